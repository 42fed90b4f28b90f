"""Local stand-ins for a vLLM OpenAI-compatible server and an SGLang server (loopback only), answering from a tiny model
with a plain uncached forward, with injectable faults: 503s, hangs (client timeouts), answers out of order, a server
that ignores the requested ids, a lower id limit, too few answers."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log softmax over the vocabulary after ``ids``: one uncached forward of the whole prompt (the oracle)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


class FakeServer:
    """``engine``: 'vllm' or 'sglang'. ``faults``: fail_503 (first N POSTs answered 503), die_after (every POST after
    the first N answered 503), hang (first N POSTs answered
    after hang_s seconds), shuffle (choices in reverse order), ignore_ids (only the sampled token comes back),
    max_ids (requests asking for more ids are refused with a 400, as vLLM does above 128), drop (one choice short),
    name_keys (tokens as text instead of 'token_id:<id>')."""

    def __init__(self, model, engine: str = "vllm", block: int = 16, max_model_len: int = 4096, **faults):
        self.model, self.engine, self.block, self.max_model_len = model, engine, block, max_model_len
        self.faults = {"fail_503": 0, "die_after": None, "hang": 0, "hang_s": 1.0, "shuffle": False, "ignore_ids": False, "max_ids": 128,
                       "drop": False, "name_keys": False, **faults}
        self.posts: list[dict] = []  # every POST body received (in arrival order)
        self.seen: list[list[int]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, obj) -> None:
                body = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

            def do_GET(self):
                self._send(*server.get(self.path))

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(*server.post(self.path, payload))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    # -- answers -----------------------------------------------------------------------------------------------
    def get(self, path: str):
        answers = {"/version": {"version": "0.32.0-fake"},
                   "/v1/models": {"object": "list", "data": [{"id": "tiny", "root": "/models/tiny",
                                                              "max_model_len": self.max_model_len}]},
                   "/get_model_info": {"model_path": "/models/tiny"}, "/get_server_info": {"version": "0.5-fake"}}
        return (200, answers[path]) if path in answers else (404, {"error": "not found"})

    def post(self, path: str, payload: dict):
        with self.lock:
            self.posts.append(payload)
            n = len(self.posts)
        dead = self.faults["die_after"] is not None and n > self.faults["die_after"]
        if n <= self.faults["fail_503"] or dead:
            return 503, {"error": {"message": "Service Unavailable"}}
        if n <= self.faults["hang"]:
            time.sleep(self.faults["hang_s"])
        if path == "/v1/completions" and self.engine == "vllm":
            return self.completions(payload)
        if path == "/generate" and self.engine == "sglang":
            return self.generate(payload)
        return 404, {"error": "not found"}

    def _cached(self, ids: list[int]) -> int:
        """Prefix-cache hits as a paged cache counts them: whole blocks shared with an earlier prompt."""
        best = 0
        for s in self.seen:
            k = 0
            while k < min(len(s), len(ids)) and s[k] == ids[k]:
                k += 1
            best = max(best, k)
        self.seen.append(list(ids))
        return min(best, len(ids) - 1) // self.block * self.block

    def _answer(self, ids: list[int], want: list[int]) -> dict[int, float]:
        with self.lock:
            lp = plain_logprobs(self.model, ids)
        sampled = int(lp.argmax())
        chosen = [] if self.faults["ignore_ids"] else want
        return {t: float(lp[t]) for t in [*chosen, sampled]}

    def completions(self, p: dict):
        want = p.get("logprob_token_ids") or []
        if len(want) > self.faults["max_ids"]:
            return 400, {"error": {"message": f"logprob_token_ids must have at most {self.faults['max_ids']} token ids, "
                                   f"got {len(want)}", "type": "BadRequestError"}}
        prompts = p["prompt"] if p["prompt"] and isinstance(p["prompt"][0], list) else [p["prompt"]]
        choices, cached = [], 0
        for i, ids in enumerate(prompts):
            top = self._answer(ids, want)
            key = (lambda t: f"tok{t}") if self.faults["name_keys"] else (lambda t: f"token_id:{t}")
            choices.append({"index": i, "text": "", "finish_reason": "length",
                            "logprobs": {"tokens": [key(max(top, key=top.get))], "token_logprobs": [max(top.values())],
                                         "top_logprobs": [{key(t): v for t, v in top.items()}], "text_offset": [0]}})
            cached += self._cached(ids)
        if self.faults["shuffle"]:
            choices.reverse()
        if self.faults["drop"]:
            choices = choices[:-1]
        n = sum(len(x) for x in prompts)
        return 200, {"id": "cmpl-fake", "object": "text_completion", "model": "tiny", "choices": choices,
                     "usage": {"prompt_tokens": n, "completion_tokens": len(prompts), "total_tokens": n + len(prompts),
                               "prompt_tokens_details": {"cached_tokens": cached}}}

    def generate(self, p: dict):
        out = []
        for ids, want in zip(p["input_ids"], p["token_ids_logprob"]):
            top = self._answer(ids, want)
            if self.faults["ignore_ids"]:
                top = {}
            out.append({"text": "", "meta_info": {"prompt_tokens": len(ids), "cached_tokens": self._cached(ids),
                                                  "output_token_ids_logprobs": [[[v, t, None] for t, v in top.items()]]}})
        return 200, out
