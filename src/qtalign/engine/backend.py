"""The scoring seam: a backend maps token-id requests to log-probabilities, and nothing more.

Tokenisation, candidate sets, decision rules, calibration, resume and the result store stay in qtalign (the scoring
rules in ``scoring/``); a backend answers two questions about already-tokenised prompts (``forward.Encoded``):

- ``next_logprobs(encoded, ids)``: per prompt, the log-probabilities (or probabilities) of the given token ids at the
  position right after the prompt (the first-token and faithful rules);
- ``continuation_logprobs(encoded, conts)``: per prompt, for every continuation (a list of token ids), the
  log-probability of each of its tokens given the prompt and the tokens before it (the sequence rule).

Backends:

``torch``   today's engine (engine/forward.py): prefix-cached, length-sorted batches; its scores are the published ones.
``vllm``    a client of a running vLLM OpenAI-compatible server: ``POST /v1/completions`` with token-id prompts,
            ``logprob_token_ids`` (at most 128 ids per request: larger sets are split) and
            ``return_tokens_as_token_ids``; answers are read from ``choices[i].logprobs.top_logprobs[0]``.
``sglang``  a client of a running SGLang server: ``POST /generate`` with ``input_ids``, ``return_logprob`` and
            ``token_ids_logprob``; answers from ``meta_info.output_token_ids_logprobs[0]``.

The HTTP clients never ask for *prompt* log-probs (they skip the servers' prefix caches): a continuation's token j is
scored as the next token after prompt + tokens 0..j-1, so every request reads the demo block, the prompt and the label
tokens before it from the server's prefix cache. Requests are sent group by group (the first prompt of a group alone,
so that its demo block is computed once and cached before the rest arrive), retried with bounded backoff on 429/5xx,
connection errors and timeouts, and every answer is checked: each prompt answered once (by index), every requested id
present. An HTTP backend's ``identity()`` (engine, server version, served model) enters the fingerprints, so records
of different engines never mix; the torch backend's identity is None (its records keep today's keys).
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from qtalign.engine.forward import Encoded, by_group
from qtalign.errors import QtalignError

BACKENDS = ("torch", "vllm", "sglang")
RETRY_STATUS = (429, 500, 502, 503, 504)
# a refusal for too many requested ids (vLLM: "Requested logprob_token_ids of length N, which is greater than max
# allowed: 128"): answered with smaller requests
ID_LIMIT = re.compile(r"(logprob_token_ids|token_ids_logprob)\b.*\b(max|at most)\b", re.S)


class TorchBackend:
    """The native engine: one forward per batch, the LM head on the last position only, one copy back per batch.
    Values are float32 numbers (as Python floats), exactly those the scoring rules computed before the seam."""

    name = "torch"

    def __init__(self, engine):
        self.engine = engine

    def identity(self) -> dict | None:
        return None  # the model identity and NUMERICS_VERSION already say everything (today's store keys)

    def next_logprobs(self, encoded, ids, probs=False, progress=None):
        import torch

        parts = self.engine.parts
        for b in self.engine.run(encoded, progress=progress):
            with torch.inference_mode():
                logits = parts.unembed(b.last_hidden)
                dist = torch.softmax(logits, dim=-1) if probs else torch.log_softmax(logits, dim=-1)
                rows = _gather_rows(dist, [ids[k] for k in b.keys])
            yield from zip(b.keys, rows)

    def continuation_logprobs(self, encoded, conts, progress=None):
        import torch

        parts = self.engine.parts
        for b in self.engine.run(encoded, keep_cache=True, progress=progress):
            with torch.inference_mode():
                logp = torch.log_softmax(parts.unembed(b.last_hidden), dim=-1)
                rows = [conts[k] for k in b.keys]
                first_ids = [[c[0] for c in cs] for cs in rows]
                firsts = _gather_rows(logp, first_ids)
            pairs = [(r, c) for r, cs in enumerate(rows) for c in cs if len(c) > 1]
            rest = iter(self.engine.continuations(b, pairs) if pairs else [])
            for key, cs, first in zip(b.keys, rows, firsts):
                yield key, [[f] + (next(rest) if len(c) > 1 else []) for f, c in zip(first, cs)]


def _gather_rows(values, ids: list[list[int]]) -> list[list[float]]:
    """``values[r, ids[r]]`` for every row r, as host floats: one gather and one copy back for the batch (rows with
    fewer ids read padding that is cut off on the host)."""
    import torch

    k = max(len(w) for w in ids)
    if k == 0:
        return [[] for _ in ids]
    idx = torch.tensor([w + [0] * (k - len(w)) for w in ids]).to(values.device)
    return [row[: len(w)] for row, w in zip(values.gather(1, idx).tolist(), ids)]


# ------------------------------------------------------------------------------------------------------------------
# HTTP servers


class ServerError(QtalignError):
    """A server answered, but not with what was asked (one clear line naming the server and what is wrong)."""


class _IdLimit(Exception):
    """The server refused a request for having too many requested ids."""


class HttpBackend:
    """What the vLLM and SGLang clients share: batching by group, retries, answer checks, continuations as
    next-token requests. Subclasses build one request (``_request``) and read its identity (``identity``)."""

    name = "http"

    def __init__(self, url: str, batch_size: int = 8, timeout: float = 120.0, retries: int = 4, backoff: float = 0.5,
                 max_ids: int = 128):
        if not url or not url.startswith(("http://", "https://")):
            raise QtalignError(f"--server-url {url!r}: give the server's address, e.g. http://127.0.0.1:8000")
        self.url = url.rstrip("/")
        self.batch_size = max(1, int(batch_size))
        self.timeout, self.retries, self.backoff, self.max_ids = timeout, retries, backoff, max_ids
        self.stats = {"requests": 0, "retries": 0, "prompts": 0, "prompt_tokens": 0, "cached_tokens": 0}
        self._identity: dict | None = None

    # -- transport -------------------------------------------------------------------------------------------
    def _call(self, path: str, payload: dict | None = None) -> Any:
        """GET (payload None) or POST JSON; retries 429/5xx, refused connections and timeouts with bounded
        exponential backoff; any other HTTP error is one ServerError with the server's message."""
        data = None if payload is None else json.dumps(payload).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
            req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                body = " ".join(e.read().decode(errors="replace").split())[:300]  # one line
                if e.code in RETRY_STATUS:
                    last = f"HTTP {e.code}"
                    continue
                if e.code in (400, 422) and ID_LIMIT.search(body):
                    raise _IdLimit(body) from None
                raise ServerError(f"{self.name} server {self.url}{path}: HTTP {e.code}: {body}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e))
            except json.JSONDecodeError:
                raise ServerError(f"{self.name} server {self.url}{path}: the answer is not JSON") from None
        raise ServerError(f"{self.name} server {self.url}{path}: no answer after {self.retries + 1} tries (last: {last}); "
                          "is the server running (docs/scale.md)?")

    # -- next-token log-probs --------------------------------------------------------------------------------
    def _batches(self, encoded: list[Encoded]) -> Iterator[list[Encoded]]:
        """Group by group (first appearance), in the caller's order; a group's first prompt alone (its demo block is
        then in the server's prefix cache when the rest arrive), then batches of at most batch_size prompts."""
        for es in by_group(encoded).values():
            yield es[:1]
            for i in range(1, len(es), self.batch_size):
                yield es[i : i + self.batch_size]

    def _score(self, prompts: list[list[int]], want: list[int]) -> list[dict[int, float]]:
        """Per prompt, {id: log-prob} for every id of ``want`` (distinct ids), in requests of at most max_ids ids; a
        server that refuses a request's id count gets smaller requests (halved, down to one id)."""
        got: list[dict[int, float]] = [{} for _ in prompts]
        i = 0
        while i < len(want):
            chunk = want[i : i + self.max_ids]
            try:
                answers = self._request(prompts, chunk)
            except _IdLimit as e:
                if len(chunk) == 1:
                    raise ServerError(f"{self.name} server {self.url}: refuses even one requested id: {e}") from None
                self.max_ids = max(1, len(chunk) // 2)
                continue
            for g, a in zip(got, answers):
                g.update(a)
            i += len(chunk)
        return got

    def next_logprobs(self, encoded, ids, probs=False, progress=None):
        for batch in self._batches(encoded):
            want = list(dict.fromkeys(t for e in batch for t in ids[e.key]))  # one request asks for the batch's union
            for e, lp in zip(batch, self._score([e.ids for e in batch], want)):
                vals = [lp[t] for t in ids[e.key]]
                yield e.key, [math.exp(x) for x in vals] if probs else vals
            if progress is not None:
                progress.update(len(batch))

    def _check_answer(self, chunk: list[int], got: dict[int, float], where: str) -> dict[int, float]:
        missing = [t for t in chunk if t not in got]
        if missing:
            raise ServerError(f"{self.name} server {self.url}: {where}: the answer lacks requested token ids "
                              f"{missing[:5]} (got {sorted(got)[:5]}): the server ignores the requested ids "
                              f"({self.ids_field}); use a version that supports it")
        return {t: got[t] for t in chunk}

    # -- continuations as next-token requests ----------------------------------------------------------------
    def continuation_logprobs(self, encoded, conts, progress=None):
        """Token j of a continuation = the next token after prompt + its tokens 0..j-1: every request reads the
        prompt from the prefix cache. Items go in chunks of batch_size (an item's requests consecutively)."""
        for es in by_group(encoded).values():
            for i in range(0, len(es), self.batch_size):
                chunk = es[i : i + self.batch_size]
                probes, wants = _continuation_probes(chunk, conts)
                answers = dict(self.next_logprobs(probes, wants))
                for e in chunk:
                    yield e.key, [[answers[(e.key, tuple(c[:j]))][wants[(e.key, tuple(c[:j]))].index(t)]
                                   for j, t in enumerate(c)] for c in conts[e.key]]
                if progress is not None:
                    progress.update(len(chunk))

    # -- subclass API -----------------------------------------------------------------------------------------
    ids_field = ""

    @property
    def context(self) -> int | None:
        """The most positions the served model takes (None when the server does not say)."""
        n = self.identity().get("max_model_len")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def _request(self, prompts: list[list[int]], ids: list[int]) -> list[dict[int, float]]:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError

    def _count(self, n_prompts: int, prompt_tokens: int, cached: int | None) -> None:
        self.stats["requests"] += 1
        self.stats["prompts"] += n_prompts
        self.stats["prompt_tokens"] += prompt_tokens
        self.stats["cached_tokens"] += int(cached or 0)


def _continuation_probes(chunk: list[Encoded], conts: dict) -> tuple[list[Encoded], dict]:
    """The next-token requests that score every continuation of every prompt of ``chunk``: one per distinct context
    (prompt + a continuation's first j tokens), asking for the ids that follow that context."""
    wants: dict[tuple, list[int]] = {}
    probes: list[Encoded] = []
    for e in chunk:
        for c in conts[e.key]:
            for j, t in enumerate(c):
                k = (e.key, tuple(c[:j]))
                if k not in wants:
                    wants[k] = []
                    probes.append(Encoded(k, e.group, e.ids + c[:j], e.prefix_len))
                if t not in wants[k]:
                    wants[k].append(t)
    return probes, wants


class VllmBackend(HttpBackend):
    """A running vLLM OpenAI-compatible server (``vllm serve MODEL`` / ``python -m vllm.entrypoints.openai.api_server``)."""

    name = "vllm"
    ids_field = "logprob_token_ids"

    def identity(self) -> dict:
        if self._identity is None:
            version = self._call("/version").get("version")
            models = self._call("/v1/models").get("data") or []
            if not models:
                raise ServerError(f"vllm server {self.url}: /v1/models lists no model")
            m = models[0]
            self._identity = {"engine": "vllm", "version": version, "model": m.get("id"), "root": m.get("root"),
                              "max_model_len": m.get("max_model_len")}
        return self._identity

    def _request(self, prompts, ids):
        payload = {"model": self.identity()["model"], "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                   "logprobs": 0, "logprob_token_ids": ids, "return_tokens_as_token_ids": True}
        resp = self._call("/v1/completions", payload)
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not isinstance(choices, list) or sorted(c.get("index", -1) for c in choices) != list(range(len(prompts))):
            raise ServerError(f"vllm server {self.url}: /v1/completions answered {len(choices or [])} choices with "
                              f"indices {sorted(c.get('index') for c in choices or [])[:8]} for {len(prompts)} prompts")
        out: list[dict[int, float]] = [{} for _ in prompts]
        for c in choices:  # answers may come in any order: placed by their index
            top = ((c.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
            got = {}
            for tok, lp in top.items():
                if not tok.startswith("token_id:"):
                    raise ServerError(f"vllm server {self.url}: top_logprobs key {tok!r} is not 'token_id:<id>': the "
                                      "server ignores return_tokens_as_token_ids")
                got[int(tok[9:])] = float(lp)
            out[c["index"]] = self._check_answer(ids, got, f"choice {c['index']}")
        usage = resp.get("usage") or {}
        self._count(len(prompts), int(usage.get("prompt_tokens") or 0),
                    (usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
        return out


class SglangBackend(HttpBackend):
    """A running SGLang server (``python -m sglang.launch_server --model-path MODEL``)."""

    name = "sglang"
    ids_field = "token_ids_logprob"

    def identity(self) -> dict:
        if self._identity is None:
            info = self._call("/get_model_info")
            server = self._call("/get_server_info")
            self._identity = {"engine": "sglang", "version": server.get("version"), "model": info.get("model_path")}
        return self._identity

    def _request(self, prompts, ids):
        payload = {"input_ids": prompts, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                   "return_logprob": True, "logprob_start_len": -1, "token_ids_logprob": [list(ids) for _ in prompts]}
        resp = self._call("/generate", payload)
        if not isinstance(resp, list) or len(resp) != len(prompts):
            raise ServerError(f"sglang server {self.url}: /generate answered {len(resp) if isinstance(resp, list) else 'no list'}"
                              f" for {len(prompts)} prompts")
        out = []
        for i, r in enumerate(resp):  # a batch's answers come in the order of its prompts
            meta = r.get("meta_info") or {}
            step = (meta.get("output_token_ids_logprobs") or [None])[0] or []
            out.append(self._check_answer(ids, {int(t[1]): float(t[0]) for t in step}, f"prompt {i}"))
            self._count(1, int(meta.get("prompt_tokens") or 0), meta.get("cached_tokens"))
        self.stats["requests"] += 1 - len(prompts)
        return out


def open_backend(name: str, server_url: str | None, batch_size: int = 8, **kw) -> HttpBackend:
    """The HTTP backend ``name`` (vllm | sglang) at ``server_url``, its identity read (one clear error when the
    server cannot be reached or is not that engine)."""
    cls = {"vllm": VllmBackend, "sglang": SglangBackend}.get(name)
    if cls is None:
        raise QtalignError(f"--backend {name!r}: an HTTP backend is one of vllm, sglang")
    if not server_url:
        raise QtalignError(f"--backend {name} needs --server-url (the address of a running {name} server, e.g. "
                           "http://127.0.0.1:8000; docs/scale.md)")
    backend = cls(server_url, batch_size=batch_size, **kw)
    backend.identity()
    return backend
