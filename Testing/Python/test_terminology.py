"""Coded terminology of the presets' labels and the shipped custom terminology context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from DSDSegmentationLib.engine.errors import ConfigError
from DSDSegmentationLib.engine.tasks import TaskPreset, builtin_presets, load_preset
from DSDSegmentationLib.engine.terminology import CONTEXT_NAME, build_context, tag_string

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "Resources" / "Terminology" / "DSDSegmentation.term.json"


def test_every_builtin_label_is_coded() -> None:
    for name in builtin_presets():
        p = load_preset(name)
        assert set(p.terminology) == set(p.labels) - {0}, f"{name}: every foreground label needs terminology"


def test_known_codes() -> None:
    hip = load_preset("hippocampus").terminology
    assert hip[1]["type"] == "SCT^5366008^Hippocampus" and hip[1]["type_modifier"] == "SCT^255549009^Anterior"
    assert hip[2]["type_modifier"] == "SCT^255551008^Posterior"
    tumour = load_preset("brain_tumour").terminology
    assert tumour[4]["type"].startswith("NCIt^C113842^") and tumour[2]["type"].startswith("SCT^79654002^")
    assert load_preset("cardiac").terminology[2]["region"].startswith("SCT^87878005^")


def test_tag_string_is_slicers_serialisation() -> None:
    tag = tag_string(load_preset("hippocampus").terminology[1])
    assert tag == (f"{CONTEXT_NAME}~SCT^123037004^Anatomical Structure~SCT^5366008^Hippocampus~SCT^255549009^Anterior"
                   "~Anatomic codes - DICOM master list~^^~^^")


def test_shipped_context_matches_presets() -> None:
    """Regenerate with: dsdseg terminology --output Resources/Terminology/DSDSegmentation.term.json --overwrite"""
    shipped = json.loads(SHIPPED.read_text(encoding="utf-8"))
    assert shipped == build_context(load_preset(n) for n in builtin_presets())
    types = [t for c in shipped["SegmentationCodes"]["Category"] for t in c["Type"]]
    hippocampus = next(t for t in types if t["CodeValue"] == "5366008")
    assert [m["CodeMeaning"] for m in hippocampus["Modifier"]] == ["Anterior", "Posterior"]
    assert hippocampus["Modifier"][0]["recommendedDisplayRGBValue"] == load_preset("hippocampus").label_colors[1]


BASE = {"name": "x", "channels": ["MR"], "labels": {"0": "bg", "1": "a"}, "normalization": [{"kind": "zscore"}],
        "patch_size": [32, 32, 32]}


@pytest.mark.parametrize("terminology, message", [
    ({"1": {"category": "SCT^123037004^Anatomical Structure"}}, "needs 'type'"),
    ({"1": {"category": "SCT^1^A", "type": "SCT-5366008-Hippocampus"}}, "not a coded entry"),
    ({"1": {"category": "SCT^1^A", "type": "SCT^^Hippocampus"}}, "not a coded entry"),
    ({"1": {"category": "SCT^1^A", "type": "SCT^2^B", "colour": "red"}}, "unknown terminology field"),
    ({"1": {"category": "SCT^1^A", "type": "SCT^2^B", "region_modifier": "SCT^7771000^Left"}}, "needs a region"),
    ({"2": {"category": "SCT^1^A", "type": "SCT^2^B"}}, "not foreground labels"),
    ({"0": {"category": "SCT^1^A", "type": "SCT^2^B"}}, "not foreground labels"),
])
def test_bad_terminology_is_named(terminology: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TaskPreset.from_dict({**BASE, "terminology": terminology})
