"""The memory allocator (benchmarks/allocator.py: glibc's malloc fragments over long CPU runs): heavy commands restart
themselves under jemalloc when it is installed, record which allocator they ran with, leave children the
environment as the user set it, and QTALIGN_ALLOCATOR=system keeps glibc's malloc."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qtalign.environment import allocator_in_use, find_allocator

pytestmark = pytest.mark.skipif(find_allocator() is None or not sys.platform.startswith("linux"),
                                reason="no jemalloc installed (Debian/Ubuntu: apt install libjemalloc2)")


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "QTALIGN_ALLOCATOR", "QTALIGN_REEXEC")}
    return {**env, "OMP_NUM_THREADS": "1", **kw}


def test_restart_under_jemalloc_and_children_see_the_users_environment():
    script = ("import os, sys; from qtalign.cli import _with_allocator; _with_allocator(sys.argv[1:]); "
              "from qtalign.environment import allocator_in_use; "
              "print(allocator_in_use(), os.environ.get('LD_PRELOAD'), os.environ.get('QTALIGN_REEXEC'))")
    out = subprocess.run([sys.executable, "-c", script, "eval"], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["jemalloc", "None", "None"]
    # a user's own preload survives; light commands and --help never restart; QTALIGN_ALLOCATOR=system keeps glibc
    lib = find_allocator()
    out = subprocess.run([sys.executable, "-c", script, "train"], env=_env(LD_PRELOAD="libm.so.6"), capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["jemalloc", "libm.so.6", "None"], lib
    for argv, env in ((["report"], _env()), (["eval", "--help"], _env()), (["eval"], _env(QTALIGN_ALLOCATOR="system"))):
        out = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split()[0] == "glibc", argv


@pytest.mark.slow  # two `python -m qtalign eval` processes
def test_an_evaluation_records_its_allocator(tmp_path, tiny_llama_dir):
    for setting, want in (("auto", "jemalloc"), ("system", "glibc")):
        out = tmp_path / setting
        subprocess.run([sys.executable, "-m", "qtalign", "eval", "--model", str(tiny_llama_dir), "--dtype", "fp32",
                        "--data-files", "demo", "--tasks", "emotion", "--langs", "en", "--limit", "2", "--no-store",
                        "--out", str(out)], env=_env(QTALIGN_ALLOCATOR=setting), check=True, capture_output=True)
        assert json.loads((out / "results.json").read_text())["environment"]["allocator"] == want


def test_this_process_reports_what_it_maps():
    maps = open("/proc/self/maps").read()
    assert allocator_in_use() == ("jemalloc" if "libjemalloc" in maps else "tcmalloc" if "libtcmalloc" in maps else "glibc")
