"""Each compat patch: the detectron2 feature it restores works, and a build that has the feature is left alone."""

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from ws_d2 import compat
from ws_d2.predictor import tracing_quietly

LEAK_CHECK = r"""
import sys, warnings
import numpy, PIL.Image, torch, detectron2

def state():
    aliases = [name for name in ("int", "float", "str", "bool", "object") if name in vars(numpy)]
    return aliases, hasattr(PIL.Image, "LINEAR"), sys.modules.get("pkg_resources"), list(warnings.filters)

before = state()
import ws_d2
from detectron2 import model_zoo
from detectron2.data.transforms import ExtentTransform
after = state()
assert after[:3] == before[:3], (before[:3], after[:3])
new_filters = [f for f in after[3] if f not in before[3]]
assert all(f[3] is not None and f[3].pattern == r"torch\.functional" for f in new_filters), new_filters
"""


def test_import_changes_nothing_outside_detectron2():
    # a fresh process: numpy's aliases, Pillow's LINEAR, sys.modules' pkg_resources as before `import ws_d2`,
    # and no warnings filter beyond torch.functional's meshgrid notice, also where detectron2 needs the patches
    done = subprocess.run([sys.executable, "-c", LEAK_CHECK], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_importing_ws_d2_and_detectron2_prints_no_warning():  # apply_all's jit.script filter, the meshgrid filter
    code = (
        "import ws_d2, torch; from detectron2.modeling import build_model; from detectron2.engine import DefaultTrainer;"
        "from detectron2.modeling.anchor_generator import DefaultAnchorGenerator as A;"
        "A(sizes=[[8]], aspect_ratios=[[1.0]], strides=[4])([torch.zeros(1, 1, 8, 8)])"
    )
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_transforms_import_and_default_interp():  # import_transforms_with_pillow_linear
    from detectron2.data.transforms import ExtentTransform

    out = ExtentTransform(src_rect=(0, 0, 8, 8), output_size=(4, 4)).apply_image(
        np.zeros((8, 8, 3), np.uint8)
    )
    assert out.shape == (4, 4, 3)


def test_class_histogram_runs():  # give_numpy_aliases_to_detectron2 (np.int in v0.6's data/build.py)
    from detectron2.data.build import print_instances_class_histogram

    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1}, {"category_id": 1}]}]
    print_instances_class_histogram(dicts, ["a", "b"])


def test_model_zoo_config_file():  # import_model_zoo_with_pkg_resources
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert path.endswith("mask_rcnn_R_50_FPN_1x.yaml")


def test_collect_env_info():  # stand_in_for_compiled_ops: default_setup prints this
    from detectron2.utils.collect_env import collect_env_info

    assert "PyTorch" in collect_env_info()


def test_compiled_ops_are_detectron2s_or_named_missing():  # stand_in_for_compiled_ops, name_missing_nms_rotated
    from detectron2 import _C
    from detectron2.layers import batched_nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0], [6.0, 5.0, 4.0, 4.0, 0.0]])
    scores, classes = torch.tensor([0.9, 0.8]), torch.tensor([0, 0])
    if compat.HAS_COMPILED_OPS:  # the build's own ops, untouched
        assert "stand-in" not in (_C.__doc__ or "")
        assert pairwise_iou_rotated(boxes, boxes).diagonal().tolist() == pytest.approx([1.0, 1.0])
        assert batched_nms_rotated(boxes, scores, classes, 0.5).tolist() == [0]
        return
    with pytest.raises(
        compat.CompiledOpsMissingError, match="deform_conv_forward.*build detectron2 from source"
    ):
        _C.deform_conv_forward(torch.zeros(1))
    with pytest.raises(compat.CompiledOpsMissingError, match="box_iou_rotated"):
        pairwise_iou_rotated(boxes, boxes)
    with pytest.raises(compat.CompiledOpsMissingError, match="nms_rotated"):
        batched_nms_rotated(boxes, scores, classes, 0.5)


def test_coco_evaluator_default_runs(tmp_path):  # use_faster_coco_eval
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator, coco_evaluation
    from detectron2.structures import Boxes, Instances

    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    name = "compat_coco_eval_test"
    register_coco_instances(name, {}, str(tmp_path / "ann.json"), str(tmp_path))
    DatasetCatalog.get(name)  # sets the category id mapping, as the test loader would
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"))  # default use_fast_impl
    evaluator.reset()
    inst = Instances((32, 32))
    inst.pred_boxes = Boxes(torch.tensor([[4.0, 4.0, 14.0, 14.0]]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([0])
    evaluator.process([{"image_id": 1}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    # detectron2's compiled COCOeval where the build has it
    own = coco_evaluation.COCOeval_opt.__module__ == "detectron2.evaluation.fast_eval_api"
    assert own == compat.HAS_COMPILED_OPS


def test_detectron2_export_imports_without_caffe2():  # import_export_without_caffe2
    import detectron2.export
    from detectron2.export import TracingAdapter, scripting_with_instances  # noqa: F401

    model = torch.nn.Linear(2, 1)
    adapter = TracingAdapter(model, torch.ones(1, 2))
    assert torch.jit.trace(adapter, adapter.flattened_inputs)(torch.ones(1, 2))[0].shape == (1, 1)
    # detectron2's own export/__init__.py ran (it defines add_export_config) unless the patch was needed
    assert hasattr(detectron2.export, "add_export_config") != (
        "import_export_without_caffe2" in compat.APPLIED
    )


def test_cascade_scales_gradients_in_training():  # skip_scale_gradient_when_tracing: only while tracing
    from detectron2.modeling.roi_heads import cascade_rcnn

    x = torch.ones(2, requires_grad=True)
    cascade_rcnn._ScaleGradient.apply(x, 0.5).sum().backward()
    assert x.grad.tolist() == [0.5, 0.5]  # its tracing: tests/test_deploy.py exports Cascade Mask R-CNN


def test_dense_detector_candidate_cap_survives_tracing():  # clamp_candidates_when_tracing
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.meta_arch.dense_detector import DenseDetector
    from detectron2.structures import Boxes

    detector = types.SimpleNamespace(box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)))

    def decode(scores, boxes):  # every score above the threshold 0; at most 5 candidates kept
        level = DenseDetector._decode_per_level_predictions
        return level(detector, Boxes(boxes), scores, boxes, 0.0, 5, (8, 8)).scores

    with tracing_quietly():
        traced = torch.jit.trace(decode, (torch.rand(3, 1), torch.zeros(3, 4)))  # 3 candidates: fewer than 5
    assert len(traced(torch.rand(8, 1), torch.zeros(8, 4))) == 5  # not 8: the cap is in the graph
