"""Golden scores: a few items' per-class scores of the embedded Gemma 3 270M and Qwen2.5-Coder-0.5B (fp32 and the
default bf16, on CPU), pinned at full precision (float.hex) together with the engine's NUMERICS_VERSION.

The shared result store reuses a score whenever model, data, prompts and NUMERICS_VERSION match, so a change to the
forward pass that moves any score must bump NUMERICS_VERSION (src/qtalign/engine/forward.py). These tests fail when a
score differs from its pin under the same version, and when the version was bumped without re-pinning. Re-pin with

    python tests/test_golden.py --repin

CPU kernels differ between machines (bf16 above all), so pins are kept per machine class (torch version, CPU
capability, bf16/AMX instructions); on a machine without pins the comparison is skipped, saying how to add them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden_scores.json")
REPIN = "python tests/test_golden.py --repin"
MODELS = {"gemma-3-270m": "gemma", "qwen2.5-coder-0.5b": "qwen"}
DTYPES = ("fp32", "bf16")
METHODS = ("sequence", "first-token")  # per-class log-probs of the whole label; probability mass of its first token


def machine() -> str:
    """The class of machine whose kernels produced a pin: torch version, CPU capability, bf16/AMX instructions."""
    import torch

    flags: list[str] = []
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        flags = sorted(f for f in line.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx"))
    except (OSError, StopIteration):
        pass
    return " ".join([f"torch {torch.__version__}", torch.backends.cpu.get_cpu_capability(), *flags])


def requests():
    """Two items of two emotion groups (German with native labels, Chinese with English labels), as `qtalign eval`
    builds them."""
    from qtalign.eval.run import build_requests
    from qtalign.tasks.items import DataSource, load_items
    from qtalign.tasks.specs import load_specs

    task = load_specs().task("emotion")
    return [r for lang, variant in (("de", "native"), ("zh", "enout"))
            for r in build_requests(task, lang, variant, load_items(task, lang, DataSource.demo())[:2], "sequence")]


def compute(lm) -> dict[str, dict[str, list[str]]]:
    """{method: {item key: per-class raw scores as float.hex}} of a loaded model."""
    from qtalign.scoring.scorer import Scorer

    out = {}
    for method in METHODS:
        scorer = Scorer(lm.model, lm.tokenizer, method, batch_size=4)
        out[method] = {str(s.key): [float(x).hex() for x in s.raw] for s in scorer.score(requests())}
    return out


def check(pinned: dict, version: str, where: str, model: str, dtype: str, computed: dict) -> list[str] | None:
    """The differences between computed scores and their pins, each a line, ending with what to do; [] when they
    agree; None when this machine has no pins for the model and dtype."""
    if pinned.get("numerics_version") != version:
        return [f"{GOLDEN.name} was pinned under NUMERICS_VERSION {pinned.get('numerics_version')!r} but the engine is "
                f"at {version!r}: re-pin the golden scores ({REPIN})"]
    want = pinned.get("machines", {}).get(where, {}).get(model, {}).get(dtype)
    if want is None:
        return None
    lines = []
    for method, items in want.items():
        for key, pin in items.items():
            got = computed.get(method, {}).get(key)
            if got != pin:
                show = [float.fromhex(x) for x in got] if got else None
                lines.append(f"{model} {dtype} {method} {key}: {show} != pinned {[float.fromhex(x) for x in pin]}")
    if lines:
        lines.append(f"the forward pass changed these scores under the same NUMERICS_VERSION {version!r}: bump "
                     f"NUMERICS_VERSION in src/qtalign/engine/forward.py (stored results are keyed by it) and re-pin "
                     f"the golden scores ({REPIN})")
    return lines


def _load(model: str, dtype: str):
    from qtalign.engine.models import ModelConfig, load_model
    from qtalign.engine.registry import embedded

    if not embedded(model).installed():
        pytest.skip(f"{model} not installed ({embedded(model).install_hint()})")
    return load_model(ModelConfig(name=model, dtype=dtype, device="cpu"))


@pytest.fixture(scope="module", params=[pytest.param((m, d), marks=getattr(pytest.mark, mark), id=f"{m}-{d}")
                                        for m, mark in MODELS.items() for d in DTYPES])
def scored(request):
    """(model, dtype, loaded model, its computed scores): each model and dtype loaded once."""
    model, dtype = request.param
    lm = _load(model, dtype)
    return model, dtype, lm, compute(lm)


def _pinned() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_scores_equal_their_pins(scored):
    from qtalign.engine.forward import NUMERICS_VERSION

    model, dtype, _, computed = scored
    problems = check(_pinned(), NUMERICS_VERSION, machine(), model, dtype, computed)
    if problems is None:
        pytest.skip(f"no golden scores for {model} {dtype} on this machine ({machine()}); add them with {REPIN}")
    assert not problems, "\n".join(problems)


def test_a_perturbed_forward_pass_is_caught(scored, monkeypatch):
    """A change of the forward pass by one part in a million (the final norm's output scaled) moves the pinned
    scores: the check names the items and says to bump NUMERICS_VERSION and re-pin."""
    from qtalign.engine.forward import NUMERICS_VERSION

    model, dtype, lm, _ = scored
    if (model, dtype) != ("gemma-3-270m", "fp32"):
        pytest.skip("one model and dtype shows it")
    norm = lm.model.get_decoder().norm
    real = norm.forward
    monkeypatch.setattr(norm, "forward", lambda x: real(x) * (1 + 1e-6))
    problems = check(_pinned(), NUMERICS_VERSION, machine(), model, dtype, compute(lm))
    if problems is None:
        pytest.skip(f"no golden scores for {model} {dtype} on this machine; add them with {REPIN}")
    assert len(problems) > 1 and "bump NUMERICS_VERSION" in problems[-1] and REPIN in problems[-1]
    assert any(" sequence " in p for p in problems[:-1]) and any(" first-token " in p for p in problems[:-1]), problems


def test_the_check_reports_a_one_ulp_change_and_an_unpinned_version():
    """The comparison itself (no model): exact to the last bit, and a bumped version asks for a re-pin."""
    import math

    pins = {"sequence": {"emotion/native/de/0": [(-1.25).hex(), (-0.5).hex()]}}
    pinned = {"numerics_version": "7", "machines": {"m": {"x": {"fp32": pins}}}}
    assert check(pinned, "7", "m", "x", "fp32", pins) == []
    moved = {"sequence": {"emotion/native/de/0": [(-1.25).hex(), math.nextafter(-0.5, 0).hex()]}}
    lines = check(pinned, "7", "m", "x", "fp32", moved)
    assert len(lines) == 2 and "emotion/native/de/0" in lines[0] and "bump NUMERICS_VERSION" in lines[1]
    assert check(pinned, "7", "other machine", "x", "fp32", moved) is None
    bumped = check(pinned, "8", "m", "x", "fp32", pins)
    assert len(bumped) == 1 and "re-pin" in bumped[0] and REPIN in bumped[0]


def repin() -> None:
    """Compute every model's and dtype's scores on this machine and pin them under the current NUMERICS_VERSION
    (other machines' pins are kept while the version is unchanged)."""
    from qtalign.engine.forward import NUMERICS_VERSION
    from qtalign.engine.registry import embedded

    old = _pinned() if GOLDEN.exists() else {}
    machines = old.get("machines", {}) if old.get("numerics_version") == NUMERICS_VERSION else {}
    here = machines.setdefault(machine(), {})
    for model in MODELS:
        if not embedded(model).installed():
            print(f"skipped {model}: not installed ({embedded(model).install_hint()})")
            continue
        for dtype in DTYPES:
            here.setdefault(model, {})[dtype] = compute(_load(model, dtype))
            print(f"pinned {model} {dtype}")
    GOLDEN.write_text(json.dumps({"numerics_version": NUMERICS_VERSION, "repin": REPIN, "machines": machines},
                                 indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN} (NUMERICS_VERSION {NUMERICS_VERSION}, machine {machine()})")


if __name__ == "__main__":
    if sys.argv[1:] != ["--repin"]:
        sys.exit(f"usage: {REPIN}")
    repin()
