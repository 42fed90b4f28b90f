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
