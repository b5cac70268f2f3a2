"""Fine-tuning from the scene and the CLI: dataset builder, background run, Stop/Resume, user store, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test install (.ci/setup)")

from DSDSegmentationLib.worker.cli import main as cli  # noqa: E402
from DSDSegmentationLib.bridge.demo import default_model  # noqa: E402
from DSDSegmentationLib.engine.cards import list_models, read_model_card, verify_package  # noqa: E402
from DSDSegmentationLib.engine.errors import InputError  # noqa: E402
from DSDSegmentationLib.engine.finetune import LOCK_NAME, export_zip, finetune, import_zip  # noqa: E402
from DSDSegmentationLib.engine.models_sha import sha256_of  # noqa: E402
from DSDSegmentationLib.bridge.logic import SegmentationBridge  # noqa: E402

CASES = ["hippocampus_052", "hippocampus_057", "hippocampus_064", "hippocampus_084"]  # held out from the base model


@pytest.fixture
def base() -> Path:
    return default_model()


def scene_pairs(scene, logic, hippocampus_dir: Path, preset: dict, n: int = 3):
    pairs = []
    for case in CASES[:n]:
        vol = logic.load_volume(hippocampus_dir / "imagesTr" / f"{case}.nii.gz", name=case)
        seg = logic.import_labelmap(hippocampus_dir / "labelsTr" / f"{case}.nii.gz", vol, preset, show_3d=False)
        seg.SetName(f"{case} corrected")
        pairs.append((vol, seg))
    return pairs


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: sha256_of(p) for p in sorted(folder.iterdir()) if p.is_file()}


def wait(worker, timeout: float = 600, until=None) -> list[dict]:
    records, t0 = [], time.time()
    while worker.running and time.time() - t0 < timeout:
        records += worker.poll()
        if until and until(records):
            return records
        time.sleep(0.1)
    records += worker.poll()
    return records


def test_segments_matched_by_terminology_then_name(scene, base: Path, hippocampus_dir: Path) -> None:
    logic = SegmentationBridge(scene, warm=False)
    preset = read_model_card(base)["preset"]
    (vol, seg), = scene_pairs(scene, logic, hippocampus_dir, preset, n=1)
    segmentation = seg.GetSegmentation()
    anterior = segmentation.GetSegmentIdBySegmentName("anterior hippocampus")
    posterior = segmentation.GetSegmentIdBySegmentName("posterior hippocampus")
    segmentation.GetSegment(anterior).SetName("Segment_1")  # renamed in Segment Editor: terminology still says it
    segmentation.GetSegment(posterior).SetTerminology("")  # no terminology: the name says it
    segmentation.GetSegment(posterior).SetName("Posterior Hippocampus")
    found = SegmentationBridge.match_segments(seg, preset)
    assert found[1] == {"segment_id": anterior, "segment": "Segment_1", "by": "terminology"}
    assert found[2] == {"segment_id": posterior, "segment": "Posterior Hippocampus", "by": "name"}


def test_scene_to_finetuned_model_in_the_selector(scene, base: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    logic = SegmentationBridge(scene, warm=False)
    preset = read_model_card(base)["preset"]
    pairs = scene_pairs(scene, logic, hippocampus_dir, preset)
    # reverse the segment order of one case: label values must not depend on it
    segmentation = pairs[0][1].GetSegmentation()
    first = segmentation.GetNthSegmentID(0)
    segmentation.SetSegmentIndex(first, segmentation.GetNumberOfSegments() - 1)
    built = logic.build_finetune_dataset(pairs, preset, tmp_path / "dataset")
    assert len(built["cases"]) == 3
    from DSDSegmentationLib.engine.io import load_volume

    exported, _ = load_volume(tmp_path / "dataset" / "labelsTr" / "case_001.nrrd")
    original, _ = load_volume(hippocampus_dir / "labelsTr" / f"{CASES[0]}.nii.gz")
    assert np.array_equal(exported.astype(int), np.rint(original).astype(int)), "exported labels equal the manual ones"
    before = fingerprint(base)
    store = tmp_path / "store"
    worker = logic.start_finetune(base, tmp_path / "dataset", tmp_path / "run", epochs=2, max_steps=2, store=store,
                                  device="cpu")
    records = wait(worker)
    result = worker.wait()
    assert result.ok, result.message
    epochs = [r for r in records if r.get("stage") == "epoch"]
    assert [r["done"] for r in epochs] == [1, 2] and "loss/total" in epochs[0]["record"]
    done = next(r for r in records if r.get("stage") == "done")
    models = {m["id"]: m for m in list_models([tmp_path / "none", store])}
    assert models[done["model_id"]]["status"] == "ok"
    card = read_model_card(Path(done["package"]))
    assert card["base_model"]["id"] == "hippocampus-dsd" and card["base_model"]["sha256"] == read_model_card(base)["sha256"]
    assert card["training_data"]["train_cases"] + card["training_data"]["val_cases"] == 3
    assert "base_model" in card["validation"] and card["versions"]["torch"]
    assert fingerprint(base) == before, "the base model is never modified"
    seg = SegmentationBridge(scene, warm=False).segment([pairs[0][0]], done["package"], device="cpu")
    assert seg.GetSegmentation().GetNumberOfSegments() == 2


def test_stop_then_resume_keeps_base_and_earlier_models(scene, base: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    logic = SegmentationBridge(scene, warm=False)
    preset = read_model_card(base)["preset"]
    logic.build_finetune_dataset(scene_pairs(scene, logic, hippocampus_dir, preset), preset, tmp_path / "dataset")
    store = tmp_path / "store"
    earlier = store / "earlier-v1"
    shutil.copytree(base, earlier)
    kept = {"base": fingerprint(base), "earlier": fingerprint(earlier)}
    run = tmp_path / "run"
    worker = logic.start_finetune(base, tmp_path / "dataset", run, epochs=3, max_steps=2, store=store, device="cpu")
    wait(worker, until=lambda recs: any(r.get("stage") == "epoch" for r in recs))
    worker.cancel()  # Stop
    assert not worker.wait().ok
    history = json.loads((run / "history.json").read_text())
    assert 1 <= len(history) < 3 and (run / "last.pt").is_file()
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["earlier-v1"], "nothing registered"
    worker = logic.start_finetune(base, tmp_path / "dataset", run, epochs=3, max_steps=2, store=store, device="cpu",
                                  resume=True)
    wait(worker)
    assert worker.wait().ok
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3], "resume continues where Stop left off"
    assert {"base": fingerprint(base), "earlier": fingerprint(earlier)} == kept
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["earlier-v1", "hippocampus-dsd-ft-v1"]


def test_bad_scene_inputs_are_named(scene, base: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    logic = SegmentationBridge(scene, warm=False)
    preset = read_model_card(base)["preset"]
    pairs = scene_pairs(scene, logic, hippocampus_dir, preset)
    with pytest.raises(InputError, match="at least 2 annotated cases"):
        logic.build_finetune_dataset(pairs[:1], preset, tmp_path / "a")
    seg = pairs[1][1].GetSegmentation()
    seg.RemoveSegment(seg.GetSegmentIdBySegmentName("posterior hippocampus"))
    with pytest.raises(InputError, match=r"case_002 .*no segment for 'posterior hippocampus'"):
        logic.build_finetune_dataset(pairs, preset, tmp_path / "b")
    # an empty segment (nothing painted)
    seg.AddEmptySegment("posterior", "posterior hippocampus")
    with pytest.raises(InputError, match=r"case_002 .*'posterior hippocampus'.* empty"):
        logic.build_finetune_dataset(pairs, preset, tmp_path / "c")
    # a segmentation drawn on another volume far away: nothing overlaps this volume
    vol = pairs[2][0]
    labelmap = logic.load_volume(hippocampus_dir / "labelsTr" / f"{CASES[2]}.nii.gz", labelmap=True)
    labelmap.SetOrigin(500, 500, 500)
    far_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "far")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, far_seg)
    far = far_seg.GetSegmentation()
    assert far.GetNumberOfSegments() == 2
    for i, name in enumerate(["anterior hippocampus", "posterior hippocampus"]):
        far.GetNthSegment(i).SetName(name)
    with pytest.raises(InputError, match="empty on the volume's grid"):
        logic.build_finetune_dataset([pairs[0], (vol, far_seg)], preset, tmp_path / "d")
    for name in "abcd":
        assert not (tmp_path / name).exists(), "nothing is written unless every case passes"


def add_case(source: Path, data: Path, case: str) -> None:
    """Copy one case into an MSD-layout folder and list it in its dataset.json."""
    shutil.copy(source / "imagesTr" / f"{case}.nii.gz", data / "imagesTr")
    shutil.copy(source / "labelsTr" / f"{case}.nii.gz", data / "labelsTr")
    ds = json.loads((source / "dataset.json").read_text())
    listed = json.loads((data / "dataset.json").read_text())["training"] if (data / "dataset.json").is_file() else []
    listed.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({**ds, "training": listed, "numTraining": len(listed)}))


def test_cli_refusals_lock_and_zip(base: Path, hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "one"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    add_case(hippocampus_dir, data, CASES[0])
    assert cli(["finetune", "--base", str(base), "--data", str(data), "--output", str(tmp_path / "r"),
                "--store", str(tmp_path / "store"), "--progress", "none"]) == 2
    assert "at least 2 annotated cases" in capsys.readouterr().err
    # one fine-tune at a time: a live owner blocks, a dead one's lock is taken over
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    add_case(hippocampus_dir, data, CASES[1])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from DSDSegmentationLib.engine.finetune import finetune_lock\n"
                               f"with finetune_lock(Path({str(store)!r})):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"another fine-tune is running \\(process {holder.pid}\\)"):
            finetune(base, data, tmp_path / "r2", epochs=1, max_steps_per_epoch=1, store=store, device="cpu")
    finally:
        holder.kill()
        holder.wait()
    assert (store / LOCK_NAME).read_text() == str(holder.pid)  # left by the killed owner: stale
    result = finetune(base, data, tmp_path / "r3", epochs=1, max_steps_per_epoch=1, store=store, device="cpu")
    # export / import as zip; the sha256 is checked and nothing is overwritten
    zipped = export_zip(result["package"], tmp_path / "m.zip")
    other = tmp_path / "other-store"
    imported = import_zip(zipped, other)
    verify_package(imported)
    with pytest.raises(InputError, match="already exists"):
        import_zip(zipped, other)


def test_stale_lock_taken_over_by_exactly_one_of_many(tmp_path: Path) -> None:
    """Six fine-tunes start together over a stale lock: exactly one holds it (three trials)."""
    import time

    code = ("import sys, time; from pathlib import Path; from DSDSegmentationLib.engine.finetune import finetune_lock; "
            "from DSDSegmentationLib.engine.errors import InputError\n"
            "t = float(sys.argv[2])\nwhile time.time() < t: time.sleep(0.001)\n"
            "try:\n with finetune_lock(Path(sys.argv[1])):\n  print('got', flush=True); time.sleep(1.5)\n"
            "except InputError:\n print('busy', flush=True)\n")
    for trial in range(3):
        store = tmp_path / f"s{trial}"
        store.mkdir()
        (store / LOCK_NAME).write_text("999999999")  # stale: its owner is gone
        start = time.time() + 2.0
        procs = [subprocess.Popen([sys.executable, "-c", code, str(store), str(start)], stdout=subprocess.PIPE, text=True)
                 for _ in range(6)]
        outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outs == ["busy"] * 5 + ["got"], outs


def test_concurrent_imports_of_one_zip(base: Path, tmp_path: Path) -> None:
    from conftest import renamed_copy

    zipped = export_zip(renamed_copy(base, tmp_path / "colleague", "hippocampus-ft-v1"), tmp_path / "m.zip")
    code = ("import sys; from DSDSegmentationLib.engine.finetune import import_zip; "
            "from DSDSegmentationLib.engine.errors import InputError\n"
            "try:\n import_zip(sys.argv[1], sys.argv[2]); print('imported')\n"
            "except InputError as e:\n print('refused' if 'already exists' in str(e) else 'other: ' + str(e))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(zipped), str(tmp_path / "store")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-500:] for r in results]
    outs = sorted(r[0].strip() for r in results)
    assert outs == ["imported"] + ["refused"] * 3, outs
    verify_package(tmp_path / "store" / "hippocampus-ft-v1")
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["hippocampus-ft-v1"], "no temporary folder left"


def test_unsafe_zip_is_refused(tmp_path: Path) -> None:
    import zipfile

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("pkg/model.json", "{}")
        z.writestr("../evil.txt", "x")
    with pytest.raises(InputError, match="outside the package"):
        import_zip(bad, tmp_path / "store")
    assert not (tmp_path / "evil.txt").exists()


def test_training_plot_nodes(scene) -> None:
    logic = SegmentationBridge(scene, warm=False)
    table, chart = logic.training_plot()
    logic.add_epoch(table, {"epoch": 1, "loss/total": 2.5})
    logic.add_epoch(table, {"epoch": 2, "loss/total": 2.0, "val_dice": 0.81})
    t = table.GetTable()
    assert t.GetNumberOfRows() == 2
    assert [t.GetValue(1, c).ToDouble() for c in range(3)] == [2.0, 2.0, 0.81]
    assert np.isnan(t.GetValue(0, 2).ToDouble())
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(1).GetYColumnName() == "validation Dice"


def test_encoder_freeze_keeps_encoder_weights(base: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    import torch

    data = tmp_path / "two"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    for case in CASES[:2]:
        add_case(hippocampus_dir, data, case)
    result = finetune(base, data, tmp_path / "run", epochs=1, max_steps_per_epoch=2, store=tmp_path / "store",
                      device="cpu", freeze_encoder=True)
    before = torch.load(base / "weights.pt", weights_only=True)
    after = torch.load(Path(result["package"]) / "weights.pt", weights_only=True)
    encoder = [k for k in before if k.split(".")[0] in ("conv_0", "down_1", "down_2", "down_3")]
    decoder = [k for k in before if k.split(".")[0].startswith("upcat") or k.startswith("final_conv")]
    assert encoder and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoder), "frozen encoder stages are unchanged"
    assert any(not torch.equal(before[k], after[k]) for k in decoder), "the decoder was trained"


def test_early_stopping_counts_validations_without_improvement(tmp_path: Path) -> None:
    from DSDSegmentationLib.engine.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(task="hippocampus", data=str(tmp_path), output=str(tmp_path / "r"), patience=2))
    trainer.history = [{"epoch": 1, "val_dice": 0.5}, {"epoch": 2}, {"epoch": 3, "val_dice": 0.7}, {"epoch": 4, "val_dice": 0.6}]
    assert not trainer._patience_exhausted()
    trainer.history.append({"epoch": 5, "val_dice": 0.69})
    assert trainer._patience_exhausted()
    trainer.history.append({"epoch": 6, "val_dice": 0.71})
    assert not trainer._patience_exhausted()
