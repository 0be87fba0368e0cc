"""Training in one process, N processes on one or several machines (NCCL or Gloo), or as a torchrun worker."""

import os
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from .. import compat

# detectron2 main's own; v0.6 lacks it
create_local_process_group = getattr(comm, "create_local_process_group", compat.create_local_process_group)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class WorkerDied(ChildProcessError):
    """A worker process was killed by a signal or exited with a nonzero code."""


def launched_by_torchrun():
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def _run_in_process_group(main_func, args, procs_per_machine, backend, timeout, **init):
    dist.init_process_group(backend, timeout=timeout, **init)
    create_local_process_group(procs_per_machine)
    comm.synchronize()
    main_func(*args)
    dist.destroy_process_group()


def _run_torchrun_worker(main_func, args, use_cuda, timeout):
    world_size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    procs_per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % procs_per_machine:
        raise RuntimeError(
            f"WORLD_SIZE {world_size} is not a multiple of LOCAL_WORLD_SIZE {procs_per_machine}"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    _run_in_process_group(main_func, args, procs_per_machine, backend, timeout, init_method="env://")


def _gloo_worker(
    local_rank, main_func, args, procs_per_machine, num_machines, machine_rank, dist_url, timeout
):
    rank = machine_rank * procs_per_machine + local_rank
    init = {"init_method": dist_url, "world_size": num_machines * procs_per_machine, "rank": rank}
    _run_in_process_group(main_func, args, procs_per_machine, "gloo", timeout, **init)


def _launch_on_cpu(main_func, procs_per_machine, num_machines, machine_rank, dist_url, args, timeout):
    """detectron2's `launch` for CPU processes on Gloo, which v0.6's cannot start (it asserts CUDA, uses NCCL).
    Retired by detectron2 PR #4720 ("Support launch() on CPU machines": Gloo when there is no GPU)."""
    worker_args = (main_func, args, procs_per_machine, num_machines, machine_rank, dist_url, timeout)
    mp.start_processes(_gloo_worker, nprocs=procs_per_machine, args=worker_args, daemon=False)


def launch(
    main_func,
    num_procs_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    use_cuda=None,
    timeout=DEFAULT_TIMEOUT,
):
    """Run `main_func(*args)` in every process of the job (under torchrun: of its environment). A worker that
    dies raises WorkerDied naming it; one that raises, ChildProcessError with its exception's line."""
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if launched_by_torchrun():
        return _run_torchrun_worker(main_func, args, use_cuda, timeout)
    if num_machines * num_procs_per_machine <= 1:
        return main_func(*args)
    if use_cuda:
        launcher = detectron2_launch
    else:  # detectron2's own launch where it picks Gloo without a GPU (main); v0.6's asserts CUDA
        launcher = detectron2_launch if compat.LAUNCH_STARTS_GLOO else _launch_on_cpu
        if dist_url in (None, "auto"):
            if num_machines > 1:
                raise ValueError("several machines need an explicit dist_url reachable by all of them")
            dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    hide_gpus = {} if use_cuda else {"CUDA_VISIBLE_DEVICES": ""}  # CPU workers see none, also where there are
    try:
        with mock.patch.dict(os.environ, hide_gpus):
            launcher(main_func, num_procs_per_machine, num_machines, machine_rank, dist_url, args, timeout)
    except ProcessExitedException as e:  # the other workers are stopped by then
        how = f"killed by signal {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        raise WorkerDied(f"worker {e.error_index} (pid {e.error_pid}) was {how}") from None
    except ProcessRaisedException as e:  # its message ends in the worker's exception line: "module.Type: ..."
        raise ChildProcessError(f"worker {e.error_index}: {e.msg.strip().splitlines()[-1]}") from None
