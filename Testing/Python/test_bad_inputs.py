"""One parametrised suite of bad inputs, faults and concurrent uses (issue: never destroy a user's file).

Every CLI case asserts the exit code, a message that names the problem, and that every file the user had (the
dataset copy, the model, anything made for the case) is byte-for-byte unchanged afterwards. Cases run on the
shipped hippocampus model and real MSD cases, so each refusal is checked before minutes of real work would start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from DSDSegmentationLib.worker.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "Resources" / "Models" / "hippocampus-dsd"
CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]


def run(args: list[str]) -> int:
    """The CLI's exit code, argparse's refusals (SystemExit) included."""
    try:
        return cli(args)
    except SystemExit as e:
        return int(e.code)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def ws(hippocampus_dir: Path, tmp_path: Path) -> Path:
    """A user's workspace: a 4-case MSD dataset copy, a copy of the model, an output folder."""
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    meta = json.loads((hippocampus_dir / "dataset.json").read_text())
    entries = []
    for c in CASES:
        for sub in ("imagesTr", "labelsTr"):
            shutil.copy(hippocampus_dir / sub / f"{c}.nii.gz", data / sub / f"{c}.nii.gz")
        entries.append({"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({**meta, "training": entries, "numTraining": len(entries)}))
    shutil.copytree(MODEL, tmp_path / "model")
    (tmp_path / "out").mkdir()
    return tmp_path


def img(ws: Path, i: int = 0) -> str:
    return str(ws / "data" / "imagesTr" / f"{CASES[i]}.nii.gz")


def lab(ws: Path, i: int = 0) -> str:
    return str(ws / "data" / "labelsTr" / f"{CASES[i]}.nii.gz")


def predict(ws: Path, *extra: str) -> list[str]:
    return ["predict", "--model", str(ws / "model"), "--progress", "none", *extra]


TUMOUR_INPUTS = json.loads((REPO / "Resources" / "Models" / "brain-tumour-dsd" / "model.json").read_text())["inputs"]


def _brats(channel: int) -> str:
    """The file of the shipped tumour model's ``channel``-th input (a BraTS 2018 case has all four sequences)."""
    from DSDSegmentationLib.engine.data import find_shared_data

    index = ["FLAIR", "T1", "T1c", "T2"].index(TUMOUR_INPUTS[channel])
    return str(find_shared_data() / "BraTS2018_2mm" / "imagesTr" / f"Brats18_2013_11_1_000{index}.nii.gz")


def tumour(ws: Path, *inputs: str) -> list[str]:
    args = ["predict", "--model", str(REPO / "Resources" / "Models" / "brain-tumour-dsd"), "--progress", "none"]
    for i in inputs:
        args += ["-i", i]
    return args + ["-o", str(ws / "out" / "tumour.nii.gz")]


def _nifti(ws: Path, name: str, affine: np.ndarray, data: np.ndarray | None = None) -> str:
    ref = nib.load(img(ws))
    arr = np.asarray(ref.dataobj) if data is None else data
    path = ws / "made" / name
    path.parent.mkdir(exist_ok=True)
    out = nib.Nifti1Image(arr, np.eye(4))
    out.set_qform(np.eye(4), code=0)
    out.set_sform(affine, code=1)  # the sform alone carries it (a degenerate affine has no qform)
    nib.save(out, str(path))
    return str(path)


def _symlink(ws: Path) -> str:
    link = ws / "out" / "link.nii.gz"
    link.symlink_to(img(ws))
    return str(link)


def _hardlink(ws: Path) -> str:
    link = ws / "out" / "hard.nii.gz"
    os.link(img(ws), link)
    return str(link)


def _existing(ws: Path) -> str:
    p = ws / "out" / "seg.nii.gz"
    p.write_bytes(b"the user's earlier result")
    return str(p)


def _users_file(ws: Path, name: str) -> str:
    p = ws / "mine" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text("the user's own file")
    return str(p)


def _bad_card(ws: Path) -> str:
    """A card edited by hand (a label added) whose checksums were regenerated: consistent sums, wrong card."""
    from DSDSegmentationLib.engine.cards import write_checksums

    pkg = ws / "made" / "edited-model"
    shutil.copytree(ws / "model", pkg)
    card = json.loads((pkg / "model.json").read_text())
    card["preset"]["labels"]["3"] = "extra"
    (pkg / "model.json").write_text(json.dumps(card))
    write_checksums(pkg, ["model.json", "weights.pt"])
    return str(pkg)


def _truncated(ws: Path) -> str:
    from DSDSegmentationLib.engine.cards import write_checksums
    from DSDSegmentationLib.engine.models_sha import sha256_of

    pkg = ws / "made" / "truncated-model"
    shutil.copytree(ws / "model", pkg)
    w = pkg / "weights.pt"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    card = json.loads((pkg / "model.json").read_text())
    card["sha256"] = sha256_of(w)
    (pkg / "model.json").write_text(json.dumps(card))
    write_checksums(pkg, ["model.json", "weights.pt"])
    return str(pkg)


def _preset_typo(ws: Path) -> str:
    from DSDSegmentationLib.engine.tasks import PRESET_DIR

    d = json.loads((PRESET_DIR / "hippocampus.json").read_text())
    d["training"]["batchsize"] = 4
    p = ws / "made" / "typo.json"
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps(d))
    return str(p)


def _nan_dataset(ws: Path) -> str:
    d = ws / "made" / "nan"
    shutil.copytree(ws / "data", d)
    x = nib.load(d / "imagesTr" / f"{CASES[2]}.nii.gz")
    arr = np.asarray(x.dataobj).astype(np.float32)
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, x.affine, x.header), str(d / "imagesTr" / f"{CASES[2]}.nii.gz"))
    return str(d)


A = np.asarray  # noqa: N816
CLI_CASES: list[tuple[str, Callable[[Path], list[str]], int, str]] = [
    # outputs that would overwrite inputs
    ("output is the input", lambda w: predict(w, "-i", img(w), "-o", img(w)), 2, "is the input file"),
    ("output is the input through ..", lambda w: predict(w, "-i", img(w), "-o",
                                                          str(w / "data" / "labelsTr" / ".." / "imagesTr" / Path(img(w)).name)),
     2, "is the input file"),
    ("output is a symlink to the input", lambda w: predict(w, "-i", img(w), "-o", _symlink(w)), 2, "is the input file"),
    ("output is a hard link of the input", lambda w: predict(w, "-i", img(w), "-o", _hardlink(w)), 2, "is the input file"),
    ("uncertainty is the input", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "s.nii.gz"), "--uncertainty", img(w)),
     2, "is the input file"),
    ("uncertainty is the output", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "s.nii.gz"),
                                                     "--uncertainty", str(w / "out" / "s.nii.gz")), 2, "also another output"),
    ("batch into imagesTr", lambda w: predict(w, "--batch", str(w / "data"), "--output-dir", str(w / "data" / "imagesTr")),
     2, "holds the input"),
    ("batch into labelsTr", lambda w: predict(w, "--batch", str(w / "data"), "--output-dir", str(w / "data" / "labelsTr")),
     2, "holds the input"),
    ("batch into imagesTr allowed, inputs still safe",
     lambda w: predict(w, "--batch", str(w / "data"), "--output-dir", str(w / "data" / "imagesTr"), "--allow-input-folder"),
     2, "is the input file"),
    ("existing output", lambda w: predict(w, "-i", img(w), "-o", _existing(w)), 2, "already exists; pass --overwrite"),
    # output paths checked before inference
    ("no extension", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "seg")), 2, "unsupported file type"),
    ("mha", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "seg.mha")), 2, "unsupported file type"),
    ("txt", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "seg.txt")), 2, "unsupported file type"),
    ("png", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "seg.png")), 2, "unsupported file type"),
    ("existing folder", lambda w: predict(w, "-i", img(w), "-o", str(w / "out")), 2, "is an existing folder"),
    ("folder under a file", lambda w: predict(w, "-i", img(w), "-o", img(w) + "/seg.nii.gz"), 2, "is a file, not a folder"),
    # options
    ("device gpu", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "s.nii.gz"), "--device", "gpu"), 2,
     "'gpu' is not one of auto, cpu, cuda"),
    ("device mps without a Mac's GPU", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "s.nii.gz"), "--device", "mps"),
     2, r"device 'mps' requested but (this torch build has no Metal|the Metal \(MPS\) GPU is not available)"),
    ("overlap 1.5", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "s.nii.gz"), "--overlap", "1.5"), 2,
     r"--overlap must be in \[0, 1\)"),
    ("overlap -0.1", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "s.nii.gz"), "--overlap", "-0.1"), 2,
     r"--overlap must be in \[0, 1\)"),
    ("temperature without DSD", lambda w: ["train", "--task", "hippocampus", "--data", str(w / "data"), "--output",
                                           str(w / "run"), "--temperature", "4", "--progress", "none"], 2,
     r"--temperature: the 'plain' terms have nothing this changes; add --dsd dsd"),
    ("qa worst 0", lambda w: ["qa", lab(w), lab(w), "--labels", "hippocampus", "--output", str(w / "q"), "--worst", "0"],
     2, r"--worst: .*must be at least 1, got 0"),
    ("qa tolerance -1", lambda w: ["qa", lab(w), lab(w), "--labels", "hippocampus", "--output", str(w / "q"),
                                   "--tolerance", "-1"], 2, r"--tolerance: .*must be a positive number, got -1"),
    ("sw batch 0", lambda w: predict(w, "-i", img(w), "-o", str(w / "out" / "s.nii.gz"), "--sw-batch-size", "0"), 2,
     "must be at least 1"),
    # multi-sequence inputs (the shipped tumour model)
    ("same sequence twice", lambda w: tumour(w, _brats(0), *[_brats(k) for k in range(len(TUMOUR_INPUTS) - 1)]), 2,
     f"inputs '{TUMOUR_INPUTS[0]}' and '{TUMOUR_INPUTS[1]}' are the same image; each input must be its own sequence"),
    ("a sequence missing", lambda w: tumour(w, *[_brats(k) for k in range(len(TUMOUR_INPUTS) - 1)]), 2,
     rf"{len(TUMOUR_INPUTS) - 1} channel\(s\) given, the model expects {len(TUMOUR_INPUTS)} \({', '.join(TUMOUR_INPUTS)}\)"),
    # geometry
    ("zero spacing", lambda w: predict(w, "-i", _nifti(w, "zero.nii.gz", A(np.diag([1.0, 0.0, 1.0, 1.0]))), "-o",
                                       str(w / "out" / "s.nii.gz")), 2, "degenerate"),
    ("1000 mm spacing", lambda w: predict(w, "-i", _nifti(w, "huge.nii.gz", A(np.diag([1000.0, 1000.0, 1000.0, 1.0]))), "-o",
                                          str(w / "out" / "s.nii.gz")), 2, "outside 0.01–50 mm"),
    ("1e-4 mm spacing", lambda w: predict(w, "-i", _nifti(w, "tiny.nii.gz", A(np.diag([1e-4, 1e-4, 1e-4, 1.0]))), "-o",
                                          str(w / "out" / "s.nii.gz")), 2, "outside 0.01–50 mm"),
    # models
    ("card labels differ from the network", lambda w: ["predict", "--model", _bad_card(w), "-i", img(w), "-o",
                                                        str(w / "out" / "s.nii.gz"), "--progress", "none"], 2,
     "4 labels .* network has 3 outputs"),
    ("truncated weights", lambda w: ["predict", "--model", _truncated(w), "-i", img(w), "-o", str(w / "out" / "s.nii.gz"),
                                     "--progress", "none"], 2, "damaged or truncated"),
    # training
    ("epochs 0", lambda w: ["train", "--task", "hippocampus", "--data", str(w / "data"), "--output", str(w / "run"),
                            "--epochs", "0"], 2, "must be at least 1"),
    ("epochs -1", lambda w: ["train", "--task", "hippocampus", "--data", str(w / "data"), "--output", str(w / "run"),
                             "--epochs", "-1"], 2, "must be at least 1"),
    ("lr 0", lambda w: ["train", "--task", "hippocampus", "--data", str(w / "data"), "--output", str(w / "run"),
                        "--lr", "0"], 2, "must be a positive number"),
    ("NaN in a training image", lambda w: ["train", "--task", "hippocampus", "--data", _nan_dataset(w), "--output",
                                           str(w / "run"), "--epochs", "1", "--progress", "none"], 2,
     f"case {CASES[2]}: the image contains NaN"),
    ("preset typo", lambda w: ["train", "--task", _preset_typo(w), "--data", str(w / "data"), "--output", str(w / "run"),
                               "--progress", "none"], 2, r"training: unknown key\(s\) \['batchsize'\]"),
    ("finetune epochs 0", lambda w: ["finetune", "--base", str(w / "model"), "--data", str(w / "data"), "--output",
                                     str(w / "ft"), "--epochs", "0"], 2, "must be at least 1"),
    ("export zip over a file", lambda w: ["models", "export", "hippocampus-dsd", _existing(w)], 2, "must end in .zip"),
    ("train into a folder with the user's log.txt", lambda w: [
        "train", "--task", "hippocampus", "--data", str(w / "data"), "--output", str(Path(_users_file(w, "log.txt")).parent),
        "--epochs", "1", "--progress", "none"], 2, "already holds log.txt, not from a training run"),
    ("terminology over an existing file", lambda w: ["terminology", "--output", _users_file(w, "my.term.json")], 2,
     "already exists; pass --overwrite"),
]


@pytest.mark.parametrize("name,make,code,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_and_keeps_every_file(ws: Path, capsys, name: str, make, code: int, message: str) -> None:
    import re

    args = make(ws)
    before = _digest(ws)
    t0 = time.perf_counter()
    rc = run(args)
    err = capsys.readouterr().err
    assert rc == code, err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert _digest(ws) == before, "a user's file changed"
    assert not [p for p in ws.rglob(".tmp-*")], "temporary files left"
    assert not (ws / "run").exists() and not (ws / "ft").exists(), "nothing is written when a run is refused"
    assert time.perf_counter() - t0 < 60


def test_overwrite_replaces_only_when_asked_and_keeps_umask(ws: Path, capsys) -> None:
    out = Path(_existing(ws))
    old = os.umask(0o022)
    try:
        assert cli(predict(ws, "-i", img(ws), "-o", str(out), "--overwrite")) == 0
    finally:
        os.umask(old)
    assert nib.load(out).shape == nib.load(img(ws)).shape
    assert out.stat().st_mode & 0o777 == 0o644, oct(out.stat().st_mode)
    # a batch into its own folder with --allow-input-folder writes new files and leaves every input alone
    before = _digest(ws / "data")
    (ws / "data" / "results").mkdir()
    assert cli(predict(ws, "--batch", str(ws / "data"), "--output-dir", str(ws / "data" / "results"))) == 0
    assert all((ws / "data" / "results" / f"{c}.nii.gz").is_file() for c in CASES)
    assert {k: v for k, v in _digest(ws / "data").items() if not k.startswith("results")} == before


def test_write_failure_is_one_clear_error_without_debris(ws: Path, capsys, monkeypatch) -> None:
    import nibabel

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nibabel, "save", full_disk)
    before = _digest(ws)
    assert cli(predict(ws, "-i", img(ws), "-o", str(ws / "out" / "s.nii.gz"))) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Traceback" not in err
    assert list((ws / "out").iterdir()) == [] and _digest(ws) == before


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A real 1 MiB file system (tmpfs), filled up: needs root and mount; skipped where neither is allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_for_real(ws: Path, tiny_fs: Path, capsys) -> None:
    before = _digest(ws)
    assert cli(predict(ws, "-i", img(ws), "-o", str(tiny_fs / "s.nii.gz"))) == 2
    err = capsys.readouterr().err
    assert ("disk is full" in err or "cannot write" in err) and "Traceback" not in err
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"]
    assert _digest(ws) == before


def test_logic_temp_folder_full_or_read_only_never_crashes_the_host(ws: Path, tiny_fs: Path) -> None:
    """slicer-core's NRRD writer segfaults on a full or read-only temp folder: the Logic checks first. Run in a
    subprocess so that a crash shows up as a failed test, not a dead test runner."""
    code = f"""
import sys
from pathlib import Path
from DSDSegmentationLib.bridge.headless import setup_headless
from DSDSegmentationLib.bridge.logic import SegmentationBridge
from DSDSegmentationLib.engine.errors import InputError
scene, app, mods = setup_headless()
logic = SegmentationBridge(scene, warm=False, temp_root={str(tiny_fs)!r}, temp_hint="the module's hint")
vol = logic.load_volume({img(ws)!r})
for root in ({str(tiny_fs)!r}, {str(ws / 'readonly')!r}):
    logic.temp_root = Path(root)
    try:
        logic.start([vol], {str(ws / 'model')!r}, device="cpu")
        print("STARTED")
    except InputError as e:
        print("REFUSED", e)
"""
    ro = ws / "readonly"
    ro.mkdir()
    immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    if not immutable:
        ro.chmod(0o555)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("REFUSED", "STARTED"))]
    assert len(lines) == 2 and lines[0].startswith("REFUSED") and "MB free" in lines[0], r.stdout
    assert "(the module's hint)" in lines[0], "Slicer's module says where to choose another folder"
    if immutable or os.geteuid() != 0:
        assert lines[1].startswith("REFUSED") and ("not writable" in lines[1] or "cannot" in lines[1]), r.stdout
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"]


def test_resume_keeps_the_runs_schedule(ws: Path, capsys) -> None:
    base = ["train", "--task", "hippocampus", "--data", str(ws / "data"), "--output", str(ws / "run"),
            "--progress", "none", "--device", "cpu"]
    assert cli([*base, "--epochs", "2", "--lr", "0.01", "--max-steps", "1", "--val-every", "1"]) == 0
    hist = json.loads((ws / "run" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    # a finished 2-epoch run resumed without settings stays a 2-epoch run (it used to run the preset's 100 epochs)
    assert cli([*base, "--resume"]) == 0
    assert len(json.loads((ws / "run" / "history.json").read_text())) == 2
    # a conflicting explicit value is an error naming it
    capsys.readouterr()
    assert cli([*base, "--resume", "--epochs", "5"]) == 2
    assert "epochs 5 (the run has 2)" in capsys.readouterr().err
    assert cli([*base, "--resume", "--lr", "0.5"]) == 2
    assert "lr 0.5 (the run has 0.01)" in capsys.readouterr().err


def test_finetune_resume_keeps_its_epochs_and_never_registers_twice(ws: Path) -> None:
    store = ws / "store"
    args = [sys.executable, "-m", "DSDSegmentationLib.worker.cli", "finetune", "--base", str(ws / "model"), "--data",
            str(ws / "data"), "--output", str(ws / "ft"), "--store", str(store), "--epochs", "3", "--max-steps", "1",
            "--device", "cpu", "--progress", "json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if '"stage": "epoch"' in line:  # stop after the first finished epoch, as the panel's Stop does
            proc.kill()
            break
    proc.wait()
    assert not store.exists() or not [p for p in store.iterdir() if p.is_dir()]
    assert cli(["finetune", "--output", str(ws / "ft"), "--resume", "--store", str(store), "--progress", "none"]) == 0
    hist = json.loads((ws / "ft" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3], "resumed with the run's own 3 epochs, not the default 30"
    models = [p.name for p in store.iterdir() if p.is_dir()]
    assert len(models) == 1
    card = json.loads((store / models[0] / "model.json").read_text())
    assert card["training"]["planned_epochs"] == 3
    assert cli(["finetune", "--output", str(ws / "ft"), "--resume", "--store", str(store), "--progress", "none"]) == 0
    assert [p.name for p in store.iterdir() if p.is_dir()] == models, "resuming a finished run registers nothing new"


def test_evaluate_and_qa_name_what_they_cannot_score(ws: Path, capsys) -> None:
    ref = nib.load(lab(ws))
    arr = np.asarray(ref.dataobj).copy()
    arr[arr == 2] = 7  # a value the labels do not name
    pred = _nifti(ws, "pred.nii.gz", ref.affine, arr.astype(np.uint8))
    empty = _nifti(ws, "empty.nii.gz", ref.affine, np.zeros_like(arr, dtype=np.uint8))
    assert cli(["evaluate", "--pred", pred, "--ref", lab(ws), "--labels", "hippocampus", "--output", str(ws / "ev")]) == 0
    assert "label value(s) [7] in the prediction are not among --labels" in capsys.readouterr().err
    assert cli(["qa", pred, empty, "--labels", "hippocampus", "--output", str(ws / "qa")]) == 0
    err = capsys.readouterr().err
    assert "reference holds no labelled structure" in err and "Traceback" not in err
    report = json.loads((ws / "qa" / "qa.json").read_text())
    assert len(report["notes"]) == 2 and (ws / "qa" / "index.html").is_file()


def test_models_list_flags_damaged_packages(ws: Path) -> None:
    from DSDSegmentationLib.engine.cards import list_models

    _bad_card(ws), _truncated(ws)
    status = {m["id"]: m["status"] for m in list_models([ws / "none", ws / "made"])}
    assert "network has 3 outputs" in status["edited-model"]
    assert "damaged or truncated" in status["truncated-model"]


SERVE_BAD = ['[1, 2]', 'null', '"predict"', '{"id": 5, "command": "predict"}', '{"id": 6, "command": "explode"}',
             'not json', '{"id": 9, "command": "qa"}', '{"id": 10, "command": "qa", "folder": "/"}']  # no QA request there


def test_warm_worker_answers_every_bad_request_and_stays_up(ws: Path) -> None:
    from DSDSegmentationLib.worker.process import WorkerProcess

    worker = WorkerProcess(["serve"], interactive=True)
    try:
        for line in SERVE_BAD:
            worker.proc.stdin.write(line + "\n")
        worker.proc.stdin.flush()
        unwritable = {"id": 7, "command": "predict", "model": str(ws / "model"), "inputs": [img(ws)], "output": img(ws)}
        good = {"id": 8, "command": "predict", "model": str(ws / "model"), "inputs": [img(ws)],
                "output": str(ws / "out" / "ok.nii.gz"), "device": "cpu"}
        before = _digest(ws / "data")
        worker.send(unwritable)
        worker.send(good)
        deadline = time.time() + 120
        while time.time() < deadline and not any(r.get("id") == 8 and r.get("stage") in ("done", "error") for r in worker.records):
            worker.poll()
            time.sleep(0.05)
        finals = [r for r in worker.records if r.get("stage") in ("done", "error", "cancelled")]
        assert len(finals) == len(SERVE_BAD) + 2, finals
        assert all(r["stage"] == "error" and r["exit_code"] == 2 for r in finals[:-1]), finals
        assert "is the input file" in finals[-2]["message"]
        assert finals[-1]["stage"] == "done" and (ws / "out" / "ok.nii.gz").is_file()
        assert worker.running and _digest(ws / "data") == before
    finally:
        worker.send({"command": "quit"})
        worker.wait(timeout=30)


def test_warm_worker_checks_every_case_of_a_batch_before_the_first_runs(ws: Path) -> None:
    """A request over several cases (the panel's 'All frames'): a bad case or output anywhere in it is refused before
    any case is segmented, so nothing is half-written; a good one gives one bar over the cases and every output."""
    from DSDSegmentationLib.worker.process import WorkerProcess

    model, out = str(ws / "model"), ws / "out"
    out.mkdir(exist_ok=True)
    first = str(out / "first.nii.gz")
    bad = [
        {"id": 1, "command": "predict", "model": model, "cases": []},
        {"id": 2, "command": "predict", "model": model, "inputs": [img(ws)], "output": first,
         "cases": [{"inputs": [img(ws)], "output": first}]},
        {"id": 3, "command": "predict", "model": model, "cases": [{"inputs": [img(ws)], "output": first},
                                                                  {"inputs": [img(ws, 1)], "output": first}]},
        {"id": 4, "command": "predict", "model": model, "cases": [{"inputs": [img(ws)], "output": first},
                                                                  {"inputs": [img(ws, 1)], "output": lab(ws, 1)}]},
        {"id": 5, "command": "predict", "model": model, "cases": [{"inputs": [img(ws)], "output": first},
                                                                  {"inputs": [str(ws / "missing.nii.gz")],
                                                                   "output": str(out / "b.nii.gz")}]},
    ]
    good = {"id": 6, "command": "predict", "model": model, "device": "cpu",
            "cases": [{"inputs": [img(ws, i)], "output": str(out / f"case{i}.nii.gz"), "name": f"case {i}"}
                      for i in range(2)]}
    worker = WorkerProcess(["serve"], interactive=True)
    try:
        before = _digest(ws / "data")
        for request in [*bad, good]:
            worker.send(request)
        deadline = time.time() + 120
        while time.time() < deadline and not any(r.get("id") == 6 and r.get("stage") in ("done", "error")
                                                 for r in worker.records):
            worker.poll()
            time.sleep(0.05)
        finals = {r["id"]: r for r in worker.records if r.get("stage") in ("done", "error", "cancelled")}
        assert [finals[i]["stage"] for i in range(1, 6)] == ["error"] * 5, finals
        assert "'cases' must be a non-empty list" in finals[1]["message"]
        assert "either 'cases' or 'inputs' and 'output', not both" in finals[2]["message"]
        assert "is given twice" in finals[3]["message"]
        assert "is the input file" in finals[4]["message"] or "exists" in finals[4]["message"], finals[4]
        assert "does not exist" in finals[5]["message"]
        assert not Path(first).exists(), "no case of a refused batch was segmented"
        assert _digest(ws / "data") == before
        assert finals[6]["stage"] == "done" and finals[6]["outputs"] == [str(out / f"case{i}.nii.gz") for i in range(2)]
        bars = [(r["stage"], r["done"], r["total"], r["message"]) for r in worker.records
                if r.get("id") == 6 and r.get("total")]
        assert bars == [("cases", 1, 2, "case 0"), ("cases", 2, 2, "case 1")]
    finally:
        worker.send({"command": "quit"})
        worker.wait(timeout=30)


def test_worker_failures_are_not_input_errors() -> None:
    from DSDSegmentationLib.engine.errors import Cancelled, InputError
    from DSDSegmentationLib.worker.process import WorkerError, WorkerResult

    with pytest.raises(WorkerError) as e:
        WorkerResult("error", 3, "out of memory: CUDA out of memory", [], kind="out of memory").raise_for_status()
    assert e.value.out_of_memory and not isinstance(e.value, InputError)
    with pytest.raises(WorkerError) as e:
        WorkerResult("error", 1, "crash: boom", [], kind="crash").raise_for_status()
    assert not e.value.out_of_memory and e.value.exit_code == 1
    # ended by a signal: SIGKILL is how Linux's out-of-memory killer ends it (nothing on its streams); SIGTERM is not
    with pytest.raises(WorkerError) as e:
        WorkerResult("error", -9, "the worker was killed", [], kind="crash").raise_for_status()
    assert e.value.out_of_memory
    with pytest.raises(WorkerError) as e:
        WorkerResult("error", -15, "the worker was ended", [], kind="crash").raise_for_status()
    assert not e.value.out_of_memory
    with pytest.raises(InputError):
        WorkerResult("error", 2, "error: constant image", [], kind="error").raise_for_status()
    with pytest.raises(Cancelled):
        WorkerResult("cancelled", 130, "cancelled by the user", []).raise_for_status()
    WorkerResult("ok", 0, "", []).raise_for_status()


def test_worker_popen_options_hide_consoles_on_windows() -> None:
    from DSDSegmentationLib.worker.process import popen_platform_options

    assert popen_platform_options("posix") == {"start_new_session": True}
    win = popen_platform_options("nt")
    assert win["creationflags"] & 0x08000000, "CREATE_NO_WINDOW"
    assert win["creationflags"] & 0x00000200, "CREATE_NEW_PROCESS_GROUP (cancel reaches the whole tree)"


def test_reports_replace_earlier_files_only_when_asked(ws: Path, capsys) -> None:
    """evaluate / qa into a folder that already holds a report (or the user's own file of that name): refused before
    any work, naming the files, everything unchanged; --overwrite replaces them; a report never lands on an input."""
    pred = _nifti(ws, "pred.nii.gz", nib.load(lab(ws)).affine, np.asarray(nib.load(lab(ws)).dataobj).astype(np.uint8))
    ev = ["evaluate", "--pred", pred, "--ref", lab(ws), "--labels", "hippocampus", "--progress", "none"]
    qa = ["qa", pred, lab(ws), "--labels", "hippocampus", "--progress", "none", "--worst", "2"]
    (ws / "ev").mkdir()
    (ws / "ev" / "metrics.csv").write_text("the user's own table\n")
    before = _digest(ws)
    assert run([*ev, "--output", str(ws / "ev")]) == 2
    err = capsys.readouterr().err
    assert "already holds metrics.csv; pass --overwrite" in err and "Traceback" not in err
    assert _digest(ws) == before and not (ws / "ev" / "metrics.json").exists()
    assert run([*ev, "--output", str(ws / "ev"), "--overwrite"]) == 0
    assert (ws / "ev" / "metrics.csv").read_text().startswith("case,class,dice")
    assert json.loads((ws / "ev" / "metrics.json").read_text())["summary"]["anterior hippocampus"]["dice"]["mean"] == 1.0

    assert run([*qa, "--output", str(ws / "qa")]) == 0
    report = _digest(ws / "qa")
    assert {"qa.json", "index.html", "surfaces/anterior_hippocampus.png"} <= report.keys()
    assert run([*qa, "--output", str(ws / "qa")]) == 2
    err = capsys.readouterr().err
    assert "already holds qa.json, index.html" in err and "surfaces/anterior_hippocampus.png" in err
    assert _digest(ws / "qa") == report
    assert run([*qa, "--output", str(ws / "qa"), "--overwrite"]) == 0
    # the report's names are never an input's, overwrite or not: a reference linked as qa.json in the report folder
    shutil.copy(lab(ws), ws / "qa2.nii.gz")
    (ws / "q2").mkdir()
    os.link(ws / "qa2.nii.gz", ws / "q2" / "qa.json")
    before = _digest(ws)
    assert run(["qa", pred, str(ws / "q2" / "qa.json"), "--labels", "hippocampus", "--output", str(ws / "q2"),
                "--overwrite", "--progress", "none"]) == 2
    assert "the report's qa.json would overwrite the input" in capsys.readouterr().err and _digest(ws) == before


def _fake_worker(tmp_path: Path, exit_code: int) -> Path:
    """A stand-in for the worker's Python: a library's line in Latin-1 and a UTF-8 path on stdout and stderr, then the
    worker's own JSON record (and an exit code)."""
    script = tmp_path / "fake-python"
    script.write_bytes(b"#!/bin/sh\n"
                       b"printf 'Warnung: Datei C:\\\\Users\\\\Jos\\351\\n'\n"  # Latin-1 e-acute: not UTF-8
                       b"printf 'Fichier C:\\\\Users\\\\Jos\\303\\251 M\\303\\274ller\\\\t1.nrrd\\n' >&2\n"  # UTF-8
                       b"printf 'bad byte \\377 on stderr\\n' >&2\n"
                       b"echo \"{\\\"stage\\\": \\\"log\\\", \\\"done\\\": 0, \\\"total\\\": 0, \\\"message\\\": \\\"encoding=$PYTHONIOENCODING\\\"}\"\n"
                       b"echo '{\"stage\": \"done\", \"done\": 1, \"total\": 1, \"message\": \"ok\"}'\n"
                       + f"exit {exit_code}\n".encode())
    script.chmod(0o755)
    return script


@pytest.mark.skipif(os.name == "nt", reason="a POSIX shell script stands in for the worker")
def test_worker_streams_in_another_encoding_never_stop_the_readers(tmp_path: Path) -> None:
    """On Windows the system code page (cp1252, cp932, ...) is not UTF-8 and a user's folder may be 'José Müller':
    the worker is told to write UTF-8 (PYTHONIOENCODING) and its streams are read as UTF-8 with replacement, so a
    byte in another encoding can neither end the reader thread (the done record would never arrive and the panel
    would wait for ever) nor garble the error message's path."""
    from DSDSegmentationLib.worker.process import WorkerProcess

    ok = WorkerProcess(["predict"], python=str(_fake_worker(tmp_path, 0))).wait(timeout=30)
    assert ok.ok and [r["stage"] for r in ok.records][-1] == "done", ok.records
    messages = [r["message"] for r in ok.records]
    assert "encoding=utf-8" in messages and any(m.startswith("Warnung: Datei") and "\ufffd" in m for m in messages)
    failed = WorkerProcess(["predict"], python=str(_fake_worker(tmp_path, 1))).wait(timeout=30)
    assert failed.status == "error" and "C:\\Users\\José Müller\\t1.nrrd" in failed.message, failed.message
    assert "bad byte \ufffd on stderr" in failed.message


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_one_shot_worker_killed_by_the_kernel_is_named(tmp_path: Path) -> None:
    """A fine-tune or one-shot predict ended by SIGKILL (Linux's out-of-memory killer; nothing on its streams) is
    reported as most likely out of memory, not as 'exit code -9, unexpected error'."""
    from DSDSegmentationLib.worker.process import WorkerProcess

    script = tmp_path / "killed-python"
    script.write_text("#!/bin/sh\nkill -9 $$\n")
    script.chmod(0o755)
    result = WorkerProcess(["finetune"], python=str(script)).wait(timeout=30)
    assert result.status == "error" and result.exit_code == -9 and result.out_of_memory, result
    assert result.message == ("the worker was killed by the system (SIGKILL), most often because the computer ran out "
                              "of memory (on Linux the kernel's out-of-memory killer)")
    script.write_text("#!/bin/sh\nkill -15 $$\n")
    result = WorkerProcess(["finetune"], python=str(script)).wait(timeout=30)
    assert not result.out_of_memory and result.message == "the worker was ended by SIGTERM", result.message


class _RunsCode:
    """What a hostile (or merely foreign) pickle can do when it is loaded: call any function, here open a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unloaded(ws: Path, capsys) -> None:
    """A checkpoint (``--model x.pt``, ``--init-from``, a resumed ``last.pt``) is read with torch's weights-only
    unpickler: tensors, plain containers and numpy's random state only. Until session 15 checkpoints were read with
    ``weights_only=False``: a checkpoint from someone else ran its code on loading (here: it created a file)."""
    import torch

    marker = ws / "ran.txt"
    evil = ws / "colleague" / "best.pt"
    evil.parent.mkdir()
    torch.save({"model": {}, "network": {}, "dsd": {}, "preset": {}, "payload": _RunsCode(marker)}, evil)
    out = ws / "out" / "seg.nii.gz"
    assert cli(["predict", "--model", str(evil), "--progress", "none", "-i", img(ws), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "was not loaded: it holds Python objects other than tensors and numbers, which could run code" in err, err
    assert not marker.exists() and not out.exists() and "Traceback" not in err
