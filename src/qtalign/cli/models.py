"""`qtalign models`: the embedded models, whether each is installed and converted, its size and licence."""

from __future__ import annotations


def configure_parser(p, name: str) -> None:
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def model_rows() -> list[dict]:
    from qtalign.engine.gguf import converted_dir
    from qtalign.engine.registry import registry

    rows = []
    for name, m in registry().items():
        cached = (converted_dir(m.sha256) / "qtalign_source.json").is_file()
        rows.append({"name": name, "family": m.family, "params": m.params, "instruct": m.instruct, "license": m.license,
                     "gguf_bytes": m.size, "installed": m.installed(), "cached": cached,
                     "install": m.install_hint(), "hub_equivalent": m.hub_equivalent, "description": m.description})
    return rows


def run_cli(args) -> int:
    import json

    rows = model_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| model | params | kind | licence | GGUF size | installed | converted (cached) | install |")
    print("|---|---|---|---|---:|---|---|---|")
    for r in rows:
        kind = "instruct" if r["instruct"] else "base"
        print(f"| {r['name']} | {r['params']} | {kind} | {r['license']} | {r['gguf_bytes'] / 2**20:,.0f} MiB | "
              f"{'yes' if r['installed'] else 'no'} | {'yes' if r['cached'] else 'no'} | `{r['install']}` |")
    return 0
