"""What qtalign writes and how it knows what it wrote: atomic writes, JSON and JSONL, content hashes, the one
fingerprint every stage and store uses, and output directories owned through a marker.

Everything here is plain Python (no torch): the bottom layer of the package.

- **Atomic writes.** A file is written to a temporary name beside it and renamed over the target, so a reader (or a
  resumed run) sees the old file or the new one, never half of one.
- **Content hashes.** ``file_sha256`` hashes a file once and remembers the hash by (path, size, mtime) in
  ``$QTALIGN_CACHE/hashes.json``: a 1 GB model is hashed once, not on every run.
- **The fingerprint.** ``fingerprint(config, data=, model=, numerics=)`` identifies a result by the settings that
  change it, the content of the data it read, the identity of the model and the version of the engine's numerics.
  A stored result is reused only when all four match.
- **Ownership.** ``OutputDir`` is a folder qtalign writes into. Its marker ``.qtalign.json`` lists what qtalign put
  there; qtalign deletes or overwrites nothing else (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from qtalign.errors import QtalignError

MARKER = ".qtalign.json"
LOCK = ".qtalign.lock"  # held (fcntl) by the process writing an OutputDir; names its pid
_HELD: dict[str, Any] = {}  # folder -> the open lock file this process holds (released when it ends)


def cache_root() -> Path:
    """qtalign's cache: converted models, content hashes, the shared result store ($QTALIGN_CACHE)."""
    return Path(os.environ.get("QTALIGN_CACHE") or Path.home() / ".cache" / "qtalign").expanduser()


def check_cache_env() -> None:
    """$QTALIGN_CACHE and $QTALIGN_STORE, where set, name folders qtalign can write: one line otherwise (a store
    pointed at a file is an error, never a store quietly turned off)."""
    for var in ("QTALIGN_CACHE", "QTALIGN_STORE"):
        if os.environ.get(var):
            check_folder(Path(os.environ[var]).expanduser(), f"${var}")


def check_folder(path: str | Path, what: str) -> Path:
    """A folder qtalign writes into (an output folder, the cache, the result store): one line when it is a file, lies
    under a file or cannot be written, instead of quietly working without it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise QtalignError(f"{what} {p}: is a file, not a folder")
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise QtalignError(f"{what} {p}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise QtalignError(f"{what} {p}: not writable ({anc})")
    return p


# ------------------------------------------------------------------------------------------------------------------
# atomic writes, JSON, JSONL


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``path`` atomically. Inside a folder qtalign owns (one with a marker) the name is recorded there first:
    a file of someone else's by that name is refused, never written over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name != MARKER and (path.parent / MARKER).is_file():
        OutputDir(path.parent).record(path.name)
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the error names the file it was writing (the old one is left whole)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def disk_errors(path: str | Path, probe: str | Path | None = None):
    """A block in which a library writes ``path`` (a file or a folder): a failed write is an OSError naming a path.
    An OSError that names no file is given ``path``; a library that reports a failed write as something else
    (torch.save: a RuntimeError "unexpected pos"; safetensors: its own error) is checked by writing a probe file into
    the folder ``probe`` (default: ``path`` when it is a folder, else the folder it is in): when the probe fails too (a
    full, read-only or forbidden disk), its OSError is raised naming ``path``; otherwise the library's error goes on
    unchanged (a bug is not a disk error, and neither is a QtalignError)."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except QtalignError:
        raise
    except Exception:
        err = _write_probe(Path(probe) if probe else Path(path) if Path(path).is_dir() else Path(path).parent)
        if err is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None


def _write_probe(folder: Path, size: int = 1 << 16) -> OSError | None:
    """The OSError that writing (and syncing) ``size`` bytes into ``folder`` raises, or None when it can be written."""
    probe = folder / f".qtalign-probe{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = memoryview(bytes(size))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return None


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON document at ``path``; ``default`` when it is missing or unreadable (a cut write is never final)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return default


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Records of a JSONL file (or of its gzip-compressed copy ``path.gz``, as exports store predictions); a line cut
    by a kill (not valid JSON) is skipped."""
    import gzip

    p = Path(path)
    if not p.exists() and Path(str(p) + ".gz").exists():
        p = Path(str(p) + ".gz")
    if not p.exists():
        return
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        yield from parse_jsonl(f)


def parse_jsonl(lines: Iterable[str]) -> Iterator[dict]:
    """Records of JSONL lines (a file's, or a text already read); a line cut by a kill (not valid JSON) is skipped."""
    for line in lines:
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def repair_jsonl_tail(path: str | Path) -> None:
    """Drop a last line cut by a kill, so that appended records start on a line of their own."""
    p = Path(path)
    if not p.exists():
        return
    data = p.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(p, data.rfind(b"\n") + 1)  # in place: a kill here loses nothing but the cut line


def yaml_load(text: str):
    """YAML with only true/false as booleans (YAML 1.2): `no` is Norwegian, `on` a word, not False and True."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


YAML_NODES_MAX = 100_000  # a config has hundreds of values; aliases must not expand past this (a "billion laughs")


def _check_expanded_size(root) -> None:
    """Refuse (yaml.YAMLError) a document whose aliases, written out, would exceed YAML_NODES_MAX values or that
    refers to itself: an alias is a reference in the loaded object, but copying, merging or validating the config
    expands it."""
    import yaml

    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise yaml.YAMLError("an alias refers to the node that contains it (a recursive document)")
        open_.add(key)
        kids = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        n = 1 + sum(size(k) for k in kids)
        open_.discard(key)
        if n > YAML_NODES_MAX:
            raise yaml.YAMLError(f"its aliases expand to more than {YAML_NODES_MAX} values (an alias bomb?)")
        sizes[key] = n
        return n

    size(root)


def require_file(path: str | Path, what: str, missing: str | None = None) -> Path:
    """An input file: one line when it is missing, a folder, or not a regular file (a pipe, a process substitution
    such as <(...), a device: qtalign hashes its inputs and may read them more than once)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise QtalignError(f"{p}: {missing or what + ' not found'}")
    if p.is_dir():
        raise QtalignError(f"{p}: is a folder, not a {what}")
    raise QtalignError(f"{p}: not a regular file (a pipe or a process substitution such as <(...)); qtalign hashes and "
                       f"rereads its inputs: save it to a file first")


def read_config(path: str | Path) -> dict:
    """A YAML (or JSON) config file as a mapping: one clear line for a missing file, bad YAML or a non-mapping."""
    import yaml

    p = require_file(path, "config file")
    try:
        d = yaml_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise QtalignError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise QtalignError(f"{p}: invalid YAML: nested too deeply") from None
    except UnicodeDecodeError:
        raise QtalignError(f"{p}: not UTF-8 text") from None
    if not isinstance(d, dict):
        raise QtalignError(f"{p}: a config file must be a mapping")
    return d


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive advisory lock (fcntl) held while the block runs; the lock file is left in place."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------------------------
# content hashes


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _hash_cache_path() -> Path:
    return cache_root() / "hashes.json"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content, cached by (absolute path, size, mtime): hashed once until the file changes."""
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    cache = read_json(_hash_cache_path(), {}) or {}
    hit = cache.get(key)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    sha = _sha256_of(p)
    if st.st_size >= 1 << 20:  # small files are hashed faster than the cache is read
        with contextlib.suppress(OSError), file_lock(cache_root() / ".hashes.lock"):
            cache = read_json(_hash_cache_path(), {}) or {}
            cache[key] = {"stamp": stamp, "sha256": sha, "at": round(time.time())}
            write_json(_hash_cache_path(), cache, indent=None)
    return sha


def files_sha256(paths: Iterable[str | Path]) -> dict[str, str]:
    """{path: sha256} for files (the data-content part of a fingerprint)."""
    return {str(p): file_sha256(p) for p in paths}


def dir_sha256(path: str | Path, skip: Iterable[str] = (MARKER,)) -> str:
    """One hash of a folder's files (relative names and contents; hidden files and ``skip`` left out)."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel in skip or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        h.update(rel.encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return bytes_sha256(text.encode("utf-8"))


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# the fingerprint


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))


def fingerprint(config: Any, data: Any = None, model: Any = None, numerics: str | None = None) -> str:
    """The identity of a result: the settings that change it (``config``), the content hashes of the data it read,
    the model's identity and the engine's numerics version. 16 hex digits."""
    payload = {"config": config, "data": data, "model": model, "numerics": numerics}
    return hashlib.sha256(canonical(payload).encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------------
# output directories owned through a marker


class OutputDir:
    """A folder qtalign writes into, owned through its marker ``.qtalign.json`` = {"tool", "kind", "entries"}.

    ``entries`` lists the names qtalign created there (or patterns of them, e.g. 'lens_*.png'); only those are ever
    removed or overwritten. A folder listed as 'name/' is owned the same way, through a marker of its own, file by
    file: removing it removes what its marker lists, recursively, and leaves every other file and the folders that
    still hold one (a folder of someone else's put in its place, without the marker, is not qtalign's). A folder
    listed as a plain name was written whole by qtalign (a library's output such as a training checkpoint) and is
    qtalign's whole. A folder that exists, is not empty and is neither marked nor listed by its owner is refused, and
    so is a folder written by another kind of qtalign command (an experiment's run dir given to ``merge``).
    """

    def __init__(self, path: str | Path, kind: str = "output", option: str = "--out"):
        self.path = Path(path).expanduser()  # `out: ~/x` is the home's x, never a folder named '~'
        self.kind = kind
        self.option = option

    # -- claiming -------------------------------------------------------------------------------------------------
    def check(self) -> "OutputDir":
        """Refuse (one line, nothing written) a path that qtalign cannot own: a file, an unwritable place, a folder of
        other people's files, or one another kind of qtalign output owns."""
        p = check_folder(self.path, self.option)
        if p.is_dir() and not self.owned() and any(p.iterdir()):
            raise QtalignError(f"{self.option} {p}: the folder exists and was not written by qtalign (no {MARKER}); "
                               "choose another folder: qtalign never deletes or overwrites files it did not write")
        kind = self._load().get("kind")
        if kind and kind != self.kind:
            raise QtalignError(f"{self.option} {p}: holds a qtalign {kind} output, not a {self.kind} one; choose another "
                               "folder")
        return self

    def whole(self) -> bool:
        """Whether the folder above is qtalign's and lists this one as written whole (a plain name, not 'name/'): then,
        without a marker of its own, all of it is qtalign's."""
        parent = OutputDir(self.path.parent)
        name = self.path.name
        return (parent.path / MARKER).is_file() and parent.is_ours(name) and not parent.marked(name)

    def owned(self) -> bool:
        return (self.path / MARKER).is_file() or self.whole()

    def claim(self) -> "OutputDir":
        """Create the folder and write its marker (a folder its owner lists as written whole, without a marker of
        its own, gets one listing everything in it)."""
        self.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / MARKER).is_file():
                self._save({x.name for x in self.path.iterdir()} if self.whole() else set())
            self.lock()
        except OSError as e:
            raise QtalignError(f"{self.option} {self.path}: cannot write there ({e.strerror or e})") from None
        return self

    def subdir(self, name: str, kind: str | None = None) -> "OutputDir":
        """A folder inside this one (``name`` may be nested: 'eval/base'), recorded here and owned through a marker
        of its own, like every folder on the way; ``kind`` is the innermost one's (the others take this one's)."""
        od, parts = self, name.split("/")
        for i, part in enumerate(parts):
            od.record(part)
            sub = OutputDir(od.path / part, (kind or self.kind) if i == len(parts) - 1 else self.kind, self.option).claim()
            if not od.marked(part):
                od._save(od.entries() - {part} | {part + "/"})
            od = sub
        return od

    def lock(self) -> None:
        """Hold the folder's lock (LOCK: an fcntl lock on a file that names the holder's pid) until the command
        finishes (release_locks, which removes the file) or the process ends: a second process claiming the folder
        is refused with the holder's pid. The lock dies with its process, so a file left by a killed one is taken
        over."""
        import fcntl

        key = str(self.path.resolve())
        if any(key.startswith(h.rstrip("/") + "/") for h in _HELD):
            return  # a folder around it is held by this process (a run dir holds its stage folders)
        while key not in _HELD:
            f = open(self.path / LOCK, "a+", encoding="utf-8")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                f.close()
                raise QtalignError(f"{self.option} {self.path}: in use by another qtalign process (pid {holder}, "
                                   f"{self.path / LOCK}); wait for it to finish or stop it") from None
            try:
                same = os.fstat(f.fileno()).st_ino == (self.path / LOCK).stat().st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it as we opened it: lock the file that is there now
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _HELD[key] = f
        d = self._load()
        if d.get("lock") != LOCK:
            d["lock"] = LOCK
            write_json(self.path / MARKER, d)

    # -- entries ------------------------------------------------------------------------------------------------
    def _load(self) -> dict:
        return read_json(self.path / MARKER, {}) or {}

    def _save(self, entries: set[str]) -> None:
        d = self._load()
        d.update(tool="qtalign", kind=d.get("kind", self.kind), entries=sorted(entries))
        d.setdefault("created", round(time.time()))
        write_json(self.path / MARKER, d)

    def entries(self) -> set[str]:
        """The names listed in the marker (read each time: other writers record names too)."""
        return set(self._load().get("entries", []))

    def record(self, *names: str) -> None:
        """Register top-level names as qtalign's, before writing them; a name that exists and is not qtalign's is
        refused (nothing of someone else's ever becomes qtalign's by being written over)."""
        tops = {n.split("/", 1)[0] for n in names}
        for top in sorted(tops):
            if (self.path / top).exists() and not self.is_ours(top):
                raise QtalignError(f"{self.path / top}: exists and was not written by qtalign; move it away or choose "
                                   "another folder")
        new = {t for t in tops if not self.is_ours(t)}
        if new:
            self._save(self.entries() | new)

    def declare(self, *names: str) -> None:
        """Record the names (or patterns) this folder's own writer writes here, files of those names already in it
        included: for a writer whose earlier version wrote them without listing them (the report's figures)."""
        if set(names) - self.entries():
            self._save(self.entries() | set(names))

    @contextlib.contextmanager
    def receiving(self, expect: Iterable[str] = ()):
        """A block in which a library writes into this folder: the names in ``expect`` are recorded first (a file of
        someone else's by such a name is refused), and every name the block creates is recorded after it."""
        self.record(*expect)
        before = {x.name for x in self.path.iterdir()} if self.path.is_dir() else set()
        yield self.path
        self._save(self.entries() | {x.name for x in self.path.iterdir()} - before - {MARKER})

    def file(self, name: str) -> Path:
        """The path of a top-level entry, registered as qtalign's."""
        self.record(name)
        return self.path / name

    def is_ours(self, name: str) -> bool:
        """Whether a top-level name is one qtalign wrote (entries may be patterns of the names it writes, e.g.
        'lens_*.png')."""
        import fnmatch

        top = name.split("/", 1)[0]
        return any(top == e.rstrip("/") or fnmatch.fnmatchcase(top, e.rstrip("/")) for e in self.entries())

    def holds(self, name: str) -> bool:
        """Whether the entry ``name`` exists with something of qtalign's in it (a folder of its own that a rerun
        cleared, left holding only other people's files, holds nothing)."""
        p = self.path / name
        if not p.exists():
            return False
        if p.is_dir() and (p / MARKER).is_file():
            sub = OutputDir(p)
            return any(sub.holds(c.name) for c in p.iterdir() if c.name != MARKER and sub.is_ours(c.name))
        return True

    def marked(self, name: str) -> bool:
        """Whether ``name`` is listed as a folder owned through a marker of its own ('name/')."""
        return name + "/" in self.entries()

    def remove(self, *names: str) -> None:
        """Remove what qtalign wrote under these entries (missing ones are fine; a nested name such as 'eval/base'
        is looked up through the folders' own markers); refuse anything else. An owned folder is cleared of its own
        files only (``_discard``)."""
        for name in names:
            top, _, rest = name.partition("/")
            target = self.path / top
            if not target.exists() and not target.is_symlink():
                continue
            if not self.is_ours(top):
                raise QtalignError(f"{target}: not written by qtalign (not listed in {self.path / MARKER}); "
                                   "refusing to delete it")
            if rest and (target / MARKER).is_file():
                OutputDir(target).remove(rest)
            elif rest and not self.marked(top):
                _discard(target / rest)  # inside a folder qtalign wrote whole
            elif not rest:
                _discard(target, marked=self.marked(top))  # the name stays in the marker: qtalign writes it again

    def clear(self) -> None:
        """Remove every entry qtalign wrote here and forget their names (for outputs whose names change from one run
        to the next, such as dated files); the marker stays, and so does everything that is not qtalign's."""
        self.remove(*sorted(x.name for x in self.path.iterdir() if x.name != MARKER and self.is_ours(x.name)))
        self._save({e for e in self.entries() if (self.path / e.rstrip("/")).exists()})  # folders still holding others'


def claim_run(out: OutputDir, record: dict, done: str, files: tuple[str, ...], what: str, other: str,
              overwrite: bool = False, leftovers: tuple[str, ...] = ()) -> dict | None:
    """The start of a resumable command (evaluation, training) in its output folder, on the main process (the caller
    shares the outcome): the finished run's ``done`` file when the run recorded in ``files[0]`` and that file carry
    ``record['fingerprint']``; else None, the folder claimed for it and ``record`` written to ``files[0]``. A finished
    run of another fingerprint, or ``files`` of an unknown run, are refused (one line; ``what`` names the command's
    files, ``other`` the refused run); an unfinished run of another fingerprint, or everything with ``overwrite``, is
    replaced: only what qtalign wrote goes (``files``, and the names that match the patterns ``leftovers``)."""
    out.check()
    fp, first = record["fingerprint"], files[0]
    prev, finished = read_json(out.path / first), read_json(out.path / done)
    stale = prev is not None and prev.get("fingerprint") != fp
    if not overwrite and prev is not None and finished is not None:
        if stale:
            raise QtalignError(f"{out.path}: holds {other} (fingerprint {prev.get('fingerprint')} != {fp}); use another "
                               "--out or --overwrite")
        if finished.get("fingerprint") == fp:
            return finished
    if not overwrite and prev is None and any(out.holds(n) for n in files):
        raise QtalignError(f"{out.path}: holds {what} files of an unknown run (no {first}); use another --out or "
                           "--overwrite")
    if stale and not overwrite:
        print(f"qtalign: {out.path}: replacing an unfinished {what} of another config", file=sys.stderr)
    out.claim()
    if overwrite or stale:
        out.remove(*[n for n in files if out.is_ours(n)],
                   *[x.name for pattern in leftovers for x in out.path.glob(pattern) if out.is_ours(x.name)])
    out.record(*files)
    write_json(out.path / first, record)
    return None


def _discard(path: Path, marked: bool = False) -> None:
    """Remove what qtalign wrote at ``path``, an entry of an owned folder: a file; a folder with a marker of its own
    as far as that marker lists (recursively), then the folder too once nothing else is left in it; a folder listed
    as written whole (not ``marked``) whole. A marked folder found without its marker is someone else's: left alone."""
    import shutil

    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
    elif (path / MARKER).is_file():
        od = OutputDir(path)
        for child in sorted(path.iterdir()):
            if child.name != MARKER and od.is_ours(child.name):
                _discard(child, od.marked(child.name))
        ours = {MARKER, LOCK} if od._load().get("lock") == LOCK else {MARKER}  # the marker proves the lock file is ours
        if {x.name for x in path.iterdir()} <= ours:
            for name in sorted(ours):
                (path / name).unlink(missing_ok=True)
            path.rmdir()
    elif not marked:
        shutil.rmtree(path)


def release_locks() -> None:
    """Give up the folder locks this process holds (a command has finished; the CLI calls this): each lock file is
    removed while still locked, then closed (which releases the lock)."""
    while _HELD:
        folder, f = _HELD.popitem()
        with contextlib.suppress(OSError):
            os.unlink(Path(folder) / LOCK)
        f.close()


def safe_name(label: str, what: str) -> str:
    """A label used as a file or folder name: one path component, no traversal."""
    if not label or label in (".", "..") or any(c in label for c in "/\\\0") or label.startswith("."):
        raise QtalignError(f"{what} {label!r}: must be a plain name (letters, digits, - _), not a path")
    return label
