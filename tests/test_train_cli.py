"""tools/train_net.py: bad input is one clear line naming the problem; the quickstart pipeline end to end."""

import json
import subprocess

import pytest
from training_support import (
    QUICKSTART_CONFIG,
    TINY_OPTS,
    make_tiny_dataset,
    synthetic_dataset_args,
    train_net,
)

from ws_d2.engine.cli import run_cli
from ws_d2.engine.quickstart import run_quickstart


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    make_tiny_dataset(root, "cli")
    return root


def cli_error(argv):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(argv)
    message = str(exit_info.value.code)
    assert message.startswith("train_net: error: ") and "\n" not in message
    return message


def base_args(data, *opts):
    return ["--config-file", str(QUICKSTART_CONFIG), *synthetic_dataset_args(str(data)), *TINY_OPTS,
            "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)", *opts]  # fmt: skip


def test_unknown_config_key(tiny_data):
    assert "SOLVER.NOT_A_KEY" in cli_error(base_args(tiny_data, "SOLVER.NOT_A_KEY", "1"))


def test_batch_that_does_not_divide(tiny_data):
    message = cli_error(base_args(tiny_data, "SOLVER.IMS_PER_BATCH", "4", "SOLVER.ITER_SIZE", "3"))
    assert "IMS_PER_BATCH 4 does not divide" in message


def test_categories_not_matching_num_classes(tiny_data):
    message = cli_error(base_args(tiny_data, "MODEL.ROI_HEADS.NUM_CLASSES", "80"))
    assert "has 3 categories but MODEL.ROI_HEADS.NUM_CLASSES is 80" in message


def test_missing_and_malformed_dataset_files(tmp_path, tiny_data):
    missing = ["--coco-dataset", "gone", str(tmp_path / "missing.json"), str(tiny_data / "val")]
    assert "data set file not found" in cli_error(missing + ["--config-file", str(QUICKSTART_CONFIG)])
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": []}))
    bad = ["--coco-dataset", "bad", str(not_coco), str(tiny_data / "val")]
    assert "is not a COCO instances file: it lacks annotations, categories" in cli_error(bad)


def test_amp_on_cpu_is_refused(tiny_data):
    assert "SOLVER.AMP.ENABLED needs a CUDA device" in cli_error(
        base_args(tiny_data, "SOLVER.AMP.ENABLED", "True")
    )


def test_command_line_prints_one_line_not_a_traceback(tiny_data):
    process = train_net(
        synthetic_dataset_args(str(tiny_data)),
        ["SOLVER.NOT_A_KEY", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_net: error: ") and "SOLVER.NOT_A_KEY" in lines[0]


def test_quickstart_pipeline_smoke(tmp_path):
    opts = TINY_OPTS + [
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    summary = run_quickstart(
        QUICKSTART_CONFIG,
        opts,
        dataset_root=str(tmp_path / "data"),
        splits={"train": 4, "val": 2},
        demo_images=1,
    )
    assert summary["iterations_trained"] == 2
    assert set(summary["trained"]) == {"bbox", "segm"}  # box and mask AP
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["segm"].keys() == summary["trained"]["segm"].keys()
    assert (tmp_path / "out" / "inference" / "ws_d2_synthetic_val" / "coco_instances_results.json").is_file()
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert len(summary["demo_images"]) == 1  # tools/demo.py drew the val image
