"""Configs of evaluation and of the stages that select items the same way (the analyses): model, tasks,
languages, label variants, data and item ranges; and the planning of task x variant x language groups."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from qtalign.engine.models import ModelConfig
from qtalign.errors import QtalignError
from qtalign.limits import SETTINGS, BatchSize, Count, Index, Seed, Tokens
from qtalign.tasks.groups import Group
from qtalign.tasks.items import CommaList, DataSource, comma_list, indices_field, parse_range, select_items
from qtalign.tasks.specs import SpecSet, TaskSpec, canonical_variant
from qtalign.tracking import Trackers

# fields that do not change a result (how the work is split up): left out of every fingerprint
NOT_FINGERPRINTED = frozenset({"batch_size", "batch_tokens", "model", "store", "progress", "report_to", "tracking_dir", "server_url"})


class TaskSelection(BaseModel):
    """Model, tasks, languages, label variants and data: what evaluation and the analyses (lens, geometry) share."""

    model_config = SETTINGS

    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: CommaList[str] = Field(default_factory=lambda: ["emotion", "snli", "paws"], min_length=1, description="task names")
    langs: CommaList[str] = Field(default_factory=lambda: ["all"], min_length=1, description="language codes, 'all', 'high' or 'low'")
    variants: CommaList[str] = Field(default_factory=lambda: ["enout"], min_length=1,
                                description="label variants: enout, native, irrelevant")
    limit: Count | None = Field(None, ge=1, description="first N items per language (after `items`)")
    items: str | dict[str, str] | None = Field(None, description="item range START:END for every task (e.g. 0:250), or one "
                                               "per task: {emotion: '0:250', snli: '0:200'} (CLI: emotion=0:250,snli=0:200)")
    exclude_items: list[Index] = Field(default_factory=list, description="item indices never used (e.g. training items)")
    data_dir: str | None = Field(None, description="folder with the official layout (or the base of data_files)")
    data_files: str | None = Field(None, description="path template with {task} and {lang} (.json/.jsonl), 'demo', or hf:<dataset>")
    split: str = Field("test", description="split for hf: datasets")
    prompts: CommaList[str] = Field(default_factory=list, description="extra spec files merged over the defaults (e.g. paper_prompts.json)")
    batch_size: BatchSize = Field(8, ge=1, description="prompts per forward pass (results do not depend on it)")
    batch_tokens: Tokens | None = Field(None, description="instead of batch_size: as many prompts per forward pass as fit "
                                        "this many token positions (rows x (demo block + longest prompt); at least one "
                                        "prompt), so that short prompts go in large batches and long ones in small "
                                        "(native engine; results do not depend on it)")
    seed: Seed = Field(0, description="seed of Python's, NumPy's and torch's generators (the faithful rule's ties; "
                      "the analyses' sampling)")

    @field_validator("variants")
    @classmethod
    def _variants(cls, v):
        return [canonical_variant(x) for x in v]

    @field_validator("exclude_items", mode="before")
    @classmethod
    def _indices(cls, v):
        return indices_field(v)

    @field_validator("items", mode="before")
    @classmethod
    def _items(cls, v):
        """`items` as given in YAML or on the command line: None, 'START:END' for every task, a mapping
        {task: 'START:END'}, or 'emotion=0:250,snli=0:200'; every range checked."""
        if v is not None and not isinstance(v, (str, dict)):
            raise ValueError(f"expected 'START:END' or a mapping {{task: 'START:END'}}, got {v!r}")
        if isinstance(v, str) and "=" in v:
            out = {}
            for part in comma_list(v):
                task, sep, rng = part.partition("=")
                if not sep or not task.strip():
                    raise ValueError(f"bad per-task item range {part!r}: use TASK=START:END (e.g. emotion=0:250,snli=0:200)")
                out[task.strip()] = rng.strip()
            v = out
        for rng in ([v] if isinstance(v, str) else (v or {}).values()):
            try:
                parse_range(rng)
            except QtalignError as e:
                raise ValueError(str(e)) from None
        return v

    def source(self) -> DataSource:
        return DataSource.from_options(self.data_dir, self.data_files, self.split)

    def select(self, task: TaskSpec, lang: str, source: DataSource | None = None) -> list:
        """The items of one task x language this config uses (range, exclusions, limit)."""
        rng = self.items.get(task.name) if isinstance(self.items, dict) else self.items
        return select_items(task, lang, source or self.source(), parse_range(rng), self.limit, set(self.exclude_items))

    def result_config(self) -> dict:
        """The settings that change results: the config part of the fingerprint."""
        return self.model_dump(mode="json", exclude=set(NOT_FINGERPRINTED) & set(type(self).model_fields))

    def plan(self, model: dict | None = None, limit: bool = True):
        """The one plan (eval/plan.Plan): groups, items, content hashes and the fingerprint for ``model``'s identity."""
        from qtalign.eval.plan import Plan

        return Plan.build(self, model, limit)

    def groups(self, specs: SpecSet) -> tuple[list[Group], list[dict]]:
        """(groups with data, skipped task x language pairs): an explicit language without data is an error; 'all',
        'high' and 'low' skip it with a note (the public data has no is/ms test files)."""
        source = self.source()
        unknown = [t for t in self.items if t not in self.tasks] if isinstance(self.items, dict) else []
        if unknown:
            raise QtalignError(f"items: ranges for tasks that are not evaluated: {', '.join(unknown)} (tasks: {', '.join(self.tasks)})")
        groups, skipped = [], []
        explicit = not set(self.langs) <= {"all", "high", "low"}
        for t in self.tasks:
            task = specs.task(t)
            for lang in specs.resolve_langs(self.langs, t):
                if not source.exists(task, lang):
                    if explicit:
                        raise QtalignError(f"{source.path(task, lang)}: no data for task '{t}' language '{lang}'")
                    skipped.append({"task": t, "lang": lang, "reason": "no data file"})
                    continue
                for v in self.variants:
                    task.label_words(lang, v)  # validates the variant for this task
                    groups.append(Group(t, v, lang))
        if not groups:
            raise QtalignError(f"nothing to evaluate: no data found under {source.describe()} for tasks {self.tasks}")
        return groups, skipped


class EvalConfig(TaskSelection):
    """Evaluation settings (round-trips to YAML/JSON)."""

    method: Literal["first-token", "faithful", "sequence"] = Field("first-token", description="scoring rule")
    length_norm: bool = Field(False, description="sequence method: mean instead of summed token log-prob")
    prefix_cache: bool = Field(True, description="compute each language's demo block once and reuse its KV cache "
                               "(results do not depend on it)")
    calibrate: bool = Field(True, description="also report contextual calibration (content-free queries)")
    store: bool = Field(True, description="reuse per-item results from the shared result store ($QTALIGN_STORE, default "
                        "$QTALIGN_CACHE/store) when model, data, prompts, method and engine numerics match, and add new ones")
    report_to: Trackers = Field(default_factory=list, description="also write the metrics to trackers: tensorboard, wandb "
                                "(offline), mlflow (file store); [] = none")
    tracking_dir: str | None = Field(None, description="where the trackers write (default <out>/tracking)")
    backend: Literal["torch", "vllm", "sglang"] = Field("torch", description="what computes the log-probs: torch (the "
                                                        "native engine) or a running vllm / sglang server at server_url "
                                                        "(docs/scale.md); results of different engines are stored apart")
    server_url: str | None = Field(None, description="address of the vllm / sglang server (e.g. http://127.0.0.1:8000)")

    @model_validator(mode="after")
    def _server(self):
        if self.backend != "torch" and not self.server_url:
            raise ValueError(f"backend {self.backend} needs server_url (the address of a running {self.backend} server, "
                             "e.g. http://127.0.0.1:8000)")
        if self.backend != "torch" and self.batch_tokens:
            raise ValueError(f"batch_tokens packs the native engine's batches (backend torch); a {self.backend} server "
                             "batches on its own (batch_size is the number of prompts per request)")
        if self.backend != "torch" and getattr(self.model, "adapter", None):  # (an experiment section has no model)
            raise ValueError(f"backend {self.backend} scores the model the server serves: an adapter cannot be applied "
                             "here; merge it (qtalign merge), serve the merged folder and evaluate that folder")
        return self

    def result_config(self) -> dict:
        d = super().result_config()
        d.pop("prefix_cache", None)  # an implementation choice: cached and uncached results are equal (tested)
        if self.backend == "torch":
            d.pop("backend", None)  # the native engine: the keys of every result computed before backends existed
        return d
