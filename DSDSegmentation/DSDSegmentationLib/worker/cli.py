"""``dsdseg``: the one entry point used from a shell and by the Slicer module's background worker.

Exit codes: 0 success, 2 bad input or configuration (message names the problem), 3 out of memory, 1 crash,
130 interrupted. With ``--progress json`` every progress update and the final error are JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..engine.errors import DSDError, InputError

DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps (an Apple-silicon Mac's GPU)"

EXIT_OK, EXIT_CRASH, EXIT_BAD_INPUT, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _progress(args: argparse.Namespace):
    from ..engine.progress import Progress

    return Progress(getattr(args, "progress", "bar"))


def _cmd_backbones(args: argparse.Namespace) -> int:
    from ..engine.networks import BACKBONES

    for name, cls in BACKBONES.items():
        spec = cls(1, 3, (64, 64, 64), {})
        print(f"{name}: {cls.description}  (patch multiple of {spec.divisor()}, shared heads by default: {cls.default_share_heads})")
        print(f"  {'head':5s} {'role':4s} {'module':22s} {'ch':>5s} {'down':>9s}")
        for row in spec.tap_table():
            mark = "  <- teacher" if row["teacher"] else ""
            print(f"  {row['head']:5s} {row['role']:4s} {row['module']:22s} {row['channels']:5d} {row['scale']:>9s}{mark}")
    return EXIT_OK


def _cmd_presets(args: argparse.Namespace) -> int:
    from ..engine.tasks import builtin_presets, load_preset

    for name in builtin_presets():
        p = load_preset(name)
        print(f"{name}: {p.title}\n  inputs {p.channels}, labels {p.labels}, patch {p.patch_size}, backbone {p.network['backbone']}")
    return EXIT_OK


def _cmd_terminology(args: argparse.Namespace) -> int:
    from ..engine.tasks import builtin_presets, load_preset
    from ..engine.terminology import build_context

    text = json.dumps(build_context(load_preset(n) for n in (args.preset or builtin_presets())), indent=2) + "\n"
    if args.output:
        from ..engine.outputs import atomic_write_text, check_output_file

        out = check_output_file(args.output, overwrite=args.overwrite, suffixes=(".json",), what="--output")
        atomic_write_text(out, text)
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_smoke(args: argparse.Namespace) -> int:
    from ..engine.smoke import run_smoke

    result = run_smoke(args.data, backbone=args.backbone, steps=args.steps, cases=args.cases, seed=args.seed)
    ok = result["dsd"]["loss_last5"] < result["dsd"]["loss_first5"] and result["export_identical"]
    if args.json:
        print(json.dumps(result, indent=2))
    print("smoke run:", "OK" if ok else "FAILED (loss did not decrease or export differs)")
    return EXIT_OK if ok else EXIT_CRASH


def _cmd_train(args: argparse.Namespace) -> int:
    from ..engine.training import TrainConfig, Trainer

    overrides = {k: v for k, v in {"temperature": args.temperature, "kl_weight": args.kl_weight,
                                   "detach_teacher": args.detach_teacher or None, "upsample": args.upsample}.items() if v is not None}
    cfg = TrainConfig(task=args.task, data=args.data, output=args.output, dsd=args.dsd, dsd_overrides=overrides,
                      backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size, samples_per_volume=args.samples,
                      lr=args.lr, val_every=args.val_every, val_fraction=args.val_fraction, max_cases=args.max_cases,
                      max_steps_per_epoch=args.max_steps, seed=args.seed, device=args.device, amp=not args.no_amp,
                      precision=args.precision,
                      num_workers=args.workers, init_from=args.init_from)
    result = Trainer(cfg, _progress(args), resume=args.resume).fit()
    if args.progress == "json":
        _report(args, {"stage": "done", **result})
    elif result.get("rank", 0) == 0:
        print(f"best validation Dice {result['best_val_dice']:.4f}; run folder {result['output']}")
    return EXIT_OK


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..engine.finetune import finetune

    if not args.resume and not (args.base and args.data):
        raise InputError("--base and --data are required (or --resume with the same --output)")
    base, data = args.base, args.data
    if args.resume:
        saved = json.loads((Path(args.output) / "config.json").read_text()) if (Path(args.output) / "config.json").is_file() else {}
        base, data = base or saved.get("init_from"), data or saved.get("data")
        if not base:
            raise InputError(f"--resume: {args.output} is not a fine-tuning run folder")
    label_map = None
    if args.label_map:
        from ..engine.errors import read_json

        label_map = read_json(args.label_map, InputError, f"--label-map {args.label_map}")
        if not isinstance(label_map, dict):
            raise InputError(f"--label-map {args.label_map}: expected an object of label value → mapping")
    result = finetune(base, data, args.output, epochs=args.epochs, lr=args.lr, dsd=args.dsd, label_map=label_map,
                      freeze_encoder=args.freeze_encoder, patience=args.patience, val_fraction=args.val_fraction,
                      seed=args.seed, device=args.device, store=args.store, name=args.name, resume=args.resume,
                      max_steps_per_epoch=args.max_steps, progress=_progress(args), val_every=args.val_every,
                      precision=args.precision)
    if args.progress == "json":
        _report(args, {"stage": "done", **result})
    else:
        b, a = result["before"]["mean_dice"], result["after"]["mean_dice"]
        if result.get("already_registered"):
            print(f"this run already finished: model {result['model_id']} ({result['package']}); nothing new registered")
            return EXIT_OK
        print(f"new model {result['model_id']} ({result['package']}): held-out Dice {b:.4f} -> {a:.4f}")
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    from ..engine.cards import builtin_models_dir, list_models, model_summary, user_models_dir
    from ..engine.finetune import check_store_model, export_zip, import_zip

    store = Path(args.store) if args.store else user_models_dir()
    if args.action == "list":
        for m in list_models([builtin_models_dir(), store]):
            status = m["status"] if m["status"] == "ok" else "unavailable"
            print(f"{m['id']:32s} {m['source']:8s} {status:11s}  {model_summary(m)[0]}")
    elif args.action == "show":
        models = {m["id"]: m for m in list_models([builtin_models_dir(), store])}
        if args.id not in models:
            raise InputError(f"no model '{args.id}'; `dsdseg models list` shows them: {', '.join(sorted(models))}")
        text, description = model_summary(models[args.id])
        print(text + "\n" + description + f"\nFolder: {models[args.id]['path']}")
    elif args.action == "export":
        if not args.id or not args.file:
            raise InputError("models export needs ID and FILE (.zip)")
        path = builtin_models_dir() / args.id if (builtin_models_dir() / args.id).is_dir() else check_store_model(args.id, store)
        print(f"wrote {export_zip(path, args.file)}")
    elif args.action == "import":
        if not args.id:
            raise InputError("models import needs the zip FILE")
        print(f"imported {import_zip(args.id, store)}")
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from ..engine.data import list_cases
    from ..engine.inference import Predictor, check_predict_options, predict_cases
    from ..engine.outputs import check_output_file, check_output_folder

    if bool(args.input) == bool(args.batch):
        raise InputError("give either --input (one case; repeat it per channel) or --batch (a dataset folder or list)")
    check_predict_options(args.device, args.overlap, args.sw_batch_size)
    if args.frames or args.volumes:
        return _predict_frames(args)
    # every output is checked before the model is loaded: nothing the user had is overwritten, and a bad output
    # path fails now, not after minutes of inference
    if args.input:
        if not args.output:
            raise InputError("--output is required with --input (a .nii.gz or .nrrd file)")
        for p in args.input:
            if not Path(p).is_file():
                raise InputError(f"input {p} does not exist")
        check_output_file(args.output, args.input, [args.uncertainty], overwrite=args.overwrite, what="--output")
        if args.uncertainty:
            check_output_file(args.uncertainty, args.input, [args.output], overwrite=args.overwrite, what="--uncertainty")
    else:
        if args.uncertainty:
            raise InputError("--uncertainty works with --input (one case), not with --batch")
        if not args.output_dir:
            raise InputError("--output-dir is required with --batch")
        cases = [(c.id, c.images) for c in list_cases(args.batch)]
        inputs = [p for c in list_cases(args.batch) for p in [*c.images, *([c.label] if c.label else [])]]
        out_dir = check_output_folder(args.output_dir, inputs, allow_input_folder=args.allow_input_folder)
        outputs = [out_dir / f"{cid}{args.format}" for cid, _ in cases]
        for o in outputs:
            check_output_file(o, inputs, [x for x in outputs if x is not o], overwrite=args.overwrite, what="output")
    predictor = Predictor(args.model, device=args.device, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                          tta=args.tta, progress=_progress(args))
    if args.input:
        out = predictor.predict_to_file(args.input, args.output, uncertainty_output=args.uncertainty)
        _report(args, {"stage": "done", "output": str(out), "uncertainty": args.uncertainty, "notes": predictor.notes})
        return EXIT_OK
    written = predict_cases(predictor, cases, out_dir, ext=args.format)
    _report(args, {"stage": "done", "outputs": [str(p) for p in written], "notes": predictor.notes})
    return EXIT_OK


def _predict_frames(args: argparse.Namespace) -> int:
    """``predict --frames``: every frame of one 4D series (a cine) into a 4D labelmap, volumes per frame as CSV."""
    from ..engine.cine import predict_frames
    from ..engine.inference import Predictor
    from ..engine.outputs import check_output_file

    if not args.frames:
        raise InputError("--volumes needs --frames (the segments' volumes per frame of a 4D series)")
    if not args.input or len(args.input) != 1 or args.uncertainty:
        raise InputError("--frames takes one 4D file with --input (and no --batch or --uncertainty)")
    if not args.output:
        raise InputError("--output is required with --input (a .nii.gz file)")
    if not Path(args.input[0]).is_file():
        raise InputError(f"input {args.input[0]} does not exist")
    check_output_file(args.output, args.input, [args.volumes], overwrite=args.overwrite, what="--output",
                      suffixes=(".nii.gz", ".nii"))
    if args.volumes:
        check_output_file(args.volumes, args.input, [args.output], overwrite=args.overwrite, what="--volumes",
                          suffixes=(".csv",))
    predictor = Predictor(args.model, device=args.device, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                          tta=args.tta, progress=_progress(args))
    out, summary = predict_frames(predictor, args.input[0], args.output, args.volumes)
    _report(args, {"stage": "done", "output": str(out), "volumes": args.volumes,
                   "notes": list(dict.fromkeys(predictor.notes)) + summary})
    return EXIT_OK


def _labels_for(spec: str) -> tuple[dict[int, str], dict[str, list[int]]]:
    """Label names (and evaluation regions, e.g. BraTS WT/TC/ET) from a preset, a dataset folder or a model."""
    from ..engine.data import dataset_labels
    from ..engine.models import load_model
    from ..engine.tasks import builtin_presets, load_preset

    if spec in builtin_presets() or spec.endswith(".json") and Path(spec).is_file() and "normalization" in Path(spec).read_text():
        p = load_preset(spec)
        return p.labels, p.regions
    p = Path(spec)
    if p.is_dir() and (p / "dataset.json").is_file():
        labels = dataset_labels(p)
        if labels:
            return labels, {}
    if p.exists():
        preset = load_model(p).preset
        return preset.labels, preset.regions
    raise InputError(f"--labels {spec}: not a preset name, a dataset folder with dataset.json, or a model")


def _pairs(pred: str, ref: str) -> list[tuple[str, str, str]]:
    from ..engine.data import IMAGE_SUFFIXES, strip_suffix, list_cases

    p, r = Path(pred), Path(ref)
    if p.is_file() and r.is_file():
        return [(strip_suffix(p.name), str(p), str(r))]
    if not p.is_dir():
        raise InputError(f"--pred {p} is neither a file nor a folder")
    preds = {strip_suffix(f.name): f for f in sorted(p.iterdir()) if f.name.endswith(IMAGE_SUFFIXES)}
    if r.is_dir() and (r / "dataset.json").is_file() or r.is_file():
        refs = {c.id: Path(c.label) for c in list_cases(r) if c.label}
    elif r.is_dir():
        refs = {strip_suffix(f.name): f for f in sorted(r.iterdir()) if f.name.endswith(IMAGE_SUFFIXES)}
    else:
        raise InputError(f"--ref {r} is neither a file, a folder nor a dataset")
    common = sorted(set(preds) & set(refs))
    if not common:
        raise InputError(f"no prediction in {p} matches a reference in {r} by case name")
    return [(c, str(preds[c]), str(refs[c])) for c in common]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..engine.metrics import REPORT_FILES, evaluate_files, format_summary, write_reports
    from ..engine.outputs import check_report_folder

    labels, regions = _labels_for(args.labels)
    pairs = _pairs(args.pred, args.ref)
    check_report_folder(args.output, REPORT_FILES, inputs=[f for _, *files in pairs for f in files],
                        overwrite=args.overwrite)
    rows = evaluate_files(pairs, labels, regions)
    for r in rows:
        for side, values in r["unlisted"].items():
            if values:
                print(f"dsdseg: warning: case {r['case']}: label value(s) {values} in the {side} are not among --labels "
                      f"{sorted(labels)} and are not scored", file=sys.stderr)
    summary = write_reports(rows, Path(args.output))
    if args.progress == "json":
        _report(args, {"stage": "done", "summary": summary, "output": args.output})
    else:
        print(f"{len(rows)} case(s); reports in {args.output}/metrics.json and metrics.csv")
        print(format_summary(summary))
    return EXIT_OK


def _cmd_qa(args: argparse.Namespace) -> int:
    from .qa_report import write_qa_report

    try:
        import vtk  # noqa: F401  (3D renders)
    except ImportError as e:
        raise InputError("dsdseg qa renders surfaces with VTK: pip install vtk==9.6.2 (Slicer's Python has it)") from e
    labels, regions = _labels_for(args.labels)
    report = write_qa_report(args.pred, args.ref, labels, args.output, image_file=args.image,
                             tolerance_mm=args.tolerance, worst=args.worst, regions=regions, overwrite=args.overwrite)
    for note in report.get("notes", []):
        print(f"dsdseg: note: {note}", file=sys.stderr)
    if args.progress == "json":
        _report(args, {"stage": "done", "output": args.output, "metrics": report["metrics"]})
    else:
        for name, m in report["metrics"].items():
            hd = "n/a" if m["hd95"] is None else f"{m['hd95']:.2f}"
            print(f"{name:28s} Dice {m['dice']:.3f}  HD95 {hd} mm  surface Dice@{args.tolerance} mm {m['surface_dice']:.3f}  "
                  f"volume {m['volume_diff_ml']:+.2f} ml")
        print(f"report: {Path(args.output) / 'index.html'}")
    return EXIT_OK


def _cmd_qa_panel(args: argparse.Namespace) -> int:
    from .qa_panel import run_panel_request

    run_panel_request(args.folder, progress=_progress(args))
    _report(args, {"stage": "done", "output": args.folder})
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    """Warm worker: one JSON request per stdin line, JSON progress and results on stdout, models kept loaded.

    Requests: ``{"id": 1, "command": "predict", "model": M, "inputs": [..], "output": F, "device": "auto",
    "tta": false, "uncertainty": F2, "overwrite": false}`` (or, instead of inputs and output, ``"cases": [{"inputs":
    [..], "output": F, "name": "frame 1 of 25"}, ..]``: several cases in order, one progress bar over them, every output
    checked before the first case runs, cancel between and within cases; the done line lists ``outputs``), ``{"id": 2, "command": "qa", "folder": D}`` (the panel's
    Compare on the masks in D, see ``qa_panel.run_panel_request``), ``{"command": "cancel", "target": 1}`` (stops request 1
    between two sliding-window batches, or before it starts; the worker and its loaded model stay) and
    ``{"command": "quit"}``. Every output line carries the request id; each request ends with exactly one line
    whose stage is "done", "cancelled" or "error" (with kind, message and the exit code the one-shot command
    would have returned). A malformed request gets an error line and the worker goes on.
    """
    import queue
    import threading

    from ..engine.errors import Cancelled
    from ..engine.inference import Predictor, check_predict_options, predict_each
    from ..engine.outputs import check_output_file

    predictors: dict[tuple, Predictor] = {}
    out_lock = threading.Lock()
    pending: queue.Queue = queue.Queue()
    cancelled: set = set()
    # a cancel of a request still waiting in the queue is answered at once, not when the request before it ends
    # (a long Apply must not make the client give up on the worker, and end that Apply too)
    state_lock = threading.Lock()
    queued: set = set()  # ids read but not yet taken by the main loop
    answered: set = set()  # queued ids whose "cancelled" line is already out

    def emit(record: dict) -> None:
        with out_lock:
            print(json.dumps(record), flush=True)

    def error(rid, message: str, kind: str = "error", code: int = EXIT_BAD_INPUT) -> None:
        emit({"stage": "error", "id": rid, "kind": kind, "message": message, "exit_code": code})

    def read_requests() -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except json.JSONDecodeError as e:
                error(None, f"bad request: not JSON ({e})")
                continue
            if not isinstance(req, dict):
                error(None, f"bad request: a request is a JSON object, got {type(req).__name__}")
                continue
            if req.get("command") == "cancel":
                target = req.get("target")
                with state_lock:
                    cancelled.add(target)
                    if target in queued and target not in answered:
                        answered.add(target)
                        emit({"stage": "cancelled", "id": target, "exit_code": EXIT_INTERRUPTED})
                continue
            with state_lock:
                queued.add(req.get("id"))
            pending.put(req)
        pending.put({"command": "quit"})

    from ..engine.runtime import environment

    emit({"stage": "ready", "pid": os.getpid(), "environment": environment()})
    threading.Thread(target=read_requests, daemon=True).start()
    while True:
        req = pending.get()
        rid = req.get("id")
        command = req.get("command")
        if command == "quit":
            break
        with state_lock:
            queued.discard(rid)
            skip = rid in cancelled
            if skip:
                cancelled.discard(rid)
                if rid not in answered:
                    emit({"stage": "cancelled", "id": rid, "exit_code": EXIT_INTERRUPTED})
                answered.discard(rid)
        if skip:
            continue
        try:
            if command == "qa":  # the panel's Compare: metrics, worst errors and distance surfaces (no model)
                from .qa_panel import run_panel_request

                folder = req.get("folder")
                if not isinstance(folder, str) or not Path(folder).is_dir():
                    raise InputError("bad request: 'folder' must be the QA request's folder")
                run_panel_request(folder, should_stop=lambda rid=rid: rid in cancelled, progress=_TaggedProgress(rid))
                emit({"stage": "done", "id": rid, "output": folder})
                continue
            if command != "predict":
                raise InputError(f"unknown request command {command!r} (predict, qa, cancel, quit)")
            model = req.get("model")
            if not isinstance(model, str) or not model:
                raise InputError("bad request: 'model' must be a model path")
            batch = req.get("cases")
            if batch is not None:  # several cases (e.g. every frame of a cine series) with one model load
                if "inputs" in req or "output" in req or "uncertainty" in req:
                    raise InputError("bad request: give either 'cases' or 'inputs' and 'output', not both")
                if not isinstance(batch, list) or not batch or not all(isinstance(c, dict) for c in batch):
                    raise InputError("bad request: 'cases' must be a non-empty list of {inputs, output, name}")
            else:
                batch = [{"inputs": req.get("inputs"), "output": req.get("output")}]
            unc = req.get("uncertainty")
            if unc is not None and not isinstance(unc, str):
                raise InputError("bad request: 'uncertainty' must be a file path")
            device = str(req.get("device", "auto"))
            check_predict_options(device, None, 4)
            overwrite = bool(req.get("overwrite", False))
            outputs = [c.get("output") for c in batch]
            for case in batch:  # every case and output checked before the first is segmented
                inputs, output = case.get("inputs"), case.get("output")
                if not isinstance(inputs, list) or not inputs or not all(isinstance(p, str) and p for p in inputs):
                    raise InputError("bad request: 'inputs' must be a non-empty list of file paths")
                if not isinstance(output, str) or not output:
                    raise InputError("bad request: 'output' must be a file path")
                for p in inputs:
                    if not Path(p).is_file():
                        raise InputError(f"input {p} does not exist")
                others = [unc] + [o for o in outputs if o is not output]
                if output in others:
                    raise InputError(f"bad request: output {output} is given twice")
                check_output_file(output, inputs, others, overwrite=overwrite, what="output")
            if unc:
                check_output_file(unc, batch[0]["inputs"], outputs, overwrite=overwrite, what="uncertainty output")
            progress = _TaggedProgress(rid)
            key = (model, device)
            if key not in predictors:
                predictors.clear()  # one model in memory at a time
                t0 = time.perf_counter()
                predictors[key] = Predictor(model, device=device, progress=progress)
                progress.log(f"model loaded in {time.perf_counter() - t0:.2f} s")
            pred = predictors[key]
            pred.progress, pred.tta, pred.notes = progress, bool(req.get("tta", False)), []
            pred.should_stop = lambda rid=rid: rid in cancelled
            if req.get("cases") is None:
                out = pred.predict_to_file(batch[0]["inputs"], batch[0]["output"], uncertainty_output=unc)
                emit({"stage": "done", "id": rid, "output": str(out), "uncertainty": unc, "notes": pred.notes})
                continue
            written = predict_each(pred, [(str(c.get("name") or f"case {i + 1} of {len(batch)}"), c["inputs"],
                                           c["output"]) for i, c in enumerate(batch)])
            emit({"stage": "done", "id": rid, "outputs": [str(p) for p in written],
                  "notes": list(dict.fromkeys(pred.notes))})
        except Cancelled:
            emit({"stage": "cancelled", "id": rid, "exit_code": EXIT_INTERRUPTED})
        except DSDError as e:
            error(rid, str(e))
        except MemoryError as e:
            error(rid, f"{e or 'not enough memory'}", "out of memory", EXIT_OOM)
        except Exception as e:  # noqa: BLE001 - one failed request must not end the warm worker
            oom = "out of memory" in str(e).lower()
            error(rid, str(e).splitlines()[0] if str(e) else type(e).__name__, "out of memory" if oom else "crash",
                  EXIT_OOM if oom else EXIT_CRASH)
        finally:
            cancelled.discard(rid)
    return EXIT_OK


class _TaggedProgress:
    """JSON progress lines that carry the request id (serve mode)."""

    def __init__(self, rid):
        from ..engine.progress import Progress

        self._p = Progress("json")
        self.rid = rid

    def update(self, stage: str, done: int, total: int, message: str = "", **extra) -> None:
        self._p.update(stage, done, total, message, id=self.rid, **extra)

    def log(self, message: str, json_record: bool = True) -> None:
        if json_record:
            self.update("log", 0, 0, message)

    def close(self) -> None:
        pass


def _cmd_export(args: argparse.Namespace) -> int:
    from ..engine.models import export_package

    out = export_package(args.model, args.output, weights_dtype=args.weights_dtype, members=args.ensemble_with)
    print(f"model package written to {out}")
    return EXIT_OK


def _report(args: argparse.Namespace, record: dict) -> None:
    if getattr(args, "progress", "bar") == "json":
        print(json.dumps(record), flush=True)
    else:
        if "output" in record:
            print(f"wrote {record['output']}")
        for o in record.get("outputs", []):
            print(f"wrote {o}")
        for n in record.get("notes", []):
            print(f"note: {n}")


def _positive(kind: type, what: str):
    """An argparse type: a number of ``kind`` that must be positive (a resumed run keeps its own when omitted)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind is int and v < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
        if kind is float and not (0 < v < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return v

    return parse


_positive_int = _positive(int, "a whole number")
_positive_float = _positive(float, "a number")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsdseg", description="Dual self-distillation (DSD) segmentation: train, predict, evaluate")
    sub = p.add_subparsers(dest="command", required=True)

    def progress_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                        help="progress as a tqdm bar (default), JSON lines on stdout, or nothing")

    def precision_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="arithmetic of the training steps: auto = fp16 mixed precision on CUDA, bf16 on a CPU "
                             "with native bf16 (AMX / AVX512-BF16) whose bf16 convolutions pass a check against fp32 at the "
                             "network's shapes, else fp32; loss, optimiser and validation stay fp32; a resumed run "
                             "keeps its own unless this is given")

    sub.add_parser("backbones", help="list the backbones and their DSD taps").set_defaults(func=_cmd_backbones)
    sub.add_parser("presets", help="list the built-in task presets").set_defaults(func=_cmd_presets)

    tm = sub.add_parser("terminology", help="the custom Slicer terminology context (.term.json) for presets' labels")
    tm.add_argument("--preset", action="append", help="preset name or JSON (repeatable; default: all built-in)")
    tm.add_argument("--output", help="write to this file (.term.json) instead of stdout")
    tm.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    tm.set_defaults(func=_cmd_terminology)

    s = sub.add_parser("smoke", help="engine smoke run: DSD vs plain for a few steps on real hippocampus MRI")
    s.add_argument("--data", help="MSD Task04 folder (default: ../shared/data/Task04_Hippocampus)")
    s.add_argument("--backbone", default="basicunet")
    s.add_argument("--steps", type=int, default=40)
    s.add_argument("--cases", type=int, default=6)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="also print the result as JSON")
    s.set_defaults(func=_cmd_smoke)

    t = sub.add_parser("train", help="train a model on a dataset (also under torchrun for multi-GPU DDP)")
    t.add_argument("--task", required=True, help="preset name (hippocampus, cardiac, brain_tumour) or preset JSON")
    t.add_argument("--data", required=True, help="dataset folder (MSD or nnU-Net dataset.json) or .json/.csv list")
    t.add_argument("--output", required=True, help="run folder (config, split, log, curves, checkpoints)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from last.pt")
    t.add_argument("--dsd", choices=["plain", "ds", "decoder", "encoder", "dsd"],
                   help="which DSD terms (default plain; a resumed run keeps its own). In our study full DSD trained "
                        "worse than plain with few cases (BasicUNet -0.5, DynUNet -0.9 Dice points, 3 seeds each) "
                        "and no better on the full set; --dsd dsd trains the method (README, 'DSD vs plain on our "
                        "data')")
    t.add_argument("--temperature", type=float)
    t.add_argument("--kl-weight", type=float)
    t.add_argument("--detach-teacher", action="store_true")
    t.add_argument("--upsample", choices=["deconv_shared", "deconv", "trilinear"])
    t.add_argument("--backbone", help="override the preset's backbone")
    t.add_argument("--init-from", metavar="MODEL",
                   help="start from this model's backbone weights (package, run folder or checkpoint; same network, "
                        "or one whose inputs include this task's channels by name, e.g. FLAIR + T1c from the "
                        "four-sequence brain-tumour model)")
    for name, typ in (("--epochs", _positive_int), ("--batch-size", _positive_int), ("--samples", _positive_int),
                      ("--lr", _positive_float), ("--val-every", _positive_int), ("--max-cases", _positive_int),
                      ("--max-steps", _positive_int), ("--workers", int)):
        t.add_argument(name, type=typ, help="a resumed run keeps its own value" if name != "--workers" else None)
    t.set_defaults(workers=0)
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help=DEVICE_HELP)
    precision_arg(t)
    t.add_argument("--no-amp", action="store_true", help="same as --precision fp32")
    progress_arg(t)
    t.set_defaults(func=_cmd_train)

    f = sub.add_parser("finetune", help="fine-tune a model on your annotated cases; registers a new user model")
    f.add_argument("--base", help="base model: package folder (built-in or user) or run folder")
    f.add_argument("--data", help="dataset folder (MSD / nnU-Net layout) or .json/.csv list of image/label pairs")
    f.add_argument("--output", required=True, help="run folder (checkpoints, curves; --resume continues it)")
    f.add_argument("--resume", action="store_true", help="continue a stopped fine-tune from its last checkpoint")
    f.add_argument("--name", help="name of the new model (default <base>-ft); a version -vN is appended")
    f.add_argument("--label-map", help="JSON file: your label values → base labels: {\"1\": {\"name\": \"hippocampus\", "
                   "\"from\": [1, 2]}, \"2\": {\"name\": \"amygdala\", \"from\": \"new\"}}; default: derived from the "
                   "dataset's label names (same name, a merge of the base labels that contain the name, or new)")
    f.add_argument("--store", help="user model folder (default $DSDSEG_MODELS or ~/.DSDSegmentation/models)")
    f.add_argument("--epochs", type=_positive_int, help="default 30 (a resumed run keeps its own)")
    f.add_argument("--lr", type=_positive_float, help="default 0.001 (a resumed run keeps its own)")
    f.add_argument("--dsd", choices=["plain", "ds", "decoder", "encoder", "dsd"],
                   help="default plain: DSD fine-tuning measured no better than plain here, at ~1.2x the step time "
                        "(README); a resumed run keeps its own")
    f.add_argument("--freeze-encoder", action="store_true", help="train the decoder (and DSD heads) only")
    f.add_argument("--patience", type=_positive_int, help="stop after this many validations without improvement")
    f.add_argument("--val-every", type=_positive_int)
    f.add_argument("--val-fraction", type=float)
    f.add_argument("--max-steps", type=_positive_int)
    f.add_argument("--seed", type=int)
    f.add_argument("--device", default="auto", help=DEVICE_HELP)
    precision_arg(f)
    progress_arg(f)
    f.set_defaults(func=_cmd_finetune)

    mo = sub.add_parser("models", help="list the built-in and user models, show one (inputs, validation, licence); "
                                               "export/import a model as a zip")
    mo.add_argument("action", choices=["list", "show", "export", "import"])
    mo.add_argument("id", nargs="?", help="model id (show, export) or zip file (import)")
    mo.add_argument("file", nargs="?", help="zip file to write (export)")
    mo.add_argument("--store", help="user model folder")
    mo.set_defaults(func=_cmd_models)

    pr = sub.add_parser("predict", help="segment volumes; output on each input's grid")
    pr.add_argument("--model", required=True, help="model package folder, run folder or checkpoint")
    pr.add_argument("-i", "--input", action="append", help="input volume (repeat once per channel, in the model's order)")
    pr.add_argument("-o", "--output", help="output labelmap (.nii.gz, .nii, .nrrd, .seg.nrrd)")
    pr.add_argument("--batch", help="dataset folder or .json/.csv list of cases to segment")
    pr.add_argument("--output-dir", help="output folder for --batch")
    pr.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nrrd"], help="output format for --batch")
    pr.add_argument("--device", default="auto", help=DEVICE_HELP)
    pr.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: the model's, usually 0.5)")
    pr.add_argument("--sw-batch-size", type=_positive_int, default=4)
    pr.add_argument("--tta", action="store_true", help="average over flips (8x slower)")
    pr.add_argument("--overwrite", action="store_true", help="replace output files that exist (never an input file)")
    pr.add_argument("--allow-input-folder", action="store_true",
                    help="--batch: allow --output-dir to be a folder that holds inputs (inputs are still never replaced)")
    pr.add_argument("--frames", action="store_true",
                    help="--input is one 4D series (a cine: x, y, z, frames) for a one-input model: segment every frame "
                         "into a 4D labelmap (.nii.gz); the ventricles' ejection fractions are noted")
    pr.add_argument("--volumes", metavar="CSV", help="with --frames: also write each segment's volume per frame (mL)")
    pr.add_argument("--uncertainty", help="also write a voxel uncertainty map (normalised entropy of the class "
                    "probabilities, with --tta of their flip average) to this file (--input only)")
    progress_arg(pr)
    pr.set_defaults(func=_cmd_predict)

    e = sub.add_parser("evaluate", help="Dice, HD95 and ASSD (mm) per class and case; JSON + CSV + summary")
    e.add_argument("--pred", required=True, help="prediction file or folder")
    e.add_argument("--ref", required=True, help="reference file, folder, or dataset (dataset.json / list)")
    e.add_argument("--labels", required=True, help="preset name, dataset folder or model that names the labels")
    e.add_argument("--output", required=True, help="report folder (metrics.json, metrics.csv)")
    e.add_argument("--overwrite", action="store_true", help="replace the report files of an earlier run in --output")
    progress_arg(e)
    e.set_defaults(func=_cmd_evaluate)

    q = sub.add_parser("qa", help="boundary QA report: metrics, worst-error slices with outlines, distance-coloured surfaces")
    q.add_argument("pred", help="segmentation (labelmap file)")
    q.add_argument("ref", help="reference labelmap on the same grid")
    q.add_argument("--labels", required=True, help="preset name, dataset folder or model that names the labels")
    q.add_argument("--image", help="the image, drawn under the outlines")
    q.add_argument("--output", required=True, help="report folder (index.html, qa.json, PNGs)")
    q.add_argument("--tolerance", type=_positive_float, default=1.0, help="surface Dice tolerance in mm (default 1)")
    q.add_argument("--worst", type=_positive_int, default=5, help="how many worst boundary errors to show")
    q.add_argument("--overwrite", action="store_true", help="replace the report files of an earlier run in --output")
    progress_arg(q)
    q.set_defaults(func=_cmd_qa)

    qp = sub.add_parser("qa-panel", help="the Slicer panel's Compare on the masks it wrote into FOLDER (request.json, "
                                          "masks.npz) → result.json and distance surfaces (.vtp)")
    qp.add_argument("folder")
    progress_arg(qp)
    qp.set_defaults(func=_cmd_qa_panel)

    sv = sub.add_parser("serve", help="warm worker: JSON requests on stdin, models stay loaded (used by Slicer)")
    sv.set_defaults(func=_cmd_serve, progress="json")

    x = sub.add_parser("export", help="write a model package (head-free weights + card + sha256) from a run")
    x.add_argument("--model", required=True)
    x.add_argument("--output", required=True)
    x.add_argument("--weights-dtype", choices=["float32", "float16"], default="float32",
                   help="float16 halves the package (the network still runs in float32; labels may differ in a few "
                        "boundary voxels)")
    x.add_argument("--ensemble-with", nargs="+", default=[], metavar="MODEL",
                   help="further runs or packages of the same network, inputs and labels: the package averages "
                        "the class probabilities of all of them (an ensemble; inference takes as many times longer)")
    x.set_defaults(func=_cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ..engine.runtime import MPS_FALLBACK, tune_cpu_allocator

    for key, value in MPS_FALLBACK.items():  # before torch is imported (it reads them once); the user's value wins
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    json_mode = getattr(args, "progress", "bar") == "json"

    def fail(kind: str, message: str, code: int) -> int:
        if json_mode:
            print(json.dumps({"stage": "error", "kind": kind, "message": message, "exit_code": code}), flush=True)
        print(f"dsdseg: {kind}: {message}", file=sys.stderr)
        return code

    try:
        code = int(args.func(args))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun, a C++ thread left by torch.distributed sometimes aborted the interpreter at exit
            # ("terminate called without an active exception", 2 of ~20 CPU/gloo runs) after all work was done
            # and every file written atomically; leave without the interpreter teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except DSDError as e:
        return fail("error", str(e), EXIT_BAD_INPUT)
    except MemoryError as e:
        return fail("out of memory", f"{e or 'not enough memory'}; try a smaller --sw-batch-size or the CPU", EXIT_OOM)
    except KeyboardInterrupt:
        return fail("interrupted", "stopped by the user", EXIT_INTERRUPTED)
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            return fail("out of memory", str(e).splitlines()[0], EXIT_OOM)
        raise


if __name__ == "__main__":
    sys.exit(main())
