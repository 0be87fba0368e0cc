"""Shared by every test: the tiny model config, tiny synthetic data sets, loading a tool, running train_net.

`make test` runs everything; `make test-quick` skips the tests marked `slow` (real training processes).
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# One thread per process (this one and the tools it starts) unless set: the tests' tensors are tiny, and two
# threads spinning on a shared or busy 2-core machine made some tests 10x slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ["WS_D2_CACHE"] = tempfile.mkdtemp(prefix="ws_d2_cache_")  # passed data checks: per test run

import ws_d2  # noqa: E402  (fixes and registration before any detectron2 import)
from ws_d2.data import generate_synthetic_dataset, register_synthetic_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "tests" / "configs" / "tiny_mask_rcnn_R_18_FPN.yaml")


def pytest_collection_modifyitems(items):
    """The slow tests (real training processes) first: `make test`'s workers start the longest files at once
    and fill in with the short ones, so that they finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_config() -> str:
    """The path of the tiny model's config file."""
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_cfg():
    """`tiny_cfg(*opts)`: the tiny model's (unfrozen) config with `KEY VALUE` overrides."""

    def make(*opts, freeze=False):
        return ws_d2.load_config(TINY_CONFIG, opts, freeze=freeze)

    return make


# A config of configs/ (Cascade, RetinaNet, Panoptic FPN...) at tests/configs/tiny_mask_rcnn_R_18_FPN.yaml's size:
# R-18, 32-channel FPN and heads (one GroupNorm group per channel), 3 thing classes (+1 stuff class for
# Panoptic FPN), few anchors and RoIs, no weights; every detection kept, so that comparisons have some.
TINY_FAMILY_OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "20", "MODEL.RPN.PRE_NMS_TOPK_TEST", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_family_opts():
    return list(TINY_FAMILY_OPTS)


@pytest.fixture(scope="session")
def tiny_family_cfg():
    """`tiny_family_cfg(name, *opts)`: configs/`name` (unfrozen) at TINY_FAMILY_OPTS's size, with overrides."""

    def make(name, *opts, freeze=False):
        return ws_d2.load_config(str(REPO / "configs" / name), [*TINY_FAMILY_OPTS, *opts], freeze=freeze)

    return make


@pytest.fixture(scope="session")
def tiny_dataset():
    """`tiny_dataset(root, prefix, ...)`: a tiny synthetic set (64 px) in `root`, registered as
    `{prefix}_train` / `{prefix}_val`. Returns (config overrides that use it, train_net flags that register it
    in a subprocess under the same names)."""

    def make(root, prefix, num_train=4, num_val=2, max_objects=2):
        generate_synthetic_dataset(
            root, {"train": num_train, "val": num_val}, image_size=64, max_objects=max_objects
        )
        register_synthetic_dataset(str(root), prefix, splits=("train", "val"))
        opts = ["DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)"]
        flags = []
        for split in ("train", "val"):
            annotations = os.path.join(root, "annotations", f"instances_{split}.json")
            flags += ["--coco-dataset", f"{prefix}_{split}", annotations, os.path.join(root, split)]
        return opts, flags

    return make


@pytest.fixture(scope="session")
def load_tool():
    """A tools/ script as a module (tools/ is not a package, and site-packages may hold an unrelated one)."""

    def load(name):
        spec = importlib.util.spec_from_file_location(f"ws_d2_tool_{name}", REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def export_tool(load_tool):
    """tools/export_model.py as a module: `export_deployable`, `export_stock_model`, `stock_config`."""
    return load_tool("export_model")


@pytest.fixture(autouse=True)
def fresh_tool_logging():
    """A tool's main() run in-process sets up its loggers on that test's captured streams: undo it afterwards,
    as a new process would start without them (a stale handler would write to a closed capture)."""
    import logging

    from detectron2.utils.logger import setup_logger

    names = ("detectron2", "fvcore", "demo", "ws_d2")
    before = {name: list(logging.getLogger(name).handlers) for name in names}
    yield
    for name in names:
        logging.getLogger(name).handlers = before[name]
    setup_logger.cache_clear()


@pytest.fixture(scope="session")
def convert_checkpoint(load_tool):
    """tools/convert_pretrained.py's file-to-file conversion: `convert_checkpoint(src, dst, source, config_file)`."""
    return load_tool("convert_pretrained").convert


@pytest.fixture(scope="session")
def start_train_net():
    """Start tools/train_net.py on the tiny config in a subprocess: `start(args, **popen_kwargs)`."""

    def start(args, **popen_kwargs):
        command = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", TINY_CONFIG, *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        return subprocess.Popen(command, cwd=REPO, env=env, **popen_kwargs)

    return start


@pytest.fixture
def save_initial_weights():
    """Random initial weights of a config's model as a checkpoint file, so separate runs start alike."""

    def save(cfg, path):
        from detectron2.modeling import build_model

        torch.manual_seed(0)
        torch.save({"model": build_model(cfg).state_dict()}, path)
        return str(path)

    return save


@pytest.fixture(scope="session")
def exact_step_opts():
    """Overrides under which one optimizer step is exactly the same computation however the batch is split
    into micro-batches or processes, up to float summation order.

    Every loss normalizer is then proportional to the number of images: RPN losses divide by
    RPN.BATCH_SIZE_PER_IMAGE x images, and every labelled anchor is sampled (no random subset). With no
    proposals (POST_NMS_TOPK_TRAIN 0) the RoI heads see exactly the ground-truth boxes (add_ground_truth_to_
    proposals), one per image with `max_objects=1` data, so box and mask losses average over the same RoIs
    and no proposal ranking (which float noise can reorder) is involved. One step (MAX_ITER 1), 4 images per
    step: every step sees the whole 4-image set in any order."""
    return [
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "4096", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "0",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "1",
        "SOLVER.CHECKPOINT_PERIOD", "100000", "DATASETS.TEST", "()",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def converted_backbone_features():
    """`converted_backbone_features(model, weights_file, resnet, reference_features)`: load a converted checkpoint
    into `model` (every bottom-up tensor from the file, nothing unexpected), then {stage: (ours, reference)}
    features of one image in float64, so that a comparison does not depend on the CPU's float32 kernels."""
    from ws_d2.checkpoint import WSCheckpointer

    def features(model, weights_file, resnet, reference_features):
        checkpointer = WSCheckpointer(model)
        incompatible = checkpointer._load_model(checkpointer._load_file(str(weights_file)))
        assert (
            not [k for k in incompatible.missing_keys if "bottom_up" in k]
            and not incompatible.unexpected_keys
        )
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with torch.no_grad():
            ours = model.backbone.bottom_up.double()(x)
            reference = reference_features(resnet.double().eval(), x)
        return {name: (ours[name], expected) for name, expected in reference.items()}

    return features
