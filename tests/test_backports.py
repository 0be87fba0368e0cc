"""Each backport: the detectron2 feature it restores works, so removing the fix fails its test."""

import json

import numpy as np
import pytest
import torch

from ws_d2 import backports

needs_standin = pytest.mark.skipif(
    backports.HAS_COMPILED_OPS, reason="full detectron2 build: real ops are used"
)


def test_fixes_are_feature_checked():
    # Applied once at import; a second pass finds every feature present and changes nothing more, except
    # the fixes that (re)install a stand-in whenever the compiled extension is missing.
    rerun = {fix.__name__ for fix in backports._FIXES if fix()}
    reapplied = {"fix_rotated_nms", "fix_coco_evaluator_fast_impl"}
    assert rerun == (set() if backports.HAS_COMPILED_OPS else reapplied)


def test_importing_ws_d2_and_detectron2_prints_no_warning(tmp_path):  # fix_jit_script_warnings
    import subprocess
    import sys

    code = (
        "import ws_d2, torch; from detectron2.modeling import build_model; from detectron2.engine import DefaultTrainer;"
        "from detectron2.modeling.anchor_generator import _create_grid_offsets as grid;"
        "grid([8, 8], 4, 0.5, torch.device('cpu'))"  # fix_meshgrid_warning
    )
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_transforms_import_and_default_interp():  # fix_pillow_linear
    from detectron2.data.transforms import ExtentTransform

    out = ExtentTransform(src_rect=(0, 0, 8, 8), output_size=(4, 4)).apply_image(
        np.zeros((8, 8, 3), np.uint8)
    )
    assert out.shape == (4, 4, 3)


def test_class_histogram_runs(caplog):  # fix_numpy_aliases (np.int in data/build.py)
    from detectron2.data.build import print_instances_class_histogram

    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1}, {"category_id": 1}]}]
    print_instances_class_histogram(dicts, ["a", "b"])


def test_model_zoo_config_file():  # fix_pkg_resources
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert path.endswith("mask_rcnn_R_50_FPN_1x.yaml")


def test_collect_env_info():  # fix_missing_compiled_ops: default_setup prints this
    from detectron2.utils.collect_env import collect_env_info

    assert "PyTorch" in collect_env_info()


@needs_standin
def test_compiled_op_is_named():  # fix_missing_compiled_ops
    import detectron2.layers.deform_conv  # noqa: F401  (imports _C at import time)
    from detectron2 import _C

    with pytest.raises(backports.CompiledOpsMissingError, match="deform_conv_forward.*from source"):
        _C.deform_conv_forward(torch.zeros(1))


@needs_standin
def test_rotated_ops_name_missing_op():  # fix_missing_compiled_ops, fix_rotated_nms
    from detectron2.layers import batched_nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0], [6.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(backports.CompiledOpsMissingError, match="box_iou_rotated"):
        pairwise_iou_rotated(boxes, boxes)
    with pytest.raises(backports.CompiledOpsMissingError, match="nms_rotated"):
        batched_nms_rotated(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), 0.5)


def test_coco_evaluator_default_runs(tmp_path):  # fix_coco_evaluator_fast_impl
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator
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


def test_detectron2_export_imports_without_caffe2():  # fix_export_without_caffe2
    import detectron2.export
    from detectron2.export import TracingAdapter, scripting_with_instances  # noqa: F401

    model = torch.nn.Linear(2, 1)
    adapter = TracingAdapter(model, torch.ones(1, 2))
    assert torch.jit.trace(adapter, adapter.flattened_inputs)(torch.ones(1, 2))[0].shape == (1, 1)
    if "fix_export_without_caffe2" in backports.APPLIED_FIXES:
        with pytest.raises(AttributeError, match="Caffe2Tracer is unavailable: .* needs caffe2"):
            detectron2.export.Caffe2Tracer  # noqa: B018
