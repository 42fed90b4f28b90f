"""Running where researchers run, checked on CPU: the torch version range and the install commands, loading straight
to a device (device_map), the fp16 path, the message of a merge from a 4-bit config, and benchmarks/gpu_check.py's
dry mode."""

import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_torch_is_a_range_and_the_install_commands_name_the_cpu_wheel():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    req = Requirement(next(d for d in proj["dependencies"] if Requirement(d).name == "torch"))
    assert not any(s.operator in ("==", "===") for s in req.specifier), req  # installs beside a user's CUDA torch
    assert torch.__version__.split("+")[0] in req.specifier and "2.13.0" in req.specifier
    for f in ("README.md", ".ci/run"):  # one command; a bare range would pull a CUDA build where no torch is installed
        assert 'pip install torch==2.13.0 -e ".[test]"' in (ROOT / f).read_text(), f
    assert any(Requirement(d).name == "bitsandbytes" for d in proj["optional-dependencies"]["gpu"])
