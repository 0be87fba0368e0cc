"""A real training process killed at any moment, and killed in the middle of writing a checkpoint, leaves a
`last_checkpoint` that names a complete checkpoint, and --resume continues from it to the end."""

import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest

from ws_d2.checkpoint import load_checkpoint_file

pytestmark = pytest.mark.slow

MAX_ITER = 4
OPTS = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "1",
        "DATASETS.TEST", "()"]  # fmt: skip
# Runs tools/train_net.py (argv[1]) as `python tools/train_net.py ...` does, with SIGXFSZ at its default
# action, which Python otherwise ignores: then the kernel kills the process, as kill -9 does (no cleanup code
# runs), at the very write() that takes a file past the RLIMIT_FSIZE limit.
AS_SCRIPT_KILLED_AT_FILE_SIZE = (
    "import os, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); sys.argv = sys.argv[1:]; "
    "sys.path[0] = os.path.dirname(sys.argv[0]); runpy.run_path(sys.argv[0], run_name='__main__')"
)


def start(repo_root, tiny_config, args, log_path, file_size_limit=None):
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    train_net = str(repo_root / "tools" / "train_net.py")
    command = [
        sys.executable,
        "-c",
        AS_SCRIPT_KILLED_AT_FILE_SIZE,
        train_net,
        "--config-file",
        tiny_config,
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=limit_file_size if file_size_limit else None,
        )  # fmt: skip


def last_complete_checkpoint(output_dir):
    """The checkpoint `last_checkpoint` names, which must load completely; returns (name, iteration)."""
    name = (output_dir / "last_checkpoint").read_text().strip()
    return name, load_checkpoint_file(str(output_dir / name))["iteration"]


def checkpoints(output_dir):
    return sorted(p for p in os.listdir(output_dir) if re.fullmatch(r"model_\d+\.pth", p))


def temporary_files(output_dir):
    return [
        p for p in os.listdir(output_dir) if p.startswith(".") and ".tmp" in p
    ]  # .<name>.<random>.tmp<ext>


def assert_resumed_from(log_path, name, iteration):
    log = log_path.read_text()
    loaded = re.findall(r"\[Checkpointer\] Loading from (\S+) \.\.\.", log)
    assert [os.path.basename(path) for path in loaded] == [name], loaded
    assert f"Starting training from iteration {iteration + 1}" in log, log[-3000:]


def test_resume_after_kill_at_any_moment_and_mid_save(tmp_path, tiny_dataset, repo_root, tiny_config):
    data_opts, flags = tiny_dataset(tmp_path / "data", "resume", num_train=4)
    output = tmp_path / "output"
    args = [*flags, *data_opts, *OPTS, "OUTPUT_DIR", str(output)]

    # 1. kill -9 at whatever the run is doing once its first checkpoint is complete
    process = start(repo_root, tiny_config, args, tmp_path / "run1.log")
    while not (output / "last_checkpoint").exists():
        assert process.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=600) == -signal.SIGKILL, "training ended before the kill"
    resumed_from = last_complete_checkpoint(output)
    assert resumed_from[1] < MAX_ITER - 1

    # 2. --resume, killed half-way through writing its first checkpoint: it may grow to half a checkpoint
    size = (output / checkpoints(output)[0]).stat().st_size
    assert size > 1_000_000  # far above the log, metrics and config files the run also writes
    left_before = set(temporary_files(output))  # (the kill -9 above may have landed mid-save too)
    process = start(
        repo_root, tiny_config, ["--resume", *args], tmp_path / "run2.log", file_size_limit=size // 2
    )
    assert process.wait(timeout=600) == -signal.SIGXFSZ, (tmp_path / "run2.log").read_text()[-3000:]
    assert_resumed_from(tmp_path / "run2.log", *resumed_from)
    partial = sorted(set(temporary_files(output)) - left_before)
    assert len(partial) == 1 and partial[0].startswith(".model_"), partial  # killed mid-save, left in place
    assert 0 < (output / partial[0]).stat().st_size <= size // 2
    assert last_complete_checkpoint(output) == resumed_from  # still the complete one

    # 3. --resume runs to the end from that checkpoint
    process = start(repo_root, tiny_config, ["--resume", *args], tmp_path / "final.log")
    assert process.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert_resumed_from(tmp_path / "final.log", *resumed_from)
    assert last_complete_checkpoint(output) == ("model_final.pth", MAX_ITER - 1)
