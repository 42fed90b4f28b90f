"""The package's layout (docs/architecture.md): every package imports exactly what the documented graph draws (the
bottom layer aside), with no cycle even through imports inside functions and commands loaded by name; `qtalign --help` imports no
torch; no long functions outside the numerical core; one home for each small idiom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "src" / "qtalign"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# the bottom layer: any package may import these; they import only one another
BOTTOM = {"io", "errors", "limits", "stats", "environment", "progress", "plots", "tracking", "tokenids", "__init__"}
# modules whose functions may be long: the numerical core (the engine, the scoring rules, token sets, the fused loss,
# the geometry metrics and the figures' plotting code)
NUMERICAL_CORE = {"engine/forward.py", "scoring/sequence.py", "scoring/faithful.py", "tasks/tokens.py", "train/loss.py",
                  "analysis/geometry.py", "analysis/lens.py", "analysis/plots.py", "report/figures.py", "tasks/specs.py"}


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] or ["__init__"]
        out["qtalign." + ".".join(parts) if parts != ["__init__"] else "qtalign"] = p
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every qtalign module a module imports, at module level or inside functions, and the command modules it names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (node.level == 0 and node.module.startswith("qtalign")):
            out.add(node.module)
            for a in node.names:
                out.add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (use qtalign.* imports)")
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("qtalign")}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("qtalign.") and " " not in node.value:
            out.add(node.value)  # modules loaded by name (the CLI's command table)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    g = {}
    for name, path in mods.items():
        g[name] = {m for m in (_resolve(x, mods) for x in imports(path, name)) if m and m != name}
    return g


def _resolve(target: str, mods: dict) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def _top(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else "__init__"


def documented_graph() -> dict[str, set[str]]:
    """The package graph drawn in docs/architecture.md: the lines `pkg -> a, b` of its ```graph block."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    block = text.split("```graph\n", 1)[1].split("```", 1)[0]
    out = {}
    for line in block.splitlines():
        if "->" in line:
            src, _, dst = line.partition("->")
            out[src.strip()] = {d.strip() for d in dst.split(",") if d.strip() and d.strip() != "(bottom layer only)"}
    return out


def package_edges() -> dict[str, set[str]]:
    """package -> the packages it imports (above the bottom layer), from every import of every module."""
    edges: dict[str, set[str]] = {}
    for mod, deps in graph().items():
        src = _top(mod)
        for d in deps:
            if d != "qtalign" and _top(d) != src:
                edges.setdefault(src, set()).add(_top(d))
    return edges


def test_no_import_cycle_even_through_function_level_imports():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m == "qtalign" or m.startswith(n + "."):
                continue  # a package's own modules
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_imports_follow_the_documented_graph():
    """Every package imports exactly the packages docs/architecture.md draws it importing (no more: an undocumented
    edge fails; no fewer: a drawn edge that no import makes fails), plus the bottom layer, which imports only itself."""
    doc = documented_graph()
    actual = package_edges()
    tops = {_top(m) for m in modules()}
    assert set(doc) == tops - BOTTOM, ("packages drawn vs. present", sorted(set(doc) ^ (tops - BOTTOM)))
    bad = []
    for pkg in sorted(tops):
        above = actual.get(pkg, set()) - BOTTOM
        if pkg in BOTTOM:
            bad += [f"bottom-layer {pkg} -> {d}" for d in sorted(above)]
        elif above != doc[pkg]:
            bad += [f"{pkg} -> {d} (not drawn)" for d in sorted(above - doc[pkg])]
            bad += [f"{pkg} -> {d} (drawn, but nothing imports it)" for d in sorted(doc[pkg] - above)]
    assert not bad, "imports vs. docs/architecture.md: " + "; ".join(bad)


def test_the_documented_graph_has_no_cycle():
    doc = documented_graph()
    order: list[str] = []
    while len(order) < len(doc):
        ready = [p for p in doc if p not in order and doc[p] <= set(order)]
        assert ready, f"cycle among {sorted(set(doc) - set(order))}"
        order += sorted(ready)


def test_help_imports_no_torch():
    code = ("import sys\nfrom qtalign.cli import build_parser\nbuild_parser().format_help()\n"
            "import qtalign.cli.run, qtalign.cli.train, qtalign.cli.eval\n"
            "bad = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'matplotlib') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "qtalign", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "eval" in out.stdout and "run" in out.stdout


def test_no_long_functions_outside_the_numerical_core():
    long = []
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).as_posix()
        if rel in NUMERICAL_CORE:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{rel}:{node.name} ({n} lines)")
    assert not long, long


def _sources() -> dict[str, str]:
    return {p.relative_to(PKG).as_posix(): p.read_text(encoding="utf-8") for p in PKG.rglob("*.py")}


def test_one_home_for_each_idiom():
    """Atomic writes, config files, fingerprints, pad ids, matplotlib setup, config-from-flags and index ranges each have
    one home; nothing else re-implements them."""
    homes = {
        "os.replace(": {"io.py", "engine/registry.py", "engine/gguf.py", "train/merge.py"},  # files vs. whole folders
        'matplotlib.use(': {"plots.py"},
        "yaml.safe_load(": {"io.py", "experiment/config.py"},
        "hashlib.sha256(": {"io.py"},
        "pad_token_id if": {"tokenids.py"},
        "def parse_range": {"tasks/items.py"},
        "def parse_indices": {"tasks/items.py"},
        "add_argument(": {"cli/options.py", "cli/run.py", "cli/report.py", "cli/export.py", "cli/models.py", "cli/train.py",
                          "cli/store.py"},
    }
    for pat, allowed in homes.items():
        found = {rel for rel, src in _sources().items() if pat in src}
        assert found <= allowed, (pat, sorted(found - allowed))


def test_report_reads_only_artifacts():
    """The report imports nothing from the experiment layer (it reads what the stages wrote)."""
    for mod, deps in graph().items():
        if mod.startswith("qtalign.report"):
            assert not any(d.startswith(("qtalign.experiment", "qtalign.eval.run", "qtalign.train", "qtalign.analysis")) for d in deps), (mod, deps)
