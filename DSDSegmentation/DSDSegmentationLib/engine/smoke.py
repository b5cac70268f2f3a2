"""Engine smoke run on real hippocampus MRI: DSD vs plain for a few steps, export, sliding-window inference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.utils import set_determinism

from .config import DSDConfig
from .data import Case, find_shared_data, list_cases
from .losses import DSDLoss
from .networks import DSDNet
from .tasks import load_preset
from .transforms import training_transforms, validation_transforms


def case_loader(cases: list[Case], samples: int, seed: int, task: str = "hippocampus") -> DataLoader:
    """Cached loader of random crops of real cases through the task's training transforms."""
    cached, random = training_transforms(load_preset(task), samples)
    random.set_random_state(seed)
    base = CacheDataset([{"image": c.images, "label": c.label} for c in cases], cached, progress=False)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(Dataset(base, random), batch_size=1, shuffle=True, generator=g, collate_fn=list_data_collate)


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
    all_cases = list_cases(root, limit=cases + 1)
    train_cases, test_case = all_cases[:-1], all_cases[-1]
    preset = load_preset("hippocampus")
    net = preset.network_config(backbone=backbone, options={})
    result: dict[str, Any] = {"backbone": backbone, "steps": steps, "train_cases": [c.id for c in train_cases]}
    log(f"data: {root} ({len(train_cases)} training cases, held-out {test_case.id})")
    for mode in ("plain", "dsd"):
        set_determinism(seed)
        model = DSDNet(net, DSDConfig.preset(mode))
        t0 = time.perf_counter()
        losses = train_steps(model, case_loader(train_cases, samples=4, seed=seed), steps)
        secs = time.perf_counter() - t0
        first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
        log(f"{mode:5s}: params {model.num_parameters()}  loss first5 {first:.3f} -> last5 {last:.3f}  ({secs:.1f} s)")
        result[mode] = {"loss_first5": first, "loss_last5": last, "seconds": secs, "params": model.num_parameters()}
    exported = model.export_backbone().eval()
    model.eval()
    test = validation_transforms(preset)({"image": test_case.images, "label": test_case.label})
    x = test["image"][None].float()
    with torch.no_grad():
        y_model = sliding_window_inference(x, net.patch_size, 4, model, overlap=0.25, mode="gaussian")
        y_export = sliding_window_inference(x, net.patch_size, 4, exported, overlap=0.25, mode="gaussian")
    same = bool(torch.equal(y_model, y_export))
    dice = compute_dice(one_hot(y_model.argmax(1, keepdim=True), 3), one_hot(test["label"][None].long(), 3),
                        include_background=False)[0].tolist()
    n_export = sum(p.numel() for p in exported.parameters())
    log(f"export: {n_export} parameters (backbone {model.num_parameters()['backbone']}); eval output identical: {same}")
    log(f"held-out {test_case.id}: shape {tuple(x.shape[2:])}, Dice anterior {dice[0]:.3f}, posterior {dice[1]:.3f} "
        f"after only {steps} steps")
    result.update({"export_params": n_export, "export_identical": same, "heldout_dice": dice})
    return result
