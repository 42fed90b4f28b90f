"""The machine and software a result was computed with (recorded in results.json and the report)."""

from __future__ import annotations

import os
import platform
import subprocess
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
    }


def hardware() -> dict:
    """CPU model, RAM and torch threads (the environment section of the report)."""
    import torch

    out: dict = {"torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        out["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    return out


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
