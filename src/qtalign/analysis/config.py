"""Configs of the analysis stages (logit lens, representation geometry): evaluation's item selection plus the models
to compare and each analysis's own settings (round-trip to YAML/JSON)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from qtalign.eval.config import TaskSelection
from qtalign.engine.models import ModelConfig
from qtalign.io import safe_name
from qtalign.limits import Count, Index
from qtalign.tasks.items import CommaList, comma_list

BASE = "base"
POOLS = ("prompt", "query", "last")


class AnalysisConfig(TaskSelection):
    """What the analysis stages (lens, geometry) share with evaluation: model(s), tasks, languages, data."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model")
    compare: dict[str, str] = Field(
        default_factory=dict,
        description="label -> LoRA adapter dir: tuned models loaded on top of the base model and analysed beside it on the same items",
    )
    tasks: CommaList[str] = Field(default_factory=lambda: ["emotion"], description="task names")
    variants: CommaList[str] = Field(default_factory=lambda: ["native"], description="label variants (the paper's analyses use native prompts)")

    @field_validator("compare", mode="before")
    @classmethod
    def _compare(cls, v) -> dict[str, str]:
        """{label: adapter dir} from a mapping, or from ['DIR', 'LABEL=DIR', ...] / 'LABEL=DIR,...' (an unlabelled first
        adapter is 'tuned'); labels become folder names, so they must be plain names, and 'base' is the base model's."""
        if isinstance(v, dict):
            items = list(v.items())
        else:
            items = []
            for i, x in enumerate(comma_list(v) if isinstance(v, str) else list(v or [])):
                label, sep, path = str(x).partition("=")
                if not sep:
                    label, path = ("tuned" if i == 0 else f"tuned{i + 1}"), str(x)
                if not label or not path:
                    raise ValueError(f"compare {x!r}: expected DIR or LABEL=DIR")
                items.append((label, path))
        out: dict[str, str] = {}
        for label, path in items:
            try:
                safe_name(label, "compare label")
            except Exception as e:  # noqa: BLE001 - QtalignError -> a validation error naming the field
                raise ValueError(str(e)) from None
            if label in out:
                raise ValueError(f"compare: label '{label}' given twice")
            out[label] = path
        if BASE in out:
            raise ValueError(f"'{BASE}' names the base model; choose another label")
        return out


class LensConfig(AnalysisConfig):
    """Language logit lens settings (round-trips to YAML/JSON)."""

    keep_overlap: bool = Field(
        False, description="keep items whose English and output-language token sets overlap (default: drop them, the paper's rule); the shared mass is reported as 'overlap'"
    )
    max_plot_langs: Count = Field(24, ge=1, description="at most this many languages in the overview figure")




class GeometryConfig(AnalysisConfig):
    """Representation-geometry settings (round-trips to YAML/JSON)."""

    pools: CommaList[Literal["prompt", "query", "last"]] = Field(
        default_factory=lambda: list(POOLS), description="poolings: prompt (mean over all prompt tokens, the paper), query (mean over the item's tokens), last (last token)"
    )
    layers: list[Index] | None = Field(None, description="layers shown in scatter plots and pair heatmaps (default: 5 evenly spaced, 0..L)")
    reference: str = Field("en", description="reference language for cosine similarity and the per-layer heatmaps")
    normed_last: bool = Field(True, description="pass layer L through the final norm (as HF hidden_states and the paper)")
    save_vectors: bool = Field(False, description="also save the pooled vectors (float16) in the npz")


