"""The transformers Trainer pieces of LoRA tuning: the trainer whose loss is the response-only loss and the callback
that writes the log (trainer_log.jsonl) and shows the progress."""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from qtalign.io import disk_errors, read_jsonl, write_jsonl

STAGING = "tmp-"  # a checkpoint is written into checkpoints/tmp-checkpoint-N/ and renamed when complete

class ResponseTrainer(Trainer):
    """Trainer whose loss is the response-only loss, normalised over the target tokens of the whole
    effective batch (all micro-batches and processes), and whose validation loss is the token mean over the
    validation split (independent of the eval batch size and of the number of processes)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *a, eval_batch_size: int = 8, **kw):
        super().__init__(*a, **kw)
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch over the accumulation
        self.eval_bs = eval_batch_size
        self._staging: str | None = None  # where the checkpoint being written goes (see _save_checkpoint)

    def _run_epoch(self, *a, **kw):
        """An epoch, unless the run already made its steps: resumed from its final checkpoint (killed while the adapter
        or the summary was written), the Trainer would otherwise make one step more than max_steps."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*a, **kw)

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the Trainer's checkpoint whole or not at all: it goes into checkpoints/tmp-checkpoint-N/checkpoint-N
        and is renamed to checkpoints/checkpoint-N (one atomic rename) once every process has written its files, then
        older ones are rotated out. A kill at any point leaves no checkpoint-N or a complete one (the staging folder is
        removed by the next save or resume); a full disk is an OSError naming the checkpoint being written."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        root = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = root / f"{STAGING}{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # a staging folder left by a kill
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            with disk_errors(root / name, probe=staging):
                super()._save_checkpoint(model, trial)  # its rotation sees only the staging folder: nothing to do
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process's files (rng_state_<i>.pth) are in
        best = self.state.best_model_checkpoint == str(staging / name)
        if best:  # every process: the Trainer recorded the staging path; the best is loaded from the final one
            self.state.best_model_checkpoint = str(root / name)
        if self.args.should_save:
            with disk_errors(root / name, probe=staging):
                self._place(staging / name, root / name, best)
        self.accelerator.wait_for_everyone()

    def _place(self, staged: Path, final: Path, best: bool) -> None:
        """Rename a complete staged checkpoint into place (its state recording the final path when it is the best),
        then keep save_total_limit checkpoints as the Trainer does (the newest and the best kept)."""
        from transformers.trainer_utils import rotate_checkpoints

        if best:
            self.state.save_to_json(str(staged / "trainer_state.json"))
        for f in staged.iterdir():  # on disk before the rename (a power cut does not leave a renamed empty file)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # an incomplete one of an earlier attempt (a resume discards them; this is the fallback)
            shutil.rmtree(final)
        os.rename(staged, final)
        staged.parent.rmdir()
        rotate_checkpoints(str(final.parent), self.args.save_total_limit, self.state.best_model_checkpoint)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if hasattr(sampler, "seed"):  # BatchRebalanceSampler: the run's seed, not its fixed default
            sampler.seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                    qt_response_loss=True)
        if num_items_in_batch is None:
            loss = out.loss_sum / out.n_tokens.clamp(min=1)
        else:
            loss = out.loss_sum / torch.as_tensor(num_items_in_batch, device=out.loss_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
        return (loss, out) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        model = self.model
        was_training = model.training
        model.eval()
        rank, world = self.args.process_index, self.args.world_size
        rows = (self.eval_dataset if eval_dataset is None else eval_dataset) or []  # the validation rows (a list)
        mine = sorted(range(rank, len(rows), world), key=lambda i: -len(rows[i]["input_ids"]))
        # every rank runs the same number of forwards (a sharded model gathers its weights in each one: a rank that
        # stopped early would leave the others waiting); a rank out of rows runs a batch that is not counted
        n_batches = -(-(-(-len(rows) // world)) // self.eval_bs)
        tot = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        collate = self.data_collator
        with torch.no_grad():
            for s in range(0, n_batches * self.eval_bs, self.eval_bs):
                batch = mine[s : s + self.eval_bs]
                b = collate([rows[i] for i in batch or [0]])
                b = {k: v.to(self.args.device) for k, v in b.items()}
                out = model(**b, qt_response_loss=True)
                if batch:
                    tot[0] += out.loss_sum.double()
                    tot[1] += out.n_tokens.double()
        if world > 1:
            tot = self.accelerator.reduce(tot, reduction="sum")
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_loss": float(tot[0] / tot[1].clamp(min=1)), "epoch": self.state.epoch}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

class TrainLog(TrainerCallback):
    """trainer_log.jsonl (main process): step, loss, lr, grad_norm, tokens, tokens/s, elapsed and ETA per log;
    eval_loss per evaluation. And the progress display through qtalign.progress (a rich bar on a terminal, a line at a
    steady interval otherwise), with the latest loss; replaces the Trainer's tqdm bar."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = self.t_last = self.bar = None
        self.tok_last = self.step0 = 0
        self.info = ""

    def on_train_begin(self, args, state, control, **kw):
        from qtalign.progress import Progress

        self.bar = Progress("train", state.max_steps, unit="steps", main=state.is_world_process_zero)
        self.bar.done = state.global_step
        self.bar.__enter__()

    def on_step_begin(self, args, state, control, **kw):
        if self.t0 is None:
            self.t0 = self.t_last = time.time()
            self.tok_last = state.num_input_tokens_seen
            self.step0 = state.global_step

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.advance(1, info=self.info)

    def on_log(self, args, state, control, logs=None, **kw):
        post = [f"{k.replace('_', ' ')} {logs[k]:.4g}" for k in ("loss", "eval_loss") if isinstance((logs or {}).get(k), float)]
        if post:
            self.info = ", ".join(post)
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        rec: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "eval_loss" in logs:
            rec["eval_loss"] = logs["eval_loss"]
        elif "loss" in logs:
            t_last = self.t_last or now
            done = state.global_step - self.step0
            per_step = (now - (self.t0 or now)) / max(done, 1)
            rec.update(
                loss=logs["loss"],
                lr=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens=state.num_input_tokens_seen,
                tokens_per_s=round((state.num_input_tokens_seen - self.tok_last) / max(now - t_last, 1e-9), 1),
                elapsed_s=round(now - (self.t0 or now), 2),
                eta_s=round(per_step * (state.max_steps - state.global_step), 1),
            )
            self.t_last, self.tok_last = now, state.num_input_tokens_seen
        else:
            return
        with disk_errors(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def resume_files(trainer, path: Path) -> list[str]:
    """The files a resume of this trainer from the checkpoint folder ``path`` reads: the adapter, the optimizer and
    scheduler, every process's RNG state, the loss scaler's (fp16 on CUDA) and the Trainer's state. A checkpoint whose
    RNG files are all of another number of processes (a resume with another world size: the Trainer goes on without
    them) needs those it holds whole."""
    world = trainer.args.world_size
    rng = ["rng_state.pth"] if world <= 1 else [f"rng_state_{i}.pth" for i in range(world)]
    held = sorted(f.name for f in path.glob("rng_state*.pth"))
    if held and not set(held) & set(rng):
        rng = held
    scaler = ["scaler.pt"] if getattr(trainer.accelerator, "scaler", None) is not None else []
    return ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", *rng, *scaler,
            "trainer_state.json"]


def checkpoint_problem(path: Path, files: list[str]) -> str | None:
    """Why the checkpoint folder ``path`` (checkpoint-N) cannot be resumed from, or None when it is complete: each of
    ``files`` is there and whole. JSON files parse (trainer_state.json naming step N); a safetensors file's header
    parses and its tensors end where the file ends; a torch file is a zip archive whose every member passes its CRC
    check (torch.save's format): a cut or missing file of any of them is found."""
    step = path.name.rsplit("-", 1)[-1]
    for name in files:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        try:
            ok = _whole(f, step)
        except Exception:  # noqa: BLE001 - whatever a cut file makes the parser raise, it is not whole
            ok = False
        if not ok:
            return f"{name} is cut or unreadable"
    return None


def _whole(f: Path, step: str) -> bool:
    if f.suffix == ".json":
        doc = json.loads(f.read_text(encoding="utf-8"))
        return f.name != "trainer_state.json" or str(doc["global_step"]) == step
    if f.suffix == ".safetensors":
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end == f.stat().st_size
    with zipfile.ZipFile(f) as z:
        return z.testzip() is None


# ----------------------------------------------------------------------------------------------------------
# outputs


def read_log(path: Path) -> list[dict]:
    return list(read_jsonl(path))


def truncate_log(path: Path, step: int) -> None:
    """On resume from a checkpoint at `step` (0: starting afresh), drop the records of the lost steps after it."""
    if path.exists():
        write_jsonl(path, [r for r in read_log(path) if r["step"] <= step])


def plot_loss(log: list[dict], path: Path, title: str = "LoRA tuning") -> None:
    from qtalign.plots import pyplot, save

    plt = pyplot()
    tr = [(r["step"], r["loss"]) for r in log if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if tr:
        ax.plot(*zip(*tr), lw=1, label="train")
    if ev:
        ax.plot(*zip(*ev), "o-", lw=1.5, ms=4, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens, nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)
