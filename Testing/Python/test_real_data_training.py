"""A few DSD training steps on real MSD hippocampus cases reduce the loss; the CLI smoke run works."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.utils import set_determinism

from DSDSegmentationLib.worker.cli import main as cli_main
from DSDSegmentationLib.engine import DSDConfig, DSDLoss, DSDNet, NetworkConfig
from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.engine.models import load_checkpoint
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


def test_two_sequence_model_initialised_from_the_four_sequence_one(tmp_path: Path, capsys) -> None:
    """`dsdseg train --init-from`: FLAIR + T1c input weights are channels 0 and 2 of the FLAIR, T1, T1c, T2 model's,
    every other backbone weight is the base's, and so are the DSD heads where they fit; a base trained on this run's
    validation cases is reported; a base without the task's channels is refused by name."""
    from DSDSegmentationLib.engine.models import load_model
    from DSDSegmentationLib.engine.training import _dims_sized_by

    data = find_shared_data() / "BraTS2018_2mm"
    common = ["--data", str(data), "--epochs", "1", "--max-cases", "6", "--max-steps", "1", "--progress", "none",
              "--device", "cpu"]
    assert cli_main(["train", "--task", "brain_tumour", "--output", str(tmp_path / "four"), "--dsd", "dsd", *common]) == 0
    assert cli_main(["train", "--task", "brain_tumour_2seq", "--output", str(tmp_path / "two"), "--init-from",
                str(tmp_path / "four"), "--dsd", "dsd", "--epochs", "1", *common[:2], *common[4:], "--lr", "1e-12"]) == 0
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "initialised from channels [0, 2]" in log and "warning" not in log  # same split: no overlap
    base, new = load_model(tmp_path / "four" / "last.pt"), load_model(tmp_path / "two" / "last.pt")
    assert new.preset.channels == ["FLAIR", "T1c"] and new.net_config.in_channels == 2
    dims = _dims_sized_by(base.net_config, "in_channels")
    assert dims and all(d == [1] for d in dims.values())  # the input convolutions (out, in, kx, ky, kz)
    b, n = base.network.state_dict(), new.network.state_dict()
    for key in dims:  # lr 1e-12: one step leaves the transferred weights as they were
        torch.testing.assert_close(n[key], b[key][:, [0, 2]], atol=1e-6, rtol=0)
    same = [k for k in b if k not in dims and b[k].dtype.is_floating_point]
    assert len(same) > 20 and all(torch.allclose(n[k], b[k], atol=1e-6) for k in same if "running" not in k)
    # the base is a checkpoint with DSD heads of the same shapes: the run starts from them, not from fresh ones
    assert "DSD heads (" in log and "initialised from the base checkpoint" in log
    hb, hn = ({k: v for k, v in load_checkpoint(tmp_path / run / "last.pt")["model"].items()
               if k.startswith("heads.")} for run in ("four", "two"))
    assert hb and hb.keys() == hn.keys() and all(torch.allclose(hn[k], hb[k], atol=1e-6) for k in hb)
    # other heads (deep supervision only: decoder heads, no encoder heads) start fresh, and the log says so
    assert cli_main(["train", "--task", "brain_tumour", "--output", str(tmp_path / "ds"), "--init-from",
                str(tmp_path / "four"), "--dsd", "ds", *common]) == 0
    assert "DSD heads start fresh (the base has other heads)" in (tmp_path / "ds" / "log.txt").read_text()

    # another split (seed 1): the base saw some of this run's validation cases
    with pytest.warns(UserWarning, match="validation case"):
        assert cli_main(["train", "--task", "brain_tumour_2seq", "--output", str(tmp_path / "leak"), "--init-from",
                    str(tmp_path / "four"), "--seed", "1", *common]) == 0
    # a base without FLAIR / T1c
    hippo = tmp_path / "hippo"
    assert cli_main(["train", "--task", "hippocampus", "--data", str(find_shared_data() / "Task04_Hippocampus"),
                "--output", str(hippo), *common[2:]]) == 0
    assert cli_main(["train", "--task", "brain_tumour_2seq", "--output", str(tmp_path / "bad"), "--init-from", str(hippo),
                *common]) != 0
    assert "lack ['FLAIR', 'T1c']" in capsys.readouterr().err
