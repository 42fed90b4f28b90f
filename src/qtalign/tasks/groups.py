"""A group: one task x label variant x language, the unit that shares a prompt prefix, a candidate set and a
calibration (the one home of the 'task/variant/lang' names and item keys)."""

from __future__ import annotations

from typing import NamedTuple


class Group(NamedTuple):
    task: str
    variant: str
    lang: str

    @property
    def name(self) -> str:
        return f"{self.task}/{self.variant}/{self.lang}"

    def key(self, index: int) -> str:
        """The item key used in every per-item record (predictions.jsonl, the store, the report)."""
        return f"{self.name}/{index}"
