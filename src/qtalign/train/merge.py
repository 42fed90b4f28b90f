"""Merging a LoRA adapter into its base model (in fp32: merging in bf16 rounds a small adapter's change away)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from qtalign.engine.models import DTYPE_NAMES, MERGE_4BIT, ModelConfig, load_model, torch_dtype
from qtalign.errors import QtalignError

# ----------------------------------------------------------------------------------------------------------
# merge


def merge(model_cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path, dtype: Literal["bf16", "fp32", "fp16"] = "bf16") -> Path:
    """Merge a LoRA adapter into its base model in fp32 and save the result (and the tokenizer) as a HF folder
    in `dtype`. ``out_dir`` is a new folder or one qtalign wrote: only the files of an earlier merge are replaced."""
    from qtalign.engine.models import apply_adapter, check_adapter_dir, check_model
    from qtalign.io import OutputDir, write_json

    if dtype not in DTYPE_NAMES:
        raise QtalignError(f"merge: unknown dtype '{dtype}' (bf16, fp32, fp16)")
    if model_cfg.load_in_4bit:
        raise QtalignError(f"merge: {MERGE_4BIT}")
    out = OutputDir(Path(out_dir).resolve(), "merge").check()
    check_adapter_dir(adapter_dir)
    base_cfg = model_cfg.model_copy(update={"dtype": "fp32", "adapter": None, "merge_adapter": False, "device": "cpu"})
    check_model(base_cfg)
    lm = load_model(base_cfg)
    merged = apply_adapter(lm.model, str(adapter_dir), merge=True, dtype=torch_dtype(dtype))
    tmp = out.path.with_name(f".{out.path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "qtalign_merge.json", {"base": model_cfg.name, "source": lm.info["source"], "adapter": str(adapter_dir),
                                               "dtype": dtype})
        out.claim()
        names = sorted(p.name for p in tmp.iterdir())
        out.remove(*[n for n in out.entries() if n not in names])  # files of an earlier merge not written now
        out.record(*names)
        for n in names:
            os.replace(tmp / n, out.path / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out.path
