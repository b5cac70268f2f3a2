"""Fine-tuning to the researcher's own labels: same, merged and new labels, from names or an explicit map."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from DSDSegmentationLib.bridge.demo import default_model
from DSDSegmentationLib.engine.errors import InputError
from DSDSegmentationLib.engine.finetune import finetune
from DSDSegmentationLib.engine.labelmapping import MappedLabel, derive_mapping, describe, transfer_output_layer
from DSDSegmentationLib.engine.models import load_model
from DSDSegmentationLib.engine.training import _class_dims
from DSDSegmentationLib.worker.cli import main as cli

CASES = ["hippocampus_052", "hippocampus_057", "hippocampus_064"]  # in the base model's validation split
HIP = {0: "background", 1: "anterior hippocampus", 2: "posterior hippocampus"}


def user_dataset(src: Path, dst: Path, labels: dict[int, str], relabel) -> Path:
    """MSD-layout copy of real cases with the user's label values (``relabel(label array) -> array``)."""
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    entries = []
    for c in CASES:
        shutil.copy(src / "imagesTr" / f"{c}.nii.gz", dst / "imagesTr")
        lab = nib.load(src / "labelsTr" / f"{c}.nii.gz")
        arr = relabel(np.rint(np.asarray(lab.dataobj)).astype(np.uint8))
        nib.save(nib.Nifti1Image(arr.astype(np.uint8), lab.affine, lab.header), str(dst / "labelsTr" / f"{c}.nii.gz"))
        entries.append({"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"})
    (dst / "dataset.json").write_text(json.dumps({"name": "mine", "modality": {"0": "T1 MRI"},
                                                  "labels": {str(k): v for k, v in labels.items()},
                                                  "training": entries}))
    return dst


def whole(arr: np.ndarray) -> np.ndarray:
    return (arr > 0).astype(np.uint8)


def with_marker(arr: np.ndarray) -> np.ndarray:
    """anterior/posterior kept, plus a new structure (3) the base model never saw: a block at a fixed place."""
    out = arr.copy()
    out[2:8, 2:8, 2:8] = 3
    return out


def test_derive_mapping_by_name_and_explicit() -> None:
    m = derive_mapping(HIP, {0: "background", 1: "Hippocampus", 2: "amygdala"})
    assert [(x.value, x.kind, x.sources) for x in m[1:]] == [(1, "merge", [1, 2]), (2, "new", [])]
    assert describe(m, HIP) == ["1 Hippocampus: merge of 1 anterior hippocampus + 2 posterior hippocampus",
                                "2 amygdala: new label (fresh output channel)"]
    m = derive_mapping(HIP, {0: "bg", 5: "posterior hippocampus"})
    assert [(x.value, x.kind, x.sources) for x in m[1:]] == [(5, "same", [2])]
    assert describe(m, HIP)[-1] == "dropped (not annotated): 1 anterior hippocampus"
    m = derive_mapping(HIP, {0: "bg", 1: "HC"}, {"1": {"name": "whole HC", "from": ["anterior hippocampus", 2]}})
    assert m[1].sources == [1, 2] and m[1].name == "whole HC" and m[1].by == "explicit"
    with pytest.raises(InputError, match=r"label value\(s\) \[2\] \(amygdala\) are neither mapped"):
        derive_mapping(HIP, {0: "bg", 1: "hippocampus", 2: "amygdala"}, {"1": {"from": [1, 2]}})
    with pytest.raises(InputError, match="comes from 'thalamus', which is not a base label"):
        derive_mapping(HIP, {0: "bg", 1: "x"}, {"1": {"from": ["thalamus"]}})
    with pytest.raises(InputError, match="mapped to more than one"):
        derive_mapping(HIP, {0: "bg", 1: "a", 2: "b"}, {"1": {"from": [1]}, "2": {"from": [1, 2]}})


@pytest.mark.parametrize("backbone,opts", [("basicunet", {}), ("dynunet", {}), ("vnet", {})])
def test_output_layer_transfer(backbone: str, opts: dict) -> None:
    """Same labels copy their base rows, a merge averages them, a new label keeps the fresh initialisation; every
    other tensor is the base's (checked on three backbones, VNet with a K×K output conv)."""
    from DSDSegmentationLib.engine.config import DSDConfig, NetworkConfig
    from DSDSegmentationLib.engine.networks import DSDNet

    patch = (32, 32, 32)
    base_cfg = NetworkConfig(backbone, 1, 3, patch, opts)
    new_cfg = NetworkConfig(backbone, 1, 3, patch, opts)  # 3 → 3 classes with another meaning: shapes alike
    base = DSDNet(base_cfg, DSDConfig.preset("plain")).backbone.state_dict()
    fresh = DSDNet(new_cfg, DSDConfig.preset("plain")).backbone.state_dict()
    dims = _class_dims(new_cfg)
    assert dims, "the output layer is found"
    mapping = [MappedLabel(0, "bg", [0], ""), MappedLabel(1, "whole", [1, 2], ""), MappedLabel(2, "new", [], "")]
    out = transfer_output_layer(base, fresh, dims, mapping, [0, 1, 2])
    for key, t in out.items():
        if key not in dims:
            assert torch.equal(t, base[key])
            continue
        assert t.shape == fresh[key].shape
        if len(dims[key]) > 1:
            continue  # VNet's K×K output conv: rows and columns both follow the mapping
        d = dims[key][0]
        assert torch.allclose(t.select(d, 1).float(), (base[key].select(d, 1).float() + base[key].select(d, 2).float()) / 2)
        assert torch.equal(t.select(d, 0), base[key].select(d, 0))
        assert torch.equal(t.select(d, 2), fresh[key].select(d, 2))


def test_whole_hippocampus_from_the_anterior_posterior_model(hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    data = user_dataset(hippocampus_dir, tmp_path / "whole", {0: "background", 1: "hippocampus"}, whole)
    store = tmp_path / "store"
    r = cli(["finetune", "--base", str(default_model()), "--data", str(data), "--output", str(tmp_path / "run"),
             "--store", str(store), "--epochs", "2", "--max-steps", "2", "--device", "cpu", "--progress", "none"])
    assert r == 0, capsys.readouterr().err
    (pkg,) = [p for p in store.iterdir() if p.is_dir()]
    card = json.loads((pkg / "model.json").read_text())
    assert card["preset"]["labels"] == {"0": "background", "1": "hippocampus"}
    assert card["network"]["out_channels"] == 2
    assert card["label_mapping"] == [{"value": 1, "name": "hippocampus", "kind": "merge", "decided_by": "name",
                                      "from": [{"value": 1, "name": "anterior hippocampus"},
                                               {"value": 2, "name": "posterior hippocampus"}]}]
    assert card["preset"]["terminology"]["1"]["type"].startswith("SCT^5366008^"), "hippocampus, no modifier"
    assert "type_modifier" not in card["preset"]["terminology"]["1"] or not card["preset"]["terminology"]["1"]["type_modifier"]
    # the base model scored on the whole hippocampus (its two parts merged) is already good: the mapping is right
    assert card["validation"]["base_model"]["mean_dice"] > 0.75
    model = load_model(pkg)
    assert model.preset.label_values == [0, 1]
    assert r == 0 and "label mapping: 1 hippocampus: merge of 1 anterior hippocampus + 2 posterior hippocampus" in \
        (tmp_path / "run" / "log.txt").read_text()


def test_new_label_explicit_map_and_refusals(hippocampus_dir: Path, tmp_path: Path, capsys) -> None:
    labels = {**HIP, 3: "marker"}
    data = user_dataset(hippocampus_dir, tmp_path / "marker", labels, with_marker)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"from": [1]}, "2": {"from": [2]}}))
    r = cli(["finetune", "--base", str(default_model()), "--data", str(data), "--output", str(tmp_path / "r0"),
             "--label-map", str(bad), "--store", str(tmp_path / "store"), "--progress", "none"])
    assert r == 2 and "label value(s) [3] (marker) are neither mapped" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"1": {"from": [1]}, "2": {"from": [2]}, "3": {"name": "marker", "from": "new"}}))
    result = finetune(default_model(), data, tmp_path / "run", epochs=1, max_steps_per_epoch=2, device="cpu",
                      store=tmp_path / "store", label_map=json.loads(good.read_text()))
    card = json.loads((Path(result["package"]) / "model.json").read_text())
    assert [(m["value"], m["kind"]) for m in card["label_mapping"]] == [(1, "same"), (2, "same"), (3, "new")]
    assert card["network"]["out_channels"] == 4 and card["preset"]["labels"]["3"] == "marker"
    # an empty label in every case
    empty = user_dataset(hippocampus_dir, tmp_path / "empty", {**HIP, 3: "marker"}, lambda a: a)
    with pytest.raises(InputError, match="label\\(s\\) 3 marker are empty in every case"):
        finetune(default_model(), empty, tmp_path / "r1", epochs=1, device="cpu", store=tmp_path / "store")
    assert not (tmp_path / "r1").exists()


def test_scene_segments_with_the_users_own_labels(scene, hippocampus_dir: Path, tmp_path: Path) -> None:
    """Whole-hippocampus segments named and coded differently from the model's labels, plus a structure the model
    does not know: the bridge plans a merge and a new label (with the segment's own terminology) instead of refusing,
    and the fine-tune from that dataset registers a model with those labels."""
    from DSDSegmentationLib.bridge.logic import SegmentationBridge
    from DSDSegmentationLib.bridge.terminology import set_segment_terminology
    from DSDSegmentationLib.engine.cards import read_model_card
    from DSDSegmentationLib.engine.terminology import tag_string

    bridge = SegmentationBridge(scene, warm=False)
    preset = read_model_card(default_model())["preset"]
    amygdala = {"category": "SCT^123037004^Anatomical Structure", "type": "SCT^4958002^Amygdala"}
    pairs = []
    for c in CASES:
        volume = bridge.load_volume(hippocampus_dir / "imagesTr" / f"{c}.nii.gz")
        lab = np.rint(np.asarray(nib.load(hippocampus_dir / "labelsTr" / f"{c}.nii.gz").dataobj)).astype(np.uint8)
        lab = with_marker(whole(lab))
        path = tmp_path / f"{c}_mine.nii.gz"
        nib.save(nib.Nifti1Image(lab, nib.load(hippocampus_dir / "labelsTr" / f"{c}.nii.gz").affine), str(path))
        labelmap = bridge.load_volume(path, labelmap=True)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{c} mine")
        import slicer

        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
        segmentation = seg.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            if segment.GetName() == "1" or segment.GetName().endswith("_1") or i == 0:
                segment.SetName("Hippocampus")
            else:
                segment.SetName("Amygdala")
                set_segment_terminology(segment, tag_string(amygdala))
        pairs.append((volume, seg))
    plan = bridge.plan_finetune_labels(pairs, preset)
    assert plan["labels"] == {0: "background", 1: "Hippocampus", 2: "Amygdala"}
    assert plan["spec"]["1"] == {"name": "Hippocampus", "from": [1, 2]}
    assert plan["spec"]["2"]["from"] == "new" and plan["spec"]["2"]["terminology"]["type"] == "SCT^4958002^Amygdala"
    assert plan["lines"] == ["1 Hippocampus: merge of 1 anterior hippocampus + 2 posterior hippocampus",
                             "2 Amygdala: new label (fresh output channel)"]
    built = bridge.build_finetune_dataset(pairs, preset, tmp_path / "dataset")
    assert json.loads((tmp_path / "dataset" / "dataset.json").read_text())["labels"] == {
        "0": "background", "1": "Hippocampus", "2": "Amygdala"}
    result = finetune(default_model(), built["folder"], tmp_path / "run", epochs=1, max_steps_per_epoch=2, device="cpu",
                      store=tmp_path / "store", label_map=json.loads(Path(built["label_map"]).read_text()))
    card = json.loads((Path(result["package"]) / "model.json").read_text())
    assert card["preset"]["terminology"]["2"]["type"] == "SCT^4958002^Amygdala"
    assert [m["kind"] for m in card["label_mapping"]] == ["merge", "new"]
    # a segment in some cases only is refused, naming the case
    pairs[1][1].GetSegmentation().RemoveSegment(pairs[1][1].GetSegmentation().GetSegmentIdBySegmentName("Amygdala"))
    with pytest.raises(InputError, match="case_002 .*no segment 'Amygdala' \\(other cases have one\\)"):
        bridge.plan_finetune_labels(pairs, preset)
