"""A few DSD training steps on real MSD hippocampus cases reduce the loss; the CLI smoke run works."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from monai.utils import set_determinism

from DSDSegmentationLib.worker.cli import main as cli_main
from DSDSegmentationLib.engine import DSDConfig, DSDLoss, DSDNet, NetworkConfig
from DSDSegmentationLib.engine.data import list_cases
from DSDSegmentationLib.engine.smoke import case_loader, train_steps


def test_dsd_steps_reduce_loss_on_real_cases(hippocampus_dir: Path) -> None:
    set_determinism(0)
    cases = list_cases(hippocampus_dir, limit=4)
    loader = case_loader(cases, samples=4, seed=0)
    model = DSDNet(NetworkConfig("basicunet", 1, 3, (32, 48, 32)), DSDConfig())
    losses = train_steps(model, loader, steps=24)
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.9 * first, (first, last)
    # every term of the objective was computed on the real batch
    batch = next(iter(loader))
    loss_fn = DSDLoss(model.dsd_config)
    loss_fn(model.train()(batch["image"]), batch["label"])
    assert {"gt/main", "gt/dec1", "kl/dec2", "kl/enc1", "kl_dec", "kl_enc"} <= set(loss_fn.last_terms)


def test_cli_smoke_run(hippocampus_dir: Path, capsys) -> None:
    rc = cli_main(["smoke", "--data", str(hippocampus_dir), "--steps", "6", "--cases", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "eval output identical: True" in out and "smoke run: OK" in out


def test_cli_reports_bad_data_folder(tmp_path: Path, capsys) -> None:
    rc = cli_main(["smoke", "--data", str(tmp_path)])
    assert rc == 2
    assert "has no dataset.json" in capsys.readouterr().err
