"""DSD loss terms against a hand computation on tiny tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from DSDSegmentationLib.engine import DSDConfig, DSDLoss, DSDOutput, pixelwise_kl

SHAPE = (2, 3, 2, 3, 2)  # B, K, x, y, z


def np_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(teacher: torch.Tensor, student: torch.Tensor, t: float) -> float:
    """Σ_c p_t (log p_t − log p_s) per voxel, then the mean over batch and voxels."""
    pt = np_softmax(teacher.detach().double().numpy() / t)
    ps = np_softmax(student.detach().double().numpy() / t)
    return float((pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean())


def make_output(requires_grad: bool = False) -> DSDOutput:
    g = torch.Generator().manual_seed(1)
    r = lambda: torch.randn(*SHAPE, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return DSDOutput(
        main=r(),
        dec=tuple(r() for _ in range(4)),
        enc=tuple(r() for _ in range(4)),
        dec_names=("dec4", "dec3", "dec2", "dec1"),
        enc_names=("enc1", "enc2", "enc3", "enc4"),
    )


@pytest.fixture
def target() -> torch.Tensor:
    return torch.randint(0, 3, (SHAPE[0], 1, *SHAPE[2:]), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("t", [1.0, 3.0, 5.0])
def test_pixelwise_kl_matches_hand_computation(t: float) -> None:
    a, b = torch.randn(*SHAPE), torch.randn(*SHAPE)
    assert float(pixelwise_kl(a, b, t)) == pytest.approx(np_kl(a, b, t), rel=1e-5)
    assert float(pixelwise_kl(a, a, t)) == pytest.approx(0.0, abs=1e-7)


def test_full_dsd_loss_equals_hand_sum(target: torch.Tensor) -> None:
    out = make_output()
    loss_fn = DSDLoss(DSDConfig())  # T = 3, alpha = 1
    total = float(loss_fn(out, target))
    dice_ce = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)
    gt = sum(float(dice_ce(z, target)) for z in (out.main, *out.dec))
    # decoder teacher = dec1 (last, 1/2 resolution) -> dec4, dec3, dec2; encoder teacher = enc4 -> enc1..enc3
    kl_dec = sum(np_kl(out.dec[3], s, 3.0) for s in out.dec[:3])
    kl_enc = sum(np_kl(out.enc[3], s, 3.0) for s in out.enc[:3])
    assert total == pytest.approx(gt + 9.0 * (kl_dec + kl_enc), rel=1e-5)
    terms = loss_fn.last_terms
    assert terms["kl_dec"] == pytest.approx(9.0 * kl_dec, rel=1e-5)
    assert terms["kl_enc"] == pytest.approx(9.0 * kl_enc, rel=1e-5)
    assert set(k for k in terms if k.startswith("gt/")) == {"gt/main", "gt/dec4", "gt/dec3", "gt/dec2", "gt/dec1"}
    assert set(k for k in terms if k.startswith("kl/")) == {f"kl/{n}" for n in ("dec4", "dec3", "dec2", "enc1", "enc2", "enc3")}


def test_temperature_squared_and_weight(target: torch.Tensor) -> None:
    out = make_output()
    only_kl = dict(main_weight=0.0, deep_supervision=False)
    for t, alpha in [(1.0, 1.0), (3.0, 1.0), (3.0, 0.5), (4.0, 2.0)]:
        cfg = DSDConfig(temperature=t, kl_weight=alpha, **only_kl)
        expected = alpha * t * t * sum(
            np_kl(h[3], s, t) for h in (out.dec, out.enc) for s in h[:3]
        )
        assert float(DSDLoss(cfg)(out, target)) == pytest.approx(expected, rel=1e-5)


def test_which_heads_feed_which_term(target: torch.Tensor) -> None:
    out = make_output()
    # encoder heads are in no GT term: changing them leaves the decoder-only loss unchanged
    dec_only = DSDLoss(DSDConfig.preset("decoder"))
    base = float(dec_only(out, target))
    changed = out._replace(enc=tuple(torch.randn(*SHAPE) for _ in range(4)))
    assert float(dec_only(changed, target)) == pytest.approx(base, rel=1e-6)
    # students equal to their teacher: KL terms vanish
    same = out._replace(dec=(out.dec[3],) * 4, enc=(out.enc[3],) * 4)
    loss = DSDLoss(DSDConfig())
    loss(same, target)
    assert loss.last_terms["kl_dec"] == pytest.approx(0, abs=1e-6) and loss.last_terms["kl_enc"] == pytest.approx(0, abs=1e-6)
    # plain: only the main output counts
    plain = DSDLoss(DSDConfig.preset("plain"))
    expected = float(DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)(out.main, target))
    assert float(plain(out, target)) == pytest.approx(expected, rel=1e-6)
    assert float(plain(out.main, target)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_teacher_unless_detached(target: torch.Tensor, detach: bool) -> None:
    out = make_output(requires_grad=True)
    cfg = DSDConfig(main_weight=0.0, deep_supervision=False, detach_teacher=detach)
    DSDLoss(cfg)(out, target).backward()
    for teacher in (out.dec[3], out.enc[3]):
        reached = teacher.grad is not None and float(teacher.grad.abs().sum()) > 0
        assert reached is (not detach)
    assert all(float(s.grad.abs().sum()) > 0 for s in out.dec[:3] + out.enc[:3])


def test_ds_weight_scales_decoder_gt_terms(target: torch.Tensor) -> None:
    out = make_output()
    a = float(DSDLoss(DSDConfig.preset("ds", ds_weight=1.0))(out, target))
    b = float(DSDLoss(DSDConfig.preset("ds", ds_weight=0.5))(out, target))
    dice_ce = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)
    main = float(dice_ce(out.main, target))
    assert a - main == pytest.approx(2 * (b - main), rel=1e-5)


def test_gt_terms_equal_monai_dicece_with_missing_classes() -> None:
    from DSDSegmentationLib.engine.losses import dice_ce_per_output

    logits = [torch.randn(*SHAPE) for _ in range(3)]
    target = torch.zeros(SHAPE[0], 1, *SHAPE[2:], dtype=torch.long)
    target[0, 0, 0, 0, 0] = 2  # class 1 absent everywhere, class 2 absent in sample 1
    ref = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)
    got = dice_ce_per_output(logits, target)
    for g, z in zip(got, logits):
        assert float(g) == pytest.approx(float(ref(z, target)), rel=1e-5)
