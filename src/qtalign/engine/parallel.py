"""Data-parallel process state (accelerate), CPU included.

`accelerate launch --cpu` starts a single process; several CPU processes come from the torchrun-based launcher:
`accelerate launch --multi_gpu --num_processes 2 -m qtalign ...` (or `torchrun --nproc_per_node 2 -m qtalign ...`).
Without CUDA, accelerate only sets up its gloo (MULTI_CPU) backend when asked for a CPU state, which this does.
"""

from __future__ import annotations


def distributed_state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def on_main_then_share(state, fn):
    """``fn()`` on the main process only, its outcome shared with the others: its value, or the QtalignError it
    raised, raised again on every process. For what must happen once and be seen by all before they go on, such as
    claiming an output folder: a process that read the folder while the main one was writing its marker saw a
    half-claimed folder as someone else's (a race CI hit)."""
    from qtalign.errors import QtalignError

    if state.num_processes == 1:
        return fn()
    import torch.distributed as dist

    box: list = [None]
    if state.is_main_process:
        try:
            box[0] = ("ok", fn())
        except QtalignError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    outcome, value = box[0]
    if outcome == "error":
        raise QtalignError(value)
    return value


# how long the processes of a data-parallel evaluation wait for the slowest one at its end (seconds)
BARRIER_TIMEOUT_S = float(24 * 3600)


def barrier_group(state, timeout_s: float = BARRIER_TIMEOUT_S):
    """A gloo group of every process with its own timeout, made while the processes are in step (a collective call:
    every rank makes it, at the same point); None for one process."""
    if state.num_processes == 1:
        return None
    import datetime

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def finish_barrier(state, group, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait for every process however uneven their shares of the work (ranks with fewer items finish early): a
    monitored barrier on ``group`` with an explicit timeout, instead of the backend's default (NCCL: 10 minutes),
    naming the ranks that did not arrive when it runs out."""
    if group is None:
        return
    import datetime

    import torch.distributed as dist

    dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
