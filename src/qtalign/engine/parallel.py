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
