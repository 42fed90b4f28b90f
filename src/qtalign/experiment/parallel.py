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
    _Leading(cfg, log, lambda folder: _send(group, folder)).run(only, force)
    _send(group, None)  # done: the others return
    return True


class _Leading(Experiment):
    """The main process's experiment: every unit of a parallel stage is announced to the others before it runs."""

    def __init__(self, cfg, log, announce: Callable[[str], None]):
        super().__init__(cfg, log)
        self._announce = announce

    def units(self):
        units = super().units()
        for u in units:
            if u.stage in PARALLEL_STAGES:
                u.run = self._announced(u.folder, u.run)
        return units

    def _announced(self, folder: str, run):
        def go():
            self._announce(folder)
            return run()

        return go


def _follow(cfg, group) -> None:
    """Another process: run each unit the main process announces, until it says it is done. A main process that
    fails ends the launch (the launcher stops the others)."""
    exp = Experiment(cfg, log=lambda s: None)
    units = {u.folder: u for u in exp.units()}
    while (folder := _receive(group)) is not None:
        units[folder].run()


def _send(group, folder: str | None) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([folder], src=0, group=group)


def _receive(group) -> str | None:
    import torch.distributed as dist

    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
