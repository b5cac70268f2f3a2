"""Inference: preprocess as in training, sliding window (gaussian blending), optional flip TTA, back onto the
input grid exactly (same shape and affine as the input file), argmax labels."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from .errors import Cancelled, InputError
from .io import load_channels, permute_axes, save_image, save_labelmap
from .models import LoadedModel, load_model
from .postprocess import keep_largest_component
from .registration_check import misregistration_notes
from .progress import Progress
from .sequence_check import check_order
from .training import resolve_device
from .transforms import inference_transforms

STITCH_ON_GPU_MAX_BYTES = 2 << 30  # above this, sliding-window outputs are accumulated in CPU memory


SPACING_RANGE_MM = (0.01, 50.0)  # outside this no scanner volume exists; 1000 mm or 1e-4 mm is a broken header


def check_predict_options(device: str, overlap: float | None, sw_batch_size: int) -> None:
    """Refuse inference options that cannot work, before any model is loaded."""
    resolve_device(device)
    if overlap is not None and not 0.0 <= float(overlap) < 1.0:
        raise InputError(f"--overlap must be in [0, 1) (a fraction of the window), got {overlap}")
    if int(sw_batch_size) < 1:
        raise InputError(f"--sw-batch-size must be at least 1, got {sw_batch_size}")


def check_geometry(affine: np.ndarray, what: str) -> None:
    """A voxel→RAS affine the pipeline can use: finite, invertible, voxel sizes within a sane range."""
    m = np.asarray(affine, dtype=float)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputError(f"{what}: the image geometry (affine) has non-finite values")
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing == 0) or abs(np.linalg.det(m[:3, :3])) < 1e-6 * float(np.prod(spacing)):
        raise InputError(f"{what}: the image geometry is degenerate (voxel spacing {spacing.round(6).tolist()} mm, "
                         "a zero or collinear axis); fix the file's header")
    lo, hi = SPACING_RANGE_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise InputError(f"{what}: voxel spacing {[float(f'{v:.6g}') for v in spacing]} mm is outside {lo:g}–{hi:g} mm; "
                         "the file's header is probably wrong (check its units and pixdim)")


def check_input_image(image: np.ndarray, n_channels: int, what: str, names: list[str] | None = None,
                      one_file: bool = False) -> None:
    """Clear errors for images the model cannot segment (``names``: the model's input names, for the messages;
    ``one_file``: the channels came from one 4D file, which for a one-input model is most likely a series of frames)."""
    if image.shape[0] != n_channels:
        listed = f" ({', '.join(names)})" if names else ""
        hint = (f"; a 4D series of {image.shape[0]} frames (a cine)? `dsdseg predict --frames` segments each frame"
                if n_channels == 1 and one_file else "")
        raise InputError(f"{what}: {image.shape[0]} channel(s) given, the model expects {n_channels}{listed}{hint}")
    if any(s < 2 for s in image.shape[1:]):
        raise InputError(f"{what}: shape {image.shape[1:]} is not a 3D volume (a 2D image?)")
    if not np.all(np.isfinite(image)):
        raise InputError(f"{what}: the image contains NaN or infinite values")
    for c in range(image.shape[0]):
        if float(image[c].max()) == float(image[c].min()):
            raise InputError(f"{what}: channel {c} has constant intensity {float(image[c].min())}; nothing to segment")
    name = (lambda c: f"'{names[c]}'") if names else (lambda c: f"channel {c}")
    for a in range(image.shape[0]):
        for b in range(a + 1, image.shape[0]):
            if np.array_equal(image[a], image[b]):
                raise InputError(f"{what}: inputs {name(a)} and {name(b)} are the same image; each input must be its "
                                 "own sequence (the same volume was picked twice?)")


GPU_TYPES = ("cuda", "mps")  # devices whose memory can run out under another program: fall back to the CPU


def gpu_out_of_memory(exc: BaseException) -> bool:
    """A GPU ran out of memory: torch's OutOfMemoryError (CUDA, and Metal in recent torch), the same re-raised as a
    RuntimeError caused by it (MONAI's sliding window does that), or Metal's "MPS backend out of memory"."""
    for e in (exc, exc.__cause__):
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError) and "MPS backend out of memory" in str(e):
            return True
    return False


def empty_gpu_cache(device: torch.device | None = None) -> None:
    """Give the allocator's cached blocks back after an out-of-memory (on the GPU that ran out)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(device, "type", None) == "mps" and torch.backends.mps.is_available():
        torch.mps.empty_cache()


class Predictor:
    """Segments volumes with one loaded model; keep it to segment more volumes without reloading."""

    def __init__(self, model: str | Path | LoadedModel, device: str = "auto", overlap: float | None = None,
                 sw_batch_size: int = 4, tta: bool = False, progress: Progress | None = None):
        check_predict_options(device, overlap, sw_batch_size)
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.device = resolve_device(device)
        self.notes: list[str] = []
        try:
            self.network = self._to(self.model.network, self.device).eval()
        except RuntimeError as exc:  # a GPU that another program fills: the CPU, said once
            if not gpu_out_of_memory(exc):
                raise
            empty_gpu_cache(self.device)
            self.device = torch.device("cpu")
            self.network = self.model.network.cpu().eval()
            self.notes.append("GPU out of memory while loading the model: running on the CPU")
        self.overlap = self.model.preset.inference["overlap"] if overlap is None else overlap
        self.sw_batch_size = sw_batch_size
        self.tta = tta
        self.progress = progress or Progress("none")
        self.transforms = inference_transforms(self.model.preset)
        # asked between sliding-window batches and before anything is written: True stops the run (Cancelled),
        # so a warm worker cancels one request without being killed
        self.should_stop: Callable[[], bool] | None = None

    def check_stop(self) -> None:
        """Raise Cancelled when ``should_stop`` says so (between batches, before writing, between cases)."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("cancelled by the user")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_stop()
        return self.network(x)

    @staticmethod
    def _to(obj, device: torch.device):
        """Every move onto the GPU goes through here (one place where a GPU out-of-memory can start)."""
        return obj.to(device)

    def _window(self, x: torch.Tensor, sw_device: torch.device, stitch: torch.device) -> torch.Tensor:
        return sliding_window_inference(x, self.model.net_config.patch_size, self.sw_batch_size, self._forward,
                                        overlap=self.overlap, mode=self.model.preset.inference["blend"], sw_device=sw_device, device=stitch,
                                        progress=False)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (1, K, ...) on CPU from the input ``x`` on the CPU; a GPU (CUDA or Metal) out of memory,
        from moving the input onto the GPU on, → CPU stitching (windows still on the GPU) → all on the CPU."""
        flips = [()] + ([c for r in (1, 2, 3) for c in itertools.combinations((2, 3, 4), r)] if self.tta else [])
        cpu = torch.device("cpu")
        attempts = [(self.device, self.device)]
        if self.device.type in GPU_TYPES:
            # windows run on the GPU; the full-volume probability map is stitched on the CPU when it is large
            out_bytes = 4 * self.model.preset.num_classes * x[0, 0].numel() * 2  # output + blending weights
            if out_bytes > STITCH_ON_GPU_MAX_BYTES:
                attempts = []
            attempts += [(self.device, cpu), (cpu, cpu)]
        for i, (sw_dev, stitch) in enumerate(attempts):
            try:
                if self.device.type in GPU_TYPES:  # back onto the GPU after an earlier request fell back to the CPU
                    self.network = self._to(self.network, sw_dev)
                xd = self._to(x, stitch)  # the volume lives where it is stitched; windows go to sw_dev
                acc = None
                for j, axes in enumerate(flips):
                    xi = torch.flip(xd, axes) if axes else xd
                    with torch.no_grad():
                        p = torch.softmax(self._window(xi, sw_dev, stitch).float(), dim=1)
                    p = torch.flip(p, axes) if axes else p
                    acc = p if acc is None else acc + p
                    self.progress.update("predict", j + 1, len(flips))
                assert acc is not None
                return (acc / len(flips)).cpu()
            except RuntimeError as exc:
                if not gpu_out_of_memory(exc):
                    raise
                xd = acc = None  # noqa: F841 (let the GPU copies go before retrying)
                empty_gpu_cache(self.device)
                if i + 1 == len(attempts):
                    raise
                nxt = attempts[i + 1]
                note = ("GPU out of memory: retrying with stitching on the CPU" if nxt[0].type in GPU_TYPES
                        else "GPU out of memory: retrying on the CPU")
                self.notes.append(note)
                self.progress.log(note)
        raise AssertionError("unreachable")

    def predict(self, images: list[str] | str, uncertainty: bool = False):
        """Labels (x, y, z) uint8 on the input's grid and the input's affine; with ``uncertainty`` also a float32
        map on the same grid: the entropy of the (flip-TTA averaged) class probabilities divided by log K, 0 where
        the model is certain, 1 where all classes are equally likely."""
        paths = [images] if isinstance(images, (str, Path)) else [str(p) for p in images]
        what = f"input {Path(paths[0]).name}"
        raw, affine = load_channels(paths, what=what, resample=True, notes=self.notes)
        check_input_image(raw, len(self.model.preset.channels), what, list(self.model.preset.channels),
                          one_file=len(paths) == 1)
        check_geometry(affine, what)
        channels = list(self.model.preset.channels)
        order_note = check_order(raw, self.model.card.get("input_check"), channels,
                                 given=[Path(p).name for p in paths] if len(paths) == len(channels) else None)
        if order_note:
            self.notes.append(order_note)
            self.progress.log(order_note)
        for note in misregistration_notes(raw, affine, channels):  # a further sequence off against the first
            self.notes.append(note)
            self.progress.log(note)
        input_affine, order = affine, self.model.preset.slice_axis_order(affine)
        if order is not None:  # slices along another axis than the model's slice axis: given to it in its order
            raw, affine = permute_axes(raw, affine, order)
            spacing = np.linalg.norm(input_affine[:3, :3], axis=0)
            note = (f"{what}: its slices ({spacing.max():.3g} mm apart) lie along array axis {int(spacing.argmax())}; the "
                    "model was given them along its own slice axis and the result put back on the input's grid")
            self.notes.append(note)
            self.progress.log(note)
        loaded = MetaTensor(torch.from_numpy(raw), affine=torch.as_tensor(affine, dtype=torch.float64),
                            meta={"filename_or_obj": paths[0]})
        data = self.transforms({"image": loaded})
        img: MetaTensor = data["image"]
        probs = self._probabilities(img.as_tensor()[None].float())
        inv = probs[0]
        if img.applied_operations:  # orientation / spacing / crop to undo
            pred = MetaTensor(probs[0], meta=dict(img.meta), applied_operations=list(img.applied_operations))
            inv = self.transforms.inverse({"image": pred})["image"]
        inv = torch.as_tensor(inv)
        labels = self.model.preset.classes_to_values(inv.argmax(0).numpy())
        if labels.shape != raw.shape[1:]:
            raise RuntimeError(f"internal error: inverted prediction has shape {labels.shape}, input {raw.shape[1:]}")
        if self.model.preset.postprocessing:  # as the card says (measured to help that model)
            labels = keep_largest_component(labels, self.model.preset.postprocessing)
        back = tuple(np.argsort(order)) if order is not None else (0, 1, 2)
        labels = np.ascontiguousarray(labels.transpose(back))
        if not uncertainty:
            return labels, input_affine
        p = inv.float().clamp_min(1e-8)
        p = p / p.sum(0, keepdim=True)  # resampling back to the input grid may blur the sums slightly
        entropy = -(p * p.log()).sum(0) / float(np.log(p.shape[0]))
        return labels, input_affine, np.ascontiguousarray(entropy.clamp(0, 1).numpy().astype(np.float32).transpose(back))

    def predict_to_file(self, images: list[str] | str, output: str | Path, uncertainty_output: str | Path | None = None) -> Path:
        first = images if isinstance(images, (str, Path)) else images[0]
        if uncertainty_output:
            labels, affine, unc = self.predict(images, uncertainty=True)
            self.check_stop()
            save_image(unc, affine, uncertainty_output, reference=first)
        else:
            labels, affine = self.predict(images)
            self.check_stop()
        return save_labelmap(labels, affine, output, reference=first)


def predict_cases(predictor: Predictor, cases: list[tuple[str, list[str]]], out_dir: Path, ext: str = ".nii.gz",
                  on_case: Callable[[str, Path], None] | None = None) -> list[Path]:
    """Segment many cases; one output file per case id, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return predict_each(predictor, [(cid, images, out_dir / f"{cid}{ext}") for cid, images in cases], on_case)


def predict_each(predictor: Predictor, items: list[tuple[str, list[str], str | Path]],
                 on_case: Callable[[str, Path], None] | None = None) -> list[Path]:
    """Segment (name, images, output) in order with one progress bar over them (named by each case), stopping between
    and within cases when the predictor is told to; each output written atomically."""
    from .progress import only_stages

    written = []
    with only_stages(predictor) as progress:
        for i, (name, images, output) in enumerate(items):
            predictor.check_stop()
            path = predictor.predict_to_file(images, output)
            written.append(path)
            progress.update("cases", i + 1, len(items), name)
            if on_case:
                on_case(name, path)
    return written
