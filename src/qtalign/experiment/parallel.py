"""`qtalign run` under several processes (`accelerate launch -m qtalign run ...`, `torchrun -m qtalign run ...`).

The main process owns the run dir: it plans, claims, skips, withdraws and records exactly as a single process does
(experiment/runner.py). The stages that run on every process are training (DDP: each process takes its share of
every batch) and evaluation (data-parallel: each process scores its share of the items); before the main process
runs one of them it tells the others which unit, and they run that unit beside it (the stages' own code shares the
output folder's claim and waits for every process at the end). The other stages (data, lens, geometry, report) run on
the main process alone while the others wait for the next unit. Arms and seeds run one process at a time.
"""

from __future__ import annotations

from typing import Callable

from qtalign.errors import QtalignError
from qtalign.experiment.runner import Experiment, run_experiments

# the stages every process runs (the others: the main process alone)
PARALLEL_STAGES = ("train", "eval")


def run_processes(cfg, only: list[str] | None = None, force: list[str] | None = None,
                  log: Callable[[str], None] | None = None) -> bool:
    """Run the experiment here, one process or several; True on the process that owns the run dir (the one that
    reports), False on the others."""
    from qtalign.engine.parallel import barrier_group, distributed_state

    state = distributed_state()
    if state.num_processes == 1:
        run_experiments(cfg, only, force, log)
        return True
    if cfg.arms or cfg.seeds:
        raise QtalignError(f"{cfg.name}: arms and seeds run under one process; under {state.num_processes} processes "
                           "run one arm x seed at a time (their run configs: --print-config)")
    group = barrier_group(state)  # the units are announced on a group that waits as long as a stage may take
    if not state.is_main_process:
        _follow(cfg, group)
        return False
    _Leading(cfg, log, lambda msg: _send(group, msg)).run(only, force)
    _send(group, None)  # done: the others return
    return True


class _Leading(Experiment):
    """The main process's experiment: a unit of a parallel stage is announced to the others (its folder and the
    fingerprints of what it reads) just before it runs here; a skipped unit is not announced."""

    def __init__(self, cfg, log, announce: Callable[[tuple], None]):
        super().__init__(cfg, log)
        self._announce = announce

    def execute(self, u, inputs) -> None:
        if u.stage in PARALLEL_STAGES:
            self._announce((u.folder, inputs.fingerprints))
        super().execute(u, inputs)


def _follow(cfg, group) -> None:
    """Another process: run each unit the main process announces, until it says it is done. A main process that
    fails ends the launch (the launcher stops the others)."""
    exp = Experiment(cfg, log=lambda s: None)
    units = {u.folder: u for u in exp.units()}  # planned as the main process plans them
    while (msg := _receive(group)) is not None:
        folder, fps = msg
        exp.execute(units[folder], exp.inputs(units[folder], fps))


def _send(group, msg: tuple | None) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([msg], src=0, group=group)


def _receive(group) -> tuple | None:
    import torch.distributed as dist

    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
