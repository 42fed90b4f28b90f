"""The transformers Trainer pieces of LoRA tuning: the trainer whose loss is the response-only loss, the log callback
(trainer_log.jsonl) and the progress display."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from qtalign.io import read_jsonl, write_jsonl

class ResponseTrainer(Trainer):
    """Trainer whose loss is the response-only loss, normalised over the target tokens of the whole
    effective batch (all micro-batches and processes), and whose validation loss is the token mean over the
    validation split (independent of the eval batch size and of the number of processes)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *a, val_rows: list[dict] | None = None, eval_batch_size: int = 8, **kw):
        super().__init__(*a, **kw)
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch over the accumulation
        self.val_rows = val_rows or []
        self.eval_bs = eval_batch_size

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
        mine = sorted(range(rank, len(self.val_rows), world), key=lambda i: -len(self.val_rows[i]["input_ids"]))
        tot = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        collate = self.data_collator
        with torch.no_grad():
            for s in range(0, len(mine), self.eval_bs):
                b = collate([self.val_rows[i] for i in mine[s : s + self.eval_bs]])
                b = {k: v.to(self.args.device) for k, v in b.items()}
                out = model(**b, qt_response_loss=True)
                tot[0] += out.loss_sum.double()
                tot[1] += out.n_tokens.double()
        if world > 1:
            tot = self.accelerator.reduce(tot, reduction="sum")
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_loss": float(tot[0] / tot[1].clamp(min=1)), "epoch": self.state.epoch}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

class LogCallback(TrainerCallback):
    """trainer_log.jsonl (main process): step, loss, lr, grad_norm, tokens, tokens/s, elapsed and ETA per log;
    eval_loss per evaluation."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = self.t_last = None
        self.tok_last = 0
        self.step0 = 0

    def on_step_begin(self, args, state, control, **kw):
        if self.t0 is None:
            self.t0 = self.t_last = time.time()
            self.tok_last = state.num_input_tokens_seen
            self.step0 = state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

class StepProgress(TrainerCallback):
    """Training progress through qtalign.progress (a rich bar on a terminal, a line at a steady interval otherwise),
    with the latest loss; replaces the Trainer's tqdm bar."""

    def __init__(self):
        self.bar = None
        self.info = ""

    def on_train_begin(self, args, state, control, **kw):
        from qtalign.progress import Progress

        self.bar = Progress("train", state.max_steps, unit="steps", main=state.is_world_process_zero)
        self.bar.done = state.global_step
        self.bar.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.advance(1, info=self.info)

    def on_log(self, args, state, control, logs=None, **kw):
        post = [f"{k.replace('_', ' ')} {logs[k]:.4g}" for k in ("loss", "eval_loss") if isinstance((logs or {}).get(k), float)]
        if post:
            self.info = ", ".join(post)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


# ----------------------------------------------------------------------------------------------------------
# outputs


def read_log(path: Path) -> list[dict]:
    return list(read_jsonl(path))


def truncate_log(path: Path, step: int) -> None:
    """On resume from a checkpoint at `step`, drop the records of the lost steps after it."""
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


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
