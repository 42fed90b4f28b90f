"""User-facing errors: one clear line, naming the file, record and field where there is one."""

from __future__ import annotations


class QtalignError(Exception):
    """An error caused by the user's input or configuration. The CLI prints it as one line and exits 2."""


def data_error(path, message: str, record: int | str | None = None, field: str | None = None) -> QtalignError:
    where = [str(path)]
    if record is not None:
        where.append(f"record {record}")
    if field is not None:
        where.append(f"field '{field}'")
    return QtalignError(": ".join(where) + ": " + message)
