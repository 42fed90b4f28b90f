"""Merging a LoRA adapter into its base model (in fp32: merging in bf16 rounds a small adapter's change away)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

from qtalign.engine.models import DTYPE_NAMES, ModelConfig, load_model, torch_dtype
from qtalign.errors import QtalignError

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


