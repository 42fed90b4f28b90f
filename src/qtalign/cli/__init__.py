"""Command line: `qtalign <command> ...` (also `python -m qtalign` and `accelerate launch -m qtalign`).

All argparse lives in this package. Each command module exposes ``configure_parser(parser, name)`` and
``run_cli(args) -> int``; their options are generated from the stages' pydantic configs (cli/options.py). Building
the parser imports configs only, never torch or transformers (`qtalign --help` is instant).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("qtalign.cli.eval", "few-shot evaluation over tasks x languages x label variants"),
    "labels": ("qtalign.cli.eval", "label-tokenisation report for a model"),
    "lens": ("qtalign.cli.analysis", "language logit lens: English vs output-language label probability per layer"),
    "geometry": ("qtalign.cli.analysis", "cross-lingual representation geometry per layer (PCA, PC1 correlation, cosine, CKA, retrieval)"),
    "build-data": ("qtalign.cli.data", "question-translation training data (the paper's alignment records)"),
    "train": ("qtalign.cli.train", "LoRA instruction tuning on question-translation data (resumable; accelerate launch for data parallel)"),
    "merge": ("qtalign.cli.train", "merge a LoRA adapter into its base model (in fp32) and save it"),
    "run": ("qtalign.cli.run", "one-command experiment: data, tuning, evaluation, analyses and report (default: the demo)"),
    "report": ("qtalign.cli.report", "write a run dir's report (report.md, report.html) again from its artifacts"),
    "compare": ("qtalign.cli.report", "compare runs side by side (models, sizes, source mixes): Markdown + HTML with a plot"),
    "card": ("qtalign.cli.report", "the reproduction card: the paper's claims beside the published measurements, with verdicts"),
    "export": ("qtalign.cli.export", "export a run's per-item predictions as Hugging Face datasets parquet files"),
    "store": ("qtalign.cli.store", "seed the shared result store with a finished (or published) evaluation, verified against this machine's data and model"),
    "models": ("qtalign.cli.models", "list the embedded models: installed, converted, size, licence"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtalign", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(mod).configure_parser(p, name)
        p.set_defaults(_module=mod)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]):
    args, rest = parser.parse_known_args(argv)
    # positionals may follow options (`qtalign run CONFIG --data-dir D key=value`): give them to the command
    if rest and isinstance(getattr(args, "args", None), list) and not any(r.startswith("-") for r in rest):
        args.args += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


# the faults of a full or read-only disk: the user's to fix (one line naming the file), not a bug
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}
# commands that run a model: long CPU jobs, which glibc's malloc slows down as its heap fragments
HEAVY = {"eval", "labels", "lens", "geometry", "train", "merge", "run"}


def _with_allocator(argv: list[str]) -> None:
    """Restart a heavy command under jemalloc when it is installed and not in use (as `python -m qtalign` or the
    `qtalign` script only, never for an in-process main(argv)); QTALIGN_ALLOCATOR=system keeps glibc's malloc."""
    if os.environ.pop("QTALIGN_REEXEC", None):  # restarted: children (a report's browser, accelerate's workers) get
        before = os.environ.pop("QTALIGN_PRELOAD_BEFORE", "")  # the environment as the user set it
        if before:
            os.environ["LD_PRELOAD"] = before
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    command = argv[0] if argv else "run"  # `qtalign` alone runs the demo
    if command not in HEAVY or "-h" in argv or "--help" in argv:
        return
    from qtalign.environment import allocator_reexec

    plan = allocator_reexec()
    if plan is not None:
        try:
            os.execve(plan[0][0], plan[0], plan[1])
        except OSError:  # cannot restart: carry on with glibc's malloc
            pass


class Interrupts:
    """Ctrl-C for the length of a command, never lost: SIGINT raises KeyboardInterrupt as usual, and until the command
    has caught it (``handled``) a watcher thread raises it again every quarter second. Python drops an exception
    raised while a finalizer (``__del__``, a weakref callback) runs ("Exception ignored in ..."): without this the
    command would carry on. ``hit`` tells, after the command, that an interrupt came.

    ``last=True`` (the process's own command, which ends it) ignores Ctrl-C from the end of the command to the exit:
    the work is done and saved, and Python hands SIGINT back to the system default before it frees its modules (about
    1.7 s with torch loaded, measured here), so a Ctrl-C then killed the finished command with no message (status -2)
    or raised inside atexit callbacks ("Exception ignored"). With another thread still running (one the exit would
    wait for), the caller's handler comes back instead, so that Ctrl-C can still end a stuck exit."""

    def __init__(self, last: bool = False):
        self.last = last
        self.hit = False
        self.handled = False
        self._old = None
        self._watcher = None

    def __enter__(self) -> "Interrupts":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.handled:  # the command has stopped already: the watcher's last call, or a second Ctrl-C
            return
        if not self.hit:
            import threading

            self.hit = True
            self._watcher = threading.Thread(target=self._repeat, daemon=True)
            self._watcher.start()
        raise KeyboardInterrupt

    def _repeat(self) -> None:
        import _thread
        import time

        while True:
            time.sleep(0.25)
            if self.handled:
                return
            _thread.interrupt_main()

    def __exit__(self, *exc) -> None:
        import signal

        self.handled = True
        if self._watcher is not None:
            self._watcher.join()  # its last call handled (as nothing) before the caller's handler is back
        if self._old is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN if self.last and not _other_threads() else self._old)


def _other_threads() -> bool:
    """Whether a thread the interpreter's exit waits for (not a daemon) is still running."""
    import threading

    return any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread())


def main(argv: list[str] | None = None) -> int:
    """The entry point. User errors end stderr with one line and exit 2; an interrupted command ends with one line
    and exits 130."""
    if argv is None:
        _with_allocator(sys.argv[1:])
    last = argv is None  # the process's own command: the process ends with it
    argv = sys.argv[1:] if argv is None else list(argv)
    with Interrupts(last=last) as intr:
        try:
            rc = _main(argv)
        except KeyboardInterrupt:
            rc = 130
        finally:
            intr.handled = True
            from qtalign.io import release_locks

            release_locks()
    if intr.hit or rc == 130:
        # CPython marks an interrupt that escapes code run by exec() of a string (dataclasses, namedtuples build
        # their methods so while modules import) as unhandled, and then ends the process by SIGINT (-2) instead of
        # with our exit code; the next such exec() clears that mark
        exec("None")  # noqa: S102 - a constant
        command = argv[0] if argv and not argv[0].startswith("-") else "run"
        print(f"qtalign {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return rc


def _main(argv: list[str]) -> int:
    from pydantic import ValidationError

    from qtalign.errors import QtalignError, validation_message

    parser = build_parser()
    if not argv:
        argv = ["run"]  # `qtalign` alone runs the demo experiment
    try:
        args = _parse(parser, argv)
    except SystemExit as e:  # argparse: usage + one error line (exit 2), or --help (exit 0)
        return int(e.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command in HEAVY or args.command in ("store", "models"):
            from qtalign.io import check_cache_env

            check_cache_env()
        return int(importlib.import_module(args._module).run_cli(args) or 0)
    except QtalignError as e:
        print(f"qtalign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"qtalign {args.command}: error: {validation_message(e, 'config')}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            return _internal_error(args.command, e)
        where = f"{e.filename}: " if e.filename else ""
        print(f"qtalign {args.command}: error: {where}{e.strerror}: free space (or fix the folder) and rerun the same "
              "command to resume", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line (the traceback with QTALIGN_DEBUG=1)
        return _internal_error(args.command, e)


def _internal_error(command: str, e: Exception) -> int:
    if os.environ.get("QTALIGN_DEBUG"):
        raise e
    print(f"qtalign {command}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
          "(rerun with QTALIGN_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
    return 1
