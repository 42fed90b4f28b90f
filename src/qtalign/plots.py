"""The one matplotlib setup every figure uses (headless Agg backend, imported only when a figure is drawn)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 120, tight: bool = True) -> Path:
    """Write a figure (atomically: a reader never sees half a PNG) and close it."""
    import io as _io

    from qtalign.io import write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    pyplot().close(fig)
    return write_bytes(path, buf.getvalue())
