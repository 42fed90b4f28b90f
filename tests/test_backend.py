"""The scoring seam: one contract every backend (torch, vllm, sglang) passes against a plain uncached transformers
forward on tiny fp32 models; the HTTP clients' fault handling against local fake servers (loopback only); and
`--backend vllm` giving the item-level predictions of `--backend torch` through `evaluate`."""

import copy
import json
import random
import time

import pytest
import torch

from conftest import ARCH_TOKENIZER, tiny_model
from fake_servers import FakeServer, plain_logprobs
from qtalign.engine.backend import ServerError, SglangBackend, TorchBackend, VllmBackend, open_backend
from qtalign.engine.forward import Engine, Prompt, encode_prompts
from qtalign.tokenids import pad_id
from qtalign.errors import QtalignError
from qtalign.scoring.scorer import ScoreRequest, Scorer
from qtalign.tasks.specs import load_specs
from qtalign.tasks.tokens import label_continuation

BACKENDS = ["torch", "vllm", "sglang"]


def _requests(task="snli", lang="de", variant="native", n=7, langs=("de", "en")):
    t = load_specs().task(task)
    reqs = []
    for lg in langs:
        words = t.label_words(lg, variant)
        for i in range(n):
            fields = {f: " ".join(["Ein Mann fährt Rad"] * (1 + i % 4)) + f" {i}" for f in t.item_fields}
            prefix, q = t.prompt_parts(lg, variant, fields)
            reqs.append(ScoreRequest(f"{lg}{i}", f"{task}/{lg}", prefix, q, list(words)))
    return reqs


def _encoded(tok, reqs):
    return encode_prompts(tok, [Prompt(r.key, r.group, r.prefix, r.prefix + r.question) for r in reqs])


class _Backend:
    """A backend of each kind over the same model: the torch engine, or a client of a fake server serving it."""

    def __init__(self, kind, model, tok, batch_size=3, **faults):
        self.kind, self.server = kind, None
        if kind == "torch":
            self.backend = TorchBackend(Engine(model, pad_id=pad_id(tok), batch_size=batch_size))
        else:
            self.server = FakeServer(model, kind, **faults).__enter__()
            cls = VllmBackend if kind == "vllm" else SglangBackend
            self.backend = cls(self.server.url, batch_size=batch_size, timeout=5, retries=3, backoff=0.01)

    def close(self):
        if self.server is not None:
            self.server.__exit__()


@pytest.fixture(params=BACKENDS)
def backend_kind(request):
    return request.param


@pytest.fixture(params=list(ARCH_TOKENIZER))
def arch_model(request):
    tok = request.getfixturevalue(ARCH_TOKENIZER[request.param])
    return tiny_model(request.param, tok), tok


# -- the contract --------------------------------------------------------------------------------------------------


def test_next_logprobs_equal_a_plain_forward(backend_kind, arch_model):
    """Every prompt answered once, with the log-probs (and probabilities) of exactly the ids asked for; more than 128
    ids and different ids per prompt included."""
    model, tok = arch_model
    reqs = _requests()
    enc = _encoded(tok, reqs)
    rng = random.Random(0)
    vocab = len(tok)
    ids = {e.key: rng.sample(range(vocab), 150 if i % 3 == 0 else 1 + i % 5) for i, e in enumerate(enc)}
    b = _Backend(backend_kind, model, tok)
    try:
        got = list(b.backend.next_logprobs(enc, ids))
        probs = dict(b.backend.next_logprobs(enc, ids, probs=True))
    finally:
        b.close()
    assert sorted(k for k, _ in got) == sorted(e.key for e in enc)
    for e in enc:
        ref = plain_logprobs(model, e.ids)[ids[e.key]].tolist()
        lps = dict(got)[e.key]
        assert len(lps) == len(ids[e.key])
        assert max(abs(a - c) for a, c in zip(lps, ref)) < 1e-4, e.key
        assert max(abs(p - torch.tensor(c).exp().item()) for p, c in zip(probs[e.key], ref)) < 1e-5


def test_continuation_logprobs_equal_a_plain_forward(backend_kind, arch_model):
    """Token j of every label continuation scored given the prompt and tokens 0..j-1."""
    model, tok = arch_model
    reqs = _requests(n=4)
    enc = _encoded(tok, reqs)
    by_key = {r.key: r for r in reqs}
    conts = {e.key: [label_continuation(tok, e.ids, by_key[e.key].prefix + by_key[e.key].question, w)
                     for w in by_key[e.key].words] for e in enc}
    assert any(len(c) > 1 for cs in conts.values() for c in cs)  # multi-token labels are exercised
    b = _Backend(backend_kind, model, tok)
    try:
        got = dict(b.backend.continuation_logprobs(enc, conts))
    finally:
        b.close()
    assert set(got) == set(conts)
    for e in enc:
        for c, lps in zip(conts[e.key], got[e.key]):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([e.ids + c])).logits[0].float(), -1)
            ref = [float(lp[len(e.ids) - 1 + j, t]) for j, t in enumerate(c)]
            assert len(lps) == len(c) and max(abs(a - r) for a, r in zip(lps, ref)) < 1e-4, (e.key, c)


@pytest.mark.parametrize("method", ["first-token", "faithful", "sequence"])
def test_every_backend_gives_the_native_predictions(backend_kind, method, spm_tokenizer):
    model = tiny_model("llama", spm_tokenizer)
    reqs = _requests(n=6)
    ref = {s.key: s for s in Scorer(model, spm_tokenizer, method, batch_size=4).score(copy.deepcopy(reqs))}
    b = _Backend(backend_kind, model, spm_tokenizer)
    try:
        got = {s.key: s for s in Scorer(b.backend, spm_tokenizer, method).score(copy.deepcopy(reqs))}
    finally:
        b.close()
    assert got.keys() == ref.keys()
    for k, r in ref.items():
        assert got[k].pred == r.pred, k
        assert max(abs(a - c) for a, c in zip(got[k].raw, r.raw)) < 1e-4 * max(1.0, max(abs(x) for x in r.raw))


def test_requests_keep_each_demo_block_together(spm_tokenizer):
    """Each group's prompts are sent consecutively, its first prompt alone (the server caches the demo block before
    the rest arrive), and the prefix cache then serves it: the reported cached tokens count it."""
    model = tiny_model("llama", spm_tokenizer)
    reqs = _requests(n=7)
    with FakeServer(model) as srv:
        be = VllmBackend(srv.url, batch_size=3, backoff=0.01)
        list(Scorer(be, spm_tokenizer).score(copy.deepcopy(reqs)))
    enc = {e.key: e for e in _encoded(spm_tokenizer, reqs)}
    by_ids = {tuple(e.ids): e.group for e in enc.values()}
    order = [[by_ids[tuple(p)] for p in post["prompt"]] for post in srv.posts]
    assert all(len(set(g)) == 1 for g in order)  # no request mixes groups
    flat = [g[0] for g in order]
    assert flat == sorted(flat, key=flat.index) and len(set(flat)) == 2  # a group's requests are consecutive
    firsts = [i for i, g in enumerate(flat) if i == 0 or flat[i - 1] != g]
    assert all(len(order[i]) == 1 for i in firsts)
    assert be.stats["cached_tokens"] >= (len(reqs) - 2) * 16 and be.stats["requests"] == len(srv.posts)


# -- faults ----------------------------------------------------------------------------------------------------------


def _scores(model, tok, reqs, method="first-token", **faults):
    kw = {k: faults.pop(k) for k in ("timeout", "retries") if k in faults}
    with FakeServer(model, **faults) as srv:
        be = VllmBackend(srv.url, batch_size=4, backoff=0.01, **{"timeout": 5, "retries": 3, **kw})
        return {s.key: s.raw for s in Scorer(be, tok, method).score(copy.deepcopy(reqs))}, be, srv


@pytest.fixture(scope="module")
def llama_pair(spm_tokenizer):
    model = tiny_model("llama", spm_tokenizer)
    reqs = _requests(n=5)
    ref = {s.key: s.raw for s in Scorer(model, spm_tokenizer, "first-token", 4).score(copy.deepcopy(reqs))}
    return model, spm_tokenizer, reqs, ref


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(max(abs(x - y) for x, y in zip(a[k], b[k])) < 1e-4 for k in a)


def test_503_then_success_is_retried(llama_pair):
    model, tok, reqs, ref = llama_pair
    got, be, _ = _scores(model, tok, reqs, fail_503=2)
    assert _close(got, ref) and be.stats["retries"] == 2


def test_a_timeout_is_retried(llama_pair):
    model, tok, reqs, ref = llama_pair
    got, be, _ = _scores(model, tok, reqs, hang=1, hang_s=1.5, timeout=0.4)
    assert _close(got, ref) and be.stats["retries"] >= 1


def test_a_server_that_never_answers_fails_clearly_and_boundedly(llama_pair):
    model, tok, reqs, _ = llama_pair
    t0 = time.time()
    with pytest.raises(ServerError, match=r"no answer after 3 tries \(last: HTTP 503\)"):
        _scores(model, tok, reqs, fail_503=10**6, retries=2)
    assert time.time() - t0 < 10
    with pytest.raises(QtalignError, match="no answer after 2 tries"):  # nothing listening at all
        open_backend("vllm", "http://127.0.0.1:9", retries=1, backoff=0.01, timeout=1)


def test_answers_out_of_order_are_placed_by_index(llama_pair):
    model, tok, reqs, ref = llama_pair
    got, _, _ = _scores(model, tok, reqs, shuffle=True)
    assert _close(got, ref)


@pytest.mark.parametrize("fault,message", [("ignore_ids", "ignores the requested ids"),
                                           ("name_keys", "ignores return_tokens_as_token_ids"),
                                           ("drop", "choices with indices")])
def test_a_server_not_answering_what_was_asked_is_one_clear_error(llama_pair, fault, message):
    model, tok, reqs, _ = llama_pair
    with pytest.raises(ServerError, match=message):
        _scores(model, tok, reqs, **{fault: True})


def test_id_sets_are_split_at_the_servers_limit(llama_pair):
    """More than 128 ids go in several requests (the server refuses more), and a server with a lower limit gets
    smaller requests after its first refusal; the scores do not change."""
    model, tok, reqs, _ = llama_pair
    enc = _encoded(tok, reqs)
    ids = {e.key: list(range(3, 303)) for e in enc}
    ref = {e.key: plain_logprobs(model, e.ids)[ids[e.key]].tolist() for e in enc}
    for limit in (128, 40):
        with FakeServer(model, max_ids=limit) as srv:
            be = VllmBackend(srv.url, batch_size=4, backoff=0.01)
            got = dict(be.next_logprobs(enc, ids))
        assert _close(got, ref)
        assert max(len(p["logprob_token_ids"]) for p in srv.posts) > limit or limit == 128
        assert be.max_ids <= limit and be.stats["retries"] == 0
    with FakeServer(model, max_ids=0) as srv:
        with pytest.raises(ServerError, match="refuses even one requested id"):
            dict(VllmBackend(srv.url, backoff=0.01).next_logprobs(enc, ids))


# -- through evaluate ------------------------------------------------------------------------------------------------


def test_vllm_backend_gives_the_torch_predictions_through_evaluate(tmp_path, tiny_llama_dir):
    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.eval.run import EvalConfig, evaluate

    lm = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32"))
    base = dict(model=ModelConfig(name=str(tiny_llama_dir), dtype="fp32"), tasks=["emotion"], langs=["en", "de"],
                variants=["enout", "native"], data_files="demo", limit=6, batch_size=4)
    torch_res = evaluate(EvalConfig(**base), tmp_path / "torch", loaded=lm, progress=False)
    with FakeServer(lm.model) as srv:
        res = evaluate(EvalConfig(**base, backend="vllm", server_url=srv.url), tmp_path / "vllm", progress=False)
    recs = {p: [json.loads(x) for x in (tmp_path / p / "predictions.jsonl").read_text().splitlines()] for p in ("torch", "vllm")}
    assert len(recs["vllm"]) == len(recs["torch"]) == 2 * 2 * 6
    for a, b in zip(recs["torch"], recs["vllm"]):
        assert (a["key"], a["pred"], a["cal_pred"]) == (b["key"], b["pred"], b["cal_pred"])
    # another engine: another fingerprint and other store keys (nothing was taken from the torch run's records)
    assert res["fingerprint"] != torch_res["fingerprint"] and res["timing"]["items_from_store"] == 0
    assert res["covers"]["model"]["backend"] == {"engine": "vllm", "version": "0.32.0-fake", "model": "tiny",
                                                 "root": "/models/tiny", "max_model_len": 4096}
    assert res["model"]["server"]["stats"]["cached_tokens"] > 0
    assert "backend" not in torch_res["covers"]["config"] and "server_url" not in res["covers"]["config"]


def test_a_server_dying_mid_group_leaves_a_run_that_resumes(tmp_path, tiny_llama_dir):
    """The server stops answering in the middle of a group: one clear error, the records scored so far kept; the rerun
    against a live server scores only the rest, and the result equals an uninterrupted run's."""
    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.eval.run import EvalConfig, evaluate

    lm = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32"))
    base = dict(model=ModelConfig(name=str(tiny_llama_dir), dtype="fp32"), tasks=["emotion"], langs=["en"],
                variants=["enout"], data_files="demo", limit=10, batch_size=2, store=False)
    with FakeServer(lm.model) as srv:
        evaluate(EvalConfig(**base, backend="vllm", server_url=srv.url), tmp_path / "clean", progress=False)
        n_clean = len(srv.posts)
    with FakeServer(lm.model, die_after=5) as srv:
        with pytest.raises(ServerError, match="no answer after 5 tries"):
            evaluate(EvalConfig(**base, backend="vllm", server_url=srv.url), tmp_path / "cut", progress=False)
    kept = (tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()
    assert 0 < len(kept) < 10 and not (tmp_path / "cut" / "results.json").exists()
    with FakeServer(lm.model) as srv:
        evaluate(EvalConfig(**base, backend="vllm", server_url=srv.url), tmp_path / "cut", progress=False)
        assert len(srv.posts) < n_clean
    recs = {p: [json.loads(x) for x in (tmp_path / p / "predictions.jsonl").read_text().splitlines()] for p in ("clean", "cut")}
    assert recs["cut"] == recs["clean"]


def test_the_context_comes_from_the_model_or_the_server(tmp_path, tiny_llama_dir, spm_tokenizer):
    """A scorer on the native engine (given as a model or as a TorchBackend) knows the model's positions; on a vLLM
    server, the served max_model_len: a prompt longer than that is refused before anything is scored."""
    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.eval.run import EvalConfig, evaluate

    model = tiny_model("llama", spm_tokenizer)
    assert Scorer(model, spm_tokenizer).context == 4096
    assert Scorer(TorchBackend(Engine(model)), spm_tokenizer).context == 4096
    lm = load_model(ModelConfig(name=str(tiny_llama_dir), dtype="fp32"))
    base = dict(model=ModelConfig(name=str(tiny_llama_dir), dtype="fp32"), tasks=["emotion"], langs=["en"],
                variants=["enout"], data_files="demo", limit=2)
    with FakeServer(lm.model, max_model_len=40) as srv:
        assert Scorer(VllmBackend(srv.url), spm_tokenizer).context == 40
        with pytest.raises(QtalignError, match=r"more than the model's context \(40 positions\)"):
            evaluate(EvalConfig(**base, backend="vllm", server_url=srv.url), tmp_path / "o", progress=False)
        assert srv.posts == []  # refused before any request


def test_backend_options_are_checked_before_anything_runs(tmp_path):
    import subprocess
    import sys

    from qtalign.eval.config import EvalConfig

    with pytest.raises(ValueError, match="backend vllm needs server_url"):
        EvalConfig(backend="vllm")
    with pytest.raises(ValueError, match="an adapter cannot be applied"):
        EvalConfig(backend="vllm", server_url="http://127.0.0.1:8000", model={"name": "x/y", "adapter": "a"})
    p = subprocess.run([sys.executable, "-m", "qtalign", "eval", "--backend", "vllm", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "server_url" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_an_experiment_passes_its_eval_backend_through(tmp_path):
    """`qtalign run ... eval.backend=vllm eval.server_url=...`: the evaluation units carry the backend in their config
    (the server's address is not a result); with a train stage the tuned evaluation is refused at planning, naming
    what to do (a server cannot apply the adapter)."""
    from pydantic import ValidationError

    from qtalign.experiment.config import load_experiment
    from qtalign.experiment.runner import Experiment

    over = ["eval.backend=vllm", "eval.server_url=http://127.0.0.1:9", f"out={tmp_path / 'run'}"]
    exp = Experiment(load_experiment(None, over + ["stages=[eval]"]))
    (unit,) = [u for u in exp.units() if u.stage == "eval"]
    assert unit.config["backend"] == "vllm" and "server_url" not in unit.config
    torch_unit = [u for u in Experiment(load_experiment(None, [f"out={tmp_path / 'run'}", "stages=[eval]"])).units()
                  if u.stage == "eval"][0]
    assert "backend" not in torch_unit.config
    with pytest.raises(ValidationError, match="an adapter cannot be applied here; merge it"):
        Experiment(load_experiment(None, over)).units()
