"""Progress of a stage: a rich bar on a terminal; when stderr is not a terminal (piped to a log, CI, accelerate
launch), one line at a steady interval with done/total, rate and ETA. Only the main process reports.

    eval: 240/960 items (25.0 %) | 4.12 items/s | elapsed 58s | ETA 2m55s

The interval is ``$QTALIGN_PROGRESS_INTERVAL`` seconds (default 30); ``QTALIGN_PROGRESS=0`` turns progress off.
"""

from __future__ import annotations

import os
import sys
import time


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def progress_line(desc: str, done: int, total: int, elapsed: float, unit: str = "items", info: str = "", start: int = 0) -> str:
    """One progress line; the rate counts only the work done since this display started (``start``)."""
    rate = (done - start) / elapsed if elapsed > 0 else 0.0
    pct = f" ({100 * done / total:.1f} %)" if total else ""
    eta = _fmt_s((total - done) / rate) if rate > 0 and total else "?"
    tail = f" | {info}" if info else ""
    return f"{desc}: {done}/{total} {unit}{pct} | {rate:.3g} {unit}/s | elapsed {_fmt_s(elapsed)} | ETA {eta}{tail}"


class Progress:
    """``with Progress("eval", total) as p: ... p.advance(n)``"""

    def __init__(self, desc: str, total: int, unit: str = "items", enabled: bool = True, main: bool = True,
                 interval: float | None = None, stream=None, terminal: bool | None = None):
        self.desc, self.total, self.unit = desc, int(total), unit
        self.stream = stream or sys.stderr
        self.enabled = enabled and main and total > 0 and os.environ.get("QTALIGN_PROGRESS", "1") != "0"
        self.interval = float(interval if interval is not None else os.environ.get("QTALIGN_PROGRESS_INTERVAL", 30))
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.done = 0
        self.info = ""
        self._start = 0
        self._bar = self._task = None
        self._t0 = self._last = time.time()

    def __enter__(self) -> "Progress":
        self._t0 = self._last = time.time()
        self._start = self.done  # a resumed run: the rate and ETA count from here
        if self.enabled and self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(file=self.stream), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, completed=self.done, rate="")
        return self

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        now = time.time()
        if self._bar is not None:
            el = now - self._t0
            rate = f"{(self.done - self._start) / el:.3g} {self.unit}/s" if el > 0 else ""
            self._bar.update(self._task, advance=n, rate=rate + (f"  {self.info}" if self.info else ""))
        elif now - self._last >= self.interval:
            self._last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        return progress_line(self.desc, self.done, self.total, (now or time.time()) - self._t0, self.unit, self.info, self._start)

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
        else:
            print(self.line(), file=self.stream, flush=True)
