"""ws_d2.engine.launch in this process: as the torchrun worker it already is, and what it refuses before starting
anything. Spawned Gloo workers: test_launch_gloo.py."""

import os
import socket

import pytest
import torch.distributed as dist
from detectron2.utils import comm

from ws_d2.engine import launch
from ws_d2.engine.launch import TORCHRUN_VARIABLES


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun_env(monkeypatch):
    """`torchrun_env(world_size, local_world_size)`: this process as rank 0 of a torchrun job."""
    monkeypatch.setattr(comm, "_LOCAL_PROCESS_GROUP", comm._LOCAL_PROCESS_GROUP)  # restored afterwards

    def set_env(world_size, local_world_size):
        env = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        env.update(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(local_world_size))
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_torchrun_worker_runs_in_this_process_in_its_process_groups(torchrun_env):
    torchrun_env(1, 1)
    seen = []

    def main(tag):
        local = (comm.get_local_rank(), comm.get_local_size())  # detectron2 asserts its local group exists
        seen.append((tag, os.getpid(), dist.get_backend(), comm.get_world_size(), local))

    # torchrun's environment decides the job, not the arguments
    launch(main, num_procs_per_machine=4, args=("step",), use_cuda=False)
    assert seen == [("step", os.getpid(), "gloo", 1, (0, 1))]
    assert not dist.is_initialized()  # the group is destroyed when main_func returns


def test_torchrun_job_whose_machines_differ_in_size_is_refused(torchrun_env):
    torchrun_env(3, 2)
    with pytest.raises(RuntimeError, match="^WORLD_SIZE 3 is not a multiple of LOCAL_WORLD_SIZE 2$"):
        launch(print, 2, use_cuda=False)
    assert not dist.is_initialized()


def test_several_machines_without_dist_url_are_refused(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="several machines need an explicit dist_url"):
        launch(print, 2, num_machines=2, dist_url="auto", use_cuda=False)
