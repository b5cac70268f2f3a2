"""Fine-tuning to the user's own labels: each user label is one of the base model's labels, a merge of several
(whole hippocampus = anterior ∪ posterior), or new. Base labels the user does not annotate are dropped.

The mapping comes from an explicit file (``--label-map``: ``{"1": {"name": "hippocampus", "from": [1, 2]},
"2": {"name": "amygdala", "from": "new"}}``, base label values or names in ``from``) or is derived from the user's
label names: an exact name (case-insensitive) is the same label; a name whose words all appear in several base
names merges those (``hippocampus`` ← ``anterior hippocampus`` + ``posterior hippocampus``); anything else is new.
The mapping is shown before training and written into the new model's card.

The backbone is transferred whole; the output layer (every parameter whose shape depends on the number of
classes, found by building the network with K and K+1 outputs) is rebuilt: a same label copies its base row, a
merge averages its base rows, a new label keeps the fresh initialisation. DSD heads are always fresh.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import InputError

DEFAULT_NEW_COLORS = [[230, 130, 40], [60, 200, 200], [200, 90, 200], [150, 220, 90]]


@dataclass
class MappedLabel:
    value: int  # the user's label value
    name: str
    sources: list[int]  # base label values (empty: a new label)
    by: str  # "same", "merge", "new" (and how it was decided: "explicit" or "name")

    @property
    def kind(self) -> str:
        return "new" if not self.sources else "same" if len(self.sources) == 1 else "merge"


def _words(name: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", name.lower()))


def derive_mapping(base_labels: dict[int, str], user_labels: dict[int, str],
                   explicit: dict[str, Any] | None = None) -> list[MappedLabel]:
    """User labels (value → name, background 0 included) mapped onto the base model's labels."""
    base = {int(k): str(v) for k, v in base_labels.items()}
    user = {int(k): str(v) for k, v in user_labels.items()}
    if 0 not in user:
        raise InputError("the label set must include 0 (background)")
    by_name = {n.lower(): v for v, n in base.items() if v}
    out = [MappedLabel(0, user[0], [0], "same")]
    if explicit is not None:
        unknown = sorted(set(str(k) for k in explicit) - {str(v) for v in user})
        if unknown:
            raise InputError(f"--label-map names label value(s) {unknown} that the dataset does not have ({sorted(user)})")
        missing = sorted(v for v in user if v and str(v) not in explicit)
        if missing:
            raise InputError(f"label value(s) {missing} ({', '.join(user[v] for v in missing)}) are neither mapped to "
                             "base labels nor marked new in --label-map; give each one \"from\": [base labels] or \"new\"")
    for value in sorted(v for v in user if v):
        name = user[value]
        if explicit is not None:
            spec = explicit[str(value)]
            src = spec.get("from") if isinstance(spec, dict) else spec
            name = spec.get("name", name) if isinstance(spec, dict) else name
            if src == "new" or src == []:
                out.append(MappedLabel(value, name, [], "explicit"))
                continue
            src = src if isinstance(src, list) else [src]
            sources = []
            for s in src:
                v = by_name.get(str(s).lower()) if not str(s).isdigit() else int(s)
                if v is None or v not in base or v == 0:
                    raise InputError(f"--label-map: label {value} ({name}) comes from {s!r}, which is not a base label "
                                     f"({', '.join(f'{k} {n}' for k, n in base.items() if k)})")
                sources.append(v)
            out.append(MappedLabel(value, name, sorted(set(sources)), "explicit"))
            continue
        if name.lower() in by_name:
            out.append(MappedLabel(value, name, [by_name[name.lower()]], "name"))
            continue
        words = _words(name)
        covering = sorted(v for v, n in base.items() if v and words and words <= _words(n))
        if len(covering) > 1:
            out.append(MappedLabel(value, name, covering, "name"))
        else:
            out.append(MappedLabel(value, name, [], "name"))
    used = [s for m in out[1:] for s in m.sources]
    dup = sorted({s for s in used if used.count(s) > 1})
    if dup:
        raise InputError(f"base label(s) {[base[d] for d in dup]} are mapped to more than one of your labels")
    return out


def is_identity(mapping: list[MappedLabel], base_labels: dict[int, str]) -> bool:
    return (len(mapping) == len(base_labels) and all(m.sources == [m.value] for m in mapping)
            and all(base_labels.get(m.value, base_labels.get(str(m.value))) is not None for m in mapping))


def describe(mapping: list[MappedLabel], base_labels: dict[int, str]) -> list[str]:
    base = {int(k): v for k, v in base_labels.items()}
    lines = []
    for m in mapping[1:]:
        if m.kind == "new":
            lines.append(f"{m.value} {m.name}: new label (fresh output channel)")
        elif m.kind == "same":
            lines.append(f"{m.value} {m.name}: base label {m.sources[0]} {base[m.sources[0]]}")
        else:
            lines.append(f"{m.value} {m.name}: merge of " + " + ".join(f"{s} {base[s]}" for s in m.sources))
    dropped = sorted(set(base) - {0} - {s for m in mapping for s in m.sources})
    if dropped:
        lines.append("dropped (not annotated): " + ", ".join(f"{d} {base[d]}" for d in dropped))
    return lines


def mapped_preset(base_preset: dict[str, Any], mapping: list[MappedLabel],
                  terminology: dict[int, dict[str, str]] | None = None) -> dict[str, Any]:
    """The new model's preset: the user's labels, colours and terminology (a same label keeps the base entry; a
    merge keeps what its sources share — e.g. hippocampus without the anterior/posterior modifier; a new label
    gets ``terminology[value]`` if given, else a plain name)."""
    labels = {int(k): v for k, v in base_preset["labels"].items()}
    colors = {int(k): v for k, v in (base_preset.get("label_colors") or {}).items()}
    terms = {int(k): v for k, v in (base_preset.get("terminology") or {}).items()}
    new_labels, new_colors, new_terms = {}, {}, {}
    n_new = 0
    for m in mapping:
        new_labels[str(m.value)] = m.name
        if m.value == 0:
            continue
        if m.sources:
            new_colors[str(m.value)] = colors.get(m.sources[0], DEFAULT_NEW_COLORS[0])
            entries = [terms[s] for s in m.sources if s in terms]
            if len(entries) == len(m.sources) and entries:
                shared = {k: v for k, v in entries[0].items() if all(e.get(k) == v for e in entries)}
                if "category" in shared and "type" in shared:
                    new_terms[str(m.value)] = shared
        else:
            new_colors[str(m.value)] = DEFAULT_NEW_COLORS[n_new % len(DEFAULT_NEW_COLORS)]
            n_new += 1
            if terminology and terminology.get(m.value):
                new_terms[str(m.value)] = terminology[m.value]
    del labels
    regions = {k: v for k, v in (base_preset.get("regions") or {}).items()
               if all(any(s == x for m in mapping for s in m.sources) for x in v)}
    out = {**base_preset, "labels": new_labels, "label_colors": new_colors, "terminology": new_terms,
           "regions": {}}
    if regions and all(m.kind == "same" and m.sources == [m.value] for m in mapping):
        out["regions"] = regions
    return out


def transfer_output_layer(base_state: dict[str, Any], fresh_state: dict[str, Any], class_dims: dict[str, list[int]],
                          mapping: list[MappedLabel], base_values: list[int]) -> dict[str, Any]:
    """The fine-tune network's state: base weights everywhere, output-layer tensors rebuilt class by class.

    ``class_dims``: parameter name → the dimensions whose size is the number of classes. ``base_values``: the base
    label values in class order (class index i = label value base_values[i])."""
    import torch

    index_of = {v: i for i, v in enumerate(base_values)}
    out = {}
    for key, fresh in fresh_state.items():
        if key not in class_dims:
            out[key] = base_state[key]
            continue
        t = base_state[key]
        for dim in class_dims[key]:
            rows = []
            for j, m in enumerate(mapping):
                if m.sources:
                    picked = torch.stack([t.select(dim, index_of[s]) for s in m.sources]).float().mean(0)
                    rows.append(picked.to(t.dtype))
                else:
                    rows.append(None)
            shape = list(t.shape)
            shape[dim] = len(mapping)
            new = torch.empty(shape, dtype=t.dtype)
            for j, row in enumerate(rows):
                if row is None:  # a new class: the fresh network's initialisation, where the shapes allow
                    src = fresh.select(dim, j) if fresh.shape[dim] == len(mapping) and fresh.dim() == t.dim() else None
                    row = src if src is not None and tuple(src.shape) == tuple(new.select(dim, j).shape) else \
                        torch.zeros_like(new.select(dim, j))
                new.select(dim, j).copy_(row)
            t = new
        out[key] = t
    return out
