"""`qtalign store import DIR...`: seed the shared result store with the per-item records of finished evaluations
(a run's eval folder or a published ``--export`` of it), so that a study on a fresh machine reuses a base evaluation
instead of recomputing it. Each folder is checked first: its fingerprint, recomputed from its config with this
machine's data, prompts, model identity and engine numerics, must equal the recorded one."""

from __future__ import annotations


def configure_parser(p, name: str) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="add a finished evaluation's records to the store (verified first)",
                         description="add a finished evaluation's records to the store (verified first)")
    imp.add_argument("dirs", nargs="+", metavar="DIR", help="evaluation folders (results.json + predictions.jsonl[.gz])")
    imp.add_argument("--data-dir", help="where the recorded config's data_dir is on this machine (contents must match)")
    imp.add_argument("--prompts", action="append", help="where the recorded prompt files are on this machine "
                     "(repeat for several; contents must match)")
    imp.add_argument("--adapter", help="where the recorded LoRA adapter is on this machine (a tuned evaluation; its "
                     "content hash is recorded, so only the same weights match)")


def run_cli(args) -> int:
    from qtalign.eval.run import import_evaluation
    from qtalign.eval.store import Store

    store = Store()
    for d in args.dirs:
        r = import_evaluation(d, data_dir=args.data_dir, prompts=args.prompts, adapter=args.adapter,
                              store=store)
        print(f"{d}: {r['records']} records in {r['groups']} groups verified; {r['added']} added to {store.root}")
    return 0
