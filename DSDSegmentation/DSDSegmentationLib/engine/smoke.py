"""Engine smoke run on real hippocampus MRI: DSD vs plain for a few steps, export, sliding-window inference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    SpatialPadd,
)
from monai.utils import set_determinism

from .config import DSDConfig, NetworkConfig
from .data import find_shared_data, msd_cases
from .losses import DSDLoss
from .networks import DSDNet


def hippocampus_loader(cases: list[dict[str, str]], patch: tuple[int, int, int], samples: int, seed: int) -> DataLoader:
    """Cached loader of random foreground/background crops of real MSD hippocampus cases."""
    tf = Compose([
        LoadImaged(["image", "label"], image_only=True),
        EnsureChannelFirstd(["image", "label"]),
        Orientationd(["image", "label"], axcodes="RAS", labels=None),
        NormalizeIntensityd("image", nonzero=False),
        SpatialPadd(["image", "label"], spatial_size=patch, mode="edge"),
        EnsureTyped("label", dtype=torch.long),
        RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=patch, pos=1, neg=0.1, num_samples=samples),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
    ]).set_random_state(seed)
    ds = CacheDataset(cases, tf, progress=False)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=1, shuffle=True, generator=g, num_workers=0)


def train_steps(model: DSDNet, loader: DataLoader, steps: int, lr: float = 3e-3) -> list[float]:
    """Run ``steps`` AdamW steps of the DSD loss; return the loss of every step."""
    loss_fn = DSDLoss(model.dsd_config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) >= steps:
                break
    return losses


def run_smoke(
    data_dir: str | Path | None = None,
    backbone: str = "basicunet",
    steps: int = 40,
    cases: int = 6,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train DSD and plain for ``steps`` on real cases, export the DSD model, segment a held-out case."""
    root = Path(data_dir) if data_dir else find_shared_data() / "Task04_Hippocampus"
    all_cases = msd_cases(root, limit=cases + 1)
    train_cases, test_case = all_cases[:-1], all_cases[-1]
    patch = (32, 32, 32)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net = NetworkConfig(backbone=backbone, in_channels=1, out_channels=3, patch_size=patch)
    result: dict[str, Any] = {"backbone": backbone, "steps": steps, "train_cases": [Path(c["image"]).name for c in train_cases]}
    log(f"data: {root} ({len(train_cases)} training cases, held-out {Path(test_case['image']).name})")
    for mode in ("plain", "dsd"):
        set_determinism(seed)
        loader = hippocampus_loader(train_cases, patch, samples=4, seed=seed)
        model = DSDNet(net, DSDConfig.preset(mode))
        t0 = time.perf_counter()
        losses = train_steps(model, loader, steps)
        secs = time.perf_counter() - t0
        first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
        log(f"{mode:5s}: params {model.num_parameters()}  loss first5 {first:.3f} -> last5 {last:.3f}  ({secs:.1f} s)")
        result[mode] = {"loss_first5": first, "loss_last5": last, "seconds": secs, "params": model.num_parameters()}
    # export the DSD model and check it is the plain backbone
    exported = model.export_backbone().eval()
    model.eval()
    test = Compose([
        LoadImaged(["image", "label"], image_only=True),
        EnsureChannelFirstd(["image", "label"]),
        Orientationd(["image", "label"], axcodes="RAS", labels=None),
        NormalizeIntensityd("image"),
    ])(test_case)
    x = test["image"].unsqueeze(0).float()
    with torch.no_grad():
        y_model = sliding_window_inference(x, patch, 4, model, overlap=0.25, mode="gaussian")
        y_export = sliding_window_inference(x, patch, 4, exported, overlap=0.25, mode="gaussian")
    same = bool(torch.equal(y_model, y_export))
    pred = y_model.argmax(1, keepdim=True)
    from monai.networks.utils import one_hot

    dice = DiceMetric(include_background=False, reduction="none")(
        one_hot(pred, 3), one_hot(test["label"].unsqueeze(0).long(), 3)
    )[0].tolist()
    n_export = sum(p.numel() for p in exported.parameters())
    log(f"export: {n_export} parameters (backbone {model.num_parameters()['backbone']}); eval output identical: {same}")
    log(f"held-out {Path(test_case['image']).name}: shape {tuple(x.shape[2:])}, Dice anterior {dice[0]:.3f}, posterior {dice[1]:.3f} "
        f"after only {steps} steps")
    result.update({"export_params": n_export, "export_identical": same, "heldout_dice": dice})
    return result
