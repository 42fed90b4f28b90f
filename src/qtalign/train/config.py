"""LoRA tuning settings (round-trip to YAML/JSON). Defaults follow the paper (LLaMA-Factory SFT): LoRA on
q_proj,v_proj with r 8, alpha 16, dropout 0; lr 5e-5, cosine schedule, 10 % warmup; effective batch 16; 3 epochs;
cutoff 2048 tokens; 5 % validation split (capped at 64 rows unless val_max_rows is null; the paper's 5 % of 20k rows
is 1,000), evaluated and checkpointed every tenth of the run (at least every 10 steps; the paper: eval_steps 50)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from qtalign.engine.models import ModelConfig
from qtalign.limits import SETTINGS, BatchSize, Count, Rank, Seed, Tokens
from qtalign.tasks.items import CommaList
from qtalign.tracking import Trackers

# TrainConfig fields that do not change the result (how the work is split up, what is kept and logged)
NOT_FINGERPRINTED = frozenset({"per_device_batch_size", "eval_batch_size", "save_total_limit", "logging_steps",
                               "loss_chunk_tokens", "length_balanced_batches", "gradient_checkpointing", "report_to",
                               "run_name", "tracking_dir"})
SINCE_0_1 = frozenset({"val_max_rows", "min_eval_steps"})  # fingerprinted only where they act (result_config)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")


class TrainConfig(BaseModel):
    """LoRA tuning settings (round-trips to YAML/JSON). Defaults follow the paper (LLaMA-Factory SFT)."""

    model_config = SETTINGS

    model: ModelConfig = Field(default_factory=ModelConfig, description="base model (dtype bf16 or fp32 on CPU)")
    data: CommaList[str] = Field(default_factory=list, description="question-translation files (.json array or .jsonl; "
                            "'input' + 'output' or 'answer' per record); the data argument of train() overrides")
    rows_per_file: Count | None = Field(None, ge=1, description="use only the first N rows of each data file")
    template: Literal["raw", "chat"] = Field("raw", description="how a record becomes a training sequence: raw = prompt + "
                                           "response + EOS; chat = one user turn (the prompt) and one assistant turn (the "
                                           "response) rendered with the tokenizer's own chat template and its defaults "
                                           "(Qwen2.5's adds its default system line), as LLaMA-Factory trains the paper's models")
    val_data: CommaList[str] = Field(default_factory=list, description="held-out validation files (same formats as data); when "
                                "given, no rows are split off the training data (val_size is ignored)")
    val_rows_per_file: Count | None = Field(None, ge=1, description="use only the first N rows of each val_data file")
    lora_r: Rank = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: CommaList[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="module names to adapt")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant_with_warmup, ...)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warmup over this fraction of the optimizer steps")
    batch_size: BatchSize = Field(16, ge=1, description="effective batch: per_device_batch_size x accumulation x processes")
    per_device_batch_size: BatchSize = Field(4, ge=1, description="micro-batch per process; accumulation is derived")
    epochs: float = Field(3.0, gt=0, description="training epochs (ignored when max_steps is set)")
    max_steps: Count | None = Field(None, ge=1, description="stop after this many optimizer steps")
    cutoff_len: Tokens = Field(2048, ge=2, description="maximum tokens per sequence (prompt + response + EOS)")
    val_size: float = Field(0.05, ge=0, description="validation split: a fraction (< 1, at most val_max_rows rows) or a "
                            "row count (>= 1); 0 = none")
    val_max_rows: Count | None = Field(64, ge=1, description="at most this many rows split off by a fractional val_size "
                                       "(null = no cap: the paper's 5 %)")
    eval_steps: Count | None = Field(None, ge=1, description="evaluate and checkpoint every N steps (default: a tenth of "
                                     "the run, at least min_eval_steps and at most the run; the paper: 50)")
    min_eval_steps: Count = Field(10, ge=1, description="the least default interval between evaluations and checkpoints "
                                  "(when eval_steps is not set)")
    eval_batch_size: BatchSize = Field(8, ge=1, description="validation micro-batch (does not change the validation loss)")
    save_total_limit: Count = Field(2, ge=1, description="checkpoints kept (the best one is always kept)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory, slower)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    optim: str = Field("adamw_torch", description="transformers optimizer name")
    logging_steps: Count = Field(1, ge=1, description="log the training loss every N steps")
    length_balanced_batches: bool = Field(True, description="split each optimizer step's rows into micro-batches of "
                                          "similar length (transformers batch_rebalance): less padding, same rows per step")
    loss_chunk_tokens: Tokens = Field(128, ge=1, description="response positions projected to logits at once in the fused loss")
    seed: Seed = Field(0, description="seeds the LoRA init, the split, the data order and dropout")
    report_to: Trackers = Field(default_factory=list, description="training metrics to trackers through the Trainer's "
                                 "integrations: tensorboard, wandb (offline), mlflow (a file store); written under "
                                 "<out>/tracking; [] = none")
    run_name: str | None = Field(None, description="the run's name in the trackers")
    tracking_dir: str | None = Field(None, description="where the trackers write (default <out>/tracking)")

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {v!r} (choose from {', '.join(SCHEDULERS)})")
        return v

    def result_config(self) -> dict:
        """The settings that change the result (not the micro-batch or the eval batch, which do not). The settings
        added after 0.1 enter only where they act (a cap on a fractional split without val_data; the least default
        evaluation interval without eval_steps), so runs made before them keep their fingerprints."""
        conf = self.model_dump(mode="json", exclude={"data", "val_data", "model", *NOT_FINGERPRINTED, *SINCE_0_1})
        if not self.val_data and 0 < self.val_size < 1:
            conf["val_max_rows"] = self.val_max_rows
        if self.eval_steps is None:
            conf["min_eval_steps"] = self.min_eval_steps
        return conf

    def fingerprint(self, data_files: list[str]) -> str:
        """Identifies a run (io.fingerprint): the result settings, the content of the training and validation files,
        and the model's identity."""
        from qtalign.engine.models import model_identity
        from qtalign.io import files_sha256, fingerprint

        conf = self.result_config()
        return fingerprint(conf, data={"data": list(files_sha256(data_files).values()),
                                       "val_data": list(files_sha256(self.val_data).values())},
                           model=model_identity(self.model))


