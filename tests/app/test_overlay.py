"""The Grad-CAM overlay: aspect ratio, crop placement, matplotlib's jet without matplotlib, and
a PNG that a standard decoder reads back pixel for pixel."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.overlay import encode_png_rgb, jet_palette, overlay_png, overlay_size


def test_jet_palette_is_matplotlibs() -> None:
    from matplotlib import colormaps

    expected = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    # Within one level of 255: matplotlib interpolates in float32, we in float64.
    diff = np.abs(jet_palette().astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.1


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (37, 53), (512, 384)])
def test_png_decodes_to_the_same_pixels(
    shape: tuple[int, int], deflate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if deflate == "zlib":  # the fallback where isal is not installed
        monkeypatch.setattr("app.overlay.isal_zlib", None)
    rng = np.random.default_rng(shape[0])
    rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    rgb[: shape[0] // 2] = 255  # a flat region next to noise: both filter paths wrap mod 256
    with Image.open(io.BytesIO(encode_png_rgb(rgb))) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(im), rgb)


def test_png_refuses_what_is_not_rgb() -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        encode_png_rgb(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        encode_png_rgb(np.zeros((0, 4, 3), np.uint8))


def test_overlay_blends_jet_on_the_film() -> None:
    """Hot pixels are 60 % grey + 40 % jet red, cold ones 60 % grey + 40 % jet blue."""
    image = np.full((20, 20), 0.5, np.float32)
    heat = np.zeros((20, 20), np.float32)
    heat[:, 10:] = 1.0
    rgb = np.asarray(Image.open(io.BytesIO(overlay_png(image, heat))).convert("RGB"), np.float32)
    grey = 0.5 * 255.0
    for (y, x), colour in (((10, 2), jet_palette()[0]), ((10, 17), jet_palette()[255])):
        expected = 0.6 * grey + 0.4 * colour.astype(np.float32)
        np.testing.assert_allclose(rgb[y, x], expected, atol=1.5)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((100, 50), (100, 50)), ((2048, 1024), (512, 256)), ((300, 3000), (51, 512))],
)
def test_overlay_size_keeps_aspect(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert overlay_size(*size) == expected
    image = np.zeros((size[1], size[0]), np.float32)
    png = overlay_png(image, np.ones((8, 8), np.float32))
    assert Image.open(io.BytesIO(png)).size == expected


def test_overlay_places_the_map_of_a_cropped_input_on_its_region() -> None:
    """With a border crop the model saw the centre only: the map lands there, borders stay cold."""
    image = np.full((100, 80), 0.5, np.float32)
    hot = np.ones((16, 16), np.float32)
    full = np.asarray(Image.open(io.BytesIO(overlay_png(image, hot))).convert("RGB"))
    cropped = np.asarray(Image.open(io.BytesIO(overlay_png(image, hot, crop=0.25))).convert("RGB"))
    cold = np.asarray(
        Image.open(io.BytesIO(overlay_png(image, np.zeros((16, 16), np.float32)))).convert("RGB")
    )
    assert cropped.shape == full.shape == (100, 80, 3)
    np.testing.assert_array_equal(cropped[50, 40], full[50, 40])  # centre: hot as without crop
    np.testing.assert_array_equal(cropped[5, 5], cold[5, 5])  # cut border: cold
    np.testing.assert_array_equal(cropped[95, 75], cold[95, 75])
    assert not np.array_equal(full[5, 5], cold[5, 5])
