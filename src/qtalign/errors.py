"""User-facing errors: one clear line, naming the file, record and field where there is one."""

from __future__ import annotations


class QtalignError(Exception):
    """An error caused by the user's input or configuration. The CLI prints it as one line and exits 2."""


class NonFiniteError(QtalignError):
    """A model produced NaN or infinite numbers: the command stops (never a skipped group, never a counted score)."""


def data_error(path, message: str, record: int | str | None = None, field: str | None = None) -> QtalignError:
    where = [str(path)]
    if record is not None:
        where.append(f"record {record}")
    if field is not None:
        where.append(f"field '{field}'")
    return QtalignError(": ".join(where) + ": " + message)


def check_text(path, text: str, record: int | str | None = None, field: str | None = None) -> str:
    """A text read from a data file is valid Unicode: a lone surrogate (a JSON escape such as \\ud800 without its
    pair) cannot be tokenized or written, and is one line naming the file, record and field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise data_error(path, f"invalid Unicode: a lone surrogate ({ascii(text[e.start])}) at character {e.start}",
                         record, field) from None
    return text


def validation_message(e, where: str = "config") -> str:
    """A pydantic ValidationError as one line naming where the config came from and the dotted field."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    more = "" if len(e.errors()) == 1 else f" (and {len(e.errors()) - 1} more)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    return f"{where}: field '{loc}': {msg}{more}"
