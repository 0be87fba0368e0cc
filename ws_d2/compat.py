"""What older detectron2 builds (v0.6's PyPI drop, without compiled ops) need on today's libraries: each patch
checks detectron2's source for the feature (never a version) and names the upstream change that retires it."""

import builtins
import importlib.util
import os
import sys
import types
import warnings

from .errors import WSD2Error

__all__ = ["APPLIED", "HAS_COMPILED_OPS", "LAUNCH_STARTS_GLOO", "CompiledOpsMissingError", "apply_all"]

APPLIED: list = []
BUILD_HINT = (
    "it needs detectron2's compiled extension (detectron2._C), which the PyPI source drop lacks: build detectron2 "
    "from source (pip install 'git+https://github.com/facebookresearch/detectron2.git') and run ws_d2 with it"
)


class CompiledOpsMissingError(WSD2Error, RuntimeError):
    """Raised when an op that only exists in detectron2's compiled extension is called."""


def _find_spec(name):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _source(path):
    """The text of detectron2's file `path` (e.g. "data/build.py"), not imported; "" if absent."""
    spec = _find_spec("detectron2")
    try:
        with open(os.path.join(spec.submodule_search_locations[0], path), encoding="utf-8") as f:
            return f.read()
    except (AttributeError, TypeError, OSError):
        return ""


def _import_while(module_name, namespace, key, value):
    namespace[key] = value
    try:
        importlib.import_module(module_name)
    finally:
        del namespace[key]


HAS_COMPILED_OPS = _find_spec("detectron2._C") is not None
LAUNCH_STARTS_GLOO = "gloo" in _source("engine/launch.py").lower()


def import_transforms_with_pillow_linear():
    # Pillow >= 10 removed Image.LINEAR, a default argument in v0.6's transform.py: it exists only while that
    # module imports. Retired by detectron2 commit ff53992 (Image.LINEAR -> Image.BILINEAR).
    from PIL import Image

    if hasattr(Image, "LINEAR") or "Image.LINEAR" not in _source("data/transforms/transform.py"):
        return False
    _import_while("detectron2.data.transforms.transform", vars(Image), "LINEAR", Image.BILINEAR)
    return True


NUMPY_ALIAS_USERS = ("data/build.py", "data/datasets/pascal_voc.py", "evaluation/sem_seg_evaluation.py",
                     "evaluation/pascal_voc_evaluation.py", "structures/masks.py", "utils/visualizer.py",
                     "utils/video_visualizer.py")  # fmt: skip


def give_numpy_aliases_to_detectron2():
    # numpy >= 1.24 removed np.int/float/str (np.bool until 2.0), which v0.6 calls: those modules get a view
    # of numpy with them, numpy stays as it is. Retired by detectron2 PR #4975 (numpy aliases).
    import re

    import numpy

    missing = [name for name in ("int", "float", "str", "bool") if name not in vars(numpy)]
    uses = re.compile(rf"\bnp\.({'|'.join(missing)})\b")
    users = [path for path in NUMPY_ALIAS_USERS if missing and uses.search(_source(path))]
    view = types.ModuleType("numpy", "numpy, plus the aliases detectron2 v0.6 calls")
    vars(view).update({name: getattr(builtins, name) for name in missing})
    view.__getattr__ = lambda name: getattr(numpy, name)
    for path in users:
        module = importlib.import_module("detectron2." + path[:-3].replace("/", "."))
        if module.np is numpy:
            module.np = view
    return bool(users)


def import_model_zoo_with_pkg_resources():
    # setuptools >= 81 removed pkg_resources, which model_zoo imports (main too): a stand-in only while it
    # imports. Retired by detectron2 PR #5484 (importlib.resources instead).
    import importlib.resources

    if _find_spec("pkg_resources") or "import pkg_resources" not in _source("model_zoo/model_zoo.py"):
        return False
    standin = types.ModuleType("pkg_resources", "ws_d2 stand-in: what detectron2.model_zoo uses")
    standin.resource_filename = lambda package, path: str(importlib.resources.files(package).joinpath(path))
    _import_while("detectron2.model_zoo.model_zoo", sys.modules, "pkg_resources", standin)
    return True


def stand_in_for_compiled_ops():
    # several modules import detectron2._C at import time: a stand-in that names a missing op when called.
    # Retired by a build with the compiled extension (those imports are still unconditional upstream).
    if HAS_COMPILED_OPS or "detectron2._C" in sys.modules:
        return False
    import detectron2

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing_op(*args, **kwargs):
            raise CompiledOpsMissingError(f"detectron2 op '{name}' is unavailable: {BUILD_HINT}")

        return missing_op

    standin = types.ModuleType("detectron2._C", "ws_d2 stand-in for detectron2's missing compiled extension")
    standin.get_compiler_version = standin.get_cuda_version = lambda: "none (detectron2._C not built)"
    standin.has_cuda = lambda: False
    standin.__getattr__ = __getattr__
    detectron2._C = sys.modules["detectron2._C"] = standin
    return True


def name_missing_nms_rotated():
    # layers/nms.py calls torch.ops.detectron2.nms_rotated, which only the compiled extension registers
    if HAS_COMPILED_OPS:
        return False
    import detectron2.layers

    # detectron2.layers re-exports a function named `nms`, which shadows the submodule's attribute
    nms_module = importlib.import_module("detectron2.layers.nms")
    nms_module.nms_rotated = detectron2.layers.nms_rotated = detectron2._C.nms_rotated  # the stand-in's
    return True


def use_faster_coco_eval():
    # COCOEvaluator's default fast path is detectron2._C's COCOeval; else faster-coco-eval's (pycocotools'
    # figures, docs/EVALUATION.md), else pycocotools'. Retired by a build with _C.
    if HAS_COMPILED_OPS:
        return False
    from detectron2.evaluation import coco_evaluation

    try:
        from faster_coco_eval import COCOeval_faster as fast_coco_eval
    except ImportError:
        from pycocotools.cocoeval import COCOeval as fast_coco_eval
    coco_evaluation.COCOeval_opt = fast_coco_eval
    return True


def filter_meshgrid_notice():
    # the anchor generator relies on torch.meshgrid's default indexing ("ij"); the notice is attributed to
    # torch.functional, the filter's scope. Retired when detectron2 passes indexing="ij".
    message = r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument"
    if "indexing" in _source("modeling/anchor_generator.py"):
        return False
    warnings.filterwarnings("ignore", message, UserWarning, module=r"torch\.functional")
    return True


def import_export_without_caffe2():
    # v0.6's export/__init__.py imports its Caffe2 exporter, and torch no longer ships caffe2: the package is
    # made with the names that need none. Retired by main's export/__init__.py (.api only if caffe2 imports).
    if "detectron2.export" in sys.modules:
        return False
    try:
        importlib.import_module("detectron2.export")
        return False
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("caffe2"):
            raise
    for name in [m for m in sys.modules if m.startswith("detectron2.export.")]:
        del sys.modules[name]  # left over from the failed import
    import detectron2

    package = importlib.util.module_from_spec(importlib.util.find_spec("detectron2.export"))
    detectron2.export = sys.modules["detectron2.export"] = package
    from detectron2.export.flatten import TracingAdapter
    from detectron2.export.torchscript import dump_torchscript_IR, scripting_with_instances

    package.TracingAdapter, package.scripting_with_instances = TracingAdapter, scripting_with_instances
    package.dump_torchscript_IR = dump_torchscript_IR
    return True


def skip_scale_gradient_when_tracing():
    # v0.6's CascadeROIHeads applies _ScaleGradient (a Python autograd Function a trace cannot hold) at
    # inference too. Retired by main's cascade_rcnn.py: only `if self.training`.
    source = _source("modeling/roi_heads/cascade_rcnn.py")
    if "if self.training:\n            box_features = _ScaleGradient" in source:
        return False
    import torch
    from detectron2.modeling.roi_heads import cascade_rcnn

    scale = cascade_rcnn._ScaleGradient.apply
    cascade_rcnn._ScaleGradient = types.SimpleNamespace(
        apply=lambda x, factor: x if torch.jit.is_tracing() else scale(x, factor)
    )
    return True


def clamp_candidates_when_tracing():
    # v0.6's DenseDetector caps each level's candidates with min(1000, count), which a trace freezes (no cap
    # where the traced image had fewer). Retired by detectron2 PR #4835 (torch.clamp).
    if "min(topk_candidates, topk_idxs.size(0))" not in _source("modeling/meta_arch/dense_detector.py"):
        return False
    import torch
    from detectron2.modeling.meta_arch import dense_detector

    def min_in_graph(cap, count):  # `count` is a tensor while tracing, an int otherwise
        return torch.clamp(count, max=cap) if isinstance(count, torch.Tensor) else min(cap, count)

    dense_detector.min = min_in_graph  # the module's only call of min()
    return True


# in this order: detectron2.layers needs detectron2._C, and detectron2.data Image.LINEAR
PATCHES = [
    stand_in_for_compiled_ops,
    import_transforms_with_pillow_linear,
    name_missing_nms_rotated,
    give_numpy_aliases_to_detectron2,
    import_model_zoo_with_pkg_resources,
    use_faster_coco_eval,
    import_export_without_caffe2,
    skip_scale_gradient_when_tracing,
    clamp_candidates_when_tracing,
]


def apply_all():
    """Apply every patch the installed detectron2 needs, each once; returns the names of those applied."""
    with warnings.catch_warnings():
        # torch >= 2.10 warns at fvcore's and box_regression's import-time torch.jit.script (not yet fixed)
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)
        applied = [patch.__name__ for patch in PATCHES if patch()]
        importlib.import_module("detectron2.modeling")
    if filter_meshgrid_notice():  # a lasting filter: outside catch_warnings
        applied.append(filter_meshgrid_notice.__name__)
    APPLIED.extend(name for name in applied if name not in APPLIED)
    return list(APPLIED)


def create_local_process_group(num_workers_per_machine):
    """For ws_d2.engine.launch (not applied at import): the per-machine groups comm.get_local_rank/size read,
    made by every rank (v0.6: only in its CUDA launcher). Retired by comm.create_local_process_group."""
    import torch.distributed as dist
    from detectron2.utils import comm

    n = num_workers_per_machine
    for machine in range(dist.get_world_size() // n):
        group = dist.new_group(list(range(machine * n, (machine + 1) * n)))
        if machine == dist.get_rank() // n:
            comm._LOCAL_PROCESS_GROUP = group
