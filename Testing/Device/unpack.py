#!/usr/bin/env python
"""Turn what a GPU session brought back into run folders that ``package_model.py --run`` takes.

Usage:  .venv/bin/python Testing/Device/unpack.py FILES_AT --to ~/dsdseg-runs/gpu-<task>

For each ``<arm>_run.json`` in FILES_AT (written by ``gpu_session.py``) this makes ``<to>/<arm>_seed<seed>/`` with
config.json, history.json, split.json, log.txt and best.pt (its ``<arm>_best.pt.NN`` parts joined in order). The
run's data paths, which pointed at the session's quantised copy under ``.device/data/<dataset>``, are pointed at the
same files in ``../shared/data/<dataset>``, so validation here runs on the original images. Refuses to overwrite a
folder that exists, and names a missing or unreadable part. Then puts back the shipped models that ``pack.py``
held back for the session (``pack.py --restore`` does only that).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DSDSegmentation"))

from DSDSegmentationLib.engine.data import find_shared_data  # noqa: E402


def remap(value, old: str, new: str):
    """Every string under ``value`` that starts with ``old`` gets ``new`` instead."""
    if isinstance(value, str):
        return new + value[len(old):] if value.startswith(old) else value
    if isinstance(value, list):
        return [remap(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: remap(v, old, new) for k, v in value.items()}
    return value


def unpack(files_at: Path, to: Path, shared: Path | None = None) -> list[Path]:
    runs = sorted(files_at.glob("*_run.json"))
    if not runs:
        raise SystemExit(f"{files_at} holds no <arm>_run.json: is it the folder the GPU session's files came back to?")
    made = []
    for record_file in runs:
        arm = record_file.name[: -len("_run.json")]
        record = json.loads(record_file.read_text())
        config = record["config.json"]
        device_data = config["data"].rstrip("/")
        local_data = str((shared or find_shared_data()) / Path(device_data).name)
        if not Path(local_data).is_dir():
            raise SystemExit(f"{arm}: the run's dataset {Path(device_data).name} is not in {local_data}")
        parts = sorted(files_at.glob(f"{arm}_best.pt.*"))
        numbers = [int(p.suffix[1:]) for p in parts]
        if not parts or numbers != list(range(len(parts))):
            raise SystemExit(f"{arm}: checkpoint parts {[p.name for p in parts]} are missing or not 00, 01, ... in order")
        dest = to / f"{arm}_seed{config.get('seed', 0)}"
        if dest.exists():
            raise SystemExit(f"{dest} exists; choose another --to (nothing was overwritten)")
        dest.mkdir(parents=True)
        config = remap({**config, "output": str(dest)}, device_data, local_data)
        session = files_at / "session.json"  # runs from before the config recorded its hardware: the session's card
        if session.is_file() and not config.get("resolved", {}).get("hardware"):
            device = json.loads(session.read_text()).get("device")
            if device:
                config.setdefault("resolved", {})["hardware"] = f"{device} (from the GPU session's session.json)"
        (dest / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("history.json", "split.json"):
            if name in record:
                (dest / name).write_text(json.dumps(remap(record[name], device_data, local_data), indent=1))
        (dest / "log.txt").write_text(record.get("log.txt", ""))
        with open(dest / "best.pt", "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        made.append(dest)
        print(f"{arm}: {dest} ({sum(p.stat().st_size for p in parts)} bytes of checkpoint, data -> {local_data})")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files_at", type=Path)
    ap.add_argument("--to", type=Path, required=True)
    args = ap.parse_args()
    unpack(args.files_at, args.to.expanduser())
    from pack import restore_models  # the models pack.py held back for the session come back now

    back = restore_models()
    if back:
        print("models put back:", ", ".join(back))


if __name__ == "__main__":
    main()
