"""DSDNet on every backbone: training output structure, eval output, head sharing, parameter counts."""

from __future__ import annotations

import pytest
import torch

from DSDSegmentationLib.engine import ConfigError, DSDConfig, DSDNet, DSDOutput, NetworkConfig
from DSDSegmentationLib.engine.networks import BACKBONES, upsample_steps

K = 3
# small but real configurations of each backbone, with non-cubic patches
CASES = {
    "basicunet": ((16, 32, 48), {}),
    "dynunet": ((16, 32, 48), {"filters": (8, 16, 32, 64, 96)}),
    "dynunet_aniso": ((32, 32, 8), {"filters": (8, 16, 32, 64, 96), "strides": (1, (2, 2, 1), 2, 2, (2, 2, 1))}),
    "unetr": ((16, 32, 48), {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "feature_size": 8}),
    "swinunetr": ((32, 64, 32), {"feature_size": 12}),
    "vnet": ((16, 32, 48), {}),
}
SHARED = {"basicunet": True, "dynunet": True, "dynunet_aniso": True, "unetr": False, "swinunetr": True, "vnet": False}


def make(key: str, in_ch: int, dsd: DSDConfig | None = None) -> DSDNet:
    patch, opts = CASES[key]
    return DSDNet(NetworkConfig(key.split("_")[0], in_ch, K, patch, opts), dsd or DSDConfig())


def test_every_registered_backbone_is_covered() -> None:
    assert {k.split("_")[0] for k in CASES} == set(BACKBONES)


@pytest.mark.parametrize("key", list(CASES))
@pytest.mark.parametrize("in_ch", [1, 2, 3, 4])
def test_train_and_eval_outputs(key: str, in_ch: int) -> None:
    if key == "vnet" and in_ch == 3:
        with pytest.raises(ConfigError, match="VNet needs in_channels that divides 16"):
            make(key, in_ch)
        return
    model = make(key, in_ch)
    patch = CASES[key][0]
    x = torch.randn(2, in_ch, *patch)
    out = model.train()(x)
    assert isinstance(out, DSDOutput)
    assert out.dec_names == ("dec4", "dec3", "dec2", "dec1")
    assert out.enc_names == ("enc1", "enc2", "enc3", "enc4")
    for t in (out.main, *out.dec, *out.enc):
        assert t.shape == (2, K, *patch)
        assert torch.isfinite(t).all()
    assert out.dec_teacher is out.dec[-1] and out.enc_teacher is out.enc[-1]
    assert len(out.as_reference_tuple()) == 9
    # heads shared between encoder and decoder stages of equal resolution, as the reference does per backbone
    assert len(model.heads) == (5 if SHARED[key] else 8)
    if SHARED[key]:
        assert model.head_of["enc4"] == model.head_of["dec3"]  # encoder teacher's head is dec3's head
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, K, *patch)


@pytest.mark.parametrize("key", ["basicunet", "dynunet", "unetr", "vnet", "swinunetr"])
def test_eval_is_bitwise_the_plain_backbone(key: str) -> None:
    model = make(key, 1)
    x = torch.randn(1, 1, *CASES[key][0])
    plain = model.spec.build()
    plain.load_state_dict(model.backbone.state_dict())
    model.eval(), plain.eval()
    calls = []
    for head in model.heads.values():
        head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        exported = model.export_backbone().eval()
        assert torch.equal(exported(x), plain(x))
    assert calls == [], "heads must not run in eval mode"
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in exported.parameters()) == n_plain
    assert set(exported.state_dict()) == set(plain.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in exported.modules())
    model.train()(x)  # hooks live only during a training forward
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.backbone.modules())
    counts = model.num_parameters()
    assert counts["backbone"] == n_plain and counts["heads"] > 0


def _head_params(backbone: str, k: int, patch: tuple, opts: dict) -> int:
    return DSDNet(NetworkConfig(backbone, 1, k, patch, opts)).num_parameters()["heads"]


@pytest.mark.parametrize(
    "backbone,k,patch,opts,expected",
    [
        # head parameter counts of the reference code's configurations (DSD_METHOD.md, table in 1.2)
        ("dynunet", 4, (128,) * 3, {"filters": (16, 32, 64, 128, 256)}, 2552),
        ("dynunet", 8, (96,) * 3, {"filters": (32, 64, 128, 256, 320)}, 8592),
        ("swinunetr", 4, (128,) * 3, {"feature_size": 12}, 1336),
        ("swinunetr", 8, (96,) * 3, {"feature_size": 36}, 6800),
        ("unetr", 4, (128,) * 3, {"feature_size": 16}, 5904),
        ("unetr", 8, (96,) * 3, {"feature_size": 32}, 17344),
        ("vnet", 4, (128,) * 3, {}, 4752),
    ],
)
def test_head_parameters_match_reference(backbone: str, k: int, patch: tuple, opts: dict, expected: int) -> None:
    assert _head_params(backbone, k, patch, opts) == expected


def test_upsample_steps() -> None:
    assert upsample_steps((1, 1, 1)) == [(1, 1, 1)]
    assert upsample_steps((8, 8, 8)) == [(2, 2, 2)] * 3
    assert upsample_steps((8, 8, 2)) == [(2, 2, 2), (2, 2, 1), (2, 2, 1)]
    assert upsample_steps((3, 3, 1)) == [(3, 3, 1)]


@pytest.mark.parametrize("mode", ["deconv_shared", "deconv", "trilinear"])
def test_upsample_modes(mode: str) -> None:
    model = make("basicunet", 1, DSDConfig(upsample=mode))
    out = model.train()(torch.randn(1, 1, *CASES["basicunet"][0]))
    assert all(t.shape[2:] == out.main.shape[2:] for t in out.dec + out.enc)
    head = model.heads[model.head_of["dec4"]]  # 1/16: 4 steps of 2x
    n_deconv = len(head.ups)
    assert n_deconv == {"deconv_shared": 1, "deconv": 4, "trilinear": 0}[mode]


def test_anisotropic_shared_deconv_has_one_module_per_step_shape() -> None:
    model = make("dynunet_aniso", 1)
    head = model.heads[model.head_of["dec4"]]  # scale (16, 16, 4): steps 2x2x2 twice then 2x2x1 twice
    assert head.scale == (16, 16, 4)
    assert len(head.ups) == 2 and head.order == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "preset,n_dec,n_enc",
    [("plain", 0, 0), ("ds", 4, 0), ("decoder", 4, 0), ("encoder", 0, 4), ("dsd", 4, 4)],
)
def test_presets_build_only_needed_heads(preset: str, n_dec: int, n_enc: int) -> None:
    model = make("basicunet", 1, DSDConfig.preset(preset))
    x = torch.randn(1, 1, *CASES["basicunet"][0])
    out = model.train()(x)
    if preset == "plain":
        assert isinstance(out, torch.Tensor) and not model.has_heads
        return
    assert (len(out.dec), len(out.enc)) == (n_dec, n_enc)


def test_share_heads_flag_overrides_backbone_default() -> None:
    assert len(make("dynunet", 1, DSDConfig(share_heads=False)).heads) == 8
    assert len(make("unetr", 1, DSDConfig(share_heads=True)).heads) == 5
    # VNet's decoder stages are wider than its encoder stages at equal resolution: nothing can be shared
    assert len(make("vnet", 1, DSDConfig(share_heads=True)).heads) == 8


@pytest.mark.parametrize("mode", ["deconv_shared", "deconv", "trilinear"])
@pytest.mark.parametrize("scale", [(1, 1, 1), (2, 2, 2), (8, 8, 2), (16, 16, 16), (4, 4, 1)])
def test_fast_head_path_equals_monai_modules(mode: str, scale: tuple) -> None:
    from DSDSegmentationLib.engine.networks import DSDHead

    head = DSDHead(8, 3, scale, mode)
    x = torch.randn(2, 8, *[32 // s for s in scale], requires_grad=True)
    fast, ref = head(x), head.forward_modules(x)
    assert fast.shape == ref.shape == (2, 3, 32, 32, 32)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, *head.parameters()])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, *head.parameters()])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
