"""The one plan of every stage that selects items (evaluation, lens, geometry): `TaskSelection.plan(model)` reads and
checks everything before a model is loaded or a file is written, and yields the groups, their items, the content
hashes of the data and the task specs, and the one fingerprint of the result. The experiment fingerprints its units
with it, evaluation records it in run.json and results.json, the analyses in their summary.json, and the shared
result store derives its per-group keys from the same hashes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qtalign.io import files_sha256, fingerprint
from qtalign.tasks.groups import Group
from qtalign.tasks.items import cluster_ids, data_hashes
from qtalign.tasks.specs import SpecSet


@dataclass
class Plan:
    cfg: object  # the TaskSelection (EvalConfig, LensConfig, GeometryConfig) it plans
    specs: SpecSet
    groups: list[Group]  # task x variant x language, in order
    skipped: list[dict]  # task x language pairs without data ('all', 'high', 'low' skip them with a note)
    by_lang: dict[tuple[str, str], list]  # (task, lang) -> the selected items (read once; shared by its variants)
    data: dict[str, dict]  # 'task/lang' -> content hashes of the language's file and the English file (gold)
    spec_digests: dict[str, str]  # 'task/lang' -> hash of the spec that shapes its prompts (eval/store.spec_digest)
    prompts: dict[str, str]  # the spec files' sha256
    model: dict | None = None  # the model's identity (the analyses: {name: identity} of every model compared)
    fingerprint: str = ""  # io.fingerprint(result config, data=content, model=model, numerics=NUMERICS_VERSION)

    @classmethod
    def build(cls, cfg, model: dict | None = None, limit: bool = True) -> "Plan":
        """Read the specs, plan the groups and select their items (``limit=False``: every item of the range)."""
        from qtalign.eval.store import spec_digest
        from qtalign.tasks.specs import load_specs

        specs = load_specs(cfg.prompts)
        source = cfg.source()
        groups, skipped = cfg.groups(specs)
        sel = cfg if limit else cfg.model_copy(update={"limit": None})
        by_lang, data, digests = {}, {}, {}
        for g in groups:
            if (g.task, g.lang) not in by_lang:
                task = specs.task(g.task)
                by_lang[(g.task, g.lang)] = sel.select(task, g.lang, source)
                data[f"{g.task}/{g.lang}"] = data_hashes(task, g.lang, source)
                digests[f"{g.task}/{g.lang}"] = spec_digest(task, g.lang)
        return cls(cfg, specs, groups, skipped, by_lang, data, digests, files_sha256(cfg.prompts)).for_model(model)

    def for_model(self, model: dict | None, cfg=None) -> "Plan":
        """The same plan for another model (base or tuned: the data is not read again); ``cfg``: the config naming
        that model (the same selection, so the same result settings)."""
        from qtalign.engine.forward import NUMERICS_VERSION

        cfg = cfg or self.cfg
        fp = fingerprint(cfg.result_config(), data=self.content, model=model, numerics=NUMERICS_VERSION)
        return replace(self, cfg=cfg, model=model, fingerprint=fp)

    @property
    def content(self) -> dict:
        """The data part of the fingerprint: item files, prompt files, task specs."""
        return {"items": self.data, "prompts": self.prompts, "specs": self.spec_digests}

    @property
    def items(self) -> dict[Group, list]:
        return {g: self.by_lang[(g.task, g.lang)] for g in self.groups}

    def keys(self) -> set[str]:
        return {g.key(it.index) for g in self.groups for it in self.by_lang[(g.task, g.lang)]}

    def covers(self) -> dict:
        """What the fingerprint covers, as recorded in run.json, results.json and summary.json."""
        from qtalign.engine.forward import NUMERICS_VERSION

        return {"config": self.cfg.result_config(), "data_sha256": self.data, "model": self.model, "numerics": NUMERICS_VERSION}

    def store_keys(self, scoring: dict) -> dict[Group, str]:
        """The shared result store's key of each group (eval/store.group_fingerprint) under the scoring settings."""
        from qtalign.engine.forward import NUMERICS_VERSION
        from qtalign.eval.store import group_fingerprint

        return {g: group_fingerprint(g, self.specs.task(g.task), scoring, self.data[f"{g.task}/{g.lang}"], self.model,
                                     NUMERICS_VERSION) for g in self.groups}

    def clusters(self) -> dict[str, dict[int, int]]:
        """task -> item index -> cluster id, for tasks whose items come in clusters (SNLI's premise triples): read
        from the English items where they are evaluated (parallel items share an index), else the first language's."""
        out = {}
        for t in self.cfg.tasks:
            langs = sorted((lang for (tt, lang) in self.by_lang if tt == t), key=lambda c: c != "en")
            if langs:
                its = self.by_lang[(t, langs[0])]
                ids = cluster_ids(self.specs.task(t), its)
                if ids is not None:
                    out[t] = {it.index: c for it, c in zip(its, ids)}
        return out

    def resource(self) -> dict[str, str]:
        return {c: lang.resource_group for c, lang in self.specs.languages.items()}
