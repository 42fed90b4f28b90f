"""The embedded models, as data (``registry.json``): name -> PyPI packages carrying the GGUF file, its size and
sha256, licence and notes. A new embedded model is an entry there and an extra in ``pyproject.toml``, not code.

Two kinds of package:
- ``assemble``: the package's ``assemble(output_path)`` writes the whole file (the Gemma package);
- ``parts``: each part package's ``get_part_path()`` returns one chunk; the chunks concatenated in part order are the
  file (the Qwen packages).

Either way the assembled file is verified, size first and then sha256, before anything converts it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from qtalign.errors import QtalignError


@dataclass(frozen=True)
class Package:
    name: str  # PyPI name
    version: str  # pinned version
    module: str  # import name


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    family: str
    description: str
    params: str
    license: str
    kind: str  # 'assemble' | 'parts'
    packages: tuple[Package, ...]
    file_name: str
    size: int
    sha256: str
    extra: str | None = None  # pip extra that installs the packages (None: a core dependency)
    hub_equivalent: str | None = None
    instruct: bool = False
    hf_model_type: str | None = None
    layers: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    notes: str = ""

    # -- installation ---------------------------------------------------------------------------------------
    def missing_packages(self) -> list[Package]:
        return [p for p in self.packages if importlib.util.find_spec(p.module) is None]

    def installed(self) -> bool:
        return not self.missing_packages()

    def install_hint(self) -> str:
        if self.extra:
            return f"pip install 'qtalign[{self.extra}]'"
        return "pip install " + " ".join(f"{p.name}=={p.version}" for p in self.packages)

    def require_installed(self) -> None:
        missing = self.missing_packages()
        if missing:
            raise QtalignError(f"model '{self.name}': its weights are not installed (missing package {missing[0].name}"
                               f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): {self.install_hint()}")

    # -- assembling ---------------------------------------------------------------------------------------------
    def part_paths(self) -> list[Path]:
        return [Path(importlib.import_module(p.module).get_part_path()) for p in self.packages]

    def assemble(self, dest: Path) -> Path:
        """Write the GGUF file to ``dest`` (atomically) and verify it: size, then sha256. Returns ``dest``."""
        self.require_installed()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        try:
            if self.kind == "assemble":
                mod = importlib.import_module(self.packages[0].module)
                try:
                    mod.assemble(output_path=tmp, overwrite=True)
                except (OSError, ValueError) as e:
                    raise QtalignError(f"model '{self.name}': its package could not assemble the GGUF file: {e}") from None
            else:
                with open(tmp, "wb") as out:
                    for part in self.part_paths():
                        if not part.is_file():
                            raise QtalignError(f"model '{self.name}': part file {part} is missing; reinstall: {self.install_hint()}")
                        with open(part, "rb") as f:
                            for block in iter(lambda: f.read(1 << 22), b""):
                                out.write(block)
            verify_file(tmp, self.size, self.sha256, f"model '{self.name}'", self.install_hint())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


def verify_file(path: Path, size: int, sha256: str, what: str, hint: str = "") -> None:
    """Size first (cheap), then sha256; one clear error for either."""
    from qtalign.io import _sha256_of

    got = path.stat().st_size
    fix = f"; reinstall its packages ({hint})" if hint else ""
    if got != size:
        raise QtalignError(f"{what}: the assembled GGUF has {got:,} bytes, expected {size:,} (a missing, truncated or "
                           f"wrong part package){fix}")
    digest = _sha256_of(path)
    if digest != sha256:
        raise QtalignError(f"{what}: the assembled GGUF's sha256 is {digest[:16]}…, expected {sha256[:16]}… (a corrupted "
                           f"part package){fix}")


def _entry(name: str, d: dict) -> EmbeddedModel:
    pk = tuple(Package(**p) for p in d["packages"])
    keep = {k: v for k, v in d.items() if k != "packages" and k in EmbeddedModel.__dataclass_fields__}
    return EmbeddedModel(name=name, packages=pk, **keep)


@lru_cache(maxsize=None)
def _load(path: str) -> dict[str, EmbeddedModel]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return {name: _entry(name, d) for name, d in doc["models"].items()}


def registry_path() -> Path:
    return Path(str(files("qtalign.engine").joinpath("registry.json")))


def registry() -> dict[str, EmbeddedModel]:
    """All embedded models, in registry order."""
    return dict(_load(str(registry_path())))


def embedded(name: str) -> EmbeddedModel | None:
    return registry().get(name)


def embedded_names() -> list[str]:
    return list(registry())
