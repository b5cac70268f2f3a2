"""Ensemble packages: several trainings of one network and preprocessing whose class probabilities are averaged.

Built here from the shipped hippocampus model and a copy of it with perturbed weights (a real network, real cases);
checked: the averaging itself, the package round trip (card, checksums, schema), refusals of tampered or mismatched
members, and fine-tuning from an ensemble (it starts from the first member)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tampered_copy

from DSDSegmentationLib.engine import DSDConfig, DSDNet
from DSDSegmentationLib.engine.cards import builtin_models_dir, read_model_card, verify_package
from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.engine.errors import InputError
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.models import EnsembleNet, export_package, load_model

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is part of the test install (.ci/setup)")

HIPPO = builtin_models_dir() / "hippocampus-dsd"


def _perturbed_checkpoint(path: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """A training checkpoint (as ``dsdseg train`` writes it) of the shipped hippocampus network, weights perturbed."""
    base = load_model(HIPPO)
    net = DSDNet(base.net_config, DSDConfig.preset("plain"))
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + scale * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() > 1
             else v for k, v in base.network.state_dict().items()}
    net.backbone.load_state_dict(state)
    torch.save({"model": net.state_dict(), "network": base.card["network"], "dsd": DSDConfig.preset("plain").to_dict(),
                "preset": base.card["preset"], "epoch": 7, "best": 0.5}, path)
    return path


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ensemble")
    member = _perturbed_checkpoint(tmp / "perturbed.pt")
    return export_package(HIPPO, tmp / "pkg", members=[member])


def test_the_ensemble_averages_its_members_probabilities() -> None:
    torch.manual_seed(0)
    a, b = (DSDNet(load_model(HIPPO).net_config, DSDConfig.preset("plain")).backbone.eval() for _ in range(2))
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad():
        expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        got = torch.softmax(EnsembleNet([a, b])(x), 1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_an_ensemble_package_round_trip(ensemble: Path, tmp_path: Path) -> None:
    card = verify_package(ensemble)
    jsonschema.validate(card, json.loads((builtin_models_dir() / "model-card.schema.json").read_text()))
    assert [m["weights"] for m in card["ensemble"]] == ["weights.pt", "weights-2.pt"]
    assert card["ensemble"][0]["source"] == "hippocampus-dsd" and card["ensemble"][1]["epoch"] == 7
    assert card["ensemble"][1]["dsd"]["deep_supervision"] is False
    sums = (ensemble / "SHA256SUMS").read_text()
    assert "weights-2.pt" in sums and card["ensemble"][1]["sha256"] in sums
    loaded = load_model(ensemble)
    assert isinstance(loaded.network, EnsembleNet) and len(loaded.backbones) == 2
    single = load_model(HIPPO).network.state_dict()
    for k, v in single.items():  # member 1 is the shipped network, unchanged
        torch.testing.assert_close(loaded.backbones[0].state_dict()[k], v)
    assert any(not torch.equal(loaded.backbones[1].state_dict()[k], v) for k, v in single.items())
    # re-exported (e.g. new preprocessing, float16) it stays an ensemble of the same members
    again = export_package(ensemble, tmp_path / "again", weights_dtype="float16")
    assert [m.get("epoch") for m in read_model_card(again)["ensemble"]] == [m.get("epoch") for m in card["ensemble"]]
    assert len(load_model(again).backbones) == 2


def test_new_members_drop_what_the_source_card_measured(tmp_path: Path) -> None:
    """An ensemble made from a package (``dsdseg export --ensemble-with``) is another model: the source's agreement
    with reference volumes (which the panel quotes beside every EF) must not travel to it, and its validation Dice says
    it was the source's. A re-export of the same weights (float16) keeps both."""
    from DSDSegmentationLib.engine.cards import model_summary, write_checksums

    source = tmp_path / "source"
    shutil.copytree(HIPPO, source)
    card = json.loads((source / "model.json").read_text())
    card["validation"]["clinical_indices"] = {"left ventricle ejection fraction": {"bias": -0.5, "sd": 5.0, "r": 0.97,
                                                                                  "patients": 10}}
    (source / "model.json").write_text(json.dumps(card))
    write_checksums(source, ["model.json", "weights.pt"])
    same = read_model_card(export_package(source, tmp_path / "same", weights_dtype="float16"))
    assert same["validation"] == card["validation"]
    member = _perturbed_checkpoint(tmp_path / "perturbed.pt")
    new = read_model_card(export_package(source, tmp_path / "new", members=[member]))
    assert "clinical_indices" not in new["validation"]
    assert new["validation"]["per_class"] == card["validation"]["per_class"]
    assert new["validation"]["note"] == (f"measured for hippocampus-dsd {card['version']} alone, not for this "
                                         "ensemble: re-measure it (package_model.py)")
    _, tip = model_summary({"title": "t", "card": new, "id": "x"})
    assert "not for this ensemble" in tip
    jsonschema.validate(new, json.loads((builtin_models_dir() / "model-card.schema.json").read_text()))


def test_an_ensemble_segments_a_real_case(ensemble: Path, tmp_path: Path) -> None:
    """An ensemble of a network with itself gives exactly that network's labels (the loading and averaging path
    changes nothing else); with a perturbed second member the labels stay close to the shipped model's."""
    case = list_cases(find_shared_data() / "Task04_Hippocampus")[0]
    single, _ = Predictor(HIPPO, device="cpu").predict(case.images)
    same = export_package(HIPPO, tmp_path / "same", members=[HIPPO])
    itself, _ = Predictor(same, device="cpu").predict(case.images)
    np.testing.assert_array_equal(itself, single)
    mixed, _ = Predictor(ensemble, device="cpu").predict(case.images)
    fg = (single > 0) | (mixed > 0)
    assert fg.sum() > 100 and (mixed[fg] == single[fg]).mean() > 0.8


def test_tampered_or_unlisted_members_are_refused(ensemble: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="weights-2.pt does not match its sha256"):
        load_model(tampered_copy(ensemble, tmp_path / "tampered", "weights-2.pt"))
    unlisted = tmp_path / "unlisted"
    shutil.copytree(ensemble, unlisted)
    sums = unlisted / "SHA256SUMS"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "weights-2.pt" not in line))
    with pytest.raises(InputError, match="does not list the ensemble member weights-2.pt"):
        load_model(unlisted)


def test_members_must_share_network_inputs_and_labels(tmp_path: Path, capsys) -> None:
    """Through the CLI (`dsdseg export --ensemble-with`): a member of another network is refused by name and
    nothing is written; members that fit make an ensemble package."""
    from DSDSegmentationLib.worker.cli import main as cli

    cardiac = builtin_models_dir() / "cardiac-dsd"
    assert cli(["export", "--model", str(HIPPO), "--output", str(tmp_path / "mixed"), "--ensemble-with", str(cardiac)]) == 2
    assert f"ensemble member {cardiac} has another network" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()
    member = _perturbed_checkpoint(tmp_path / "other.pt", seed=1)
    assert cli(["export", "--model", str(HIPPO), "--output", str(tmp_path / "ok"), "--ensemble-with", str(member)]) == 0
    assert len(load_model(tmp_path / "ok").backbones) == 2


def test_members_of_another_width(tmp_path: Path) -> None:
    """Members of one backbone family may differ in width (the backbone's options, e.g. DynUNet filters: the shipped
    cardiac 2.1.0 was 8-128, 3.0.0 16-256): the member records its own network, loads into it, and the package's
    output is the average of the two networks' probabilities. Another patch size or preprocessing is refused."""
    base = load_model(HIPPO)
    wide_cfg = base.net_config.to_dict() | {"options": {**base.net_config.options, "features": [48, 48, 96, 192, 384, 48]}}
    wide = DSDNet(type(base.net_config).from_dict(wide_cfg), DSDConfig.preset("plain"))
    torch.save({"model": wide.state_dict(), "network": wide_cfg, "dsd": DSDConfig.preset("plain").to_dict(),
                "preset": base.card["preset"], "epoch": 3, "best": 0.4}, tmp_path / "wide.pt")
    pkg = export_package(HIPPO, tmp_path / "pkg", members=[tmp_path / "wide.pt"])
    card = verify_package(pkg)
    jsonschema.validate(card, json.loads((builtin_models_dir() / "model-card.schema.json").read_text()))
    assert "network" not in card["ensemble"][0] and card["ensemble"][1]["network"]["options"]["features"][0] == 48
    loaded = load_model(pkg)
    narrow, wide_net = loaded.backbones
    assert sum(p.numel() for p in wide_net.parameters()) > 1.5 * sum(p.numel() for p in narrow.parameters())
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad():
        expected = (torch.softmax(load_model(HIPPO).network(x), 1) + torch.softmax(wide.backbone.eval()(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(loaded.network(x), 1), expected, atol=1e-5, rtol=1e-4)
    # re-exported (float16), the widths stay with their members
    again = load_model(export_package(pkg, tmp_path / "again", weights_dtype="float16"))
    assert [sum(p.numel() for p in n.parameters()) for n in again.backbones] == \
        [sum(p.numel() for p in n.parameters()) for n in loaded.backbones]
    # another patch (sliding window) or another preprocessing: refused, nothing written
    for key, value, what in (("patch_size", [32, 32, 32], "another network"), ("spacing", [1.5, 1.5, 1.5], "preprocessing")):
        net = wide_cfg | ({key: value} if key == "patch_size" else {})
        preset = base.card["preset"] | ({key: value} if key == "spacing" else {})
        torch.save({"model": DSDNet(type(base.net_config).from_dict(net), DSDConfig.preset("plain")).state_dict(),
                    "network": net, "dsd": DSDConfig.preset("plain").to_dict(), "preset": preset, "epoch": 1,
                    "best": 0.1}, tmp_path / f"{key}.pt")
        with pytest.raises(InputError, match=what):
            export_package(HIPPO, tmp_path / f"bad-{key}", members=[tmp_path / f"{key}.pt"])
        assert not (tmp_path / f"bad-{key}").exists()
    # a card whose member claims another family is refused when loaded
    bad = tmp_path / "edited"
    shutil.copytree(pkg, bad)
    edited = json.loads((bad / "model.json").read_text())
    edited["ensemble"][1]["network"]["out_channels"] = 5
    (bad / "model.json").write_text(json.dumps(edited))
    from DSDSegmentationLib.engine.cards import PACKAGE_SUMS, write_checksums

    write_checksums(bad, [line.split()[1] for line in (bad / PACKAGE_SUMS).read_text().splitlines() if line])
    with pytest.raises(InputError, match="ensemble member weights-2.pt is not a basicunet"):
        load_model(bad)


def test_fine_tuning_an_ensemble_starts_from_its_first_member(ensemble: Path, hippocampus_dir: Path,
                                                              tmp_path: Path) -> None:
    """The fine-tuned model is one network (the base's first member, trained on), and its log says so."""
    from DSDSegmentationLib.engine.finetune import finetune

    data = tmp_path / "cases"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    ds = json.loads((hippocampus_dir / "dataset.json").read_text())
    listed = []
    for case in ("hippocampus_052", "hippocampus_057"):
        for sub in ("imagesTr", "labelsTr"):
            shutil.copy(hippocampus_dir / sub / f"{case}.nii.gz", data / sub)
        listed.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({**ds, "training": listed, "numTraining": len(listed)}))
    result = finetune(ensemble, data, tmp_path / "run", epochs=1, max_steps_per_epoch=1, lr=1e-12,
                      store=tmp_path / "store", device="cpu")
    assert "ensemble of 2 networks: starting from its first member" in (tmp_path / "run" / "log.txt").read_text()
    tuned = load_model(result["package"])
    assert not read_model_card(result["package"]).get("ensemble") and len(tuned.backbones) == 1
    # every layer but the output one (which the label mapping of the user's dataset may rebuild) is member 1's
    first, second = (m.state_dict() for m in load_model(ensemble).backbones)
    mine = tuned.network.state_dict()
    keys = [k for k, v in first.items() if v.is_floating_point() and "running" not in k and "final_conv" not in k]
    assert len(keys) > 20 and all(torch.allclose(mine[k], first[k], atol=1e-5) for k in keys)
    assert not all(torch.allclose(mine[k], second[k], atol=1e-5) for k in keys)
