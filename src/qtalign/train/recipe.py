"""LoRA instruction tuning on question-translation data (the paper's alignment step): the recipe.

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
    checkpoints/        Trainer checkpoints (adapter, optimizer, scheduler, RNG), each written into tmp-checkpoint-N/
                        and renamed checkpoint-N when complete: a killed run resumes from the newest complete one
    trainer_log.jsonl   one record per logged step (step, loss, lr, tokens/s, ETA) and per evaluation (eval_loss)
    adapter/            the best checkpoint by validation loss, as a peft adapter dir (the last one without val)
    loss.png            training and validation loss curves
    summary.json        stage summary (figures, tables, numbers, timing_s), written last
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch

from qtalign.tokenids import pad_id
from qtalign.engine.models import check_model, load_model
from qtalign.errors import QtalignError
from qtalign.io import OutputDir, claim_run, disk_errors, read_json, require_file, write_json
from qtalign.tracking import check_available
from qtalign.train.config import TrainConfig
from qtalign.train.data import Collator, check_template, encode_example, load_pairs, split_rows
from qtalign.train.loss import install_response_loss
from qtalign.train.trainer import (STAGING, ResponseTrainer, TrainLog, checkpoint_problem, plot_loss, read_log, resume_files,
                                   truncate_log)

OUR_FILES = ("train_config.json", "checkpoints", "adapter", "trainer_log.jsonl", "loss.png", "summary.json", "tracking")
CHECKPOINTS = ("checkpoint-*", "tmp-checkpoint-*")  # the folders the Trainer writes (each whole) into checkpoints/
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "training_args.bin")


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def planned_steps(cfg: TrainConfig, n_train: int) -> int:
    """The optimizer steps of a run: max_steps, else the epochs over the training rows."""
    return cfg.max_steps or math.ceil(max(1, math.ceil(n_train / cfg.batch_size)) * cfg.epochs)


def training_arguments(cfg: TrainConfig, out: Path, n_train: int, n_val: int, device: str):
    """The transformers TrainingArguments for a config (accumulation derived from the effective batch)."""
    from transformers import TrainingArguments

    total = planned_steps(cfg, n_train)
    eval_steps = cfg.eval_steps or min(total, max(total // 10, cfg.min_eval_steps))
    has_val = n_val > 0
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=_accumulation(cfg),
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
        **mixed_precision(cfg, device),
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        train_sampling_strategy="batch_rebalance" if cfg.length_balanced_batches else "random",
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        report_to=list(cfg.report_to) or "none",
        run_name=cfg.run_name,
        save_only_model=False,
    )


def mixed_precision(cfg: TrainConfig, device: str) -> dict:
    """The Trainer's precision flags. bf16 and fp32 weights train as they are (no autocast). fp16 weights train on CUDA
    under the Trainer's fp16 autocast with a loss scaler (the LoRA weights themselves are fp32: peft keeps adapters of
    a half-precision base in fp32), since fp16 gradients without one underflow; on CPU fp16 is refused
    (:func:`_check_settings`)."""
    return {"bf16": False, "fp16": cfg.model.dtype == "fp16" and device == "cuda"}


def _check_settings(cfg: TrainConfig) -> None:
    """Settings only transformers can judge, checked before the model is loaded or a file is written."""
    from transformers.training_args import OptimizerNames

    from qtalign.engine.models import device_type

    if cfg.model.dtype == "fp16" and device_type(cfg.model.device) == "cpu":
        raise QtalignError("train: dtype fp16 trains with a loss scaler, which needs a CUDA GPU; on CPU use --dtype bf16 "
                           "(or fp32)")
    _accumulation(cfg)
    names = [o.value for o in OptimizerNames]
    if cfg.optim not in names:
        raise QtalignError(f"train: unknown optim {cfg.optim!r} (e.g. {', '.join(names[:6])}, ...)")


def _accumulation(cfg: TrainConfig) -> int:
    """Micro-batches per optimizer step, derived from the effective batch (one line when it does not divide)."""
    _, world = _world()
    per = cfg.per_device_batch_size * world
    if cfg.batch_size % per:
        raise QtalignError(f"train: batch_size {cfg.batch_size} is not a multiple of per_device_batch_size "
                           f"{cfg.per_device_batch_size} x {world} process(es)")
    return cfg.batch_size // per


def _data_files(cfg: TrainConfig, data_path) -> list[str]:
    files = [str(p) for p in ([data_path] if isinstance(data_path, (str, Path)) else (data_path or cfg.data))]
    if not files:
        raise QtalignError("train: no data files (pass --data or set `data` in the config)")
    for f in files:
        require_file(f, "data file")
    for f in cfg.val_data:
        require_file(f, "validation data file (val_data)")
    return files


def _claim(out: OutputDir, fp: str, cfg: TrainConfig, overwrite: bool) -> dict | None:
    """Own the output dir for this fingerprint (io.claim_run); returns the summary of a finished identical run."""
    record = {"fingerprint": fp, "world_size": _world()[1], "config": cfg.model_dump(mode="json")}
    finished = claim_run(out, record, "summary.json", OUR_FILES, "training", "a training run with another config or data",
                         overwrite)
    if finished is None:
        out.subdir("checkpoints", "checkpoints").record(*CHECKPOINTS)
    return finished


def _claim_once(out: OutputDir, fp: str, cfg: TrainConfig, overwrite: bool) -> dict | None:
    """`_claim` on the main process only, its outcome (a finished run's summary, or the one-line refusal) shared with
    the others. The process group set up here is the one the Trainer uses later."""
    from accelerate import PartialState

    from qtalign.engine.parallel import on_main_then_share

    state = PartialState(cpu=cfg.model.device == "cpu") if _world()[1] > 1 else None
    if state is None:
        return _claim(out, fp, cfg, overwrite)
    return on_main_then_share(state, lambda: _claim(out, fp, cfg, overwrite))


def _encode_rows(tok, pairs: list[dict], cfg: TrainConfig) -> tuple[list[dict], int]:
    enc = [encode_example(tok, p["prompt"], p["response"], cfg.cutoff_len, cfg.template) for p in pairs]
    return [e for e in enc if e is not None], sum(e is None for e in enc)


def _split(tok, pairs, val_pairs, cfg: TrainConfig) -> tuple[list[dict], list[dict], int]:
    """(training rows, validation rows, rows skipped because cutoff_len left them no response token)."""
    rows, skipped = _encode_rows(tok, pairs, cfg)
    if not rows:
        raise QtalignError(f"train: no row keeps a response token within cutoff_len {cfg.cutoff_len}")
    if cfg.val_data:
        return rows, _encode_rows(tok, val_pairs, cfg)[0], skipped
    tr_idx, va_idx = split_rows(len(rows), cfg.val_size, cfg.seed, cfg.val_max_rows)
    return [rows[i] for i in tr_idx], [rows[i] for i in va_idx], skipped


def _check_context(model, rows: list[dict], cfg: TrainConfig) -> None:
    """Rows (cut to cutoff_len) fit the model's context, else one line before any step: lower cutoff_len."""
    from qtalign.engine.models import context_length

    limit = context_length(model)
    longest = max((len(r["input_ids"]) for r in rows), default=0)
    if limit and longest > limit:
        raise QtalignError(f"cutoff_len {cfg.cutoff_len}: a training row keeps {longest} tokens, more than the model's "
                           f"context ({limit} positions); set cutoff_len to at most {limit}")


def _tracking_env(cfg: TrainConfig, out: Path) -> None:
    """Point the Trainer's integrations at the run's own tracking folder: TensorBoard event files, W&B offline,
    MLflow's file store (nothing leaves the machine)."""
    d = Path(cfg.tracking_dir) if cfg.tracking_dir else out / "tracking"
    if "tensorboard" in cfg.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(d / "tensorboard")
    if "wandb" in cfg.report_to:
        os.environ["WANDB_MODE"] = os.environ.get("QTALIGN_WANDB_MODE", "offline")
        os.environ["WANDB_DIR"] = str(d)
    if "mlflow" in cfg.report_to:
        os.environ["MLFLOW_TRACKING_URI"] = (d / "mlruns").resolve().as_uri()


def _record_resolved(out: Path, cfg: TrainConfig, args, n_train: int, n_val: int) -> None:
    """What the defaults resolved to (rows, steps, evaluation and checkpoint interval), beside the config."""
    write_json(out / "train_config.json", {**read_json(out / "train_config.json"), "resolved": {
        "train_rows": n_train, "val_rows": n_val, "steps": planned_steps(cfg, n_train), "eval_steps": args.eval_steps,
        "save_steps": args.save_steps, "best_checkpoint": args.load_best_model_at_end}})


def _with_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    hidden = getattr(model.config, "hidden_size", None)
    if hidden and cfg.lora_r > hidden:  # a rank above the hidden size adds parameters and changes nothing
        raise QtalignError(f"lora_r {cfg.lora_r}: above the model's hidden size ({hidden}); choose a rank of at most {hidden}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise QtalignError(f"train: cannot apply LoRA to {type(model).__name__}: {str(e).splitlines()[0]}") from None


def _trainer(peft_model, args, tok, train_rows, val_rows, cfg: TrainConfig, out: Path, callbacks):
    from transformers.trainer_callback import ProgressCallback

    trainer = ResponseTrainer(
        model=peft_model, args=args, data_collator=Collator(pad_id(tok)), train_dataset=train_rows,  # lists of rows:
        eval_dataset=val_rows or None, eval_batch_size=cfg.eval_batch_size,  # the Trainer's samplers take any sized one
        callbacks=[TrainLog(out / "trainer_log.jsonl"), *(callbacks or [])],
    )
    trainer.remove_callback(ProgressCallback)  # TrainLog reports instead
    return trainer


def _discard_incomplete(folder: Path, trainer) -> None:
    """Remove from checkpoints/ (qtalign's: the Trainer's folders are listed there by pattern) every staging folder
    left by a kill and every checkpoint-N that is not complete (``checkpoint_problem``: written by a version that
    wrote in place, cut by a power loss, or half removed by a rotation), saying which and why."""
    import re

    od = OutputDir(folder, "checkpoints")
    for d in sorted(folder.iterdir()):
        if not d.is_dir() or not od.is_ours(d.name):
            continue
        if d.name.startswith(STAGING):
            why = "its writing was stopped before it was complete"
        elif re.fullmatch(r"checkpoint-\d+", d.name):
            why = checkpoint_problem(d, resume_files(trainer, d))
        else:
            continue
        if why:
            print(f"qtalign train: {d}: discarded, an incomplete checkpoint ({why})", file=sys.stderr)
            od.remove(d.name)


def _resume_point(trainer, out: Path, main: bool) -> str | None:
    """The newest complete checkpoint (None: start afresh), incomplete ones discarded first by the main process."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / "checkpoints"
    if main and folder.is_dir():
        _discard_incomplete(folder, trainer)
    trainer.accelerator.wait_for_everyone()  # an --overwrite or a discard by the main process is done
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _run_trainer(trainer, out: Path, main: bool) -> tuple[object, int | None]:
    """Train, resuming from the newest complete checkpoint (its log records after that step are dropped). A write
    that fails for want of space (a checkpoint, the log, the adapter) is an OSError naming what was being written."""
    ckpt = _resume_point(trainer, out, main)
    resumed_from = read_json(Path(ckpt) / "trainer_state.json")["global_step"] if ckpt else None
    if main:  # the records of the steps after the checkpoint (all of them, starting afresh) are lost
        truncate_log(out / "trainer_log.jsonl", resumed_from or 0)
    # On CPU, tiny LoRA gradients and Adam moments become denormal floats, whose arithmetic is many times slower on
    # x86: flush them to zero (the step rate otherwise falls several-fold after a few dozen steps).
    torch.set_flush_denormal(True)
    try:
        with disk_errors(out):
            result = trainer.train(resume_from_checkpoint=ckpt)
    finally:
        torch.set_flush_denormal(False)
    adapter = OutputDir(out, "train").subdir("adapter", "adapter") if main else None
    with adapter.receiving(ADAPTER_FILES) if main else contextlib.nullcontext():  # what save_model writes is recorded
        with disk_errors(out / "adapter"):
            trainer.save_model(str(out / "adapter"))  # writes on the main process only
    trainer.accelerator.wait_for_everyone()
    return result, resumed_from


def _summary(cfg, out: Path, fp: str, args, state, result, n_train: int, n_val: int, skipped: int, resumed_from,
             world: int, t_start: float) -> dict:
    import resource

    log = read_log(out / "trainer_log.jsonl")
    tps = [r["tokens_per_s"] for r in log if r.get("tokens_per_s")]
    evals = [r for r in log if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
    numbers = {
        "template": cfg.template, "train_rows": n_train, "val_rows": n_val, "skipped_rows": skipped,
        "steps": state.global_step, "processes": world, "gradient_accumulation": args.gradient_accumulation_steps,
        "train_tokens": state.num_input_tokens_seen,
        "final_train_loss": next((r["loss"] for r in reversed(log) if "loss" in r), None),
        "best_eval_loss": best["eval_loss"] if best else None, "best_step": best["step"] if best else None,
        "tokens_per_s": round(result.metrics.get("train_tokens_per_second") or (sum(tps) / len(tps) if tps else 0.0), 1),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "resumed_from_step": resumed_from,
    }
    return {
        "stage": "train",
        "figures": [{"path": "loss.png", "caption": f"Response-token loss of LoRA tuning ({n_train} rows, "
                     f"{state.global_step} steps): train per logged step, validation per evaluation."}],
        "tables": [{"title": "LoRA tuning", "markdown": _table(numbers)}],
        "numbers": numbers,
        "timing_s": round(time.time() - t_start, 1),
        "fingerprint": fp,
        "adapter": str(out / "adapter"),
        "config": cfg.model_dump(mode="json"),
    }


def train(cfg: TrainConfig, data_path: str | Path | list | None, out_dir: str | Path, loaded=None, *, callbacks=None,
          overwrite: bool = False) -> dict:
    """Tune a LoRA adapter; resumes from ``out_dir/checkpoints`` when present; returns the stage summary.
    ``data_path``: a file or a list of files (None: ``cfg.data``); ``loaded``: a :class:`models.LoadedModel`
    to train instead of loading ``cfg.model`` (its weights are left unchanged: the adapter is removed after)."""
    import warnings

    from peft import PeftModel
    from transformers import set_seed

    # transformers 5 deprecates a name its own Trainer/peft path still calls once per run: not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)

    t_start = time.time()
    out = OutputDir(out_dir, "train")
    files = _data_files(cfg, data_path)
    check_available(cfg.report_to, cfg.tracking_dir)
    pairs = load_pairs(files, cfg.rows_per_file)  # data errors before anything is written or loaded
    val_pairs = load_pairs(cfg.val_data, cfg.val_rows_per_file) if cfg.val_data else []
    if loaded is None:
        check_model(cfg.model)
    cfg = cfg.model_copy(update={"data": files})
    _check_settings(cfg)
    fp = cfg.fingerprint(files)
    rank, world = _world()
    finished = _claim_once(out, fp, cfg, overwrite)
    if finished is not None:
        return finished

    lm = loaded or load_model(cfg.model)
    model, tok = lm.model, lm.tokenizer
    if isinstance(model, PeftModel):
        raise QtalignError("train: the base model already carries an unmerged adapter; set merge_adapter or drop adapter")
    check_template(tok, cfg.template, cfg.model.name)
    train_rows, val_rows, skipped = _split(tok, pairs, val_pairs, cfg)
    _check_context(model, train_rows + val_rows, cfg)
    device = str(next(model.parameters()).device.type)
    args = training_arguments(cfg, out.path, len(train_rows), len(val_rows), device)  # also sets up the process group
    _tracking_env(cfg, out.path)
    if rank == 0:
        _record_resolved(out.path, cfg, args, len(train_rows), len(val_rows))

    set_seed(cfg.seed)  # before the adapter is created: same seed -> same adapter
    remove = install_response_loss(model, cfg.loss_chunk_tokens)
    peft_model = None
    try:
        peft_model = _with_lora(model, cfg)
        trainer = _trainer(peft_model, args, tok, train_rows, val_rows, cfg, out.path, callbacks)
        result, resumed_from = _run_trainer(trainer, out.path, rank == 0)
        state = trainer.state
    finally:
        if loaded is not None and peft_model is not None:  # give the caller its model back unchanged
            peft_model.unload()
        remove()
    summary = _summary(cfg, out.path, fp, args, state, result, len(train_rows), len(val_rows), skipped, resumed_from,
                       world, t_start)
    if rank == 0:
        plot_loss(read_log(out.path / "trainer_log.jsonl"), out.path / "loss.png", f"LoRA tuning: {Path(cfg.model.name).name}")
        write_json(out.path / "summary.json", summary)
    return summary


def _table(numbers: dict) -> str:
    lines = ["| quantity | value |", "|---|---|"]
    for k, v in numbers.items():
        if v is not None:
            v = (f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}") if isinstance(v, float) else v
            lines.append(f"| {k.replace('_', ' ')} | {v} |")
    return "\n".join(lines)
