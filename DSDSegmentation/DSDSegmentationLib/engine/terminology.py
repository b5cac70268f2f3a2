"""Segment terminology (SNOMED CT / DICOM codes) for model labels, without Slicer.

A label's terminology is a dict of coded entries written ``SCHEME^value^meaning``:
``category`` and ``type`` (required), ``type_modifier``, ``region`` and ``region_modifier`` (optional).
From these come (a) the segment tag string Slicer stores on each segment and (b) the project's custom
terminology context (``Resources/Terminology/DSDSegmentation.term.json``, dcmqi segment-context schema), which
the module loads at startup so Slicer's terminology selector knows every type our models produce, with colours.

Codes are those of DICOM PS3.16: categories CID 7150, brain structures CID 7153 (hippocampus SCT 5366008),
anatomic modifiers CID 2 (anterior SCT 255549009, posterior SCT 255551008), cardiac structures CID 7152
(left ventricle SCT 87878005, right ventricle SCT 53085002), myocardium SCT 74281007, brain lesion types
CID 7168/7169 (necrosis SCT 6574001, edema SCT 79654002, non-enhancing lesion NCIt C81175, enhancing lesion
NCIt C113842).
"""

from __future__ import annotations

from typing import Any, Iterable

from .errors import ConfigError

CONTEXT_NAME = "DSDSegmentation - segment types"
REGION_CONTEXT_NAME = "Anatomic codes - DICOM master list"
CONTEXT_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#"
FIELDS = ("category", "type", "type_modifier", "region", "region_modifier")
REQUIRED = ("category", "type")


def parse_code(text: str, what: str = "code") -> tuple[str, str, str]:
    """``'SCT^5366008^Hippocampus'`` → ``('SCT', '5366008', 'Hippocampus')``; empty string → three empties."""
    if not text:
        return ("", "", "")
    parts = str(text).split("^")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2] or "~" in text or "|" in text:
        raise ConfigError(f"{what}: '{text}' is not a coded entry 'SCHEME^value^meaning' (e.g. 'SCT^5366008^Hippocampus')")
    return parts[0], parts[1], parts[2]


def validate_entry(entry: dict[str, Any], what: str) -> dict[str, str]:
    """Check one label's terminology dict; returns it with every field present (missing optional ones empty)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{what}: terminology must be an object with {', '.join(FIELDS)}")
    unknown = set(entry) - set(FIELDS)
    if unknown:
        raise ConfigError(f"{what}: unknown terminology field(s) {sorted(unknown)}; known: {', '.join(FIELDS)}")
    for key in REQUIRED:
        if not entry.get(key):
            raise ConfigError(f"{what}: terminology needs '{key}'")
    out = {key: str(entry.get(key) or "") for key in FIELDS}
    for key, value in out.items():
        parse_code(value, f"{what} {key}")
    if out["region_modifier"] and not out["region"]:
        raise ConfigError(f"{what}: a region_modifier needs a region")
    return out


def _code_str(text: str) -> str:
    return "^".join(parse_code(text))


def tag_string(entry: dict[str, str], context: str = CONTEXT_NAME) -> str:
    """The segment terminology tag as Slicer serialises it (``vtkSlicerTerminologiesModuleLogic``):
    ``context~category~type~typeModifier~regionContext~region~regionModifier``."""
    e = validate_entry(entry, "terminology")
    return "~".join([context, _code_str(e["category"]), _code_str(e["type"]), _code_str(e["type_modifier"]),
                     REGION_CONTEXT_NAME, _code_str(e["region"]), _code_str(e["region_modifier"])])


def _coded(text: str) -> dict[str, str]:
    scheme, value, meaning = parse_code(text)
    return {"CodingSchemeDesignator": scheme, "CodeValue": value, "CodeMeaning": meaning}


def build_context(presets: Iterable[Any]) -> dict[str, Any]:
    """A custom terminology context holding every (category, type, modifier) the given presets use, with each
    label's colour as the recommended display colour. Deterministic (sorted) so the shipped file can be
    checked against the presets in a test."""
    categories: dict[str, dict[str, Any]] = {}
    for preset in presets:
        for value, entry in sorted(preset.terminology.items()):
            rgb = list(preset.label_colors.get(value, [128, 128, 128]))
            label = preset.labels[value]
            cat = categories.setdefault(entry["category"], {**_coded(entry["category"]), "showAnatomy": False,
                                                            "Type": {}})
            if entry["region"]:
                cat["showAnatomy"] = True
            typ = cat["Type"].setdefault(entry["type"], {**_coded(entry["type"]), "Modifier": {}})
            if entry["type_modifier"]:
                typ["Modifier"].setdefault(entry["type_modifier"], {**_coded(entry["type_modifier"]),
                                                                    "3dSlicerLabel": label,
                                                                    "recommendedDisplayRGBValue": rgb})
            else:
                typ.setdefault("3dSlicerLabel", label)
                typ.setdefault("recommendedDisplayRGBValue", rgb)
    out_categories = []
    for _, cat in sorted(categories.items()):
        types = []
        for _, typ in sorted(cat["Type"].items()):
            mods = [m for _, m in sorted(typ.pop("Modifier").items())]
            if mods:
                typ["Modifier"] = mods
            types.append(typ)
        cat["Type"] = types
        out_categories.append(cat)
    return {"SegmentationCategoryTypeContextName": CONTEXT_NAME, "@schema": CONTEXT_SCHEMA,
            "SegmentationCodes": {"Category": out_categories}}
