"""The model packages shipped in Resources/Models: verified, schema-valid, and they segment real cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tampered_copy

from DSDSegmentationLib.engine.cards import builtin_models_dir, list_models, model_summary, verify_package
from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.engine.errors import InputError
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.io import load_volume
from DSDSegmentationLib.engine.models import load_model

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is part of the test install (.ci/setup)")

SHIPPED = {  # id -> (dataset folder, floor on the Dice of one validation case, what the floor applies to)
    # measured: hippocampus 0.88 mean of both classes (42 cases); brain tumour (4 sequences / FLAIR + T1c): whole
    # tumour about 0.89 over 6 validation cases, the first of them 0.84 or more
    "hippocampus-dsd": ("Task04_Hippocampus", 0.75, "mean of the classes"),
    "cardiac-dsd": ("ACDC_subset", 0.55, "mean of the classes"),
    "brain-tumour-dsd": ("BraTS2018_2mm", 0.75, "whole tumour"),
    "brain-tumour-2seq-dsd": ("BraTS2018_2mm", 0.75, "whole tumour"),
}
SCHEMA = json.loads((builtin_models_dir() / "model-card.schema.json").read_text())
MAX_BYTES_PER_NETWORK = 20 * 1024 * 1024  # an ensemble package holds one weights file per member


def test_the_models_are_shipped_and_listed() -> None:
    models = {m["id"]: m for m in list_models([builtin_models_dir()])}
    assert set(SHIPPED) <= set(models)
    for model_id in SHIPPED:
        assert models[model_id]["status"] == "ok", models[model_id]["status"]


@pytest.mark.parametrize("model_id", sorted(SHIPPED))
def test_package_is_verified_small_and_schema_valid(model_id: str) -> None:
    folder = builtin_models_dir() / model_id
    card = verify_package(folder)
    jsonschema.validate(card, SCHEMA)
    networks = max(1, len(card.get("ensemble") or []))
    assert networks <= 2 and sum(p.stat().st_size for p in folder.iterdir()) <= networks * MAX_BYTES_PER_NETWORK
    assert card["id"] == model_id
    assert set(card["preset"]["terminology"]) == set(card["preset"]["labels"]) - {"0"}
    assert set(card["validation"]["per_class"]) == ({v for k, v in card["preset"]["labels"].items() if k != "0"}
                                                    | set(card["preset"].get("regions") or {}))
    non_commercial = card["training_data"]["licence"].startswith("CC-BY-NC") or "non-commercial" in card["training_data"]["licence"]
    assert card["licence"]["non_commercial"] is non_commercial
    assert ("non-commercial" in card["licence"]["text"]) is non_commercial


@pytest.mark.parametrize("model_id", sorted(SHIPPED))
def test_segments_a_real_validation_case_above_floor(model_id: str, tmp_path: Path) -> None:
    folder = builtin_models_dir() / model_id
    dataset, floor, what = SHIPPED[model_id]
    card = verify_package(folder)
    val_ids = card["split"]["val_ids"]
    case = next(c for c in list_cases(find_shared_data() / dataset, channels=card["inputs"]) if c.id == val_ids[0])
    out = tmp_path / "pred.nii.gz"
    Predictor(folder, device="cpu").predict_to_file(case.images, out)
    pred, pred_aff = load_volume(out)
    ref, ref_aff = load_volume(case.label)
    np.testing.assert_allclose(pred_aff, ref_aff, atol=1e-4)
    ref = np.rint(ref).astype(int)
    if what == "whole tumour":
        masks = [(pred > 0, ref > 0)]
    else:
        masks = [(pred == v, ref == v) for v in (int(k) for k in card["preset"]["labels"] if k != "0")]
    dices = [2 * np.logical_and(p, r).sum() / (p.sum() + r.sum()) for p, r in masks if p.any() or r.any()]
    assert np.mean(dices) > floor, f"{model_id} on {case.id}: Dice ({what}) {np.round(dices, 3)}"


def test_what_a_researcher_sees_before_picking_a_model(tmp_path: Path, capsys) -> None:
    """The model selector (and `dsdseg models list/show`) shows non-commercial licences in the list and, in the
    description, inputs in order, segments, training data, validation Dice (regions for the tumour models), the
    network (an ensemble with its members) and the licence text; a broken package says why it cannot be used."""
    from DSDSegmentationLib.worker.cli import main as cli

    models = {m["id"]: m for m in list_models([builtin_models_dir()])}
    text, tip = model_summary(models["brain-tumour-dsd"])
    card = models["brain-tumour-dsd"]["card"]
    assert text.endswith(f"{card['version']} (non-commercial)")
    assert "Inputs, in this order: FLAIR, T1, T1c, T2\nRegister the inputs to each other to within about 1 mm" in tip
    for region in card["preset"]["regions"]:
        assert f"{region} {card['validation']['per_class'][region]['dice']:.3f}" in tip
    assert "ensemble of 2 dynunet (DSD + plain)" in tip and card["licence"]["text"] in tip
    text, tip = model_summary(models["hippocampus-dsd"])
    assert "non-commercial" not in text and "Network: basicunet, trained plain (no DSD heads)" in tip
    dice = models["hippocampus-dsd"]["card"]["validation"]["per_class"]["anterior hippocampus"]["dice"]
    assert f"anterior hippocampus {dice:.3f}" in tip and "CC-BY-SA 4.0" in tip
    assert "Ejection fraction" not in tip and "Register the inputs" not in tip  # one input: nothing to register
    text, tip = model_summary(models["cardiac-dsd"])  # the card's agreement with the reference (bench_cardiac_function)
    assert ("Ejection fraction, model − manual reference (10 held-out patients): left ventricle -0.5 ± 5.0 points "
            "(r = 0.97), right ventricle -6.6 ± 11.4 points (r = 0.59)") in tip, tip
    broken = {**models["hippocampus-dsd"], "status": "model package x: weights.pt is missing", "source": "user"}
    text, tip = model_summary(broken)
    assert text.endswith("(user) — unavailable: model package x: weights.pt is missing") and "missing" in tip
    store = tmp_path / "store"
    assert cli(["models", "show", "cardiac-dsd", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "(non-commercial)" in out and "Inputs, in this order: cine MRI" in out and "non-commercial use only" in out
    assert cli(["models", "show", "no-such-model", "--store", str(store)]) == 2
    assert "no model 'no-such-model'" in capsys.readouterr().err


def test_tampered_shipped_package_is_refused(tmp_path: Path) -> None:
    source = builtin_models_dir() / "hippocampus-dsd"
    with pytest.raises(InputError, match="weights.pt does not match its sha256"):
        load_model(tampered_copy(source, tmp_path / "weights-tampered", "weights.pt"))
    card = tmp_path / "card-tampered"
    shutil.copytree(source, card)
    text = json.loads((card / "model.json").read_text())
    text["preset"]["labels"]["1"] = "something else"
    (card / "model.json").write_text(json.dumps(text))
    with pytest.raises(InputError, match="model.json does not match its sha256"):
        load_model(card)


class _FakeGpu:
    """Stands in for a CUDA or Metal (MPS) device on this CPU-only machine: a move onto it or a window on it runs out
    of memory at the chosen steps (``fail``: 'load', 'input', 'window'), else runs on the CPU."""

    def __init__(self, type: str, fail: set[str]):
        self.type, self.fail = type, fail

    def out_of_memory(self, where: str) -> Exception:
        import torch

        if self.type == "mps":  # the Metal allocator's words (a plain RuntimeError in the torch releases before 2.5)
            return RuntimeError(f"MPS backend out of memory (MPS allocated: 17.9 GB, simulated {where})")
        return torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated {where})")


def _fake_gpu_predictor(monkeypatch: pytest.MonkeyPatch, fail: set[str], kind: str = "cuda") -> Predictor:
    import torch

    from DSDSegmentationLib.engine import inference

    gpu = _FakeGpu(kind, fail)
    real_to = Predictor._to

    def to(obj, device):
        if isinstance(device, _FakeGpu):
            step = "load" if isinstance(obj, torch.nn.Module) else "input"
            if step in device.fail:
                raise device.out_of_memory(f"at {step}")
            return obj  # stays on the CPU
        return real_to(obj, device)

    real_window = Predictor._window

    def window(self, x, sw_device, stitch):
        if isinstance(sw_device, _FakeGpu) and "window" in sw_device.fail:
            try:  # as MONAI's sliding window raises it on a real H100 (seen in the GPU session)
                raise sw_device.out_of_memory("in a window")
            except RuntimeError as e:
                raise RuntimeError("Seems to be OOM. Please try smaller patch size") from e
        cpu = torch.device("cpu")
        return real_window(self, x, cpu, cpu)

    monkeypatch.setattr(Predictor, "_to", staticmethod(to))
    monkeypatch.setattr(Predictor, "_window", window)
    monkeypatch.setattr(inference, "resolve_device", lambda name: gpu if name == kind else torch.device(name))
    monkeypatch.setattr(inference, "check_predict_options", lambda *a, **k: None)
    return Predictor(builtin_models_dir() / "hippocampus-dsd", device=kind)


@pytest.mark.parametrize("kind", ["cuda", "mps"])
@pytest.mark.parametrize("fail, note", [
    ({"input"}, "GPU out of memory: retrying"),  # the input's move (a GPU session found this one uncaught)
    ({"input", "window"}, "GPU out of memory: retrying on the CPU"),
    ({"load"}, "GPU out of memory while loading the model: running on the CPU"),
])
def test_gpu_out_of_memory_anywhere_falls_back_to_the_cpu_result(monkeypatch: pytest.MonkeyPatch, fail: set[str],
                                                                   note: str, kind: str) -> None:
    sample = sorted((builtin_models_dir().parent / "SampleData" / "Hippocampus").glob("imagesTr/*.nii.gz"))[0]
    expected, _ = Predictor(builtin_models_dir() / "hippocampus-dsd", device="cpu").predict(str(sample))
    predictor = _fake_gpu_predictor(monkeypatch, fail, kind)
    labels, _ = predictor.predict(str(sample))
    assert np.array_equal(labels, expected)
    assert any(n.startswith(note) for n in predictor.notes), predictor.notes
    again, _ = predictor.predict(str(sample))  # a warm worker's next request, on the same predictor
    assert np.array_equal(again, expected)
