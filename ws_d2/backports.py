"""Every fix detectron2 v0.6 (the PyPI source drop) needs on today's libraries and without its compiled ops.

Each fix checks for the missing feature (never a version number) and does nothing where the installed
detectron2 or library already has it, so a full or newer detectron2 build keeps working unchanged.
`import ws_d2` applies them all; `APPLIED_FIXES` names the ones that were needed here. Each fix says what
retires it; deleting a fix is deleting its function and its line in `_FIXES`.
"""

import importlib.util
import sys
import types
import warnings

from .errors import WSD2Error

__all__ = ["APPLIED_FIXES", "CompiledOpsMissingError", "HAS_COMPILED_OPS", "apply_all"]

APPLIED_FIXES: list = []

BUILD_HINT = (
    "it needs detectron2's compiled extension (detectron2._C), which the PyPI source drop lacks. "
    "Build detectron2 from source (python -m pip install 'git+https://github.com/facebookresearch/detectron2.git', "
    "with a C++/CUDA toolchain), then run ws_d2 with that interpreter (make ... PYTHON=/path/to/python)."
)


class CompiledOpsMissingError(WSD2Error, RuntimeError):
    """Raised when an op that only exists in detectron2's compiled extension is called."""


def _find_spec(name):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


HAS_COMPILED_OPS = _find_spec("detectron2._C") is not None


def _compiled_ops_standin():
    """A `detectron2._C` that imports, reports itself in collect_env, and names any op that is called."""
    module = types.ModuleType("detectron2._C")
    module.__doc__ = "ws_d2 stand-in for detectron2's missing compiled extension."
    module.get_compiler_version = lambda: "none (detectron2._C not built; ws_d2 stand-in)"
    module.get_cuda_version = lambda: "none (detectron2._C not built; ws_d2 stand-in)"
    module.has_cuda = lambda: False

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing_op(*args, **kwargs):
            raise CompiledOpsMissingError(f"detectron2 op '{name}' is unavailable: {BUILD_HINT}")

        missing_op.__name__ = name
        return missing_op

    module.__getattr__ = __getattr__
    return module


def fix_missing_compiled_ops():
    # deform_conv, rotated_boxes, roi_align_rotated and fast_eval_api do `from detectron2 import _C`
    # at import time, so without it `import detectron2.modeling` fails. Retired by a detectron2 build with
    # its compiled extension (not fixed upstream: those imports are still unconditional).
    if HAS_COMPILED_OPS or "detectron2._C" in sys.modules:
        return False
    import detectron2

    detectron2._C = sys.modules["detectron2._C"] = _compiled_ops_standin()
    return True


def fix_rotated_nms():
    # layers/nms.py calls torch.ops.detectron2.nms_rotated, registered only by the compiled extension.
    # Retired, like the fix above, by a build with the compiled extension.
    if HAS_COMPILED_OPS:
        return False

    import detectron2.layers

    def nms_rotated(boxes, scores, iou_threshold):
        raise CompiledOpsMissingError(f"detectron2 op 'nms_rotated' is unavailable: {BUILD_HINT}")

    # detectron2.layers re-exports a function named `nms`, which shadows the submodule's attribute.
    nms_module = importlib.import_module("detectron2.layers.nms")
    nms_module.nms_rotated = detectron2.layers.nms_rotated = nms_rotated
    return True


def fix_pillow_linear():
    # Pillow >= 10 removed Image.LINEAR (an alias of BILINEAR); detectron2 v0.6 uses it as a default
    # argument in data/transforms/transform.py, so that module fails to import. Retired by detectron2
    # commit ff53992 (July 2023, after v0.6: Image.LINEAR -> Image.BILINEAR).
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return False
    Image.LINEAR = Image.BILINEAR
    return True


def fix_numpy_aliases():
    # numpy >= 1.24 removed np.int/np.float/np.str (aliases of the builtins), used by detectron2 v0.6 in
    # data/build.py's class histogram, sem_seg_evaluation and pascal_voc (np.bool: structures/masks.py,
    # pascal_voc_evaluation). Retired by a detectron2 release after PR #4975 ("Replace numpy aliases").
    import builtins

    import numpy as np

    with warnings.catch_warnings():  # numpy warns on probing its expired names
        warnings.simplefilter("ignore")
        missing = [name for name in ("int", "float", "str", "bool", "object") if not hasattr(np, name)]
    for name in missing:
        setattr(np, name, getattr(builtins, name))
    return bool(missing)


def fix_pkg_resources():
    # setuptools >= 81 removed pkg_resources; detectron2's model_zoo imports it for resource_filename.
    # Not fixed upstream yet (issue #5494; PR #5484 moves it to importlib.resources).
    if "pkg_resources" in sys.modules or _find_spec("pkg_resources") is not None:
        return False
    import importlib.resources

    module = types.ModuleType("pkg_resources")
    module.__doc__ = "ws_d2 stand-in: only what detectron2.model_zoo uses."

    def resource_filename(package, resource):
        return str(importlib.resources.files(package).joinpath(resource))

    module.resource_filename = resource_filename
    sys.modules["pkg_resources"] = module
    return True


def fix_coco_evaluator_fast_impl():
    # COCOEvaluator(use_fast_impl=True), its default, calls detectron2._C's COCOeval. Without it, that slot
    # gets faster-coco-eval's C++ COCOeval, which gives pycocotools' figures (tests/test_coco_eval.py) several
    # times faster (docs/EVALUATION.md); without that package, use_fast_impl is forced off (pycocotools).
    # use_fast_impl=False (TEST.FAST_COCO_EVAL False) is pycocotools either way. Retired by a build with the
    # compiled extension.
    if HAS_COMPILED_OPS:
        return False
    from detectron2.evaluation import coco_evaluation

    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        COCOeval_faster = None
    if COCOeval_faster is not None:
        coco_evaluation.COCOeval_opt = COCOeval_faster
        return True
    cls = coco_evaluation.COCOEvaluator
    if getattr(cls.__init__, "_ws_d2_no_fast_impl", False):
        return True
    original_init = cls.__init__

    def __init__(self, *args, use_fast_impl=True, **kwargs):
        original_init(self, *args, use_fast_impl=False, **kwargs)

    __init__._ws_d2_no_fast_impl = True
    __init__.__wrapped__ = original_init
    cls.__init__ = __init__
    return True


def fix_jit_script_warnings():
    # fvcore.nn (imported by detectron2.layers) and detectron2.modeling.box_regression apply torch.jit.script
    # at import time, which torch >= 2.10 answers with a FutureWarning each: import them once with exactly
    # that warning silenced. Retired when they stop scripting at import (not yet upstream).
    modules = ("fvcore.nn", "detectron2.modeling.box_regression")
    if all(name in sys.modules for name in modules):
        return False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)
        for name in modules:
            importlib.import_module(name)
    return True


def fix_meshgrid_warning():
    # detectron2's anchor generator calls torch.meshgrid without `indexing`, and torch warns at every first
    # call that the argument will be required; detectron2 relies on the default ("ij"), which is what it
    # gets. Silence exactly that notice. Retired when detectron2 passes indexing="ij".
    import inspect

    from detectron2.modeling import anchor_generator

    message = r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument"
    already = "fix_meshgrid_warning" in APPLIED_FIXES
    if already or "indexing" in inspect.getsource(anchor_generator._create_grid_offsets):
        return False
    warnings.filterwarnings("ignore", message, UserWarning)
    return True


def fix_export_without_caffe2():
    # detectron2 v0.6's export/__init__.py imports its Caffe2 exporter (export/api.py: `from caffe2.proto
    # import caffe2_pb2`) unconditionally, and torch no longer ships caffe2: `import detectron2.export` fails,
    # and with it TracingAdapter and the TorchScript helpers, which never use caffe2. Here the package is
    # created without running that __init__, with those names; the Caffe2 API names one missing line.
    # Retired by detectron2's later export/__init__.py, which imports .api only when caffe2 imports.
    if "detectron2.export" in sys.modules:
        return False
    try:
        importlib.import_module("detectron2.export")
        return False
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("caffe2"):
            raise
    for name in [m for m in sys.modules if m.startswith("detectron2.export.")]:
        del sys.modules[name]  # left over from the failed import, if any
    import detectron2

    package = importlib.util.module_from_spec(importlib.util.find_spec("detectron2.export"))
    detectron2.export = sys.modules["detectron2.export"] = package
    from detectron2.export.flatten import TracingAdapter
    from detectron2.export.torchscript import dump_torchscript_IR, scripting_with_instances

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"detectron2.export.{name} is unavailable: detectron2 v0.6's Caffe2 export needs caffe2, which "
            "today's torch no longer ships (TracingAdapter, TorchScript and ONNX export work without it)"
        )

    package.TracingAdapter = TracingAdapter
    package.dump_torchscript_IR = dump_torchscript_IR
    package.scripting_with_instances = scripting_with_instances
    package.__getattr__ = __getattr__
    package.__all__ = ["TracingAdapter", "dump_torchscript_IR", "scripting_with_instances"]
    return True


_FIXES = [
    fix_pillow_linear,
    fix_numpy_aliases,
    fix_pkg_resources,
    fix_missing_compiled_ops,
    fix_jit_script_warnings,
    fix_rotated_nms,
    fix_coco_evaluator_fast_impl,
    fix_meshgrid_warning,
    fix_export_without_caffe2,
]


def apply_all():
    for fix in _FIXES:
        if fix() and fix.__name__ not in APPLIED_FIXES:
            APPLIED_FIXES.append(fix.__name__)
    return list(APPLIED_FIXES)


# Not import-time fixes: functions that stand in for what detectron2 v0.6 lacks, called where needed.


def set_local_process_group(world_size, procs_per_machine, machine_rank):
    """Create the per-machine process groups that detectron2's `comm.get_local_rank/size` read; every rank
    must create every group, in the same order. v0.6 creates them only inside its own CUDA launcher.
    Retired by `comm.create_local_process_group` (detectron2 PR #4720)."""
    import torch.distributed as dist
    from detectron2.utils import comm

    for machine in range(world_size // procs_per_machine):
        group = dist.new_group(list(range(machine * procs_per_machine, (machine + 1) * procs_per_machine)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    import torch.distributed as dist
    from detectron2.utils import comm

    rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    set_local_process_group(world_size, procs_per_machine, machine_rank)
    comm.synchronize()
    main_func(*args)
    dist.destroy_process_group()


def launch_on_cpu(main_func, procs_per_machine, num_machines, machine_rank, dist_url, args, timeout):
    """`procs_per_machine` CPU processes on the Gloo backend: v0.6's `launch` asserts CUDA and uses NCCL.
    Retired by detectron2 PR #4720 ("Support launch() on CPU machines": Gloo when there is no GPU)."""
    import torch.multiprocessing as mp

    world_size = num_machines * procs_per_machine
    mp.spawn(
        _cpu_worker,
        nprocs=procs_per_machine,
        args=(main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def create_ddp_model(model, **kwargs):
    """detectron2's `create_ddp_model`, which pins every model to `device_ids=[local rank]`: a CPU model
    (Gloo) must get none. Not fixed upstream (issue #5146 was closed without a change)."""
    from detectron2.engine import create_ddp_model as detectron2_create_ddp_model
    from detectron2.utils import comm

    on_cuda = next(model.parameters()).device.type == "cuda"
    return detectron2_create_ddp_model(
        model, device_ids=[comm.get_local_rank()] if on_cuda else None, **kwargs
    )
