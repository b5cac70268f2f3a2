"""End to end on real hippocampus cases: train, resume, predict onto the input grid, evaluate, DDP, bad inputs."""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

from DSDSegmentationLib.worker.cli import main as cli
from DSDSegmentationLib.engine.io import load_volume
from DSDSegmentationLib.engine.models import load_checkpoint, load_model

TRAIN = ["--task", "hippocampus", "--max-cases", "8", "--max-steps", "3", "--val-every", "1", "--progress", "none"]


def run_cli(*args: str) -> int:
    return cli([str(a) for a in args])


@pytest.fixture(scope="module")
def trained_run(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "hippo"
    assert run_cli("train", "--data", hippocampus_dir, "--output", out, "--epochs", "2", "--dsd", "dsd", *TRAIN) == 0
    return out


def test_training_run_folder(trained_run: Path) -> None:
    for name in ("config.json", "split.json", "log.txt", "history.json", "curves.png", "last.pt", "best.pt"):
        assert (trained_run / name).is_file(), name
    split = json.loads((trained_run / "split.json").read_text())
    train_p = {c["patient"] for c in split["train"]}
    val_p = {c["patient"] for c in split["val"]}
    assert train_p and val_p and not train_p & val_p
    history = json.loads((trained_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(0.0 <= h["val_dice"] <= 1.0 for h in history)
    assert {"loss/gt/main", "loss/kl_dec", "loss/kl_enc"} <= set(history[0])
    assert history[1]["lr"] < history[0]["lr"]  # poly schedule


def test_split_is_deterministic_and_by_patient(hippocampus_dir: Path) -> None:
    from DSDSegmentationLib.engine.data import Case, split_by_patient

    cases = [Case(f"p{i // 2}_f{i % 2}", [], None, f"p{i // 2}") for i in range(20)]
    a, b = split_by_patient(cases, 0.2, seed=3), split_by_patient(cases, 0.2, seed=3)
    assert [c.id for c in a[1]] == [c.id for c in b[1]]
    assert {c.patient for c in a[0]}.isdisjoint({c.patient for c in a[1]})
    assert len(a[1]) == 4  # 2 of 10 patients, both frames each


def test_existing_run_is_not_overwritten(trained_run: Path, hippocampus_dir: Path, capsys) -> None:
    before = (trained_run / "last.pt").stat().st_mtime_ns
    assert run_cli("train", "--data", hippocampus_dir, "--output", trained_run, "--epochs", "2", *TRAIN) == 2
    assert "already holds a training run; use --resume" in capsys.readouterr().err
    assert (trained_run / "last.pt").stat().st_mtime_ns == before


def test_a_new_run_never_replaces_the_users_files_of_the_same_names(hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    """--output pointed at a folder of the user's holding a log.txt and a config.json of their own: refused before
    anything is written, the files named and byte for byte unchanged; other files alone do not matter, and the
    remains of an unfinished run of ours (no last.pt) are taken over."""
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "log.txt").write_text("lab notebook\n")
    (mine / "config.json").write_text('{"scanner": "3T"}')
    (mine / "notes.md").write_text("keep")
    args = ["--data", hippocampus_dir, "--epochs", "1", *TRAIN[:4], "--max-steps", "1", "--progress", "none"]
    assert run_cli("train", "--output", mine, *args) == 2
    err = capsys.readouterr().err
    assert "already holds config.json, log.txt, not from a training run" in err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "log.txt", "notes.md"]
    assert (mine / "log.txt").read_text() == "lab notebook\n" and (mine / "config.json").read_text() == '{"scanner": "3T"}'
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("keep")
    assert run_cli("train", "--output", other, *args) == 0
    assert (other / "notes.md").read_text() == "keep" and (other / "last.pt").is_file()
    (other / "last.pt").unlink()  # an unfinished run of ours: a new run may start over there
    assert run_cli("train", "--output", other, *args) == 0
    some_file = tmp_path / "some-file"
    some_file.write_text("x")
    assert run_cli("train", "--output", some_file, *args) == 2
    assert "is a file; a training run needs a folder" in capsys.readouterr().err and some_file.read_text() == "x"


def _history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def test_resume_after_kill_continues_the_same_run(hippocampus_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(hippocampus_dir), "--epochs", "3", *TRAIN]
    ref = tmp_path / "uninterrupted"
    assert run_cli(*args, "--output", ref) == 0
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "DSDSegmentationLib.worker.cli", *args, "--output", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "history.json").is_file() and len(_history(run)) >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_history(run))
    assert 1 <= done < 3, "the run should have been killed part-way"
    assert run_cli(*args, "--output", run, "--resume") == 0
    h, r = _history(run), _history(ref)
    assert [x["epoch"] for x in h] == [1, 2, 3]
    for a, b in zip(h, r):  # same schedule and, with per-epoch reseeding, the same losses
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-4)
    assert "resumed from epoch" in (run / "log.txt").read_text()


def test_default_terms_plain_for_a_new_run_and_a_resumed_run_keeps_its_own(hippocampus_dir: Path, tmp_path: Path) -> None:
    """Without --dsd a new run trains plain (the study's evidence, training.DEFAULT_DSD) and a resumed run keeps the
    terms it was started with, also one started with full DSD before the default changed."""
    from DSDSegmentationLib.engine.training import DEFAULT_DSD, TrainConfig, Trainer

    assert DEFAULT_DSD == "plain"
    new = Trainer(TrainConfig(task="hippocampus", data=str(hippocampus_dir), output=str(tmp_path / "new")))
    assert new.cfg.dsd == "plain" and not new.dsd_config.deep_supervision and not new.dsd_config.encoder_kl
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"task": "hippocampus", "dsd": "dsd"}))
    resumed = Trainer(TrainConfig(task="hippocampus", data=str(hippocampus_dir), output=str(old)), resume=True)
    assert resumed.cfg.dsd == "dsd" and resumed.dsd_config.deep_supervision and resumed.dsd_config.encoder_kl
    explicit = Trainer(TrainConfig(task="hippocampus", data=str(hippocampus_dir), output=str(old), dsd="ds"), resume=True)
    assert explicit.cfg.dsd == "ds"  # and _prepare_run_folder refuses it: settings ['dsd'] differ


def test_precision_bf16_autocasts_the_steps_and_a_resumed_run_keeps_or_switches_it(
        hippocampus_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """bf16 really runs the network under CPU autocast (loss in fp32), the run records it, a resumed run keeps it,
    and an explicit other precision switches it with a log line; fp16 on a CPU is refused by name."""
    import torch
    from DSDSegmentationLib.engine import training
    from DSDSegmentationLib.engine.errors import ConfigError

    seen: list[tuple[bool, object]] = []

    class Recording(training.DSDNet):
        def forward(self, x):
            out = super().forward(x)
            if self.training:
                seen.append((torch.is_autocast_enabled("cpu"), (out.main if hasattr(out, "main") else out).dtype))
            return out

    monkeypatch.setattr(training, "DSDNet", Recording)
    # (this CPU's bf16 convolutions may fail the check before the first step: that is tested below) and a patch whose
    # deepest stage is 3 voxels deep, not 2, where oneDNN's bf16 weight gradients were garbage on an AVX512-BF16 CPU
    monkeypatch.setattr(training, "bf16_convolution_error", lambda model, x: (0.0, ""))
    from DSDSegmentationLib.engine.tasks import load_preset

    preset = tmp_path / "hippocampus48.json"
    preset.write_text(json.dumps({**load_preset("hippocampus").to_dict(), "patch_size": [48, 48, 48]}))
    run = tmp_path / "bf16"
    assert run_cli("train", "--data", hippocampus_dir, "--output", run, "--epochs", "1", "--precision", "bf16",
                   "--task", preset, *TRAIN[2:4], "--max-steps", "1", "--progress", "none") == 0
    assert seen == [(True, torch.bfloat16)]
    assert json.loads((run / "config.json").read_text())["resolved"]["precision"] == "bf16"
    assert _history(run)[0]["precision"] == "bf16" and math.isfinite(_history(run)[0]["loss/total"])
    # resumed: keeps bf16 without being told; an explicit fp32 switches and says so
    cfg = training.TrainConfig(task=str(preset), data=str(hippocampus_dir), output=str(run), max_cases=8)
    kept = training.Trainer(cfg, resume=True)
    kept._prepare_run_folder()
    assert kept.precision == "bf16" and kept.first_log == []
    cfg.precision = "fp32"
    trainer = training.Trainer(cfg, resume=True)
    trainer._prepare_run_folder()
    assert trainer.precision == "fp32" and trainer.first_log == ["precision bf16 -> fp32 from this resumption on"]
    assert json.loads((run / "config.json").read_text())["resolved"]["precision"] == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        training.resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="not one of"):
        training.resolve_precision("half", torch.device("cpu"))
    assert training.resolve_precision("bf16", torch.device("cpu"), amp=False) == "fp32"
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    assert training.resolve_precision("auto", torch.device("cpu")) == "fp32"  # emulated bf16 would be slower
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert training.resolve_precision("auto", torch.device("cpu")) == "bf16"


class _WrongGradient(torch.autograd.Function):
    """Identity forward; a garbage backward, as oneDNN's bf16 weight gradient was for inputs 2 voxels deep."""

    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        return g * 1e6 + 1.0


class FaultyBf16Conv(torch.nn.Conv3d):
    """A convolution whose weight gradient is wrong under autocast only."""

    def forward(self, x):
        w = _WrongGradient.apply(self.weight) if torch.is_autocast_enabled(x.device.type) else self.weight
        return self._conv_forward(x, w, self.bias)


def test_bf16_check_finds_a_wrong_convolution_and_passes_right_ones() -> None:
    """Each convolution at its own input shape, bf16 against fp32: a wrong weight gradient is found and named
    with its shape; right layers pass; the model is left as it was. And on this CPU, the check agrees with a
    direct comparison at the shape where oneDNN's fault was seen (3x3x3, input 2 voxels deep)."""
    from DSDSegmentationLib.engine.training import BF16_CONV_TOLERANCE, bf16_convolution_error

    torch.manual_seed(0)
    right = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 4, 3, padding=1))
    err, _ = bf16_convolution_error(right, torch.zeros(1, 1, 4, 5, 6))
    assert err < BF16_CONV_TOLERANCE
    faulty = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), FaultyBf16Conv(4, 4, 3, padding=1))
    before = {k: v.clone() for k, v in faulty.state_dict().items()}
    err, where = bf16_convolution_error(faulty, torch.zeros(1, 1, 4, 5, 6))
    assert err > 100 and where == "2 (input 4x5x6)"
    assert all(torch.equal(before[k], v) for k, v in faulty.state_dict().items())
    assert all(p.grad is None for p in faulty.parameters())

    conv = torch.nn.Conv3d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 2, 3, 2)
    grads = []
    for bf16 in (True, False):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        y.float().sum().backward()
        grads.append(conv.weight.grad.clone())
    direct = float(torch.linalg.vector_norm(grads[0] - grads[1]) / torch.linalg.vector_norm(grads[1]))
    direct_wrong = not direct <= BF16_CONV_TOLERANCE
    assert (bf16_convolution_error(conv, torch.zeros(1, 8, 2, 3, 2))[0] > BF16_CONV_TOLERANCE) == direct_wrong


def test_wrong_bf16_falls_back_to_fp32_when_automatic_and_is_refused_when_asked(
        hippocampus_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from DSDSegmentationLib.engine import training

    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)  # auto would pick bf16
    monkeypatch.setattr(training, "bf16_convolution_error", lambda model, x: (math.inf, "backbone.down_4 (input 2x3x2)"))
    run = tmp_path / "auto"
    assert run_cli("train", "--data", hippocampus_dir, "--output", run, "--epochs", "1", *TRAIN[:4],
                   "--max-steps", "1", "--progress", "none") == 0
    log = (run / "log.txt").read_text()
    assert ("bf16 is wrong on this cpu: the convolution backbone.down_4 (input 2x3x2) differs from fp32 by inf"
            in log and "training in fp32 instead" in log)
    assert json.loads((run / "config.json").read_text())["resolved"]["precision"] == "fp32"
    assert _history(run)[0]["precision"] == "fp32"
    assert run_cli("train", "--data", hippocampus_dir, "--output", tmp_path / "asked", "--epochs", "1",
                   "--precision", "bf16", *TRAIN[:4], "--max-steps", "1", "--progress", "none") == 2
    err = capsys.readouterr().err
    assert "precision bf16: bf16 is wrong on this cpu" in err and "--precision fp32" in err
    assert not (tmp_path / "asked" / "last.pt").exists()


def test_a_step_with_non_finite_gradients_is_refused_before_the_weights_change(
        hippocampus_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A finite loss with inf / nan gradients (what wrong bf16 kernels produced) stops the run before the
    optimiser step: the checkpoint of the last epoch stays finite and the error says where."""
    from DSDSegmentationLib.engine import training

    calls = []
    forward = training.training_forward

    def poisoned(net, x, precision):
        out = forward(net, x, precision)
        calls.append(1)
        if len(calls) == 2:
            main = out.main if hasattr(out, "main") else out
            main.register_hook(lambda g: g * float("nan"))
        return out

    monkeypatch.setattr(training, "training_forward", poisoned)
    run = tmp_path / "nan"
    cfg = training.TrainConfig(task="hippocampus", data=str(hippocampus_dir), output=str(run), max_cases=8,
                               epochs=2, max_steps_per_epoch=1, val_every=1, precision="fp32")
    with pytest.raises(RuntimeError, match=r"non-finite gradients at epoch 2 step 1 \(precision fp32\); the weights "
                                           r"were not updated; resume from last.pt"):
        training.Trainer(cfg).fit()
    state = load_checkpoint(run / "last.pt")  # what resuming reads (no code from the file)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_needs_a_checkpoint(tmp_path: Path, hippocampus_dir: Path, capsys) -> None:
    assert run_cli("train", "--data", hippocampus_dir, "--output", tmp_path / "none", "--resume", *TRAIN) == 2
    assert "has no last.pt checkpoint" in capsys.readouterr().err


def _oblique_affine() -> np.ndarray:
    a, b = math.radians(25), math.radians(15)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([1.0, 1.2, 0.9]) @ np.diag([-1, 1, -1])  # flipped axes, anisotropic
    aff[:3, 3] = [12.5, -40.0, 7.25]
    return aff


def test_predict_output_on_input_grid(trained_run: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    src = hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"
    data = np.asanyarray(nib.load(src).dataobj).astype(np.float32)
    oblique = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, _oblique_affine()), oblique)
    lps = tmp_path / "lps.nrrd"
    nrrd.write(str(lps), data, {"space": "left-posterior-superior", "space directions": np.diag([0.9, 1.1, 1.3]).tolist(),
                                "space origin": [-5.0, 3.0, 20.0], "kinds": ["domain"] * 3})
    for inp, out in ((src, tmp_path / "a.nii.gz"), (oblique, tmp_path / "b.nii.gz"), (lps, tmp_path / "c.nrrd"),
                     (oblique, tmp_path / "d.nrrd")):
        assert run_cli("predict", "--model", trained_run, "-i", inp, "-o", out, "--progress", "none") == 0
        img, img_aff = load_volume(inp)
        lab, lab_aff = load_volume(out)
        assert lab.shape == img.shape, inp
        np.testing.assert_allclose(lab_aff, img_aff, atol=1e-5)
        assert set(np.unique(lab)) <= {0, 1, 2}
    # NRRD output keeps the LPS header values of an NRRD input
    _, h_in = nrrd.read(str(lps))
    _, h_out = nrrd.read(str(tmp_path / "c.nrrd"))
    np.testing.assert_allclose(np.asarray(h_out["space directions"], float), np.asarray(h_in["space directions"], float), atol=1e-6)
    np.testing.assert_allclose(np.asarray(h_out["space origin"], float), np.asarray(h_in["space origin"], float), atol=1e-6)


def test_predict_batch_evaluate_and_tta(trained_run: Path, hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    listing = tmp_path / "cases.csv"
    names = ["hippocampus_001", "hippocampus_003"]
    listing.write_text("image,label\n" + "".join(
        f"{hippocampus_dir}/imagesTr/{n}.nii.gz,{hippocampus_dir}/labelsTr/{n}.nii.gz\n" for n in names))
    preds = tmp_path / "preds"
    assert run_cli("predict", "--model", trained_run, "--batch", listing, "--output-dir", preds, "--tta", "--progress", "none") == 0
    assert sorted(p.name for p in preds.iterdir()) == [f"{n}.nii.gz" for n in names]
    capsys.readouterr()
    assert run_cli("evaluate", "--pred", preds, "--ref", listing, "--labels", "hippocampus", "--output", tmp_path / "ev") == 0
    printed = capsys.readouterr().out
    assert "anterior hippocampus" in printed and "HD95 (mm)" in printed
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert [c["case"] for c in report["cases"]] == names
    for c in report["cases"]:
        for m in c["classes"].values():
            assert 0 <= m["dice"] <= 1
    csv_lines = (tmp_path / "ev" / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 2 * 2


def test_predict_json_progress_lines(trained_run: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.nii.gz"
    r = subprocess.run([sys.executable, "-m", "DSDSegmentationLib.worker.cli", "predict", "--model", str(trained_run), "-i",
                        str(hippocampus_dir / "imagesTr" / "hippocampus_004.nii.gz"), "-o", str(out), "--progress", "json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert all({"stage", "done", "total", "message"} <= set(rec) for rec in records[:-1])
    assert records[-1]["stage"] == "done" and records[-1]["output"] == str(out)


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: np.where(np.arange(d.size).reshape(d.shape) == 7, np.nan, d), "NaN or infinite"),
        (lambda d: np.full_like(d, 3.0), "constant intensity 3.0"),
        (lambda d: d[:, :, :1], "not a 3D volume"),
        (lambda d: np.stack([d, d], axis=-1), r"2 channel\(s\) given, the model expects 1"),
        (lambda d: np.stack([d] * 3, axis=-1)[..., None], "expected a 3D volume"),
    ],
)
def test_bad_prediction_inputs(trained_run: Path, hippocampus_dir: Path, tmp_path: Path, capsys, make, match) -> None:
    data = np.asanyarray(nib.load(hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz").dataobj).astype(np.float32)
    bad = _write(tmp_path / "bad.nii.gz", make(data))
    out = tmp_path / "out.nii.gz"
    assert run_cli("predict", "--model", trained_run, "-i", bad, "-o", out, "--progress", "none") == 2
    err = capsys.readouterr().err
    assert err.count("dsdseg: error:") == 1 and re.search(match, err), err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_bad_prediction_input_messages(trained_run: Path, hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    img = hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"
    out = tmp_path / "o.nii.gz"
    assert run_cli("predict", "--model", trained_run, "-i", img, "-i", img, "-o", out, "--progress", "none") == 2
    assert "2 channel(s) given, the model expects 1" in capsys.readouterr().err
    nan = np.asanyarray(nib.load(img).dataobj).astype(np.float32)
    nan[3, 3, 3] = np.nan
    assert run_cli("predict", "--model", trained_run, "-i", _write(tmp_path / "n.nii.gz", nan), "-o", out, "--progress", "none") == 2
    assert "contains NaN or infinite values" in capsys.readouterr().err
    assert run_cli("predict", "--model", tmp_path / "nomodel", "-i", img, "-o", out, "--progress", "none") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def _copy_dataset(src: Path, dst: Path, n: int) -> list[str]:
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"] = sorted(meta["training"], key=lambda e: e["image"])[:n]
    for e in meta["training"]:
        shutil.copy(src / e["image"], dst / e["image"])
        shutil.copy(src / e["label"], dst / e["label"])
    (dst / "dataset.json").write_text(json.dumps(meta))
    return [Path(e["label"]).name for e in meta["training"]]


@pytest.mark.parametrize("defect,match", [
    ("values", "label values [7] are not among the task's labels"),
    ("shape", "label shape (10, 10, 10) differs from image shape"),
    ("affine", "label and image have different geometry"),
    ("fraction", "label has non-integer values"),
    ("missing", "does not exist"),
])
def test_bad_training_data_named_and_nothing_written(hippocampus_dir: Path, tmp_path: Path, capsys, defect: str, match: str) -> None:
    data = tmp_path / "data"
    labels = _copy_dataset(hippocampus_dir, data, 4)
    target = data / "labelsTr" / labels[2]
    img = nib.load(target)
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    if defect == "values":
        arr[0, 0, 0] = 7
        _write(target, arr, img.affine)
    elif defect == "shape":
        _write(target, np.zeros((10, 10, 10), np.uint8), img.affine)
    elif defect == "affine":
        aff = img.affine.copy()
        aff[0, 3] += 5
        _write(target, arr, aff)
    elif defect == "fraction":
        arr[0, 0, 0] = 0.5
        _write(target, arr, img.affine)
    else:
        target.unlink()
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--output", out, "--epochs", "1", *TRAIN) == 2
    err = capsys.readouterr().err
    assert match in err and labels[2].replace(".nii.gz", "") in err
    assert not out.exists()


def test_ddp_two_gloo_processes_keep_weights_in_sync(hippocampus_dir: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "DSDSegmentationLib.worker.cli", "train",
                        "--data", str(hippocampus_dir), "--output", str(out), "--epochs", "1", "--device", "cpu", *TRAIN],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    sums = json.loads((out / "ddp_sync.json").read_text())["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2
    assert (out / "best.pt").is_file()


def test_export_package_and_tamper(trained_run: Path, hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    pkg = tmp_path / "pkg"
    assert run_cli("export", "--model", trained_run, "--output", pkg) == 0
    card = json.loads((pkg / "model.json").read_text())
    assert card["sha256"] and card["parameters"] == 1438819  # backbone only, no heads
    img = hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert run_cli("predict", "--model", pkg, "-i", img, "-o", a, "--progress", "none") == 0
    assert run_cli("predict", "--model", trained_run, "-i", img, "-o", b, "--progress", "none") == 0
    assert np.array_equal(load_volume(a)[0], load_volume(b)[0])
    # float16 storage: half the file, the network still float32, the same labels but for a few boundary voxels
    half = tmp_path / "half"
    assert run_cli("export", "--model", trained_run, "--output", half, "--weights-dtype", "float16") == 0
    assert json.loads((half / "model.json").read_text())["weights_dtype"] == "float16"
    assert (half / "weights.pt").stat().st_size < 0.55 * (pkg / "weights.pt").stat().st_size
    assert all(p.dtype == torch.float32 for p in load_model(half).network.parameters())
    h = tmp_path / "h.nii.gz"
    assert run_cli("predict", "--model", half, "-i", img, "-o", h, "--progress", "none") == 0
    assert np.mean(load_volume(h)[0] == load_volume(a)[0]) > 0.999
    with open(pkg / "weights.pt", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    capsys.readouterr()
    assert run_cli("predict", "--model", pkg, "-i", img, "-o", tmp_path / "c.nii.gz", "--progress", "none") == 2
    assert "weights.pt does not match its sha256 in SHA256SUMS; the file is corrupt" in capsys.readouterr().err
    # a modified card (here: a renamed label) is refused too, even with intact weights
    card_pkg = tmp_path / "pkg2"
    assert run_cli("export", "--model", trained_run, "--output", card_pkg) == 0
    text = (card_pkg / "model.json").read_text()
    (card_pkg / "model.json").write_text(text.replace("posterior hippocampus", "tumour", 1))
    capsys.readouterr()
    assert run_cli("predict", "--model", card_pkg, "-i", img, "-o", tmp_path / "d.nii.gz", "--progress", "none") == 2
    assert "model.json does not match its sha256 in SHA256SUMS; the card is corrupt or was modified" in capsys.readouterr().err
    (card_pkg / "SHA256SUMS").unlink()
    assert run_cli("predict", "--model", card_pkg, "-i", img, "-o", tmp_path / "d.nii.gz", "--progress", "none") == 2
    assert "SHA256SUMS is missing" in capsys.readouterr().err
    assert not (tmp_path / "d.nii.gz").exists()


def test_task_must_match_dataset_labels(hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    assert run_cli("train", "--data", hippocampus_dir, "--output", tmp_path / "r", "--task", "cardiac", "--epochs", "1",
                   "--progress", "none") == 2
    assert "the dataset declares labels" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("task,folder,case", [
    ("cardiac", "ACDC_subset", "patient005_frame01"),
    ("brain_tumour_2015", "BraTS2015_DeepMedicSample", "brats_2013_pat0004_1"),
    ("brain_tumour", "BraTS2018_2mm", "Brats18_2013_11_1"),
    ("brain_tumour_2seq", "BraTS2018_2mm", "Brats18_2013_11_1"),
])
def test_other_presets_train_and_predict_on_input_grid(hippocampus_dir: Path, tmp_path: Path, task: str, folder: str, case: str) -> None:
    from DSDSegmentationLib.engine.data import list_cases
    from DSDSegmentationLib.engine.tasks import load_preset

    data = hippocampus_dir.parent / folder
    run = tmp_path / "run"
    assert run_cli("train", "--task", task, "--data", data, "--output", run, "--epochs", "1", "--max-cases", "3",
                   "--max-steps", "1", "--progress", "none") == 0
    (c,) = [c for c in list_cases(data, channels=load_preset(task).channels) if c.id == case]
    args = [a for p in c.images for a in ("-i", p)]
    out = tmp_path / "pred.nrrd"
    assert run_cli("predict", "--model", run, *args, "-o", out, "--progress", "none") == 0
    img, img_aff = load_volume(c.images[0])
    lab, lab_aff = load_volume(out)
    assert lab.shape == img.shape[:3]
    np.testing.assert_allclose(lab_aff, img_aff, atol=1e-4)
    # outputs carry the dataset's label values (BraTS 2018: 0, 1, 2, 4 — never the class index 3)
    assert set(np.unique(lab).tolist()) <= set(load_preset(task).label_values)
    if task == "brain_tumour_2seq":
        assert len(c.images) == 2 and c.images[1].endswith("_0002.nii.gz")  # FLAIR and T1c picked by name


def test_channels_on_other_grids_are_resampled_onto_the_first(tmp_path: Path) -> None:
    from DSDSegmentationLib.engine.errors import InputError
    from DSDSegmentationLib.engine.io import load_channels

    x = np.arange(20 * 22 * 24, dtype=np.float32).reshape(20, 22, 24) % 97
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    a = _write(tmp_path / "a.nii.gz", x, aff)
    shifted = aff.copy()
    shifted[:3, 3] = [-2, 0, 0]  # same voxels two mm to the left: voxel i of b is voxel i-2 of a
    b = _write(tmp_path / "b.nii.gz", x, shifted)
    with pytest.raises(InputError, match="b.nii.gz has a different geometry"):
        load_channels([str(a), str(b)])
    notes: list[str] = []
    img, out_aff = load_channels([str(a), str(b)], resample=True, notes=notes)
    np.testing.assert_array_equal(out_aff, aff)
    np.testing.assert_allclose(img[1, :-2], x[2:], atol=1e-4)
    assert notes == ["b.nii.gz was resampled onto the grid of a.nii.gz"]


def test_model_registry_reports_problems_without_torch(trained_run: Path, tmp_path: Path) -> None:
    from DSDSegmentationLib.engine.cards import list_models

    user = tmp_path / "models"
    assert run_cli("export", "--model", trained_run, "--output", user / "good") == 0
    assert run_cli("export", "--model", trained_run, "--output", user / "corrupt") == 0
    assert run_cli("export", "--model", trained_run, "--output", user / "noweights") == 0
    (user / "corrupt" / "weights.pt").write_bytes(b"garbage")
    (user / "noweights" / "weights.pt").unlink()
    (user / "broken").mkdir()
    (user / "broken" / "model.json").write_text("{not json")
    status = {m["id"]: m["status"] for m in list_models([tmp_path / "builtin-none", user])}
    assert sorted(status) == ["broken", "corrupt", "good", "noweights"] and status["good"] == "ok"
    assert "weights.pt does not match its sha256" in status["corrupt"]
    assert "weights.pt is missing" in status["noweights"]
    assert "not valid JSON" in status["broken"]
    code = "import sys; from DSDSegmentationLib.engine.cards import list_models; list_models(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_predict_frames_segments_every_frame_of_a_4d_cine(hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    """``predict --frames`` on a 4D series (ACDC patient001's end-diastolic and end-systolic frames stacked, as ACDC's
    own 4D files hold a cine): a 4D labelmap whose every frame equals that frame segmented alone, the volumes per
    frame as CSV and the ventricles' ejection fractions; every bad use refused before the model loads."""
    from DSDSegmentationLib.engine.cards import builtin_models_dir

    acdc = hippocampus_dir.parent / "ACDC_subset" / "imagesTr"
    frames = [acdc / "patient001_frame01.nii.gz", acdc / "patient001_frame12.nii.gz"]
    first = nib.load(frames[0])
    data = np.stack([np.asanyarray(nib.load(f).dataobj) for f in frames], axis=-1)
    cine = tmp_path / "patient001_4d.nii.gz"
    nib.save(nib.Nifti1Image(data, first.affine, first.header), cine)  # the header as ACDC ships it (unit sform)
    model = builtin_models_dir() / "cardiac-dsd"
    out, csv_path = tmp_path / "seg_4d.nii.gz", tmp_path / "volumes.csv"
    base = ["predict", "--model", model, "--progress", "none", "--device", "cpu"]

    # a 4D file without --frames: the message says what to do
    assert run_cli(*base, "-i", cine, "-o", out) == 2
    assert "2 channel(s) given, the model expects 1 (cine MRI); a 4D series of 2 frames (a cine)? `dsdseg predict " \
           "--frames` segments each frame" in capsys.readouterr().err
    # refusals, nothing written
    csv_path.write_text("the user's own table\n")
    for extra, message in (
        (["-i", cine, "-o", out, "--volumes", tmp_path / "v.csv"], "--volumes needs --frames"),
        (["-i", cine, "-i", cine, "-o", out, "--frames"], "--frames takes one 4D file"),
        (["-i", cine, "-o", tmp_path / "seg.nrrd", "--frames"], "the name must end in .nii.gz, .nii"),
        (["-i", cine, "-o", out, "--frames", "--volumes", csv_path], "--volumes .* already exists"),
        (["-i", frames[0], "-o", out, "--frames"], r"has shape \(216, 256, 10\); --frames needs a 4D series"),
    ):
        assert run_cli(*base, *extra) == 2, extra
        assert re.search(message, capsys.readouterr().err), (extra, message)
    assert not out.exists() and csv_path.read_text() == "the user's own table\n"
    csv_path.unlink()

    assert run_cli(*base, "-i", cine, "-o", out, "--frames", "--volumes", csv_path) == 0
    printed = capsys.readouterr().out
    labels, affine = load_volume(out)
    assert labels.shape == (216, 256, 10, 2)
    assert np.allclose(np.abs(np.diag(affine))[:3], [1.5625, 1.5625, 10.0]), "the true spacing (pixdim rule) kept"
    alone = tmp_path / "es.nii.gz"
    assert run_cli(*base, "-i", frames[1], "-o", alone) == 0
    assert np.array_equal(labels[..., 1], load_volume(alone)[0]), "a frame of the series = that frame alone"
    rows = [line.split(",") for line in csv_path.read_text().splitlines()]
    assert rows[0] == ["frame", "right ventricle cavity (mL)", "left ventricle myocardium (mL)",
                       "left ventricle cavity (mL)"]
    voxel_ml = 1.5625 * 1.5625 * 10.0 / 1000
    assert [float(r[3]) for r in rows[1:]] == pytest.approx([(labels[..., t] == 3).sum() * voxel_ml for t in (0, 1)],
                                                            abs=0.01)
    lv = [float(r[3]) for r in rows[1:]]
    assert f"note: left ventricle ejection fraction {100 * (lv[0] - lv[1]) / lv[0]:.0f} % (largest {lv[0]:.1f} mL in " \
           f"frame 1, smallest {lv[1]:.1f} mL in frame 2; against the manual reference on this model's 10 validation " \
           "patients: -0.5 ± 5.0 points (95 % limits of agreement -10.2 to +9.3), r = 0.97)" in printed
    myo_ed = float(rows[1][2])  # the LV mass at end-diastole (the cavity's largest frame), with its agreement
    assert f"note: left ventricle mass {myo_ed * 1.05:.0f} g (myocardium at 1.05 g/mL in frame 1; against the manual " \
           "reference on this model's 10 validation patients: +10.5 ± 8.6 g (95 % limits of agreement -6.4 to +27.4), " \
           "r = 0.99)" in printed, printed
    # the right ventricle's EF comes with the error that makes it unreliable (bench_cardiac_function.py, in the card)
    assert re.search(r"note: right ventricle ejection fraction \d+ % \(.*; against the manual reference on this model's "
                     r"10 validation patients: -6\.6 ± 11\.4 points \(95 % limits of agreement -28\.9 to \+15\.7\), "
                     r"r = 0\.59\)", printed), printed
