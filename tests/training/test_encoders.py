"""Encoders: every name builds, gives unit-norm embeddings, works channels_last, loads weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from training.encoders import EncoderWeightsError, create_encoder, list_encoders

ALL = list_encoders()


def test_registry_names() -> None:
    assert set(ALL) >= {
        "resnet9",
        "resnet9_half",
        "covidnet",
        "sepconv",
        "resnet18",
        "resnet50",
        "densenet121",
    }


@pytest.mark.parametrize("name", ALL)
def test_every_encoder_gives_unit_norm_embeddings(name: str) -> None:
    torch.manual_seed(0)
    encoder = create_encoder(name, embedding_dim=24).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y = encoder(x)
        y_cl = encoder.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)
        )
    assert y.shape == (2, 24)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(y_cl, y, atol=1e-4, rtol=1e-4)
    # Grad-CAM explains the last feature map: forward is exactly head(features).
    with torch.no_grad():
        feats = encoder.forward_features(x)
        assert feats.ndim == 4 and feats.shape[:2] == (2, encoder.feature_dim)
        torch.testing.assert_close(encoder.embed_features(feats), y)


def test_unknown_encoder_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown encoder 'vgg'") as info:
        create_encoder("vgg")
    for name in ALL:
        assert name in str(info.value)


def test_weights_round_trip_whole_encoder(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_encoder("sepconv", embedding_dim=16).eval()
    path = tmp_path / "enc.pt"
    torch.save(source.state_dict(), path)
    loaded = create_encoder("sepconv", embedding_dim=16, weights=path).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_rgb_backbone_weights_are_summed_to_one_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A torchvision-style (3-channel, 1000-class fc) state dict loads into the grey backbone."""
    import torchvision

    rgb = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(rgb.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="training.encoders"):
        encoder = create_encoder("resnet18", weights=path)
    summed = rgb.conv1.weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(encoder.backbone.conv1.weight, summed)
    torch.testing.assert_close(encoder.backbone.layer4[1].bn2.weight, rgb.layer4[1].bn2.weight)
    # The 1000-class fc has no place in the encoder: reported, not silently dropped.
    assert "fc.weight" in caplog.text and "unexpected" in caplog.text


def test_grey_input_equals_rgb_network_on_replicated_grey(tmp_path: Path) -> None:
    """Summing first-conv weights = running the RGB stem on a grey image copied to 3 channels."""
    import torchvision

    rgb = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "w.pth"
    torch.save(rgb.state_dict(), path)
    grey = create_encoder("resnet18", weights=path).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey.backbone.conv1(x), rgb.conv1(x.repeat(1, 3, 1, 1)))


def test_bad_weights_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        create_encoder("sepconv", weights=tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(EncoderWeightsError, match="cannot read weights"):
        create_encoder("sepconv", weights=junk)
    other = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, other)
    with pytest.raises(EncoderWeightsError, match="matches none"):
        create_encoder("sepconv", weights=other)


# ------------------------------------------------------------------------------------------
# Pretrained-weights layouts found in the wild (issue: each loads fully or fails loudly)


def _densenet_old_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Rename to the pre-0.3 torchvision DenseNet names (``norm.1``) behind ``prefix``."""
    import re

    pattern = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
    return {prefix + pattern.sub(r"\1.\2.", k): v for k, v in state.items()}


def test_chexnet_style_densenet_with_prefixes_and_old_keys_loads_fully(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    rgb = torchvision.models.densenet121(weights=None)
    state = _densenet_old_keys(rgb.state_dict(), "module.densenet121.")
    assert any(".norm.1." in k for k in state)
    path = tmp_path / "chexnet.pth.tar"
    torch.save({"epoch": 3, "state_dict": state}, path)
    encoder = create_encoder("densenet121", weights=path)
    net = encoder.backbone.features
    torch.testing.assert_close(
        net.denseblock4.denselayer16.norm2.weight,
        rgb.features.denseblock4.denselayer16.norm2.weight,
    )
    torch.testing.assert_close(net.conv0.weight, rgb.features.conv0.weight.sum(dim=1, keepdim=True))


def test_torchxrayvision_densenet_sets_its_input_scale(tmp_path: Path) -> None:
    from training.encoders import XRV_INPUT_SCALE, load_weights

    source = create_encoder("densenet121")  # grey stem, like torchxrayvision's DenseNet
    state = {k.removeprefix("backbone."): v for k, v in source.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state["op_threshs"] = torch.rand(18)
    state["classifier.weight"] = torch.zeros(18, 1024)
    path = tmp_path / "xrv.pt"
    torch.save(state, path)
    report = load_weights(create_encoder("densenet121"), path)
    assert report.input_scale == XRV_INPUT_SCALE == (0.5, 1 / 2048)
    assert report.layout.startswith("torchxrayvision")
    assert "op_threshs" in report.unexpected and report.missing == []
    # (x - 0.5) * 2048 maps [0, 1] pixels onto torchxrayvision's [-1024, 1024].
    mean, std = report.input_scale
    assert ((0.0 - mean) / std, (1.0 - mean) / std) == (-1024.0, 1024.0)


def test_whole_pickled_model_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "model.pt"
    torch.save(model, path)  # the whole nn.Module, not a state dict
    with caplog.at_level(logging.WARNING, logger="training.encoders"):
        encoder = create_encoder("resnet18", weights=path)
    torch.testing.assert_close(
        encoder.backbone.layer3[0].conv1.weight, model.layer3[0].conv1.weight
    )
    assert "load only files you trust" in caplog.text


def test_backbone_with_missing_layers_is_refused(tmp_path: Path) -> None:
    import torchvision

    state = {
        k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
        if not k.startswith("layer4.")
    }  # fmt: skip
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(EncoderWeightsError, match=r"unset \(layer4"):
        create_encoder("resnet18", weights=path)
    # A ResNet-50 file for a ResNet-18 encoder: shapes differ everywhere -> refused too.
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(EncoderWeightsError, match="another architecture"):
        create_encoder("resnet18", weights=path)
