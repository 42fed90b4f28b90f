"""The bounds every numeric setting is checked against, shared by all configs (train, eval, analysis, data, model,
experiment): a number is finite, and a size is one a machine can hold. A setting outside them is refused when the
config is validated, before any file is read or written (one line naming the option or the dotted key).

- ``SETTINGS``: the pydantic config of every settings model: unknown keys and non-finite floats (inf, nan) refused.
- Annotated types for the integer settings, each with its upper bound: ``Seed`` (0..2**32-1, what NumPy accepts),
  ``Rank`` (a LoRA rank), ``BatchSize``, ``Tokens`` (a sequence length or chunk), ``Count`` (steps, rows, items,
  checkpoints), ``Index`` (an item or layer index). A field keeps its own lower bound and description in its ``Field``.

Plain Python and pydantic: the bottom layer of the package.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

SETTINGS = ConfigDict(extra="forbid", allow_inf_nan=False)

SEED_MAX = 2**32 - 1  # numpy.random.seed's range
RANK_MAX = 4096  # a LoRA rank above this is larger than the hidden size of every model qtalign loads
BATCH_MAX = 65536
TOKENS_MAX = 1 << 20
COUNT_MAX = 2**31 - 1

Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Rank = Annotated[int, Field(ge=1, le=RANK_MAX)]
BatchSize = Annotated[int, Field(ge=1, le=BATCH_MAX)]
Tokens = Annotated[int, Field(ge=1, le=TOKENS_MAX)]
Count = Annotated[int, Field(ge=1, le=COUNT_MAX)]
Index = Annotated[int, Field(ge=0, le=COUNT_MAX)]
