"""LoRA instruction tuning on question-translation data (the paper's alignment step), and merging.

Built on transformers ``Trainer`` + peft + accelerate; the one custom piece is the loss. Defaults are the paper's
(LLaMA-Factory SFT): LoRA on q_proj,v_proj with r 8, alpha 16, dropout 0; lr 5e-5, cosine schedule, 10 % warmup;
effective batch 16; 3 epochs; cutoff 2048 tokens; 5 % validation split; the best checkpoint by validation loss is
kept. See docs/training.md.

Sequence and masking rule: ``ids = tokenizer(prompt + response)`` with the tokenizer's default special tokens (BOS
for Llama/Gemma tokenizers, none for Qwen), then EOS appended (unless already last). The labels are -100 over the
longest common token prefix of ``tokenizer(prompt)`` and ``ids`` (the prompt, including BOS) and equal ``ids``
after it, so a token that merges the end of the prompt with the start of the response is trained on. Sequences are
truncated to ``cutoff_len`` from the end; a row left without response tokens is skipped (and counted).

Response-only logits: the vocabulary of Gemma is 262k, so projecting every position to logits is most of the
cost. The loss runs the decoder body, gathers the final hidden states at positions whose next-token label is not
-100, and multiplies only those by the output weight (fp32 cross-entropy). With a frozen output weight this is
one fused, token-chunked function that computes the loss and the hidden-state gradient in the same pass (the
[N, vocab] logits never outlive one chunk); with a trainable head it falls back to plain autograd.

Output dir layout (``train(cfg, data, out)``):
    train_config.json   the resolved config and its fingerprint (written first)
    checkpoints/        Trainer checkpoints (adapter, optimizer, scheduler, RNG): a killed run resumes from here
    trainer_log.jsonl   one record per logged step (step, loss, lr, tokens/s, ETA) and per evaluation (eval_loss)
    adapter/            the best checkpoint by validation loss, as a peft adapter dir (the last one without val)
    loss.png            training and validation loss curves
    summary.json        stage summary (figures, tables, numbers, timing_s), written last
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from qtalign.tasks.items import comma_list
from qtalign.engine.forward import lcp
from qtalign.errors import QtalignError, data_error
from qtalign.engine.models import DTYPE_NAMES, ModelConfig, load_model, torch_dtype


# TrainConfig fields that do not change the result (how the work is split up, what is kept and logged)
NOT_FINGERPRINTED = frozenset({"per_device_batch_size", "eval_batch_size", "save_total_limit", "logging_steps",
                               "loss_chunk_tokens", "length_balanced_batches", "gradient_checkpointing"})


class TrainConfig(BaseModel):
    """LoRA tuning settings (round-trips to YAML/JSON). Defaults follow the paper (LLaMA-Factory SFT)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig, description="base model (dtype bf16 or fp32 on CPU)")
    data: list[str] = Field(default_factory=list, description="question-translation files (.json array or .jsonl; "
                            "'input' + 'output' or 'answer' per record); the data argument of train() overrides")
    rows_per_file: int | None = Field(None, ge=1, description="use only the first N rows of each data file")
    template: Literal["raw", "chat"] = Field("raw", description="how a record becomes a training sequence: raw = prompt + "
                                           "response + EOS; chat = one user turn (the prompt) and one assistant turn (the "
                                           "response) rendered with the tokenizer's own chat template and its defaults "
                                           "(Qwen2.5's adds its default system line), as LLaMA-Factory trains the paper's models")
    val_data: list[str] = Field(default_factory=list, description="held-out validation files (same formats as data); when "
                                "given, no rows are split off the training data (val_size is ignored)")
    val_rows_per_file: int | None = Field(None, ge=1, description="use only the first N rows of each val_data file")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="module names to adapt")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant_with_warmup, ...)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warmup over this fraction of the optimizer steps")
    batch_size: int = Field(16, ge=1, description="effective batch: per_device_batch_size x accumulation x processes")
    per_device_batch_size: int = Field(4, ge=1, description="micro-batch per process; accumulation is derived")
    epochs: float = Field(3.0, gt=0, description="training epochs (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    cutoff_len: int = Field(2048, ge=2, description="maximum tokens per sequence (prompt + response + EOS)")
    val_size: float = Field(0.05, ge=0, description="validation split: a fraction (< 1) or a row count (>= 1); 0 = none")
    eval_steps: int | None = Field(None, ge=1, description="evaluate and checkpoint every N steps (default: ~10 per run)")
    eval_batch_size: int = Field(8, ge=1, description="validation micro-batch (does not change the validation loss)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the best one is always kept)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory, slower)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    optim: str = Field("adamw_torch", description="transformers optimizer name")
    logging_steps: int = Field(1, ge=1, description="log the training loss every N steps")
    length_balanced_batches: bool = Field(True, description="split each optimizer step's rows into micro-batches of "
                                          "similar length (transformers batch_rebalance): less padding, same rows per step")
    loss_chunk_tokens: int = Field(128, ge=1, description="response positions projected to logits at once in the fused loss")
    seed: int = Field(0, description="seeds the LoRA init, the split, the data order and dropout")

    @field_validator("target_modules", "data", "val_data", mode="before")
    @classmethod
    def _split(cls, v):
        return comma_list(v)

    def fingerprint(self, data_files: list[str]) -> str:
        """Identifies a run (io.fingerprint): settings that change the result, the content of the training and
        validation files, and the model's identity (not the micro-batch or the eval batch, which do not)."""
        from qtalign.engine.models import model_identity
        from qtalign.io import files_sha256, fingerprint

        conf = self.model_dump(mode="json", exclude={"data", "val_data", "model", *NOT_FINGERPRINTED})
        return fingerprint(conf, data={"data": list(files_sha256(data_files).values()),
                                       "val_data": list(files_sha256(self.val_data).values())},
                           model=model_identity(self.model))


# ----------------------------------------------------------------------------------------------------------
# data


def load_pairs(paths: list[str | Path], rows_per_file: int | None = None) -> list[dict]:
    """Question-translation records (read by :func:`qtdata.load_question_records`: our JSONL with input/output,
    the official *_question.json files with input/answer, alpaca JSON) -> [{'id', 'prompt', 'response'}]."""
    from qtalign.qtdata.build import load_question_records

    out = []
    for p in paths:
        p = Path(p)
        recs = load_question_records(p)
        if rows_per_file:
            recs = recs[:rows_per_file]
        for r in recs:
            if not r["input"] or not r["output"]:
                raise data_error(p, "empty prompt or response", record=r["row"], field="input" if not r["input"] else "output")
            out.append({"id": str(r["id"]), "prompt": r["input"], "response": r["output"]})
    if not out:
        raise QtalignError("train: no training records (pass at least one data file)")
    return out



def encode_example(tokenizer, prompt: str, response: str, cutoff_len: int = 2048, template: str = "raw") -> dict | None:
    """{'input_ids', 'labels'} for one pair (see the module docstring for the rule); None when truncation leaves
    no response token. ``template='chat'`` renders the pair as a user and an assistant turn with the tokenizer's chat
    template (the text is tokenized without adding special tokens again: the template writes them)."""
    if template == "chat":
        p_text, full_text = chat_texts(tokenizer, prompt, response)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        ids = list(tokenizer(full_text, add_special_tokens=False)["input_ids"])  # the template ends the assistant turn
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise QtalignError("train: the tokenizer has no EOS token")
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = list(tokenizer(prompt + response, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != eos:
            ids.append(eos)
    n_prompt = max(lcp(p_ids, ids), 1)  # position 0 has no previous token: never a target
    ids = ids[:cutoff_len]
    labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
    if all(x == -100 for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def chat_texts(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """(the user turn with the assistant's generation prompt, the whole conversation) as the tokenizer's chat template
    writes them, with its defaults (e.g. Qwen2.5's default system line)."""
    user = [{"role": "user", "content": prompt}]
    p_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(p_text):  # templates that rewrite earlier turns would break the prompt mask
        raise QtalignError("train: the tokenizer's chat template does not write the user turn as a prefix of the "
                           "conversation; use template: raw")
    return p_text, full


def check_template(tokenizer, template: str, model_name: str) -> None:
    """template 'chat' needs a tokenizer with a chat template (one clear error naming the model otherwise)."""
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise QtalignError(f"train: template 'chat': the tokenizer of model '{model_name}' has no chat template "
                           "(GGUF files without tokenizer.chat_template, base models); use template: raw")


class Collator:
    """Right-pads input_ids (pad id), labels (-100) and builds the attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict]) -> dict:
        T = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), T), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), T), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def split_rows(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): a seeded shuffle, the first `val` rows held out."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_val = int(val_size) if val_size >= 1 else (max(1, round(n * val_size)) if val_size > 0 else 0)
    if n_val >= n:
        raise QtalignError(f"train: val_size {val_size} leaves no training rows (of {n})")
    return sorted(idx[n_val:]), sorted(idx[:n_val])


# ----------------------------------------------------------------------------------------------------------
# response-only loss


class _FusedResponseCE(torch.autograd.Function):
    """Summed cross-entropy of ``h @ W.T (+ b)`` against targets for a frozen W, token-chunked. The hidden-state
    gradient is computed in the forward pass, chunk by chunk, so the [N, vocab] logits never outlive a chunk and
    are never recomputed. Optional tanh soft-capping (Gemma)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, softcap, chunk):
        need = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if need else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            rows = torch.arange(hc.shape[0], device=h.device)
            z = torch.nn.functional.linear(hc.to(weight.dtype), weight, bias)  # logits in the weight dtype, like the model
            t = None
            if softcap:
                t = torch.tanh(z.float() / softcap)
                z = t * softcap
            # one fused fp32 softmax pass; logsumexp = z_max - log p_max (p_max >= 1/vocab: no underflow)
            zmax, imax = z.max(dim=-1)
            zt = z[rows, tc].float()
            p = torch.softmax(z, dim=-1, dtype=torch.float32)
            del z  # at most two [chunk, vocab] buffers alive at once
            total += (zmax.float() - torch.log(p[rows, imax]) - zt).sum()
            if need:
                p[rows, tc] -= 1.0  # d loss / d z = softmax - onehot
                if t is not None:
                    p.mul_(1.0 - t * t)
                grad[s : s + chunk] = (p.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad if need else None)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype) if grad is not None else None), None, None, None, None, None


def response_loss_sum(parts, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 128, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy, number of target tokens) over the positions whose next-token label is not
    -100. ``hidden``: (B, T, d) final-normed hidden states; ``parts``: :class:`engine.ModelParts`."""
    h = hidden[:, :-1]
    tgt = labels[:, 1:].to(h.device)
    mask = tgt != -100
    h = h[mask]
    tgt = tgt[mask]
    n = mask.sum()
    head = parts.head
    plain = type(head) is torch.nn.Linear or not hasattr(head, "base_layer")
    w = head.weight if plain else None
    if fused and plain and not w.requires_grad and (head.bias is None or not head.bias.requires_grad):
        return _FusedResponseCE.apply(h, w, head.bias, tgt, parts.softcap, chunk), n
    # trainable or adapted head: plain autograd over the selected positions
    logits = (torch.nn.functional.linear(h.to(w.dtype), w, head.bias) if plain else head(h.to(head.weight.dtype))).float()
    if parts.softcap:
        logits = torch.tanh(logits / parts.softcap) * parts.softcap
    return torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"), n


@dataclass
class ResponseLoss:
    loss_sum: torch.Tensor
    n_tokens: torch.Tensor

    # DDP and the Trainer look into outputs like into a mapping
    def keys(self):
        return ["loss_sum", "n_tokens"]

    def __getitem__(self, k):
        return getattr(self, k)


def install_response_loss(model, chunk: int = 128):
    """Let ``model(..., qt_response_loss=True)`` return a :class:`ResponseLoss` computed from the decoder body and
    the response positions only (any other call is the model's own forward). Installed on the base CausalLM, so
    it works through peft and DDP wrappers. Returns a function that removes it."""
    from qtalign.engine.forward import ModelParts

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = base.forward
    had_attr = "forward" in vars(base)

    def forward(self, *args, qt_response_loss: bool = False, **kw):
        if not qt_response_loss:
            return original(*args, **kw)
        parts = ModelParts.of(self)
        out = parts.decoder(input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"), use_cache=False)
        loss_sum, n = response_loss_sum(parts, out.last_hidden_state, kw["labels"], chunk)
        return ResponseLoss(loss_sum, n)

    base.forward = types.MethodType(forward, base)

    def remove():
        if had_attr:
            base.forward = original
        else:
            del base.forward

    return remove


# ----------------------------------------------------------------------------------------------------------
# trainer


def _trainer_classes():
    """Defined lazily: importing transformers.Trainer is slow."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback

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

    class Bar(ProgressCallback):
        """The Trainer's tqdm bar, with the latest loss / eval loss / tokens per second as a postfix instead of
        one printed dict per log."""

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                post = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate") if isinstance(logs.get(k), float)}
                if post:
                    self.training_bar.set_postfix(post, refresh=False)

    return ResponseTrainer, LogCallback, Bar


# ----------------------------------------------------------------------------------------------------------
# outputs


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """On resume from a checkpoint at `step`, drop the records of the lost steps after it."""
    recs = [r for r in read_log(path) if r["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    os.replace(tmp, path)


def plot_loss(log: list[dict], path: Path, title: str = "LoRA tuning") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----------------------------------------------------------------------------------------------------------
# train


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def training_arguments(cfg: TrainConfig, out: Path, n_train: int, n_val: int, device: str):
    """The transformers TrainingArguments for a config (accumulation derived from the effective batch)."""
    from transformers import TrainingArguments

    _, world = _world()
    per = cfg.per_device_batch_size * world
    if cfg.batch_size % per:
        raise QtalignError(
            f"train: batch_size {cfg.batch_size} is not a multiple of per_device_batch_size {cfg.per_device_batch_size}"
            f" x {world} process(es)"
        )
    accum = cfg.batch_size // per
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    eval_steps = cfg.eval_steps or max(1, total // 10)
    has_val = n_val > 0
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps if has_val else None,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        seed=cfg.seed,
        bf16=False,  # the weights already are in the requested dtype; no autocast
        fp16=False,
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        train_sampling_strategy="batch_rebalance" if cfg.length_balanced_batches else "random",
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        report_to="none",
        save_only_model=False,
    )


def train(cfg: TrainConfig, data_path: str | Path | list | None, out_dir: str | Path, loaded=None, *, callbacks=None,
          overwrite: bool = False) -> dict:
    """Tune a LoRA adapter; resumes from ``out_dir/checkpoints`` when present; returns the stage summary.
    ``data_path``: a file or a list of files (None: ``cfg.data``); ``loaded``: a :class:`models.LoadedModel`
    to train instead of loading ``cfg.model`` (its weights are left unchanged: the adapter is removed after)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    t_start = time.time()
    out = Path(out_dir)
    files = [str(p) for p in ([data_path] if isinstance(data_path, (str, Path)) else (data_path or cfg.data))]
    if not files:
        raise QtalignError("train: no data files (pass --data or set `data` in the config)")
    for f in files:
        if not Path(f).exists():
            raise QtalignError(f"{f}: data file not found")
    for f in cfg.val_data:
        if not Path(f).exists():
            raise QtalignError(f"{f}: validation data file not found (val_data)")
    pairs = load_pairs(files, cfg.rows_per_file)  # data errors before anything is written or loaded
    val_pairs = load_pairs(cfg.val_data, cfg.val_rows_per_file) if cfg.val_data else []
    cfg = cfg.model_copy(update={"data": files})
    fp = cfg.fingerprint(files)
    rank, world = _world()
    main = rank == 0

    prev = out / "train_config.json"
    if prev.exists() and not overwrite:
        old = json.loads(prev.read_text(encoding="utf-8")).get("fingerprint")
        if old != fp:
            raise QtalignError(f"{out}: holds a training run with another config or data ({old} != {fp}); "
                               "use another --out or --overwrite")
        if (out / "summary.json").exists():
            return json.loads((out / "summary.json").read_text(encoding="utf-8"))
    if main:
        if overwrite:
            for name in ("checkpoints", "adapter", "trainer_log.jsonl", "summary.json", "loss.png"):
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(prev, {"fingerprint": fp, "world_size": world, "config": cfg.model_dump()})

    lm = loaded or load_model(cfg.model)
    model, tok = lm.model, lm.tokenizer
    if isinstance(model, PeftModel):
        raise QtalignError("train: the base model already carries an unmerged adapter; set merge_adapter or drop adapter")
    device = str(next(model.parameters()).device.type)
    check_template(tok, cfg.template, cfg.model.name)

    def encode(ps):
        enc = [encode_example(tok, p["prompt"], p["response"], cfg.cutoff_len, cfg.template) for p in ps]
        return [e for e in enc if e is not None], sum(e is None for e in enc)

    rows, skipped = encode(pairs)
    if not rows:
        raise QtalignError(f"train: no row keeps a response token within cutoff_len {cfg.cutoff_len}")
    if cfg.val_data:
        train_rows, (val_rows, _) = rows, encode(val_pairs)
    else:
        tr_idx, va_idx = split_rows(len(rows), cfg.val_size, cfg.seed)
        train_rows, val_rows = [rows[i] for i in tr_idx], [rows[i] for i in va_idx]

    args = training_arguments(cfg, out, len(train_rows), len(val_rows), device)  # also sets up the process group
    ResponseTrainer, LogCallback, Bar = _trainer_classes()

    set_seed(cfg.seed)  # before the adapter is created: same seed -> same adapter
    remove = install_response_loss(model, cfg.loss_chunk_tokens)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    peft_model = None
    log_path = out / "trainer_log.jsonl"
    try:
        try:
            peft_model = get_peft_model(model, lora)
        except ValueError as e:
            raise QtalignError(f"train: cannot apply LoRA to {type(model).__name__}: {str(e).splitlines()[0]}") from None
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        trainer = ResponseTrainer(
            model=peft_model,
            args=args,
            data_collator=Collator(pad),
            train_dataset=_ListDataset(train_rows),
            eval_dataset=_ListDataset(val_rows) if val_rows else None,
            callbacks=[LogCallback(log_path), *(callbacks or [])],
            val_rows=val_rows,
            eval_batch_size=cfg.eval_batch_size,
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(Bar())
        trainer.accelerator.wait_for_everyone()  # an --overwrite by the main process is done
        ckpt = get_last_checkpoint(str(out / "checkpoints")) if (out / "checkpoints").is_dir() else None
        resumed_from = None
        if ckpt:
            resumed_from = json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"]
            if main:
                _truncate_log(log_path, resumed_from)
        # On CPU, tiny LoRA gradients and Adam moments become denormal floats, whose arithmetic is many times slower
        # on x86: flush them to zero (the step rate otherwise falls several-fold after a few dozen steps).
        torch.set_flush_denormal(True)
        try:
            result = trainer.train(resume_from_checkpoint=ckpt)
        finally:
            torch.set_flush_denormal(False)
        state = trainer.state
        trainer.save_model(str(out / "adapter"))  # writes on the main process only
        trainer.accelerator.wait_for_everyone()
    finally:
        if loaded is not None and peft_model is not None:  # give the caller its model back unchanged
            peft_model.unload()
        remove()

    log = read_log(log_path)
    tps = [r["tokens_per_s"] for r in log if r.get("tokens_per_s")]
    evals = [r for r in log if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
    numbers = {
        "template": cfg.template,
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "skipped_rows": skipped,
        "steps": state.global_step,
        "processes": world,
        "gradient_accumulation": args.gradient_accumulation_steps,
        "train_tokens": state.num_input_tokens_seen,
        "final_train_loss": next((r["loss"] for r in reversed(log) if "loss" in r), None),
        "best_eval_loss": best["eval_loss"] if best else None,
        "best_step": best["step"] if best else None,
        "tokens_per_s": round(result.metrics.get("train_tokens_per_second") or (sum(tps) / len(tps) if tps else 0.0), 1),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "peak_rss_mb": _peak_rss_mb(),
        "resumed_from_step": resumed_from,
    }
    summary = {
        "stage": "train",
        "figures": [{"path": "loss.png", "caption": f"Response-token loss of LoRA tuning ({len(train_rows)} rows, "
                     f"{state.global_step} steps): train per logged step, validation per evaluation."}],
        "tables": [{"title": "LoRA tuning", "markdown": _table(numbers)}],
        "numbers": numbers,
        "timing_s": round(time.time() - t_start, 1),
        "fingerprint": fp,
        "adapter": str(out / "adapter"),
        "config": cfg.model_dump(),
    }
    if main:
        plot_loss(log, out / "loss.png", f"LoRA tuning: {Path(cfg.model.name).name}")
        _write_json_atomic(out / "summary.json", summary)
    return summary


def _table(numbers: dict) -> str:
    lines = ["| quantity | value |", "|---|---|"]
    for k, v in numbers.items():
        if v is not None:
            v = (f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}") if isinstance(v, float) else v
            lines.append(f"| {k.replace('_', ' ')} | {v} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# merge


def merge(model_cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path, dtype: Literal["bf16", "fp32", "fp16"] = "bf16") -> Path:
    """Merge a LoRA adapter into its base model in fp32 and save the result (and the tokenizer) as a HF folder
    in `dtype`. Returns the output dir."""
    from qtalign.engine.models import apply_adapter

    out = Path(out_dir)
    if dtype not in DTYPE_NAMES:
        raise QtalignError(f"merge: unknown dtype '{dtype}' (bf16, fp32, fp16)")
    base_cfg = model_cfg.model_copy(update={"dtype": "fp32", "adapter": None, "merge_adapter": False, "device": "cpu"})
    lm = load_model(base_cfg)
    merged = apply_adapter(lm.model, str(adapter_dir), merge=True, dtype=torch_dtype(dtype))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    (tmp / "qtalign_merge.json").write_text(json.dumps({"base": model_cfg.name, "source": lm.info["source"],
                                                         "adapter": str(adapter_dir), "dtype": dtype}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# CLI: `qtalign train`, `qtalign merge`

_TRAIN_FLAGS = {  # CLI flag -> (TrainConfig field, type, help)
    "--rows-per-file": ("rows_per_file", int, "first N rows of each data file"),
    "--template": ("template", str, "raw | chat (the tokenizer's chat template: one user + one assistant turn) (raw)"),
    "--val-rows-per-file": ("val_rows_per_file", int, "first N rows of each --val-data file"),
    "--lora-r": ("lora_r", int, "LoRA rank (8)"),
    "--lora-alpha": ("lora_alpha", float, "LoRA alpha (16)"),
    "--lora-dropout": ("lora_dropout", float, "LoRA dropout (0)"),
    "--target-modules": ("target_modules", str, "comma list (q_proj,v_proj)"),
    "--lr": ("learning_rate", float, "peak learning rate (5e-5)"),
    "--lr-scheduler": ("lr_scheduler", str, "cosine | linear | constant_with_warmup | ... (cosine)"),
    "--warmup-ratio": ("warmup_ratio", float, "warmup fraction of the steps (0.1)"),
    "--batch-size": ("batch_size", int, "effective batch (16)"),
    "--micro-batch-size": ("per_device_batch_size", int, "per-process micro-batch (4); accumulation is derived"),
    "--epochs": ("epochs", float, "epochs (3)"),
    "--max-steps": ("max_steps", int, "stop after N optimizer steps"),
    "--cutoff-len": ("cutoff_len", int, "max tokens per sequence (2048)"),
    "--val-size": ("val_size", float, "validation fraction (<1) or rows (>=1) (0.05)"),
    "--eval-steps": ("eval_steps", int, "evaluate + checkpoint every N steps (default ~10 per run)"),
    "--eval-batch-size": ("eval_batch_size", int, "validation micro-batch (8)"),
    "--seed": ("seed", int, "seed (0)"),
}


def configure_parser(p, name: str) -> None:
    from qtalign.cli import add_model_args

    add_model_args(p)
    if name == "merge":
        p.add_argument("--out", required=True, help="merged model dir to write")
        return
    g = p.add_argument_group("training")
    g.add_argument("--config", help="YAML/JSON config (keys of TrainConfig, optionally under 'train:'); flags override it")
    g.add_argument("--data", nargs="+", help="question-translation files (.json/.jsonl)")
    g.add_argument("--val-data", nargs="+", help="held-out validation files (no rows are split off --data then)")
    for flag, (_, typ, help_) in _TRAIN_FLAGS.items():
        g.add_argument(flag, type=typ, help=help_)
    g.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute activations in backward")
    g.add_argument("--out", required=True, help="output dir (resumable: rerun the same command after a kill)")
    g.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
    g.add_argument("--save-config", help="write the resolved config as YAML and exit")


def train_config(args) -> TrainConfig:
    from qtalign.cli import load_config_file, with_model_overrides

    d = load_config_file(getattr(args, "config", None))
    d = dict(d.get("train", d))
    for flag, (key, _, _) in _TRAIN_FLAGS.items():
        v = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if v is not None:
            d[key] = v
    if args.gradient_checkpointing is not None:
        d["gradient_checkpointing"] = True
    if args.data:
        d["data"] = args.data
    if args.val_data:
        d["val_data"] = args.val_data
    with_model_overrides(d, args)
    return TrainConfig(**d)


def run_cli(args) -> int:
    if args.command == "merge":
        from qtalign.cli import model_overrides

        ov = model_overrides(args)
        adapter = ov.pop("adapter", None)
        if not adapter:
            raise QtalignError("merge: --adapter DIR is required")
        dtype = ov.pop("dtype", "bf16")
        ov.pop("merge_adapter", None)
        out = merge(ModelConfig(**ov), adapter, args.out, dtype)
        print(f"wrote {out}")
        return 0
    cfg = train_config(args)
    if args.save_config:
        import yaml

        Path(args.save_config).write_text(yaml.safe_dump({"train": cfg.model_dump()}, sort_keys=False, allow_unicode=True))
        print(f"wrote {args.save_config}")
        return 0
    res = train(cfg, None, args.out, overwrite=args.overwrite)
    if _world()[0] == 0:
        print(res["tables"][0]["markdown"])
        print(json.dumps({"out": args.out, "adapter": res["adapter"], "timing_s": res["timing_s"]}))
    return 0
