"""Bad configuration and bad inputs raise clear errors naming the problem."""

from __future__ import annotations

import pytest
import torch

from DSDSegmentationLib.engine import ConfigError, DSDConfig, DSDNet, InputError, NetworkConfig


@pytest.mark.parametrize(
    "net,match",
    [
        (NetworkConfig("resnet"), r"unknown backbone 'resnet'; available: basicunet, dynunet, swinunetr, unetr, vnet"),
        (NetworkConfig("basicunet", patch_size=(32, 40, 32)), r"patch size \(32, 40, 32\) is not divisible by \(16, 16, 16\)"),
        (NetworkConfig("swinunetr", patch_size=(48, 64, 64)), r"not divisible by \(32, 32, 32\).*swinunetr"),
        (NetworkConfig("basicunet", out_channels=1), r"number of classes K.*>= 2, got 1"),
        (NetworkConfig("basicunet", in_channels=0), r"in_channels must be an integer >= 1, got 0"),
        (NetworkConfig("vnet", in_channels=3), r"VNet needs in_channels that divides 16"),
        (NetworkConfig("dynunet", options={"filters": (8, 16, 32), "strides": (1, 2)}), r"3 filters but 2 strides"),
        (NetworkConfig("dynunet", options={"filters": (8, 16), "strides": (1, 2)}), r"at least 3 levels"),
        (NetworkConfig("unetr", options={"hidden_size": 100, "num_heads": 12}), r"hidden_size 100 must be divisible by num_heads 12"),
        (NetworkConfig("swinunetr", patch_size=(64, 64, 64), options={"feature_size": 16}), r"multiple of 12"),
        (NetworkConfig("basicunet", options={"filters": (1, 2)}), r"unknown option\(s\) \['filters'\] for backbone 'basicunet'"),
        (NetworkConfig("dynunet", patch_size=(32, 32, 12), options={"strides": (1, 2, 2, 2, (2, 2, 1))}), r"divisible by \(16, 16, 8\)"),
    ],
)
def test_bad_network_config(net: NetworkConfig, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DSDNet(net)


def test_bad_dsd_config() -> None:
    with pytest.raises(ConfigError, match="upsample must be one of"):
        DSDConfig(upsample="nearest")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        DSDConfig(temperature=0)
    with pytest.raises(ConfigError, match="kl_weight must be >= 0"):
        DSDConfig(kl_weight=-1)
    with pytest.raises(ConfigError, match="unknown DSD preset 'full'"):
        DSDConfig.preset("full")
    with pytest.raises(ConfigError, match=r"unknown DSDConfig key\(s\) \['temp'\]"):
        DSDConfig.from_dict({"temp": 3})


def test_bad_inputs_at_training_time() -> None:
    model = DSDNet(NetworkConfig("basicunet", 2, 3, (32, 32, 32))).train()
    with pytest.raises(InputError, match=r"expects 2 input channel\(s\), got 1"):
        model(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(InputError, match=r"spatial size \(32, 32, 20\) is not divisible"):
        model(torch.randn(1, 2, 32, 32, 20))
    with pytest.raises(InputError, match="expected a 5D tensor"):
        model(torch.randn(2, 32, 32, 32))


def test_config_round_trip() -> None:
    net = NetworkConfig("dynunet", 2, 4, (64, 64, 32), {"strides": [1, 2, 2, 2, [2, 2, 1]]})
    assert NetworkConfig.from_dict(net.to_dict()) == net
    dsd = DSDConfig.preset("decoder", temperature=2.0)
    assert DSDConfig.from_dict(dsd.to_dict()) == dsd


def test_preset_blocks_are_typed_and_label_values_may_have_gaps() -> None:
    import json as _json

    import numpy as _np

    from DSDSegmentationLib.engine.errors import ConfigError as _CE
    from DSDSegmentationLib.engine.tasks import PRESET_DIR, TRAINING_DEFAULTS, TaskPreset, load_preset

    base = _json.loads((PRESET_DIR / "hippocampus.json").read_text())
    for block, key, value, match in (("training", "batchsize", 4, r"unknown key\(s\) \['batchsize'\]"),
                                     ("inference", "overlapp", 0.5, r"unknown key\(s\) \['overlapp'\]"),
                                     ("training", "epochs", "many", "'epochs' must be a int"),
                                     ("training", "epochs", 0, "'epochs' must be at least 1"),
                                     ("inference", "overlap", 1.0, r"'overlap' must be in \[0, 1\)")):
        d = _json.loads(_json.dumps(base))
        d[block][key] = value
        with pytest.raises(_CE, match=match):
            TaskPreset.from_dict(d)
    d = _json.loads(_json.dumps(base))
    d["training"]["augment"] = {"gamma": 0.3, "bais_field": 0.2}
    with pytest.raises(_CE, match=r"training.augment: unknown key\(s\) \['bais_field'\]"):
        TaskPreset.from_dict(d)
    p = TaskPreset.from_dict({**base, "training": {}})
    assert p.training["epochs"] == TRAINING_DEFAULTS["epochs"], "defaults come from one place"
    tumour = load_preset("brain_tumour")
    assert tumour.label_values == [0, 1, 2, 4] and tumour.num_classes == 4
    values = _np.array([[0, 1], [2, 4]])
    classes = tumour.values_to_classes(values)
    assert classes.tolist() == [[0, 1], [2, 3]]
    assert tumour.classes_to_values(classes).tolist() == values.tolist()
    assert tumour.regions["whole tumour (WT)"] == [1, 2, 4]
    with pytest.raises(_CE, match="region 'x' must list foreground label values"):
        TaskPreset.from_dict({**tumour.to_dict(), "regions": {"x": [3]}})
