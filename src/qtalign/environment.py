"""The machine and software a result was computed with (recorded in results.json and the report)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from qtalign import __version__


def git_hash() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a checkout, no git
        return None


def environment() -> dict:
    """Versions and platform (torch, transformers, peft are imported here: call it from the stages only)."""
    import peft
    import torch
    import transformers

    return {
        "qtalign": __version__,
        "git": git_hash(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "allocator": allocator_in_use(),
    }


# ------------------------------------------------------------------------------------------------------------------
# the memory allocator: glibc's malloc fragments over long CPU runs (benchmarks/allocator.py); jemalloc does not

ALLOCATOR_LIBS = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
                  "tcmalloc": ("libtcmalloc.so.4", "libtcmalloc_minimal.so.4")}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def allocator_in_use() -> str:
    """'jemalloc', 'tcmalloc' or 'glibc': the malloc this process runs with (from its mapped libraries)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return next((name for name in ALLOCATOR_LIBS if f"lib{name}" in maps), "glibc")


def find_allocator() -> str | None:
    """The path of an installed jemalloc (or tcmalloc), or QTALIGN_ALLOCATOR when that names a library file."""
    given = os.environ.get("QTALIGN_ALLOCATOR", "auto")
    if given not in ("auto", "system"):
        return given if Path(given).is_file() else None
    dirs = [Path(sys.prefix) / "lib", *map(Path, LIB_DIRS)]
    return next((str(d / n) for names in ALLOCATOR_LIBS.values() for n in names for d in dirs if (d / n).is_file()), None)


def allocator_reexec() -> tuple[list[str], dict] | None:
    """(argv, env) that restart this process with jemalloc preloaded, or None where that does not apply: not Linux,
    QTALIGN_ALLOCATOR=system, already restarted or already running a better allocator, or none installed."""
    if not sys.platform.startswith("linux") or os.environ.get("QTALIGN_ALLOCATOR") == "system":
        return None
    if allocator_in_use() != "glibc":
        return None
    lib = find_allocator()
    if lib is None:
        return None
    before = os.environ.get("LD_PRELOAD", "")
    env = {**os.environ, "QTALIGN_REEXEC": "1", "QTALIGN_PRELOAD_BEFORE": before,
           "LD_PRELOAD": " ".join(x for x in (lib, before) if x)}
    return [sys.executable, *sys.orig_argv[1:]], env


def _cpuinfo(field: str) -> str | None:
    """The value of the first /proc/cpuinfo line for ``field`` (None where there is none or the file cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where that cannot be read)."""
    return set((_cpuinfo("flags") or "").split())


def bf16_native() -> bool | None:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX); None where unknown. Without it
    torch's bf16 matrix products take a reference path: measured on a 2-core AVX2 EPYC, 0.1 GFLOP/s against 8.9 in
    fp32 (about 90x slower), which turns a 40-minute LoRA run into days."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags) if flags else None


def hardware() -> dict:
    """CPU model, RAM, torch threads and native bf16 (the environment section of the report)."""
    import torch

    out: dict = {"torch_threads": torch.get_num_threads(), "bf16_native": bf16_native()}
    if (model := _cpuinfo("model name")) is not None:
        out["cpu_model"] = model
    try:
        import psutil

        out["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    return out
