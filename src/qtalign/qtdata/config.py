"""Question-translation data settings (round-trip to YAML/JSON)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from qtalign.limits import SETTINGS, Count, Index, Seed
from qtalign.tasks.items import CommaList, DataSource, comma_list, indices_field

KEYWORDS = ("all", "high", "low")


def split_mix(v):
    """Source languages as given: a list, 'zh,de', or one of the paper's mix names ('zhde' = zh,de; 'swhi' = sw,hi)."""
    v = comma_list(v)
    if isinstance(v, list) and len(v) == 1 and v[0] not in KEYWORDS and len(v[0]) > 2 and len(v[0]) % 2 == 0 and v[0].isalpha():
        return [v[0][i : i + 2] for i in range(0, len(v[0]), 2)]
    return v


class QTDataConfig(BaseModel):
    """Question-translation data settings (round-trips to YAML/JSON)."""

    model_config = SETTINGS

    task: str | None = Field(None, description="task whose questions are translated (emotion, snli, paws, ...); "
                                               "not needed when only question_files are given")
    sources: list[str] = Field(default_factory=list, description="source language codes (or all/high/low); the "
                               "paper's mixes: zhde = zh,de; zhdeit = zh,de,it; swhi = sw,hi")
    target: str = Field("en", description="target language code (the paper: en, also zh)")
    rows_per_lang: Count | None = Field(None, ge=1, description="rows per source language (default: all available)")
    items: str | None = Field(None, description="item index range START:END (e.g. 60:120), applied to every source")
    exclude_items: list[Index] = Field(default_factory=list, description="item indices never used (e.g. evaluation items)")
    exclude_file: str | None = Field(None, description="more excluded indices: a text file of indices/START:END ranges, "
                                     "a JSON list, or an evaluation predictions.jsonl (its 'index' of this task)")
    shuffle: bool = Field(True, description="sample rows_per_lang at random and shuffle the mix (else first rows, in order)")
    paired: bool = Field(False, description="use the same item indices for every source language")
    seed: Seed = Field(0, description="seed of the sampling and the shuffle")
    dedup: bool = Field(True, description="drop records whose input text repeats an earlier one")
    control: Literal["none", "copy", "shuffled"] = Field(
        "none", description="a control set with the same rows and the same responses: copy = each row's input becomes "
        "its own target-language question (target -> target, e.g. English -> English: no cross-lingual content); "
        "shuffled = each source question paired with another item's target question (the translation "
        "correspondence removed); none = the question-translation rows themselves")
    data_dir: str | None = Field(None, description="folder with the official layout (or the base of data_files)")
    data_files: str | None = Field(None, description="path template with {task} and {lang} (.json/.jsonl), 'demo', or "
                                   "hf:<dataset>; e.g. snli/snli_{lang}10k_train.json under data_dir")
    split: str = Field("test", description="split for hf: datasets")
    prompts: CommaList[str] = Field(default_factory=list, description="extra spec files merged over the defaults (e.g. paper_prompts.json)")
    question_files: CommaList[str] = Field(default_factory=list, description="ready question-translation files (official "
                                      "input/answer, our input/output JSONL, or alpaca) mixed into the set")
    alpaca: bool = Field(False, description="also write LLaMA-Factory alpaca.json and dataset_info.json")
    dataset_name: str | None = Field(None, description="dataset_info.json entry name (default qt_<task>_<sources>_<target>)")

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, v):
        return split_mix(v)

    @field_validator("exclude_items", mode="before")
    @classmethod
    def _indices(cls, v):
        return indices_field(v)

    def source(self) -> DataSource:
        return DataSource.from_options(self.data_dir, self.data_files, self.split)

    def fingerprint(self) -> str:
        from qtalign.io import fingerprint

        return fingerprint(self.model_dump(mode="json"))

    def name(self) -> str:
        if self.dataset_name:
            return self.dataset_name
        src = "".join(self.sources) or "files"
        return f"qt_{self.task or 'mixed'}_{src}_{self.target}"


