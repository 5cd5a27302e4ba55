"""The shared preprocessing: exact numbers on tiny images, spec round-trips, augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from training.preprocess import (
    Preprocessing,
    crop_box,
    equalize_histogram,
    preprocess,
    preprocess_batch,
    train_augmentation,
)


def test_constant_image_gives_hand_computed_values() -> None:
    spec = Preprocessing(image_size=8, mean=0.5, std=0.25)
    out = preprocess(np.full((20, 30), 0.75, np.float32), spec)
    assert out.shape == (1, 8, 8) and out.dtype == torch.float32
    # (0.75 - 0.5) / 0.25 = 1.0 everywhere; resizing a constant keeps it constant
    torch.testing.assert_close(out, torch.ones(1, 8, 8))


def test_same_size_image_is_only_normalised() -> None:
    spec = Preprocessing(image_size=8, mean=0.2, std=0.5)
    image = np.arange(64, dtype=np.float32).reshape(8, 8) / 63.0
    out = preprocess(image, spec)
    expected = (torch.from_numpy(image) - 0.2) / 0.5
    torch.testing.assert_close(out[0], expected)


def test_downscale_is_antialiased_area_average() -> None:
    # 2x2 blocks of a checkerboard average to 0.5 with antialiasing (no aliasing to 0 or 1).
    image = (np.indices((16, 16)).sum(axis=0) % 2).astype(np.float32)
    out = preprocess(image, Preprocessing(image_size=8, mean=0.0, std=1.0))
    torch.testing.assert_close(out, torch.full((1, 8, 8), 0.5), atol=0.02, rtol=0)


def test_uint8_and_non_square_inputs() -> None:
    spec = Preprocessing(image_size=16)
    out = preprocess(np.full((10, 40), 255, np.uint8), spec)
    torch.testing.assert_close(out, torch.full((1, 16, 16), 2.0))  # (1 - 0.5) / 0.25


def test_rejects_wrong_shapes() -> None:
    spec = Preprocessing(image_size=8)
    with pytest.raises(ValueError, match="decode_image"):
        preprocess(np.zeros((4, 4, 3), np.float32), spec)
    with pytest.raises(ValueError):
        preprocess(np.zeros((0, 4), np.float32), spec)


def test_batch_helper() -> None:
    spec = Preprocessing(image_size=8)
    batch = preprocess_batch([np.zeros((5, 5), np.float32), np.ones((9, 3), np.float32)], spec)
    assert batch.shape == (2, 1, 8, 8)
    torch.testing.assert_close(batch[1], torch.full((1, 8, 8), 2.0))
    assert preprocess_batch([], spec).shape == (0, 1, 8, 8)


def test_spec_round_trip_and_validation() -> None:
    spec = Preprocessing(image_size=64, mean=0.4, std=0.3)
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    assert Preprocessing().to_dict() == {
        "image_size": 128, "mean": 0.5, "std": 0.25, "crop": 0.0, "equalize": False,
    }  # fmt: skip
    # A checkpoint written before crop/equalize existed reads as "no crop, no equalisation".
    legacy = Preprocessing.from_dict({"image_size": 64, "mean": 0.4, "std": 0.3})
    assert (legacy.crop, legacy.equalize) == (0.0, False)
    with pytest.raises(ValueError, match="unknown keys"):
        Preprocessing.from_dict({**spec.to_dict(), "zoom": 1})
    with pytest.raises(ValueError, match="crop"):
        Preprocessing(crop=0.5)
    with pytest.raises(ValueError, match="missing keys"):
        Preprocessing.from_dict({"image_size": 64})
    with pytest.raises(ValueError):
        Preprocessing(std=0)
    with pytest.raises(ValueError):
        Preprocessing(image_size=2)
    with pytest.raises(AttributeError):
        spec.image_size = 3  # type: ignore[misc]


def test_augmentation_keeps_shape_and_scale_and_pickles() -> None:
    torch.manual_seed(0)
    spec = Preprocessing(image_size=32)
    x = preprocess(np.random.default_rng(0).random((40, 40), dtype=np.float32), spec)
    augment = train_augmentation(spec)
    outs = [augment(x) for _ in range(4)]
    for out in outs:
        assert out.shape == (1, 32, 32) and out.dtype == torch.float32
        # stays within the normalised [0, 1] range: (0-0.5)/0.25 .. (1-0.5)/0.25
        assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5
    assert not torch.equal(outs[0], outs[1])  # random
    assert torch.equal(x, preprocess(np.random.default_rng(0).random((40, 40), np.float32), spec))
    restored = pickle.loads(pickle.dumps(augment))  # DataLoader workers need this
    assert restored(x).shape == (1, 32, 32)


def test_augmentation_without_flip_is_configurable() -> None:
    spec = Preprocessing(image_size=16)
    augment = train_augmentation(spec, hflip_p=0.0)
    assert "HorizontalFlip" not in repr(augment)
    with pytest.raises(ValueError):
        train_augmentation(spec, hflip_p=2.0)


def test_border_crop_removes_edge_markers() -> None:
    # A bright "R" marker in the corner, uniform lungs elsewhere: after a 10 % crop the
    # model input is uniform, so the marker cannot be learned.
    image = np.full((100, 100), 0.4, np.float32)
    image[2:8, 2:8] = 1.0
    spec = Preprocessing(image_size=20, mean=0.0, std=1.0, crop=0.1)
    out = preprocess(image, spec)
    assert out.shape == (1, 20, 20)
    torch.testing.assert_close(out, torch.full((1, 20, 20), 0.4))
    assert preprocess(image, Preprocessing(image_size=20, mean=0.0, std=1.0)).max() > 0.45
    assert crop_box(100, 50, 0.1) == (10, 90, 5, 45)


def test_histogram_equalisation_makes_exposures_agree() -> None:
    rng = np.random.default_rng(0)
    film = rng.random((64, 64)).astype(np.float32) ** 2
    dark, bright = 0.3 * film, 0.5 + 0.5 * film  # the same film, two exposures
    spec = Preprocessing(image_size=64, mean=0.0, std=1.0, equalize=True)
    a, b = preprocess(dark, spec), preprocess(bright, spec)
    # Equal up to the 1/256 quantisation of the darker exposure's fewer grey levels.
    assert float((a - b).abs().mean()) < 0.02 and float((a - b).abs().max()) < 0.1
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0
    plain = Preprocessing(image_size=64, mean=0.0, std=1.0)
    assert float((preprocess(dark, plain) - preprocess(bright, plain)).abs().mean()) > 0.4
    flat = preprocess(np.full((8, 8), 0.9, np.float32), spec)
    torch.testing.assert_close(flat, torch.full((1, 64, 64), 0.5))
    # Hand-computed: levels 0, 0, 128, 255 -> ranks (cdf - cdf_min) / (n - cdf_min)
    x = torch.tensor([[0.0, 0.0], [128 / 255, 1.0]])
    torch.testing.assert_close(equalize_histogram(x), torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
