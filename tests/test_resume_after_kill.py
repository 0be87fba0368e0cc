"""kill -9 a real training process at several moments; --resume continues from the last complete checkpoint."""

import os
import re
import signal
import subprocess
import time

import pytest

from ws_d2.checkpoint import load_checkpoint_file

pytestmark = pytest.mark.slow

MAX_ITER = 8
OPTS = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "1",
        "DATASETS.TEST", "()"]  # fmt: skip


def start(start_train_net, flags, opts, output_dir, log_path):
    with open(log_path, "w") as log:
        args = [*flags, *opts, *OPTS, "OUTPUT_DIR", str(output_dir)]
        return start_train_net(args, stdout=log, stderr=subprocess.STDOUT)


def kill_when(process, condition, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "training ended before the kill"
        assert time.monotonic() < deadline, "timed out waiting for the kill moment"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


def last_complete_checkpoint(output_dir):
    """The checkpoint `last_checkpoint` names, which must load completely; returns (name, iteration)."""
    with open(output_dir / "last_checkpoint") as f:
        name = f.read().strip()
    return name, load_checkpoint_file(str(output_dir / name))["iteration"]


def checkpoints(output_dir):
    return sorted(p for p in os.listdir(output_dir) if re.fullmatch(r"model_\d+\.pth", p))


def test_resume_after_sigkill_at_several_moments(tmp_path, tiny_dataset, start_train_net):
    data_opts, flags = tiny_dataset(tmp_path / "data", "resume", num_train=4)
    output = tmp_path / "output"
    output.mkdir()
    moments = [
        # right after the first checkpoint is complete (and usually while the next step runs)
        lambda: len(checkpoints(output)) >= 1 and (output / "last_checkpoint").exists(),
        # while a checkpoint is being written: its temporary file exists (polled every 2 ms)
        lambda: any(p.endswith(".tmp") for p in os.listdir(output)) and len(checkpoints(output)) >= 3,
        # at an arbitrary later moment
        lambda: len(checkpoints(output)) >= 5,
    ]
    resumed_from = None
    for index, moment in enumerate(moments):
        log_path = tmp_path / f"run{index}.log"
        kill_when(
            start(start_train_net, flags + (["--resume"] if index else []), data_opts, output, log_path),
            moment,
        )
        if resumed_from is not None:
            assert_resumed_from(log_path, *resumed_from)
        resumed_from = last_complete_checkpoint(output)
    log_path = tmp_path / "final.log"
    process = start(start_train_net, flags + ["--resume"], data_opts, output, log_path)
    assert process.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    assert_resumed_from(log_path, *resumed_from)
    name, iteration = last_complete_checkpoint(output)
    assert (name, iteration) == ("model_final.pth", MAX_ITER - 1)


def assert_resumed_from(log_path, name, iteration):
    log = log_path.read_text()
    loaded = re.findall(r"\[Checkpointer\] Loading from (\S+) \.\.\.", log)
    assert [os.path.basename(path) for path in loaded] == [name], loaded
    assert f"Starting training from iteration {iteration + 1}" in log, log[-3000:]
