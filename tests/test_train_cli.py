"""tools/train_net.py: bad input is one clear line naming the problem; tools/quickstart.py end to end."""

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def train_net(load_tool):
    return load_tool("train_net")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("cli_data")
    return root, tiny_dataset(root, "cli")


def cli_error(train_net, capsys, args):
    assert train_net.run(args) == 1
    message = capsys.readouterr().err
    assert message.startswith("train_net: error: ") and message.count("\n") == 1, message
    return message


def base_args(tiny_config, tiny_data, *opts):
    _, (data_opts, data_flags) = tiny_data
    return ["--config-file", tiny_config, *data_flags, *data_opts, *opts]


def test_unknown_config_key(train_net, capsys, tiny_config, tiny_data):
    assert "SOLVER.NOT_A_KEY" in cli_error(
        train_net, capsys, base_args(tiny_config, tiny_data, "SOLVER.NOT_A_KEY", "1")
    )


def test_batch_that_does_not_divide(train_net, capsys, tiny_config, tiny_data):
    args = base_args(tiny_config, tiny_data, "SOLVER.IMS_PER_BATCH", "4", "SOLVER.ITER_SIZE", "3")
    assert "IMS_PER_BATCH 4 does not divide" in cli_error(train_net, capsys, args)


def test_categories_not_matching_num_classes(train_net, capsys, tiny_config, tiny_data):
    args = base_args(tiny_config, tiny_data, "MODEL.ROI_HEADS.NUM_CLASSES", "80")
    assert "has 3 categories but MODEL.ROI_HEADS.NUM_CLASSES is 80" in cli_error(train_net, capsys, args)


def test_missing_and_malformed_dataset_files(train_net, capsys, tmp_path, tiny_config, tiny_data):
    root, _ = tiny_data
    missing = ["--coco-dataset", "gone", str(tmp_path / "missing.json"), str(root / "val")]
    assert "data set file not found" in cli_error(train_net, capsys, missing + ["--config-file", tiny_config])
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": []}))
    bad = ["--coco-dataset", "bad", str(not_coco), str(root / "val"), "--config-file", tiny_config]
    bad += ["DATASETS.TRAIN", "('bad',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")]
    assert train_net.run(bad) == 1  # found when the set is loaded, after the run's logging has begun
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error:" in line] == [
        f"train_net: error: {not_coco} is not a COCO instances file: it lacks annotations, categories"
    ]


def test_missing_config_file_and_weights(train_net, capsys, tmp_path, tiny_config, tiny_data):
    assert "config file not found" in cli_error(
        train_net, capsys, ["--config-file", str(tmp_path / "no.yaml")]
    )
    args = base_args(tiny_config, tiny_data, "MODEL.WEIGHTS", str(tmp_path / "absent.pth"))
    assert "MODEL.WEIGHTS file not found" in cli_error(train_net, capsys, args)


def test_amp_on_cpu_is_refused(train_net, capsys, tiny_config, tiny_data):
    args = base_args(tiny_config, tiny_data, "SOLVER.AMP.ENABLED", "True")
    assert "SOLVER.AMP.ENABLED needs a CUDA device" in cli_error(train_net, capsys, args)


def test_usage_error_exits_2(train_net):
    with pytest.raises(SystemExit) as exit_info:
        train_net.run(["--num-cpu-procs", "two"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_command_line_prints_one_line_not_a_traceback(start_train_net, tiny_data):
    _, (data_opts, data_flags) = tiny_data
    process = start_train_net(
        [*data_flags, *data_opts, "SOLVER.NOT_A_KEY", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_net: error: ") and "SOLVER.NOT_A_KEY" in lines[0]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, repo_root, tiny_config):
    output = tmp_path / "out"
    command = [sys.executable, str(repo_root / "tools" / "quickstart.py"), "--config-file", tiny_config,
               "--dataset-root", str(tmp_path / "data"), "--num-images", "4", "2", "--demo-images", "1",
               "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(output)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((output / "quickstart_summary.json").read_text())
    assert summary["iterations_trained"] == 2
    assert set(summary["trained"]) == {"bbox", "segm"}  # box and mask AP
    saved = json.loads((output / "eval_results.json").read_text())
    assert saved["segm"].keys() == summary["trained"]["segm"].keys()
    assert (output / "inference" / "ws_d2_synthetic_val" / "coco_instances_results.json").is_file()
    assert (output / "model_final.pth").is_file()
    assert [p.name for p in (output / "demo").iterdir()] == ["000001.png"]  # the drawn val image
    assert "box AP" in done.stdout and "mask AP" in done.stdout
