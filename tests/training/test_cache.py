"""The decode-once tensor cache and the batch augmentation that runs on the training device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.synthetic import make_folder
from training.cache import CachedDataset, DeviceBatches, open_cache
from training.data import Sample, XrayDataset, class_names, load_source
from training.gpu_augment import BatchAugmentation
from training.preprocess import Preprocessing
from training.train import TrainConfig, train

SPEC = Preprocessing(image_size=24, mean=0.5, std=0.25)


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "shapes", {"train": 6}, size=40)


def _samples(root: Path) -> list[Sample]:
    return sorted(load_source(root), key=lambda s: str(s.path))


def test_cache_matches_the_shared_preprocessing(shapes: Path, tmp_path: Path) -> None:
    samples = _samples(shapes)
    classes = class_names(samples)
    cached = CachedDataset(open_cache(samples, SPEC, tmp_path / "c"), classes)
    reference = XrayDataset(samples, classes, SPEC, augment=False)
    assert len(cached) == len(reference) == 24
    assert list(cached.labels) == list(reference.labels)
    for i in range(len(cached)):
        # uint8 storage: at most half a grey level off, in normalised units.
        diff = (cached[i][0] - reference[i][0]).abs().max().item()
        assert diff <= 0.5 / 255 / SPEC.std + 1e-5, i


def test_second_open_decodes_nothing_and_content_changes_rebuild(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = _samples(shapes)
    first = open_cache(samples, SPEC, tmp_path / "c")
    assert first.built

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not decode")

    monkeypatch.setattr("training.cache.decode_image", no_decoding)
    again = open_cache(samples, SPEC, tmp_path / "c")
    assert not again.built and again.key == first.key
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))
    # A relabelled sample is the same pixels: still a hit.
    relabelled = [Sample(samples[0].path, "other"), *samples[1:]]
    assert open_cache(relabelled, SPEC, tmp_path / "c").key == first.key
    monkeypatch.undo()
    # Another image size, or one edited image: another key, decoded afresh.
    assert open_cache(samples, Preprocessing(image_size=16), tmp_path / "c").built
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(samples[3].path)
    edited = open_cache(samples, SPEC, tmp_path / "c")
    assert edited.built and edited.key != first.key
    assert np.asarray(edited.images)[3].max() == 0
    assert len(list((tmp_path / "c").glob("*.u8"))) == 3


def test_unreadable_files_are_left_out(shapes: Path, tmp_path: Path) -> None:
    samples = _samples(shapes)
    samples[2].path.write_bytes(b"not an image")
    cache = open_cache(samples, SPEC, tmp_path / "c")
    assert len(cache) == len(samples) - 1 and cache.skipped == [samples[2].path]
    assert samples[2] not in cache.samples
    meta = json.loads((tmp_path / "c" / f"{cache.key}.json").read_text())
    assert meta["count"] == len(samples) - 1


# ---- batch augmentation -----------------------------------------------------------------------


def _batch(n: int = 6, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, 1, size, size), generator=g)


def test_augmentation_off_is_the_identity_and_flip_is_a_flip() -> None:
    x = _batch()
    off = BatchAugmentation(SPEC, hflip_p=0, rotation_degrees=0, scale=(1, 1), ratio=(1, 1),
                            jitter=0)  # fmt: skip
    assert torch.allclose(off(x), x, atol=1e-5)
    flip = BatchAugmentation(SPEC, hflip_p=1, rotation_degrees=0, scale=(1, 1), ratio=(1, 1),
                             jitter=0)  # fmt: skip
    assert torch.allclose(flip(x), torch.flip(x, dims=[-1]), atol=1e-5)


def test_default_augmentation_differs_per_image_and_stays_in_range() -> None:
    ramp = torch.linspace(0.1, 0.9, 24)[:, None].expand(24, 24)  # dark top, bright bottom
    x = ramp[None, None].expand(8, 1, 24, 24).contiguous()  # the same image eight times
    out = BatchAugmentation(SPEC)(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    flat = out.flatten(1)
    distinct = {tuple(np.round(row.numpy(), 4)) for row in flat}
    assert len(distinct) == 8  # one random crop/rotation/flip/jitter per image
    # Mild: each augmented image still correlates with the original.
    corr = [np.corrcoef(row.numpy(), x[0].flatten().numpy())[0, 1] for row in flat]
    assert min(corr) > 0.8, corr


def test_device_batches_yield_normalised_augmented_batches(shapes: Path, tmp_path: Path) -> None:
    samples = _samples(shapes)
    ds = CachedDataset(open_cache(samples, SPEC, tmp_path / "c"), class_names(samples))
    plain = DeviceBatches(ds, [[0, 5, 7], [1, 2, 3]], device=torch.device("cpu"), augment=None)
    batches = list(plain)
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (3, 1, 24, 24) and x.dtype == torch.float32
    assert torch.allclose(x[1], ds[5][0]) and y.tolist() == [int(ds.labels[i]) for i in (0, 5, 7)]
    aug = DeviceBatches(
        ds, [[0, 5, 7]], device=torch.device("cpu"), augment=BatchAugmentation(SPEC)
    )
    xa, _ = next(iter(aug))
    assert not torch.allclose(xa, x)


# ---- training from the cache --------------------------------------------------------------------


def test_training_from_the_cache_learns(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", {"train": 32, "val": 8, "test": 12}, size=40)
    config = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), encoder="resnet9_half",
        encoder_kwargs={"stem_stride": 1}, loss="contrastive", epochs=4, image_size=32,
        batch_size=16, lr=3e-3, warmup_epochs=0.5, threads=1, n_way_episodes=100,
        progress_bar=False, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    result = train(config)
    assert result.metrics["test"]["knn"]["balanced_accuracy"] > 0.8, result.metrics["test"]
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 3  # train, val, test
