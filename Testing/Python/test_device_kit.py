"""The GPU session's way back: a run split into files the device returns (at most 8, 16 MiB each) and joined here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

DEVICE = Path(__file__).resolve().parents[1] / "Device"
sys.path.insert(0, str(DEVICE))

from gpu_session import PART_BYTES, write_run  # noqa: E402
from unpack import unpack  # noqa: E402


def test_a_run_larger_than_a_returned_file_comes_back_whole(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "ACDC_subset" / "imagesTr").mkdir(parents=True)
    device_data = "/somewhere/repo/.device/data/ACDC_subset"
    run = tmp_path / "run"
    run.mkdir()
    case = {"id": "patient001_frame01", "images": [f"{device_data}/imagesTr/patient001_frame01.nii.gz"],
            "label": f"{device_data}/labelsTr/patient001_frame01.nii.gz", "patient": "patient001"}
    (run / "config.json").write_text(json.dumps({"data": device_data, "output": "/tmp/dsdseg-run-dsd", "seed": 0,
                                                 "resolved": {"epochs": 3}}))
    (run / "split.json").write_text(json.dumps({"seed": 0, "val_fraction": 0.2, "train": [case], "val": [case]}))
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 1.0, "seconds": 2.0}]))
    (run / "log.txt").write_text("epoch 1/3\n")
    checkpoint = os.urandom(PART_BYTES * 2 + 12345)  # the brain-tumour checkpoint is 23 MB: three parts here
    (run / "best.pt").write_bytes(checkpoint)

    back = tmp_path / "back"
    back.mkdir()
    names = write_run(run, back, "dsd")
    assert names == ["dsd_run.json", "dsd_best.pt.00", "dsd_best.pt.01", "dsd_best.pt.02"]
    assert all((back / n).stat().st_size <= 16 * 2**20 for n in names)

    (back / "session.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3"}))
    (made,) = unpack(back, tmp_path / "runs", shared=shared)
    assert made.name == "dsd_seed0"
    assert (made / "best.pt").read_bytes() == checkpoint
    split = json.loads((made / "split.json").read_text())
    assert split["val"][0]["images"] == [f"{shared}/ACDC_subset/imagesTr/patient001_frame01.nii.gz"]
    config = json.loads((made / "config.json").read_text())
    assert config["data"] == f"{shared}/ACDC_subset" and config["output"] == str(made)
    assert config["resolved"]["hardware"].startswith("NVIDIA H100")  # from session.json, for the card
    assert (made / "log.txt").read_text() == "epoch 1/3\n"

    with pytest.raises(SystemExit, match="exists"):  # never overwrites
        unpack(back, tmp_path / "runs", shared=shared)
    (back / "dsd_best.pt.01").unlink()
    with pytest.raises(SystemExit, match="missing"):
        unpack(back, tmp_path / "other", shared=shared)


def test_the_card_names_the_gpu_a_run_trained_on(tmp_path: Path) -> None:
    """package_model.py takes the hardware from the run (a GPU run packaged on this CPU is not 'no GPU')."""
    sys.path.insert(0, str(DEVICE.parent / "Benchmarks"))
    from package_model import run_hardware

    assert run_hardware({"device": "cuda", "resolved": {"hardware": "NVIDIA H100 80GB HBM3 (CUDA 13.0)"}}).startswith("NVIDIA H100")
    assert "CUDA GPU" in run_hardware({"device": "cuda", "resolved": {}})
    assert run_hardware({"device": "cpu", "resolved": {}}).startswith("CPU")


def test_the_other_tasks_models_are_held_back_for_the_session_and_come_back_unchanged(tmp_path: Path) -> None:
    """The shipped models leave no room for a dataset in the 64 MiB the device takes: pack.py moves the other
    tasks' models out of the tree and the index, so they do not travel, and puts them back byte for byte."""
    import subprocess

    from pack import hold_models, restore_models, tree_bytes

    repo = tmp_path / "repo"
    models = repo / "Resources" / "Models"
    for name, task, size in (("cardiac-dsd", "cardiac", 1000), ("brain-tumour-dsd", "brain_tumour", 50000),
                             ("brain-tumour-2seq-dsd", "brain_tumour_2seq", 30000),
                             ("hippocampus-dsd", "hippocampus", 20000)):
        (models / name).mkdir(parents=True)
        (models / name / "model.json").write_text(json.dumps({"id": name, "task": task}))
        (models / name / "weights.pt").write_bytes(os.urandom(size))
    (repo / ".gitignore").write_text("/.device-hold/\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "models")
    before = {p.relative_to(repo): p.read_bytes() for p in models.rglob("*") if p.is_file()}
    full = tree_bytes(repo)

    held = hold_models("cardiac", repo)
    assert held == ["Resources/Models/brain-tumour-2seq-dsd", "Resources/Models/brain-tumour-dsd"]
    tracked = git("ls-files").split()
    assert "Resources/Models/cardiac-dsd/weights.pt" in tracked and not any("tumour" in t for t in tracked)
    assert "Resources/Models/hippocampus-dsd/weights.pt" in tracked  # the session's GPU checks run it
    assert not (models / "brain-tumour-dsd").exists() and (repo / ".device-hold/Resources/Models/brain-tumour-dsd").is_dir()
    assert tree_bytes(repo) < full - 70000
    with pytest.raises(SystemExit, match="not empty"):  # a second pack never stacks holds
        hold_models("cardiac", repo)

    assert restore_models(repo) == held
    assert {p.relative_to(repo): p.read_bytes() for p in models.rglob("*") if p.is_file()} == before
    assert git("status", "--porcelain") == "" and not (repo / ".device-hold").exists()
    assert restore_models(repo) == []

    (models / "brain-tumour-2seq-dsd" / "model.json").write_text("{}")  # a model with changes not in HEAD is never held
    with pytest.raises(SystemExit, match="not committed"):
        hold_models("cardiac", repo)
    assert (models / "brain-tumour-dsd").is_dir() and not (repo / ".device-hold").exists()  # nothing moved
    git("checkout", "-q", "--", ".")
    hold_models("cardiac", repo)
    (models / "brain-tumour-dsd").mkdir()  # something new in its place is never overwritten
    (models / "brain-tumour-dsd" / "mine.txt").write_text("user's")
    with pytest.raises(SystemExit, match="exists again"):
        restore_models(repo)
    assert (models / "brain-tumour-dsd" / "mine.txt").read_text() == "user's"
    assert (repo / ".device-hold/Resources/Models/brain-tumour-dsd/weights.pt").is_file()
