"""Devices: an Apple-silicon Mac's GPU (Metal, ``mps``) is chosen by name and refused with the reason where there is
none; the worker lets operators Metal lacks run on the CPU. (The GPU out-of-memory fallback, for CUDA and Metal, is
in test_shipped_models.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from DSDSegmentationLib.engine import runtime, training
from DSDSegmentationLib.engine.cards import builtin_models_dir
from DSDSegmentationLib.engine.errors import ConfigError

MODULE_DIR = Path(__file__).resolve().parents[2] / "DSDSegmentation"


def test_a_macs_gpu_is_chosen_by_name_and_refused_with_the_reason_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.backends.mps.is_available():  # this machine: a Linux build of torch
        with pytest.raises(ConfigError, match="device 'mps' requested but .*; use cpu"):
            training.resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs an Apple-silicon Mac with macOS 14 or newer"):
        training.resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    mps = torch.device("mps")
    assert training.resolve_device("mps") == mps
    if not torch.cuda.is_available():
        assert training.resolve_device("auto") == torch.device("cpu"), "auto never picks Metal"
        assert runtime.environment().endswith("device CPU; Apple GPU available: choose device mps")
    assert training.describe_hardware(mps).startswith("Apple GPU (Metal, MPS")
    # training on Metal runs in fp32: no autocast on it, and the half types are refused by name
    assert training.resolve_precision("auto", mps) == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        training.resolve_precision("fp16", mps)
    with pytest.raises(ConfigError, match="bf16 is not supported on mps"):
        training.resolve_precision("bf16", mps)
    # one Metal GPU: no multi-process training on it
    monkeypatch.setattr(training, "_world", lambda: 2)
    with pytest.raises(ConfigError, match="one process"):
        training.Trainer._device(SimpleNamespace(cfg=SimpleNamespace(device="mps")))


def test_the_worker_enables_metals_cpu_fallback_before_torch_is_imported(tmp_path: Path) -> None:
    """torch reads PYTORCH_ENABLE_MPS_FALLBACK once, when it is imported: the worker sets it first (a user's own
    value wins), so an operator the Metal backend lacks runs on the CPU instead of failing the run."""
    sample = sorted((builtin_models_dir().parent / "SampleData" / "Hippocampus").glob("imagesTr/*.nii.gz"))[0]
    probe = f"""
import json, os, sys
seen = []
class Probe:  # records the variable at torch's first import
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK"))
        return None
sys.meta_path.insert(0, Probe())
from DSDSegmentationLib.worker.cli import main
code = main(["predict", "--model", {str(builtin_models_dir() / "hippocampus-dsd")!r}, "-i", {str(sample)!r},
             "-o", {str(tmp_path / "seg.nii.gz")!r}, "--device", "cpu", "--progress", "none"])
print(json.dumps({{"code": code, "seen": seen}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), env.get("PYTHONPATH", "")])
    for given, expected in ((None, "1"), ("0", "0")):
        if given is not None:
            env["PYTORCH_ENABLE_MPS_FALLBACK"] = given
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result == {"code": 0, "seen": [expected]}, result
        (tmp_path / "seg.nii.gz").unlink()
