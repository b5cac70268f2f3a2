"""Are a multi-sequence case's inputs registered? An estimate of each further sequence's displacement against the first.

A four-sequence tumour model loses its enhancing tumour quickly when the T1c is off against FLAIR (measured with
``Testing/Benchmarks/bench_misregistration.py``: −4 Dice points at 1 mm, −14 at 2 mm, −30 at 4 mm). The inputs are
already on the first one's grid (``io.load_channels``); here each further one's image edges (gradient magnitude inside
the head, which different MRI contrasts share) are cross-correlated with the first one's over all shifts at once (FFT)
on a grid of about 2 mm, and the peak, refined to sub-voxel by a parabola per axis, is the displacement. On the
registered BraTS 2018 cases it reads 0.0–0.5 mm; a note is given from ``WARN_MM``.
"""

from __future__ import annotations

import numpy as np

WARN_MM = 1.5  # below: registered as far as this estimate can tell (it reads up to ~0.5 mm on registered data)
MAX_VOXELS = 3  # the search reaches this many (about 2 mm) voxels each way: a larger offset reads as "at least"


def _edges(volume: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    v = volume.astype(np.float32)
    mask = v != v.flat[0]  # the head: whatever differs from the corner's background value
    g = np.sqrt(sum(ndimage.sobel(v, axis=i) ** 2 for i in range(3)))
    inside = g[mask]
    if inside.size < 1000 or float(inside.std()) == 0.0:
        return np.zeros_like(g)
    return np.where(mask, (g - inside.mean()) / inside.std(), 0.0).astype(np.float32)


def displacement_mm(first: np.ndarray, other: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, bool]:
    """``other``'s displacement against ``first`` (same grid, axes x, y, z of the array) in mm per array axis, and
    whether it reached the edge of the search (then the true offset is at least that large)."""
    spacing = np.asarray(spacing, float)
    step = np.maximum(1, np.round(2.0 / spacing)).astype(int)  # about 2 mm voxels: enough for a >= 1 mm question
    sl = tuple(slice(None, None, int(s)) for s in step)
    a, b = _edges(first[sl]), _edges(other[sl])
    if not a.any() or not b.any() or min(a.shape) < 4 * MAX_VOXELS:  # no edges, or too thin to search: no estimate
        return np.zeros(3), False
    corr = np.fft.irfftn(np.fft.rfftn(a) * np.conj(np.fft.rfftn(b)), s=a.shape)  # corr[d] = sum_x a(x + d) b(x)
    r = MAX_VOXELS
    # the shifts -r..r on each axis as a cube (negative shifts wrap around, as the FFT's correlation does)
    cube = np.roll(corr, (r, r, r), axis=(0, 1, 2))[: 2 * r + 1, : 2 * r + 1, : 2 * r + 1]
    peak = np.array(np.unravel_index(int(np.argmax(cube)), cube.shape))
    out, edge = (peak - r).astype(float), False
    for ax in range(3):
        if peak[ax] in (0, 2 * r):
            edge = True
            continue
        e = np.eye(3, dtype=int)[ax]
        y0, y1, y2 = cube[tuple(peak - e)], cube[tuple(peak)], cube[tuple(peak + e)]
        den = y0 - 2 * y1 + y2
        out[ax] += 0.5 * (y0 - y2) / den if den < 0 else 0.0
    return -out * step * spacing, edge  # the peak is where other, moved back, meets first


def misregistration_notes(image: np.ndarray, affine: np.ndarray, channels: list[str]) -> list[str]:
    """For a multi-sequence case (channels first, all on the first one's grid): a note for each further sequence that
    appears displaced by ``WARN_MM`` or more against the first, in mm along the array axes."""
    if image.shape[0] < 2:
        return []
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    notes = []
    for c in range(1, image.shape[0]):
        d, edge = displacement_mm(image[0], image[c], spacing)
        size = float(np.linalg.norm(d))
        if size >= WARN_MM:
            notes.append(f"{channels[c]} appears displaced against {channels[0]} by {'at least ' if edge else ''}"
                         f"{size:.1f} mm (along the array axes {d[0]:+.1f}, {d[1]:+.1f}, {d[2]:+.1f} mm): the "
                         "sequences look unregistered, and the regions read from it suffer (for the tumour models, "
                         "enhancing tumour −14 Dice points at 2 mm); register them (e.g. General Registration (BRAINS), "
                         "rigid) and segment again")
    return notes
