"""GGUF files: a header check that turns garbage, empty and truncated files into one clear error, and the one-time
conversion to a bf16 Hugging Face folder in the cache, keyed by the file's content (sha256), never by its name.

Cache layout (``$QTALIGN_CACHE/models/``):

    gguf-<sha256[:16]>-v<converter>-bf16/   the converted folder (config, safetensors, tokenizer) + qtalign_source.json
    .tmp-<sha256[:16]>-<pid>/     a conversion in progress; left behind by a killed one and removed by the next
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from pathlib import Path

from qtalign.errors import QtalignError
from qtalign.io import cache_root, file_lock, write_json

CONVERTER_VERSION = 1  # bump when the conversion changes the converted weights


def check_gguf(path: Path) -> None:
    """Raise one clear error unless ``path`` looks like a complete GGUF v2/v3 file (magic, version, tensor table
    readable, tensor data inside the file)."""
    if not path.is_file():
        raise QtalignError(f"{path}: GGUF file not found")
    size = path.stat().st_size
    if size == 0:
        raise QtalignError(f"{path}: the GGUF file is empty")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise QtalignError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise QtalignError(f"{path}: unsupported GGUF version {version} (2 or 3)")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - the reader raises many types on a damaged file
        raise QtalignError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not reader.tensors:
        raise QtalignError(f"{path}: the GGUF file holds no tensors")
    if end > size:
        raise QtalignError(f"{path}: truncated GGUF file: its tensor data ends at byte {end:,}, the file has {size:,}")


def converted_dir(sha256: str) -> Path:
    """Keyed by the GGUF file's content and the converter's version (a changed conversion never reuses old weights)."""
    return cache_root() / "models" / f"gguf-{sha256[:16]}-v{CONVERTER_VERSION}-bf16"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(models: Path) -> list[Path]:
    """Remove conversions that a killed process left behind (``.tmp-*-<pid>`` whose process is gone)."""
    gone = []
    for p in models.glob(".tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def ensure_converted(gguf: Path, sha256: str, label: str) -> Path:
    """The converted bf16 folder of a GGUF file with content ``sha256`` (converting it once, under a lock)."""
    out = converted_dir(sha256)
    if (out / "qtalign_source.json").is_file():
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if (out / "qtalign_source.json").is_file():
            return out
        remove_stale_tmp(out.parent)
        check_gguf(gguf)
        _convert(gguf, out, sha256, label)
    return out


def _convert(gguf: Path, out_dir: Path, sha256: str, label: str) -> None:
    """Dequantise a GGUF checkpoint and save it as a bf16 HF folder (the GGUF-loaded model cannot be saved
    directly, so it is rebuilt from its config and state dict)."""
    import torch
    from rich.console import Console
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    t0 = time.time()
    tmp = out_dir.parent / f".tmp-{sha256[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with console.status(f"[bold]{label}: converting {gguf.name} to a bf16 HF folder (once; about a minute per 0.5B)…"):
            try:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
                cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            except (ValueError, KeyError, OSError, RuntimeError) as e:
                raise QtalignError(f"{gguf}: cannot convert this GGUF file with transformers: {str(e).splitlines()[0][:200]}") from None
            cfg.dtype = "bfloat16"
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
            if getattr(cfg, "tie_word_embeddings", False):
                missing = [m for m in missing if "lm_head" not in m]  # tied to the embeddings
            if missing or unexpected:
                raise QtalignError(f"{gguf}: GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_json(tmp / "qtalign_source.json", {"label": label, "gguf": gguf.name, "sha256": sha256,
                                                     "converter_version": CONVERTER_VERSION,
                                                     "converted_s": round(time.time() - t0, 1)})
        if out_dir.exists():  # an incomplete folder of ours (no qtalign_source.json): replaced
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"[green]{label}: converted in {time.time() - t0:.0f} s -> {out_dir}")
