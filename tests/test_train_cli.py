"""tools/train_net.py: every input it refuses is refused before a run starts, in one line naming the problem, and
loses nothing (exit 1; 2 for a usage error); the real command line prints that line, not a traceback;
tools/quickstart.py end to end."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def train_net(load_tool):
    return load_tool("train_net")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_dataset):
    """(data set root, config overrides that use it, train_net flags that register it): cli_train / cli_val."""
    root = tmp_path_factory.mktemp("cli_data")
    return root, *tiny_dataset(root, "cli")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def write_coco_set(root, category_id):
    """A valid 1-image COCO set in `root` whose one annotation has `category_id` (1 is the only category)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (90, 90, 90)).save(root / "images" / "1.png")
    annotation = {"id": 12, "image_id": 1, "category_id": category_id, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}  # fmt: skip
    content = {
        "images": [{"id": 1, "file_name": "1.png", "width": 8, "height": 8}],
        "annotations": [annotation],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "instances.json").write_text(json.dumps(content))
    return str(root / "instances.json"), str(root / "images")


def refusal_cases(tmp_path, tiny_config, tiny_data):
    """{case: (argv, exit status, what the line names)}, all with OUTPUT_DIR tmp_path/out (or under a file)."""
    root, data, data_flags = tiny_data
    (tmp_path / "text.pth").write_text("these are not weights\n")
    (tmp_path / "crafted.pkl").write_bytes(pickle.dumps({"model": _RunsCode()}))
    (tmp_path / "a_file").write_text("")

    def train(*opts, flags=(), config=tiny_config, output=tmp_path / "out"):
        # as on a command line: the flags that register the tiny set (already registered in this process:
        # the same registration again is accepted) and the opts that use it
        return ["--config-file", str(config), *data_flags, *flags, *data, "OUTPUT_DIR", str(output), *opts]

    def dataset(name, json_file, image_dir):
        return train(flags=["--coco-dataset", name, str(json_file), str(image_dir)])

    return {
        "unknown config key": (train("SOLVER.NOT_A_KEY", "1"), 1, ["SOLVER.NOT_A_KEY"]),
        "categories not matching NUM_CLASSES": (
            train("MODEL.ROI_HEADS.NUM_CLASSES", "80"), 1, ["has 3 categories but MODEL.ROI_HEADS.NUM_CLASSES is 80"]
        ),
        "data set file not found": (
            dataset("gone", tmp_path / "missing.json", root / "val"), 1, ["data set file not found", tmp_path / "missing.json"]
        ),
        "config file not found": (train(config=tmp_path / "no.yaml"), 1, ["config file not found", tmp_path / "no.yaml"]),
        "MODEL.WEIGHTS file not found": (
            train("MODEL.WEIGHTS", str(tmp_path / "absent.pth")), 1, ["MODEL.WEIGHTS file not found", tmp_path / "absent.pth"]
        ),
        "text file named .pth": (train("MODEL.WEIGHTS", str(tmp_path / "text.pth")), 1, [tmp_path / "text.pth"]),
        "crafted pickle": (train("MODEL.WEIGHTS", str(tmp_path / "crafted.pkl")), 1, [tmp_path / "crafted.pkl"]),
        "AMP on the CPU": (train("SOLVER.AMP.ENABLED", "True"), 1, ["SOLVER.AMP.ENABLED needs a CUDA device"]),
        "IMS_PER_BATCH 0": (train("SOLVER.IMS_PER_BATCH", "0"), 1, ["SOLVER.IMS_PER_BATCH"]),
        "MODEL.WS.EPS -1.0": (train("MODEL.WS.EPS", "-1.0"), 1, ["MODEL.WS.EPS"]),
        "unwritable OUTPUT_DIR": (train(output=tmp_path / "a_file" / "sub"), 1, [tmp_path / "a_file"]),
        "--num-cpu-procs -1": (["--num-cpu-procs", "-1", *train()], 2, ["--num-cpu-procs"]),
        "--num-cpu-procs two": (["--num-cpu-procs", "two", *train()], 2, ["--num-cpu-procs"]),
        "MODEL.DEVICE cuda without a GPU": (train("MODEL.DEVICE", "cuda"), 1, ["MODEL.DEVICE"]),
    }  # fmt: skip


CASES = [
    "unknown config key", "categories not matching NUM_CLASSES", "data set file not found", "config file not found",
    "MODEL.WEIGHTS file not found", "text file named .pth", "crafted pickle", "AMP on the CPU",
    "IMS_PER_BATCH 0", "MODEL.WS.EPS -1.0", "unwritable OUTPUT_DIR", "--num-cpu-procs -1", "--num-cpu-procs two",
    pytest.param("MODEL.DEVICE cuda without a GPU", marks=pytest.mark.skipif(CUDA, reason="a GPU is present")),
]  # fmt: skip


def run_refused(train_net, capsys, argv, status, *named):
    """train_net's run(argv) as its command line exits: `status`, and stderr has exactly one error line, no
    traceback, naming each of `named`. Returns that line."""
    try:
        code = train_net.run(argv)
    except SystemExit as exit_info:  # argparse's usage error
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == status, (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    if status == 1:
        assert errors[0].startswith("train_net: error: "), err
    for name in named:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def files_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("case", CASES)
def test_refused_before_a_run_starts(case, train_net, capsys, tmp_path, tiny_config, tiny_data):
    argv, status, named = refusal_cases(tmp_path, tiny_config, tiny_data)[case]
    run_refused(train_net, capsys, argv, status, *named)
    assert files_in(tmp_path / "out") == []  # nothing written: no log, config, checkpoint or metrics


@pytest.mark.parametrize("case", ["not a COCO instances file", "COCO record that cannot train"])
def test_bad_data_refused_when_loaded(case, train_net, capsys, tmp_path, tiny_config, tiny_data):
    """A COCO set is parsed when it is loaded, in the run: its bad records end it before any training step."""
    (tmp_path / "not_coco.json").write_text(json.dumps({"images": []}))
    coco_json, coco_images = write_coco_set(tmp_path / "coco", category_id=7)
    json_file, image_dir, named = {
        "not a COCO instances file": (tmp_path / "not_coco.json", tiny_data[0] / "val", ["it lacks annotations, categories"]),
        "COCO record that cannot train": (coco_json, coco_images, ["annotation id 12", "category_id 7"]),
    }[case]  # fmt: skip
    name = "bad_" + case.split()[0]
    flags = ["--coco-dataset", name, str(json_file), str(image_dir), "--config-file", tiny_config]
    opts = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")]
    run_refused(train_net, capsys, [*flags, *opts], 1, json_file, *named)
    assert not list((tmp_path / "out").glob("*.pth"))  # no training step ran


def test_finished_run_is_not_overwritten(train_net, capsys, tmp_path, tiny_config, tiny_data):
    final = tmp_path / "model_final.pth"
    final.write_bytes(b"the finished run's weights")
    argv = ["--config-file", tiny_config, *tiny_data[1], "OUTPUT_DIR", str(tmp_path)]
    assert "--resume" in run_refused(train_net, capsys, argv, 1, tmp_path, "model_final.pth")
    assert files_in(tmp_path) == ["model_final.pth"] and final.read_bytes() == b"the finished run's weights"


CONFIG_FILES = {
    "yaml syntax": (b"MODEL:\n  WS: [\n", "YAML syntax error at line 3"),
    "top level a list": (b"- MODEL\n", "not a mapping"),
    "empty": (b"", "empty config file"),
    "binary": (b"\xff\xfe\x00\x01\x89PNG", "not a UTF-8 text"),
}


@pytest.mark.parametrize("kind", CONFIG_FILES)
def test_config_file_that_is_not_a_yaml_mapping(kind, train_net, capsys, tmp_path):
    content, expected = CONFIG_FILES[kind]
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    assert expected in run_refused(train_net, capsys, ["--config-file", str(config)], 1, config)


def test_resume_refuses_truncated_checkpoint_and_garbage_last_checkpoint(
    train_net, capsys, tmp_path, tiny_config, tiny_data
):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}, "iteration": 3}, truncated / "model_0000003.pth")
    whole = (truncated / "model_0000003.pth").read_bytes()
    (truncated / "model_0000003.pth").write_bytes(whole[: len(whole) // 2])
    (truncated / "last_checkpoint").write_text("model_0000003.pth")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "last_checkpoint").write_bytes(b"\x00\xff\xfe garbage")
    for output_dir, named in [(truncated, "model_0000003.pth"), (garbage, garbage / "last_checkpoint")]:
        before = {name: (output_dir / name).read_bytes() for name in files_in(output_dir)}
        argv = ["--config-file", tiny_config, "--resume", *tiny_data[1], "OUTPUT_DIR", str(output_dir)]
        run_refused(train_net, capsys, argv, 1, named)
        assert {name: (output_dir / name).read_bytes() for name in files_in(output_dir)} == before


@pytest.mark.slow
def test_command_line_prints_one_line_not_a_traceback(start_train_net, tiny_data):
    process = start_train_net(
        [*tiny_data[2], *tiny_data[1], "SOLVER.NOT_A_KEY", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
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
