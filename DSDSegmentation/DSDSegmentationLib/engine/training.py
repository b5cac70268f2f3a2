"""Training: presets + DSD network + MONAI data pipeline, checkpoints, resume, validation, torch DDP."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import tempfile
import warnings
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.utils import set_determinism

from .config import DSDConfig, NetworkConfig
from .data import Case, dataset_labels, list_cases, split_by_patient, validate_case
from .errors import ConfigError, InputError
from .losses import DSDLoss
from .outputs import apply_umask, atomic_write_text
from .networks import DSDNet
from .progress import Progress
from .tasks import TaskPreset, load_preset
from .transforms import training_transforms, validation_transforms

CHECKPOINT_VERSION = 1
# What a training run from scratch uses unless told (issue 14's DSD study, README "DSD vs plain on our data"): with
# 17 and 42 hippocampus training cases full DSD trained worse than plain (-0.52 and -0.49 Dice points, 3 seeds,
# paired over cases and seeds, Wilcoxon p = 0.002), deep supervision alone the same as plain, and no regime
# measured so far showed a gain; plain is also the cheapest step. `--dsd dsd` trains the method.
DEFAULT_DSD = "plain"


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` in the run folder."""

    task: str
    data: str
    output: str
    dsd: str | None = None  # plain, ds, decoder, encoder, dsd; None: DEFAULT_DSD, or a resumed run's own
    dsd_overrides: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None
    backbone_options: dict[str, Any] | None = None
    epochs: int | None = None
    batch_size: int | None = None
    samples_per_volume: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-5
    val_every: int | None = None
    val_fraction: float = 0.2
    max_cases: int | None = None
    max_steps_per_epoch: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # False: fp32 whatever ``precision`` says (the CLI's --no-amp)
    precision: str = "auto"  # auto, fp32, bf16, fp16: see resolve_precision; a resumed run keeps its own unless given
    num_workers: int = 0
    sw_batch_size: int = 4
    # fine-tuning: a preset and network given as dicts (from a base model's card) instead of ``task``'s, the base
    # model whose backbone weights start the run (and the DSD heads of a checkpoint whose heads fit, else fresh
    # ones), encoder freeze, early stopping
    preset: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    init_from: str | None = None
    freeze_encoder: bool = False
    patience: int | None = None  # validations without improvement before stopping
    # fine-tuning to other labels: per class of this run, the base classes' label values it starts from (a merge:
    # several; a new label: none); and the user's mapping file as given (recorded for --resume)
    label_map: list[list[int]] | None = None
    label_map_spec: dict[str, Any] | None = None
    # studies: the validation split from its own seed (the same cases for every training seed), and a seeded share
    # of the training patients (low-data regimes); None: the split follows ``seed``, all training cases are used
    split_seed: int | None = None
    train_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (an Apple-silicon Mac's
    GPU: asked for by name, never chosen by ``auto``); anything else, or a device this machine lacks, is a
    ConfigError that says why."""
    import re

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        from .runtime import mps_problem

        problem = mps_problem()
        if problem:
            raise ConfigError(f"device 'mps' requested but {problem}; use cpu")
        return torch.device("mps")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise ConfigError(f"device {name!r} is not one of {DEVICES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available in this torch build/machine; use cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def describe_hardware(device: torch.device) -> str:
    """What a run trained on, for its config and the model card: the GPU's name, or the CPU and its core count."""
    import os
    import platform

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda}), {_world()} process(es)"
    if device.type == "mps":
        return f"Apple GPU (Metal, MPS; {platform.machine()}, {os.cpu_count()} CPU cores), {_world()} process(es)"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), {_world()} process(es)"


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """True on CPUs that compute bf16 in hardware (AMX tiles or AVX512-BF16), where autocast to bf16 is faster;
    elsewhere bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # private helpers: absent in some builds
        return False


def resolve_precision(precision: str, device: torch.device, amp: bool = True) -> str:
    """The arithmetic a training step runs in: ``fp32``, ``bf16`` (autocast, no loss scaling) or ``fp16`` (autocast
    with loss scaling, CUDA only). ``auto``: fp16 on CUDA, bf16 on a CPU with native bf16 (about 1.7-2x faster per
    step on this project's AMX CPU, measured in Testing/Benchmarks/bench_precision.py), fp32 otherwise. The loss,
    the optimiser and validation always run in fp32. A bf16 run is checked once more against the network itself
    before its first step (``Trainer._check_bf16``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not amp or precision == "fp32":
        return "fp32"
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16: this GPU does not support bf16; use fp16 or fp32")
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"precision bf16 is not supported on {device.type}; use fp32")
    return precision


# what a run writes into its folder (a new run never replaces files of these names that are not its own)
RUN_FILES = ("config.json", "split.json", "log.txt", "history.json", "curves.png", "best.pt", "last.pt", "ddp_sync.json")

# a convolution's output and gradients under bf16 autocast differ from fp32 by about 0.003 (relative norm), up to 0.015
# seen (a 1-channel input convolution, where the weight gradient is a sum with cancellation); the oneDNN fault this
# guards against gives 0.96 at the least, mostly 1e12, inf or nan
BF16_CONV_TOLERANCE = 0.15


def bf16_convolution_error(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """Every convolution of ``model`` at the input shape it gets from ``x``, run alone on random data under bf16
    autocast and in fp32: the largest relative difference ``|bf16 - fp32| / |fp32|`` of its output, input gradient
    and weight gradient (non-finite counts as infinite), and where (module name and input shape). The model itself
    is not changed (a copy is run).

    Why: on some CPUs (seen on an AMD EPYC with AVX512-BF16 and no AMX, torch 2.13.0) oneDNN computes the weight
    gradient of a 3x3x3 convolution whose input is 2 voxels deep as garbage (relative error 1 to 1e12, or nan), so
    a network whose deepest stage has depth 2 (BasicUNet on the hippocampus patch) trains on wrong gradients or
    diverges; the same layers are right on a CPU with AMX. Each layer is checked on its own because through a whole
    network bf16 rounding alone moves some gradients by tens of percent."""
    shapes: dict[str, tuple[torch.nn.Module, tuple[int, ...]]] = {}

    def remember(name: str):
        def hook(mod: torch.nn.Module, args: tuple) -> None:
            shapes.setdefault(name, (mod, tuple(args[0].shape)))
        return hook

    probe = copy.deepcopy(model)  # (a forward in training mode would update e.g. batch-norm statistics)
    probe.requires_grad_(True)  # frozen layers too
    for name, m in probe.named_modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            m.register_forward_pre_hook(remember(name))
    with torch.no_grad():
        probe(x)
    gen = torch.Generator().manual_seed(0)
    worst, where, seen = 0.0, "", set()
    for name, (mod, shape) in shapes.items():
        key = (repr(mod), shape)
        if key in seen:
            continue
        seen.add(key)
        layer = mod.float()
        inp = torch.randn(shape, generator=gen).to(x.device)
        results = []
        for bf16 in (True, False):
            layer.zero_grad(set_to_none=True)
            xi = inp.clone().requires_grad_(True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = layer(xi)
            out.float().backward(torch.ones_like(out, dtype=torch.float32))
            results.append((out.detach().float(), xi.grad, layer.weight.grad))
        for a, b in zip(*results):
            scale = float(torch.linalg.vector_norm(b))
            err = float(torch.linalg.vector_norm(a - b)) / scale if bool(torch.isfinite(a).all()) and scale else math.inf
            if not err <= worst:  # nan counts as worst too
                worst, where = (math.inf if math.isnan(err) else err), f"{name} (input {'x'.join(map(str, shape[2:]))})"
    return worst, where


def bf16_problem(model: torch.nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu") -> str | None:
    """None when every convolution of ``model``, at the shapes an input of ``input_shape`` gives it, computes under
    bf16 what it does in fp32 (``bf16_convolution_error``); otherwise what is wrong, naming the layer."""
    device = torch.device(device)
    err, where = bf16_convolution_error(model, torch.zeros(tuple(input_shape), device=device))
    if err <= BF16_CONV_TOLERANCE:
        return None
    return (f"bf16 is wrong on this {device.type}: the convolution {where} differs from fp32 by {err:.3g} "
            f"(relative; bf16 rounding gives about 0.003, at most {BF16_CONV_TOLERANCE})")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Trainer:
    """One training run in ``config.output``: ``config.json``, ``split.json``, ``log.txt``, ``history.json``,
    ``curves.png``, ``last.pt`` (full state, for ``--resume``) and ``best.pt`` (best validation Dice)."""

    def __init__(self, config: TrainConfig, progress: Progress | None = None, resume: bool = False):
        self.cfg = config
        self.progress = progress or Progress("none")
        self.preset: TaskPreset = TaskPreset.from_dict(config.preset) if config.preset else load_preset(config.task)
        tr = self.preset.training
        for key in ("epochs", "batch_size", "samples_per_volume", "val_every", "max_steps_per_epoch", "max_cases", "patience"):
            v = getattr(config, key)
            if v is not None and int(v) < 1:
                raise ConfigError(f"{key.replace('_', ' ')} must be at least 1, got {v}")
        if config.lr is not None and not config.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {config.lr}")
        if not 0 < config.val_fraction < 1:
            raise ConfigError(f"val fraction must be between 0 and 1, got {config.val_fraction}")
        self.epochs = int(config.epochs or tr["epochs"])
        self.batch_size = int(config.batch_size or tr["batch_size"])
        self.samples = int(config.samples_per_volume or tr["samples_per_volume"])
        self.lr = float(config.lr or tr["lr"])
        self.val_every = int(config.val_every or tr["val_every"])
        self.out = Path(config.output)
        self.resume = resume
        self._init_distributed()
        self.device = self._device()
        self.precision = resolve_precision(config.precision, self.device, config.amp)
        net_overrides: dict[str, Any] = {"backbone": config.backbone}
        if config.backbone_options is not None:
            net_overrides["options"] = config.backbone_options
        elif config.backbone and config.backbone != self.preset.network.get("backbone"):
            net_overrides["options"] = {}
        self.net_config = (NetworkConfig.from_dict(config.network) if config.network
                           else self.preset.network_config(**net_overrides))
        if config.dsd is None:  # a resumed run keeps its own terms (runs made before the default changed included)
            saved = self.out / "config.json"
            config.dsd = (json.loads(saved.read_text(encoding="utf-8")).get("dsd") if resume and saved.is_file()
                          else None) or DEFAULT_DSD
        self.dsd_config = DSDConfig.preset(config.dsd, **config.dsd_overrides)
        kl = self.dsd_config.decoder_kl or self.dsd_config.encoder_kl
        unused = [k for k in config.dsd_overrides if (k in ("temperature", "kl_weight", "detach_teacher") and not kl)
                  or (k == "upsample" and self.dsd_config.is_plain)]
        if unused:  # e.g. --temperature with the plain default: refused rather than silently without effect
            names = ", ".join("--" + k.replace("_", "-") for k in unused)
            what = "these change" if len(unused) > 1 else "this changes"
            raise ConfigError(f"{names}: the '{config.dsd}' terms have nothing {what}; add --dsd dsd")
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.best = -1.0
        self.stopped_early = False
        self.first_log: list[str] = []  # lines for log.txt once the run folder exists (e.g. a fine-tune's label mapping)

    # ----------------------------------------------------------------------------------------------- setup
    def _init_distributed(self) -> None:
        self._owns_process_group = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and self.cfg.device != "cpu" else "gloo"
            dist.init_process_group(backend=backend)
            self._owns_process_group = True

    def close(self, graceful: bool = True) -> None:
        """Shut down the process group this trainer started (a live gloo group aborts the interpreter at exit).
        After an error no barrier is entered: the other ranks may be gone."""
        if self._owns_process_group and dist.is_initialized():
            if graceful:
                dist.barrier()
            dist.destroy_process_group()
            self._owns_process_group = False

    def _device(self) -> torch.device:
        dev = resolve_device(self.cfg.device)
        if dev.type == "mps" and _world() > 1:
            raise ConfigError("device 'mps': a Mac's Metal GPU is one device; train it with one process (no torchrun), "
                              "or use cuda or cpu for multi-process training")
        if dev.type == "cuda" and _world() > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        return dev

    def _log(self, message: str, json_record: bool = True) -> None:
        """A line in log.txt and on the progress stream (``json_record=False``: not as a JSON ``log`` record, for
        lines whose content a JSON record already carries, e.g. the epoch line after its ``epoch`` record)."""
        if _rank() != 0:
            return
        self.progress.log(message, json_record=json_record)
        with open(self.out / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def _check_new_run_folder(self) -> None:
        """A new run writes its files (``RUN_FILES``) into ``self.out``: into a new or empty folder, one with other
        files, or the remains of an unfinished run of ours (a config.json with our resolved settings, no last.pt,
        e.g. a run stopped before its first epoch ended). Files of those names that are not ours (the user's own
        log.txt or config.json) are never replaced or appended to: refused before anything is written."""
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--output {self.out} is a file; a training run needs a folder")
        clash = [name for name in RUN_FILES if (self.out / name).exists()]
        if not clash:
            return
        try:
            saved = json.loads((self.out / "config.json").read_text(encoding="utf-8"))
            ours = isinstance(saved, dict) and "task" in saved and "resolved" in saved
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise InputError(f"--output {self.out} already holds {', '.join(clash)}, not from a training run of "
                             f"this extension; choose a new or empty folder (nothing there was changed)")

    def _prepare_run_folder(self) -> tuple[list[Case], list[Case]]:
        cfg_path = self.out / "config.json"
        if self.resume:
            if not (self.out / "last.pt").is_file():
                raise InputError(f"--resume: {self.out} has no last.pt checkpoint to resume from")
            saved = json.loads(cfg_path.read_text(encoding="utf-8"))
            split = json.loads((self.out / "split.json").read_text(encoding="utf-8"))
            mine = self.cfg.to_dict()
            differ = [k for k in ("task", "dsd", "dsd_overrides", "backbone", "backbone_options", "seed") if saved.get(k) != mine.get(k)]
            if differ:
                raise ConfigError(f"--resume: settings {differ} differ from the run in {self.out}; resume with the same settings")
            self._restore_schedule(saved)
            self._restore_precision(saved)
            to_case = lambda d: Case(**d)  # noqa: E731
            return [to_case(c) for c in split["train"]], [to_case(c) for c in split["val"]]
        if (self.out / "last.pt").exists():
            raise InputError(f"{self.out} already holds a training run; use --resume or another --output folder")
        self._check_new_run_folder()
        cases = list_cases(self.cfg.data, self.cfg.max_cases, channels=self.preset.channels)
        declared = dataset_labels(self.cfg.data) if Path(self.cfg.data).is_dir() else None
        if declared and sorted(declared) != sorted(self.preset.labels):
            raise ConfigError(f"the dataset declares labels {declared} but task '{self.preset.name}' has "
                              f"{self.preset.labels}; choose the matching --task or a preset JSON with these labels")
        n_ch, labels = len(self.preset.channels), list(self.preset.labels)
        for i, c in enumerate(cases):
            if c.label is None:
                raise InputError(f"case {c.id} has no label; training needs labels")
            validate_case(c, n_ch, labels)
            self.progress.update("validate data", i + 1, len(cases), c.id)
        split_seed = self.cfg.seed if self.cfg.split_seed is None else self.cfg.split_seed
        train, val = split_by_patient(cases, self.cfg.val_fraction, split_seed)
        if self.cfg.train_fraction is not None:
            if not 0 < self.cfg.train_fraction <= 1:
                raise ConfigError(f"train fraction must be in (0, 1], got {self.cfg.train_fraction}")
            patients = sorted({c.patient for c in train})
            random.Random(self.cfg.seed).shuffle(patients)
            keep = set(patients[:max(1, round(self.cfg.train_fraction * len(patients)))])
            train = [c for c in train if c.patient in keep]
        if _rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg = {**self.cfg.to_dict(), "resolved": {"epochs": self.epochs, "batch_size": self.batch_size,
                   "samples_per_volume": self.samples, "lr": self.lr, "val_every": self.val_every,
                   "network": self.net_config.to_dict(), "dsd": self.dsd_config.to_dict(),
                   "preset": self.preset.to_dict(), "world_size": _world(),
                   "torch": torch.__version__, "precision": self.precision,
                   "hardware": describe_hardware(self.device)}}
            atomic_write_text(cfg_path, json.dumps(cfg, indent=2))
            atomic_write_text(self.out / "split.json", json.dumps(
                {"seed": self.cfg.seed, "val_fraction": self.cfg.val_fraction,
                 "train": [c.to_dict() for c in train], "val": [c.to_dict() for c in val]}, indent=2))
        return train, val

    RESUMED = {"epochs": "epochs", "batch_size": "batch_size", "samples_per_volume": "samples", "lr": "lr",
               "val_every": "val_every"}

    def _restore_schedule(self, saved: dict[str, Any]) -> None:
        """A resumed run keeps every training setting of the run; a conflicting explicit value is an error."""
        resolved = saved.get("resolved", {})
        conflicts = []
        for key, attr in self.RESUMED.items():
            want, had = getattr(self.cfg, key), resolved.get(key)
            if had is None:
                continue
            if want is not None and float(want) != float(had):
                conflicts.append(f"{key} {want} (the run has {had})")
            setattr(self, attr, type(getattr(self, attr))(had))
        for key in ("max_steps_per_epoch", "weight_decay", "val_fraction", "max_cases", "patience", "freeze_encoder"):
            had, want, default = saved.get(key), getattr(self.cfg, key), TrainConfig.__dataclass_fields__[key].default
            if want != had and want != default:
                conflicts.append(f"{key} {want} (the run has {had})")
            setattr(self.cfg, key, had)
        if conflicts:
            raise ConfigError(f"--resume: {', '.join(conflicts)}; a resumed run keeps its settings (leave them out, or "
                              "start a new run in another --output folder)")

    def _restore_precision(self, saved: dict[str, Any]) -> None:
        """A resumed run keeps its precision (runs from before the setting: fp32 on the CPU, fp16 with amp on
        CUDA); an explicit other ``precision`` switches it from the next epoch on, and log.txt says so."""
        had = saved.get("resolved", {}).get("precision")
        if had is None:  # before the setting existed, amp meant fp16 on CUDA and nothing on the CPU
            had = "fp16" if saved.get("amp", True) and self.device.type == "cuda" else "fp32"
        if self.cfg.precision == "auto" and self.cfg.amp:
            try:
                self.precision = resolve_precision(had, self.device)
            except ConfigError:  # e.g. an fp16 GPU run resumed on a CPU
                self.precision = resolve_precision("auto", self.device)
        if self.precision != had:
            self.first_log.append(f"precision {had} -> {self.precision} from this resumption on")
            if _rank() == 0:
                saved.setdefault("resolved", {})["precision"] = self.precision
                atomic_write_text(self.out / "config.json", json.dumps(saved, indent=2))

    def _check_bf16(self, model: DSDNet) -> None:
        """Before the first bf16 step: each convolution of the network at the run's patch shape under bf16 against
        fp32 (``bf16_convolution_error``). Wrong results switch an automatic choice to fp32, with a line in log.txt
        and config.json updated; an explicit ``precision="bf16"`` is refused."""
        found = bf16_problem(model, (1, len(self.preset.channels), *self.preset.patch_size), self.device)
        if found is None:
            return
        if self.cfg.precision == "bf16":
            raise ConfigError(f"precision bf16: {found}; train with --precision fp32 (or auto, which checks this)")
        self.precision = "fp32"
        self._log(f"{found}; training in fp32 instead")
        if _rank() == 0:
            cfg_path = self.out / "config.json"
            saved = json.loads(cfg_path.read_text(encoding="utf-8"))
            saved.setdefault("resolved", {})["precision"] = "fp32"
            atomic_write_text(cfg_path, json.dumps(saved, indent=2))

    def _check_gradients(self, model: DSDNet, epoch: int, step: int) -> None:
        """A step with inf / nan gradients is refused before the optimiser applies it, so the weights (and last.pt,
        written at the end of an epoch) stay as they were."""
        norms = [torch.linalg.vector_norm(p.grad.detach()) for p in model.parameters() if p.grad is not None]
        if norms and not bool(torch.isfinite(torch.stack(norms).sum())):
            raise RuntimeError(f"non-finite gradients at epoch {epoch + 1} step {step + 1} (precision {self.precision});"
                               f" the weights were not updated; resume from last.pt"
                               f"{' with --precision fp32' if self.precision == 'bf16' else ''}")

    # ------------------------------------------------------------------------------------------------ run
    def fit(self) -> dict[str, Any]:
        try:
            result = self._fit()
        except BaseException:
            self.close(graceful=False)
            raise
        self.close()
        return result

    def _fit(self) -> dict[str, Any]:
        set_determinism(self.cfg.seed)
        train_cases, val_cases = self._prepare_run_folder()
        for line in self.first_log:
            self._log(line)
        if _world() > 1:
            dist.barrier()
        cached_tf, random_tf = training_transforms(self.preset, self.samples)
        items = [{"image": c.images, "label": c.label} for c in train_cases]
        # the deterministic part once, in threads when workers are asked for (a GPU machine's cores)
        base = CacheDataset(items, cached_tf, progress=False, num_workers=max(1, self.cfg.num_workers))
        train_ds = Dataset(base, random_tf)
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, shuffle=True, seed=self.cfg.seed) if _world() > 1 else None
        gen = torch.Generator()
        loader = DataLoader(train_ds, batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler,
                            num_workers=self.cfg.num_workers, collate_fn=list_data_collate, generator=gen,
                            persistent_workers=self.cfg.num_workers > 0)  # no worker start-up every epoch
        val_ds = CacheDataset([{"image": c.images, "label": c.label} for c in val_cases], validation_transforms(self.preset),
                              progress=False) if _rank() == 0 else None

        model = DSDNet(self.net_config, self.dsd_config)
        if self.cfg.init_from and not self.resume:
            self._init_from_base(model, val_cases)
        if self.cfg.freeze_encoder:
            frozen = self._freeze_encoder(model)
            self._log(f"encoder frozen: {frozen} parameters in {', '.join(t.module for t in model.spec.taps() if t.role == 'enc')}")
        model = model.to(self.device)
        loss_fn = DSDLoss(self.dsd_config)
        if self.precision == "bf16":
            self._check_bf16(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.lr,
                                weight_decay=self.cfg.weight_decay)
        steps_per_epoch = len(loader) if not self.cfg.max_steps_per_epoch else min(len(loader), self.cfg.max_steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: (1 - e / self.epochs) ** 0.9)  # poly, per epoch
        scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if self.resume:
            self._load_state(model, opt, sched, scaler)
        net: torch.nn.Module = model
        if _world() > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._log(f"training {self.preset.name}: {len(train_cases)} train / {len(val_cases)} val cases, "
                  f"{self.net_config.backbone} {self.dsd_config_name()}, {self.epochs} epochs x {steps_per_epoch} steps, "
                  f"device {self.device}, precision {self.precision}, world size {_world()}, params {model.num_parameters()}")
        for epoch in range(self.start_epoch, self.epochs):
            t0 = time.time()
            # reseeding per epoch makes a resumed run draw the same crops as an uninterrupted one
            random_tf.set_random_state(seed=self.cfg.seed + 1000 * epoch + _rank())
            gen.manual_seed(self.cfg.seed + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            sums: dict[str, float] = {}
            n = 0
            for step, batch in enumerate(loader):
                if step >= steps_per_epoch:
                    break
                x, y = batch["image"].to(self.device), batch["label"].to(self.device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(training_forward(net, x, self.precision), y)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"non-finite loss at epoch {epoch + 1} step {step + 1}: {loss_fn.last_terms}")
                scaler.scale(loss).backward()
                if self.precision != "fp16":  # (fp16: the grad scaler skips steps with inf / nan gradients itself)
                    self._check_gradients(model, epoch, step)
                scaler.step(opt)
                scaler.update()
                for k, v in loss_fn.last_terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                self.progress.update("train", epoch * steps_per_epoch + step + 1, self.epochs * steps_per_epoch,
                                     f"epoch {epoch + 1}/{self.epochs} loss {loss_fn.last_terms['total']:.4f}")
            sched.step()
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0,
                                      "precision": self.precision,
                                      **{f"loss/{k}": v / max(n, 1) for k, v in sums.items()}}
            is_val = (epoch + 1) % self.val_every == 0 or epoch + 1 == self.epochs
            if is_val and _rank() == 0:
                dice = self.validate(model, val_ds)
                record.update({f"val_dice/{self.preset.class_names[c]}": d for c, d in dice.items()})
                record["val_dice"] = float(np.mean(list(dice.values())))
            self.history.append(record)
            if _rank() == 0:
                improved = "val_dice" in record and record["val_dice"] > self.best
                if improved:
                    self.best = record["val_dice"]
                state = self._state(model, opt, sched, scaler, epoch + 1)
                atomic_save(state, self.out / "last.pt")
                if improved:
                    atomic_save({**state, "optimizer": None, "scheduler": None, "scaler": None}, self.out / "best.pt")
                atomic_write_text(self.out / "history.json", json.dumps(self.history, indent=1))
                self._plot()
                self.progress.update("epoch", epoch + 1, self.epochs, "", record=record, best=self.best)
                msg = f"epoch {epoch + 1}/{self.epochs} loss {record.get('loss/total', float('nan')):.4f} ({record['seconds']:.1f} s)"
                if "val_dice" in record:
                    msg += f" val Dice {record['val_dice']:.4f}" + (" (best)" if improved else "")
                # (the epoch record above carries it for machines: a log record after it would replace the panel's
                # "Epoch k/n, loss, best Dice, time left" line with this raw one every epoch)
                self._log(msg, json_record=False)
            if _world() > 1:
                dist.barrier()
            if self._patience_exhausted():
                self._log(f"early stop: no better validation Dice in the last {self.cfg.patience} validations")
                self.stopped_early = True
                break
        result = {"best_val_dice": self.best, "stopped_early": self.stopped_early, "epochs_run": len(self.history), "epochs": self.epochs, "output": str(self.out), "rank": _rank()}
        if _world() > 1:
            # every rank must hold the same weights after DDP training; record the evidence
            checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters())], dtype=torch.float64)
            gathered = [torch.zeros_like(checksum) for _ in range(_world())]
            dist.all_gather(gathered, checksum)
            result["rank_checksums"] = [float(g) for g in gathered]
            if _rank() == 0:
                atomic_write_text(self.out / "ddp_sync.json", json.dumps({"rank_checksums": result["rank_checksums"]}))
        if _rank() == 0:
            self._log(f"done: best validation Dice {self.best:.4f}")
        return result

    def _init_from_base(self, model: DSDNet, val_cases: list[Case] | None = None) -> None:
        """Backbone weights of the base model (package, run folder or checkpoint); the DSD heads too where the base is
        a checkpoint with heads of the same shapes (and no label mapping), else they start fresh.

        A base with more input channels gives the channels of this task by name (e.g. FLAIR + T1c out of FLAIR, T1,
        T1c, T2): the input layers keep the weights of those channels. A base trained on cases that are this run's
        validation cases (known when the base is a run folder or checkpoint with its split.json) is reported, since
        its validation Dice would then be optimistic."""
        from .models import load_model

        base = load_model(self.cfg.init_from)
        mine = self.net_config.to_dict()
        theirs = base.net_config.to_dict()
        base_state = base.backbones[0].state_dict()
        if base.members:
            self._log(f"the base is an ensemble of {len(base.members)} networks: starting from its first member")
        if theirs["in_channels"] != mine["in_channels"]:
            picks = input_channel_picks(base.preset.channels, self.preset.channels)
            base_state = transfer_input_channels(base_state, _dims_sized_by(base.net_config, "in_channels"), picks)
            theirs = {**theirs, "in_channels": mine["in_channels"]}
            self._log(f"input channels {self.preset.channels} initialised from channels {picks} of the base model's "
                      f"{base.preset.channels}")
        if self.cfg.label_map is not None:
            theirs = {**theirs, "out_channels": mine["out_channels"]}
        if theirs != mine:
            raise ConfigError(f"the base model's network {base.net_config.to_dict()} differs from this run's {mine}")
        if self.cfg.label_map is None:
            model.backbone.load_state_dict(base_state)
            self._init_heads_from_base(model, base.heads_state)
        else:
            from .labelmapping import MappedLabel, transfer_output_layer

            mapping = [MappedLabel(v, "", list(src), "") for v, src in zip(self.preset.label_values, self.cfg.label_map)]
            state = transfer_output_layer(base_state, model.backbone.state_dict(),
                                          _class_dims(self.net_config), mapping, base.preset.label_values)
            model.backbone.load_state_dict(state)
        self._log(f"initialised from {self.cfg.init_from}")
        overlap = sorted(base_training_ids(self.cfg.init_from) & {c.id for c in val_cases or []})
        if overlap:
            message = (f"the base model {self.cfg.init_from} was trained on {len(overlap)} of this run's validation "
                       f"case(s) ({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''}): its validation Dice "
                       "will be optimistic; use the base's split (same --seed and --val-fraction on the same cases)")
            warnings.warn(message, stacklevel=2)
            self._log("warning: " + message)

    def _init_heads_from_base(self, model: DSDNet, heads: dict[str, torch.Tensor] | None) -> None:
        """A base checkpoint whose DSD heads fit this run's (same names and shapes) gives them too, so a continued
        run does not first train fresh heads against a trained backbone; otherwise the heads stay fresh."""
        mine = model.heads.state_dict()
        if heads and heads.keys() == mine.keys() and all(heads[k].shape == mine[k].shape for k in mine):
            model.heads.load_state_dict(heads)
            self._log(f"DSD heads ({len(mine)} tensors) initialised from the base checkpoint")
        elif mine:
            self._log("DSD heads start fresh (the base " + ("has no heads" if not heads else "has other heads") + ")")

    @staticmethod
    def _freeze_encoder(model: DSDNet) -> int:
        """No gradient for the modules the encoder taps read (the encoder stages); returns how many parameters."""
        n = 0
        for tap in model.spec.taps():
            if tap.role == "enc":
                for p in model.backbone.get_submodule(tap.module).parameters():
                    if p.requires_grad:
                        p.requires_grad_(False)
                        n += p.numel()
        return n

    def _patience_exhausted(self) -> bool:
        if not self.cfg.patience:
            return False
        vals = [h["val_dice"] for h in self.history if "val_dice" in h]
        if len(vals) <= self.cfg.patience:
            return False
        best_at = int(np.argmax(vals))
        return len(vals) - 1 - best_at >= self.cfg.patience

    def dsd_config_name(self) -> str:
        return self.cfg.dsd + (f" {self.cfg.dsd_overrides}" if self.cfg.dsd_overrides else "")

    @torch.no_grad()
    def validate(self, model: DSDNet, val_ds: Dataset) -> dict[int, float]:
        """Mean Dice per foreground class over the validation cases (sliding window, preprocessed space)."""
        model.eval()
        k = self.preset.num_classes
        scores = []
        for i, item in enumerate(val_ds):
            x = item["image"][None].to(self.device)
            logits = sliding_window_inference(x, self.net_config.patch_size, self.cfg.sw_batch_size, model,
                                              overlap=self.preset.inference["overlap"], mode=self.preset.inference["blend"])
            pred = logits.argmax(1, keepdim=True).cpu()
            # the functional form: MONAI's DiceMetric object would all-gather across DDP ranks, and only rank 0 validates
            scores.append(compute_dice(one_hot(pred, k), one_hot(item["label"][None].long(), k), include_background=False, ignore_empty=False)[0])
            self.progress.update("validate", i + 1, len(val_ds))
        mean = torch.stack(scores).nanmean(dim=0)
        model.train()
        return {c + 1: float(s) for c, s in enumerate(mean)}

    # ------------------------------------------------------------------------------------------ checkpoints
    def _state(self, model: DSDNet, opt, sched, scaler, epoch: int) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "best": self.best,
            "history": self.history,
            "network": self.net_config.to_dict(),
            "dsd": self.dsd_config.to_dict(),
            "preset": self.preset.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def _load_state(self, model: DSDNet, opt, sched, scaler) -> None:
        from .models import load_checkpoint

        state = load_checkpoint(self.out / "last.pt", map_location=self.device)
        if state.get("version") != CHECKPOINT_VERSION:
            raise InputError(f"{self.out / 'last.pt'}: checkpoint version {state.get('version')} is not supported")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # a run that used no loss scaling saved an empty state
            scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.best = float(state["best"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self._log(f"resumed from epoch {self.start_epoch} (best validation Dice {self.best:.4f})")

    def _plot(self) -> None:
        from .pictures import offscreen_pyplot

        plt = offscreen_pyplot()
        if plt is None:
            return
        ep = [h["epoch"] for h in self.history]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
        ax[0].plot(ep, [h.get("loss/total", math.nan) for h in self.history], label="total")
        ax[0].plot(ep, [h.get("loss/gt/main", math.nan) for h in self.history], label="DiceCE main")
        ax[0].set_xlabel("epoch"), ax[0].set_ylabel("training loss"), ax[0].legend()
        val = [h for h in self.history if "val_dice" in h]
        for name in self.preset.labels.values():
            key = f"val_dice/{name}"
            if val and key in val[0]:
                ax[1].plot([h["epoch"] for h in val], [h[key] for h in val], marker="o", label=name)
        if val:
            ax[1].plot([h["epoch"] for h in val], [h["val_dice"] for h in val], "k--", label="mean")
        ax[1].set_xlabel("epoch"), ax[1].set_ylabel("validation Dice"), ax[1].set_ylim(0, 1)
        if val:
            ax[1].legend(fontsize=8)
        fig.suptitle(f"{self.preset.name}: {self.net_config.backbone}, {self.dsd_config_name()}")
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=self.out)
        os.close(fd)
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        apply_umask(tmp)
        os.replace(tmp, self.out / "curves.png")


def _dims_sized_by(net_config: NetworkConfig, field: str) -> dict[str, list[int]]:
    """Parameter name → the dimensions whose size is ``field`` of the network (``in_channels``: the input layers,
    ``out_channels``: the output layer), found by building the backbone with one more: generic over every backbone."""
    from .networks import DSDNet

    n = getattr(net_config, field)
    a = DSDNet(net_config, DSDConfig.preset("plain")).backbone.state_dict()
    b = DSDNet(NetworkConfig.from_dict({**net_config.to_dict(), field: n + 1}),
               DSDConfig.preset("plain")).backbone.state_dict()
    return {key: [d for d, (x, y) in enumerate(zip(a[key].shape, b[key].shape)) if x != y]
            for key in a if tuple(a[key].shape) != tuple(b[key].shape)}


def _class_dims(net_config: NetworkConfig) -> dict[str, list[int]]:
    return _dims_sized_by(net_config, "out_channels")


def input_channel_picks(base_channels: list[str], channels: list[str]) -> list[int]:
    """Index of each of this task's channels among the base model's, matched by name (case-insensitive)."""
    index = {name.strip().lower(): i for i, name in enumerate(base_channels)}
    missing = [c for c in channels if c.strip().lower() not in index]
    if missing:
        raise ConfigError(f"the base model's inputs {list(base_channels)} lack {missing}: a model with other inputs can "
                          "only be initialised from one whose inputs include each of this task's by name")
    return [index[c.strip().lower()] for c in channels]


def transfer_input_channels(state: dict[str, Any], input_dims: dict[str, list[int]], picks: list[int]) -> dict[str, Any]:
    """``state`` with the input-channel dimensions (``input_dims``, from :func:`_dims_sized_by`) reduced to ``picks``."""
    out = dict(state)
    for key, dims in input_dims.items():
        t = state[key]
        for d in dims:
            t = t.index_select(d, torch.tensor(picks))  # a copy, not a view
        out[key] = t
    return out


def base_training_ids(source: str | Path) -> set[str]:
    """Case ids a base model was trained on, where its run folder's split.json says (else empty)."""
    p = Path(source)
    split = p / "split.json" if p.is_dir() else p.parent / "split.json"
    try:
        return {c["id"] for c in json.loads(split.read_text())["train"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def training_forward(net: torch.nn.Module, x: torch.Tensor, precision: str) -> Any:
    """The forward pass of a training step in ``precision`` (autocast for bf16 / fp16), outputs in fp32 for the loss."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(x.device.type, dtype=dtype, enabled=precision != "fp32"):
        out = net(x)
    return _float(out)


def _float(out: Any) -> Any:
    """Cast autocast (fp16 / bf16) outputs to float32 before the loss."""
    if isinstance(out, torch.Tensor):
        return out.float()
    return out._replace(main=out.main.float(), dec=tuple(t.float() for t in out.dec), enc=tuple(t.float() for t in out.enc))
