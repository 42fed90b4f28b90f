"""Representation geometry: CKA / cosine / PCA / PC1 correlation on synthetic data with known answers, pooling
against HF hidden states, batch-size invariance, and the stage output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from analysis_data import write_data
from conftest import tiny_model
from qtalign.tasks.items import DataSource, load_items
from qtalign.engine.forward import Prompt
from qtalign.errors import QtalignError
from qtalign.analysis.geometry import (
    GeometryConfig, cka_matrix, joint_pca, layer_metrics, linear_cka, paired_cosine, pc1_correlations, pooled_states, run_geometry,
    retrieval_accuracy, retrieval_metrics,
)
from qtalign.engine.models import LoadedModel
from qtalign.tasks.specs import load_specs


def _orth(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


# -------------------------------------------------------------------------------------------- synthetic metrics


def _retrieval_brute_force(q, k, clusters=None):
    hits = 0
    for i in range(len(q)):
        sims = [float(np.dot(q[i], k[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(k[j]))) for j in range(len(k))]
        j = max(range(len(k)), key=lambda j: (sims[j], -j))
        hits += (j == i) if clusters is None else (clusters[j] == clusters[i])
    return hits / len(q)


def test_retrieval_accuracy_known_answers_and_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    assert retrieval_accuracy(x, 5.0 * x + 1e-3 * rng.normal(size=x.shape)) == 1.0  # scale-free: cosine
    perm = np.roll(np.arange(40), 1)
    assert retrieval_accuracy(x, x[perm]) == 0.0  # every nearest neighbour is another item
    half = x.copy()
    half[20:] = x[perm][20:]  # items 20..39 of the keys belong to other items
    assert retrieval_accuracy(x, half) == pytest.approx(_retrieval_brute_force(x, half))
    assert 0.45 <= retrieval_accuracy(x, half) <= 0.55
    noisy = x + 1.5 * rng.normal(size=x.shape)
    assert retrieval_accuracy(x, noisy) == pytest.approx(_retrieval_brute_force(x, noisy))
    # clusters (SNLI triples sharing a premise): the nearest item of the same cluster is a hit
    clusters = np.repeat(np.arange(10), 4)
    within = np.array([(i // 4) * 4 + (i + 1) % 4 for i in range(40)])  # a different item of the same cluster
    assert retrieval_accuracy(x, x[within]) == 0.0 and retrieval_accuracy(x, x[within], clusters) == 1.0
    assert retrieval_accuracy(x, noisy, clusters) == pytest.approx(_retrieval_brute_force(x, noisy, clusters))


def test_retrieval_metrics_both_directions_and_centring():
    rng = np.random.default_rng(1)
    en = rng.normal(size=(30, 8))
    shifted = en * rng.uniform(0.5, 2.0, size=(1, 8)) + 3.0  # the same items, rescaled and shifted per dimension
    other = rng.normal(size=(30, 8))
    m = retrieval_metrics([en, shifted, other], ref=0)
    assert m["retrieval_to"][0] == 1.0 and m["retrieval_from"][0] == 1.0  # the reference against itself
    assert m["retrieval_to_centred"][1] > m["retrieval_to"][1]  # the language's offset hurt raw cosine
    assert m["retrieval_to"][1] == pytest.approx(_retrieval_brute_force(en, shifted))
    assert m["retrieval_to_centred"][1] == pytest.approx(_retrieval_brute_force(en - en.mean(0), shifted - shifted.mean(0)))
    assert m["retrieval_to"][2] == pytest.approx(_retrieval_brute_force(en, other))
    assert m["retrieval_from"][2] == pytest.approx(_retrieval_brute_force(other, en))


def test_linear_cka_known_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    # invariant to rotation, isotropic scaling and translation: CKA = 1
    assert linear_cka(x, 3.0 * x @ _orth(16, rng) + 7.0) == pytest.approx(1.0, abs=1e-10)
    # independent representations: close to 0 (expected value ~ d/n)
    assert linear_cka(x, rng.normal(size=(200, 16))) < 0.15
    # x = [a, b] with independent isotropic halves, y = a: CKA = ||A'A||_F / sqrt(||A'A||^2 + ||B'B||^2) -> 1/sqrt(2)
    a, b = rng.normal(size=(20000, 4)), rng.normal(size=(20000, 4))
    assert linear_cka(np.hstack([a, b]), a) == pytest.approx(1 / np.sqrt(2), abs=0.01)
    # not invariant to anisotropic scaling (unlike CCA)
    assert linear_cka(x, x * np.linspace(0.1, 10, 16)) < 0.95
    m = cka_matrix([x, x @ _orth(16, rng), rng.normal(size=(200, 16))])
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert m[0, 1] == pytest.approx(1.0) and m[0, 2] < 0.15
    assert np.isnan(cka_matrix([x, np.ones((200, 16))])[0, 1])  # no variance: undefined, not 0


def test_cka_matrix_matches_pairwise():
    rng = np.random.default_rng(1)
    blocks = [rng.normal(size=(50, 8)) for _ in range(3)]
    blocks[1] = blocks[0] + 0.5 * blocks[1]
    m = cka_matrix(blocks)
    for i in range(3):
        for j in range(3):
            assert m[i, j] == pytest.approx(linear_cka(blocks[i], blocks[j]), abs=1e-10)


def test_paired_cosine_known_angle():
    theta = np.linspace(0, 2 * np.pi, 37)[:-1]
    x = np.stack([np.cos(theta), np.sin(theta)], 1) * np.linspace(1, 5, 36)[:, None]
    for ang in (0.0, np.pi / 3, np.pi / 2, np.pi):
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        assert paired_cosine(x, 2.5 * x @ rot.T) == pytest.approx(np.cos(ang), abs=1e-12)


def test_pca_recovers_a_plane():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(300, 2)) * [5.0, 1.0]
    basis = _orth(20, rng)[:2]
    x = z @ basis + 3.0
    coords, var = joint_pca([x[:150], x[150:]], 2)
    assert var.sum() == pytest.approx(1.0) and var[0] > var[1]
    ev = np.linalg.eigvalsh(np.cov(z.T))
    np.testing.assert_allclose(var, ev[::-1] / ev.sum(), rtol=1e-8)
    # the 2-D coordinates preserve pairwise distances of data that lie in a plane
    d_orig = np.linalg.norm(x[:20, None] - x[None, :20], axis=-1)
    d_pca = np.linalg.norm(coords[:20, None] - coords[None, :20], axis=-1)
    np.testing.assert_allclose(d_pca, d_orig, atol=1e-8)
    # constant data: zero variance, zero coordinates (no division by zero)
    c, v = joint_pca([np.ones((5, 4)), np.ones((5, 4))], 2)
    assert np.all(c == 0) and np.all(v == 0)


def test_pc1_correlation_known_structure():
    """Languages share the item factor along the main direction: r = +1 (same), -1 (mirrored), ~0 (independent);
    when language offsets dominate the variance, PC1 separates languages and the item correlation vanishes."""
    rng = np.random.default_rng(3)
    n, d = 400, 32
    u, w = _orth(d, rng)[:2]
    a = rng.normal(size=n)
    noise = lambda s: s * rng.normal(size=(n, d))  # noqa: E731
    same = [np.outer(a, u) + noise(0.01) + 0.1 * w * k for k in range(2)]
    mirrored = -np.outer(a, u) + noise(0.01)
    indep = np.outer(rng.normal(size=n), u) + noise(0.01)
    r = pc1_correlations([*same, mirrored, indep])
    assert r[0, 1] == pytest.approx(1.0, abs=1e-3)
    assert r[0, 2] == pytest.approx(-1.0, abs=1e-3)
    assert abs(r[0, 3]) < 0.15
    assert np.allclose(np.diag(r), 1)
    # language offsets (along w) much larger than the item spread: PC1 = language axis
    big = [np.outer(a, u) + noise(0.01) + 50 * w * k for k in range(2)]
    coords, var = joint_pca(big, 1)
    assert var[0] > 0.99
    assert abs(pc1_correlations(big, coords)[0, 1]) < 0.5
    # layer_metrics bundles them with the reference language
    m = layer_metrics([*same, mirrored], ref=0)
    assert m["cos"][0] == pytest.approx(1.0) and m["pc1corr"].shape == (3, 3) and m["pca2"].shape == (3 * n, 2)
    assert m["cka"][0, 2] == pytest.approx(1.0, abs=1e-3)  # mirroring is a rotation: CKA 1


# -------------------------------------------------------------------------------------------- real hidden states


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("geom_data"), n=6)


def _prompts(task, langs, src, n=4):
    out = []
    for lang in langs:
        for it in load_items(task, lang, src)[:n]:
            prefix, q = task.prompt_parts(lang, "native", it.fields)
            out.append(Prompt((lang, it.index), f"g/{lang}", prefix, prefix + q))
    return out


def test_pooling_matches_hf_hidden_states(tiny, data):
    model, tok = tiny
    task = load_specs(data["spec"]).task("emotion")
    src = DataSource(data_dir=data["data_dir"], files=data["files"])
    prompts = _prompts(task, ["en", "zh"], src)
    lm = LoadedModel(model, tok, {})
    got = pooled_states(lm, prompts, ["prompt", "query", "last"], batch_size=3)
    for p in prompts:
        ids = tok(p.text)["input_ids"]
        pre = tok(p.prefix)["input_ids"]
        q0 = next(i for i in range(len(ids)) if i >= len(pre) or ids[i] != pre[i])
        assert 0 < q0 < len(ids)
        with torch.no_grad():
            hs = torch.stack(model(torch.tensor([ids]), output_hidden_states=True).hidden_states)[:, 0].numpy()  # (L+1, T, d)
        np.testing.assert_allclose(got["prompt"][p.key], hs.mean(1), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["query"][p.key], hs[:, q0:].mean(1), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["last"][p.key], hs[:, -1], atol=1e-4, rtol=1e-4)
    raw = pooled_states(lm, prompts[:2], ["last"], normed_last=False)
    assert not np.allclose(raw["last"][prompts[0].key][-1], got["last"][prompts[0].key][-1])


def test_pooled_vectors_hold_only_their_own_memory(tiny, data):
    """Each stored vector owns (or is the whole of) its buffer: a view into a batch's stacked states would keep every
    batch alive (the 'last' pool once did: a study's geometry stage grew to 24 GB and was killed)."""
    model, tok = tiny
    task = load_specs(data["spec"]).task("emotion")
    prompts = _prompts(task, ["en", "zh"], DataSource(data_dir=data["data_dir"], files=data["files"]))
    got = pooled_states(LoadedModel(model, tok, {}), prompts, ["prompt", "query", "last"], batch_size=3)

    def held(a):
        while getattr(a, "base", None) is not None:
            a = a.base
        return a.untyped_storage().nbytes() if isinstance(a, torch.Tensor) else a.nbytes

    for pool, vecs in got.items():
        for k, v in vecs.items():
            assert held(v) == v.nbytes, (pool, k, held(v), v.nbytes)


def test_pooling_independent_of_batch_size(spm_tokenizer, data):
    lm = LoadedModel(tiny_model("gemma3", spm_tokenizer), spm_tokenizer, {})
    task = load_specs(data["spec"]).task("emotion")
    prompts = _prompts(task, ["xx", "zh"], DataSource(data_dir=data["data_dir"], files=data["files"]), n=5)
    a = pooled_states(lm, prompts, ["prompt", "query", "last"], batch_size=1)
    b = pooled_states(lm, prompts, ["prompt", "query", "last"], batch_size=4)
    for pool in a:
        for k in a[pool]:
            np.testing.assert_allclose(a[pool][k], b[pool][k], atol=1e-5, rtol=1e-5)


def test_run_geometry_base_vs_tuned(spm_tokenizer, data, tmp_path):
    base = LoadedModel(tiny_model("llama", spm_tokenizer, seed=0), spm_tokenizer, {"name": "a"})
    tuned = LoadedModel(tiny_model("llama", spm_tokenizer, seed=1), spm_tokenizer, {"name": "b"})
    cfg = GeometryConfig(langs="en,zh,xx", data_dir=data["data_dir"], data_files=data["files"], prompts=[data["spec"]],
                         batch_size=4, pools="prompt,query", layers=[0, 2], save_vectors=True)
    assert GeometryConfig(**yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg
    s = run_geometry(cfg, tmp_path, {"base": base, "tuned": tuned}, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text())["stage"] == "geometry"
    assert len(s["figures"]) == 2 * 3
    for f in s["figures"]:
        assert (tmp_path / f["path"]).stat().st_size > 1000
    z = np.load(tmp_path / "geometry_emotion_native.npz")
    assert list(z["langs"]) == ["en", "zh", "xx"] and len(z["index"]) == data["n"]
    L1 = base.model.config.num_hidden_layers + 1
    assert z["base/prompt/pc1corr"].shape == (L1, 3, 3) and z["tuned/query/cka"].shape == (L1, 3, 3)
    assert z["base/prompt/pca2"].shape == (L1, 3 * data["n"], 2)
    v = z["base/query/vectors"].astype(np.float64)  # (L+1, lang, item, d)
    assert v.shape[:3] == (L1, 3, data["n"])
    # the saved metrics are the metrics of the saved vectors
    np.testing.assert_allclose(z["base/query/cka"][1], cka_matrix(list(v[1])), atol=2e-3)
    assert not np.allclose(z["base/prompt/cka"], z["tuned/prompt/cka"])
    assert s["numbers"]["base/emotion/native/prompt/zh/pc1corr_L2"] == pytest.approx(float(z["base/prompt/pc1corr"][2, 1, 0]))
    with pytest.raises(QtalignError, match="reference language 'de'"):
        run_geometry(cfg.model_copy(update={"reference": "de"}), tmp_path / "x", {"base": base}, progress=False)


def test_cli_geometry(tiny_llama_dir, data, tmp_path):
    from qtalign.cli import main

    out = tmp_path / "g"
    rc = main(["geometry", "--model", str(tiny_llama_dir), "--dtype", "fp32", "--data-dir", data["data_dir"], "--data-files", data["files"],
               "--prompts", data["spec"], "--langs", "en,xx", "--limit", "4", "--pools", "last", "--layers", "1", "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["pools"] == ["last"] and s["config"]["layers"] == [1] and len(s["figures"]) == 3
    assert main(["geometry", "--model", str(tiny_llama_dir), "--data-dir", data["data_dir"], "--data-files", data["files"],
                 "--prompts", data["spec"], "--langs", "en,xx", "--layers", "1,x", "--out", str(out)]) == 2


@pytest.mark.gemma
def test_gemma_geometry_small(tmp_path):
    from qtalign.engine.models import load_model

    lm = load_model()
    task = load_specs().task("emotion")
    prompts = _prompts(task, ["en", "de"], DataSource.demo(), n=2)
    got = pooled_states(lm, prompts, ["prompt", "last"], batch_size=2)
    p = prompts[-1]
    with torch.no_grad():
        hs = lm.model(torch.tensor([lm.tokenizer(p.text)["input_ids"]]), output_hidden_states=True).hidden_states
    ref = torch.stack(hs)[:, 0].float()
    got_p = torch.tensor(got["prompt"][p.key])
    cos = torch.nn.functional.cosine_similarity(got_p, ref.mean(1), dim=-1)
    assert cos.min() > 0.999 and got_p.shape == (19, 640)
