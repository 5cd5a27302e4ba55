"""The one preprocessing function shared by training, evaluation and the HTTP service.

A model is only as good as the agreement between the pixels it was trained on and the pixels
it is later shown. Everything that turns a decoded image (``float32 (H, W)`` in ``[0, 1]``,
see :mod:`training.imaging`) into a model input therefore lives here, is parameterised by a
:class:`Preprocessing` value stored inside every checkpoint, and is called unchanged by every
consumer.

Two steps exist against the shortcuts that public chest X-ray sets are known for (DeGrave et
al. 2021: burned-in text, laterality markers, borders, exposure, age):

- ``crop``: a fixed fraction of each border is cut before resizing. Markers ("L", "R"),
  "PORTABLE" stamps and text labels sit at the film's edges, the lungs in the middle; a
  central crop of 8 % per side keeps both costophrenic angles on ordinary frontal films.
- ``equalize``: histogram equalisation of the (cropped) image, so that exposure, window and
  scanner contrast differences between hospitals become one intensity distribution.

Both are fields of :class:`Preprocessing`, stored in each checkpoint, and applied by the same
:func:`preprocess` in training and serving. Resizing uses
``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``; the aspect ratio is not
kept (X-rays are close to square and the same squeeze is applied everywhere).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Preprocessing",
    "TrainAugmentation",
    "crop_box",
    "equalize_histogram",
    "preprocess",
    "preprocess_batch",
    "train_augmentation",
]


@dataclass(frozen=True)
class Preprocessing:
    """How decoded images become model inputs; saved in checkpoints so the service matches.

    ``mean`` and ``std`` are fixed constants rather than data-set statistics so that a model
    fine-tuned on a hospital's own references keeps the same input scale. ``crop`` (fraction
    cut from each border) and ``equalize`` (histogram equalisation) default to off here, which
    is what checkpoints written before they existed did; :class:`training.train.TrainConfig`
    turns them on for new models.
    """

    image_size: int = 128
    mean: float = 0.5
    std: float = 0.25
    crop: float = 0.0
    equalize: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int | np.integer)
            or not 8 <= int(self.image_size) <= 4096
        ):
            raise ValueError(
                f"image_size must be an integer between 8 and 4096, got {self.image_size!r}"
            )
        if not math.isfinite(float(self.mean)):
            raise ValueError(f"mean must be a finite number, got {self.mean!r}")
        if not (math.isfinite(float(self.std)) and float(self.std) > 0):
            raise ValueError(f"std must be a positive finite number, got {self.std!r}")
        if not (math.isfinite(float(self.crop)) and 0.0 <= float(self.crop) < 0.4):
            raise ValueError(f"crop must be a fraction in [0, 0.4), got {self.crop!r}")
        if not isinstance(self.equalize, bool | np.bool_):
            raise ValueError(f"equalize must be true or false, got {self.equalize!r}")
        # Normalise numpy scalars etc. so to_dict() is plain JSON.
        object.__setattr__(self, "crop", float(self.crop))
        object.__setattr__(self, "equalize", bool(self.equalize))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (stored in checkpoints and configs)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_dict` output; unknown or missing keys are an error.

        Strict on purpose: a checkpoint whose preprocessing we do not fully understand must
        not be served with silently guessed pixels. The one exception is a field added after
        a checkpoint was written (``crop``, ``equalize``): absent means the step did not exist,
        which is exactly its off default.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocessing must be a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        missing = sorted(fields - set(data) - _ADDED_LATER)
        if unknown or missing:
            raise ValueError(
                f"invalid preprocessing {dict(data)!r}: unknown keys {unknown}, missing keys "
                f"{missing}; expected exactly {sorted(fields)}"
            )
        return cls(**{name: data[name] for name in fields if name in data})


_ADDED_LATER = frozenset({"crop", "equalize"})


def crop_box(height: int, width: int, crop: float) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` pixel bounds kept by a border ``crop`` fraction.

    Public so that the Grad-CAM overlay can place the map of the cropped input back where it
    belongs on the full upload.
    """
    dy, dx = round(height * crop), round(width * crop)
    if height - 2 * dy < 1:
        dy = 0
    if width - 2 * dx < 1:
        dx = 0
    return dy, height - dy, dx, width - dx


def equalize_histogram(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Histogram-equalise a ``[0, 1]`` image tensor (any shape): output is its intensity rank.

    Maps each pixel to the fraction of pixels at or below its 1/``bins`` level, so films
    from scanners with different exposure and windowing share one intensity distribution. A
    constant image stays constant (mid-grey), rather than being blown up to noise.
    """
    levels = (x.clamp(0.0, 1.0) * (bins - 1)).round().to(torch.int64)
    hist = torch.bincount(levels.flatten(), minlength=bins).to(torch.float32)
    cdf = hist.cumsum(0)
    lowest = cdf[hist > 0][0]
    span = cdf[-1] - lowest
    if span <= 0:
        return torch.full_like(x, 0.5)
    lut = ((cdf - lowest) / span).clamp_(0.0, 1.0)
    return lut[levels]


def _as_image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate a decoded image and return it as a float32 ``(1, 1, H, W)`` tensor."""
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu")
    else:
        arr = np.asarray(image)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(
            f"preprocess expects a decoded grayscale image (H, W), got shape {tuple(t.shape)}; "
            "decode it with training.imaging.decode_image first"
        )
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"cannot preprocess an empty image of shape {tuple(t.shape)}")
    return t.to(torch.float32)[None, None]


def preprocess(image: np.ndarray | torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """Turn a decoded image into a model input: ``float32`` tensor ``(1, S, S)``.

    Cut ``spec.crop`` of each border, equalise the histogram if ``spec.equalize``, resize to
    ``S x S`` (bilinear, antialiased, so downscaling a 3000-pixel film does not alias rib
    edges into noise), then ``(x - mean) / std``. ``image`` is a ``float32 (H, W)`` array in
    ``[0, 1]`` as returned by ``decode_image`` (``uint8`` arrays are accepted and scaled by
    1/255).
    """
    x = _as_image_tensor(image)
    if spec.crop > 0:
        top, bottom, left, right = crop_box(x.shape[-2], x.shape[-1], spec.crop)
        x = x[..., top:bottom, left:right]
    if spec.equalize:
        x = equalize_histogram(x)
    size = spec.image_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    x = (x - spec.mean) / spec.std
    return x[0].contiguous()


def preprocess_batch(
    images: Sequence[np.ndarray | torch.Tensor], spec: Preprocessing
) -> torch.Tensor:
    """:func:`preprocess` each image and stack them into ``(B, 1, S, S)``."""
    if len(images) == 0:
        return torch.empty((0, 1, spec.image_size, spec.image_size), dtype=torch.float32)
    return torch.stack([preprocess(image, spec) for image in images])


class TrainAugmentation:
    """Random augmentation of a preprocessed ``(1, S, S)`` tensor (training only).

    Works on the *normalised* tensor that :func:`preprocess` returns (so the dataset can cache
    preprocessed tensors and augment per epoch): it maps back to ``[0, 1]``, applies
    torchvision ``v2`` transforms there (colour jitter clamps to ``[0, 1]``, and rotation fills
    with black, like the film border), then normalises again.

    - ``RandomResizedCrop(scale=(0.8, 1.0), ratio=(0.9, 1.1))``: mild zoom/shift; stronger
      crops could remove the lung bases where consolidation often sits.
    - ``RandomRotation(±7°)``: patient positioning varies by a few degrees.
    - ``RandomHorizontalFlip(hflip_p)``, default 0.5: chest X-rays are *not* left-right
      symmetric (the heart is on the left), so a flipped film is anatomically implausible.
      We keep 0.5 as in the source work because the four classes here (normal, bacterial,
      viral, COVID-19 pneumonia) are not defined by laterality, and with ~50 COVID-19
      training images the extra variety helps more than it hurts. Set ``hflip_p=0`` for
      findings where side matters (cardiomegaly, situs anomalies, lateralised lesions).
    - brightness/contrast jitter of ±``jitter``: exposure differs between machines.
    - ``RandomErasing(erase_p)`` of a small patch: no single small region (a marker, a text
      stamp, an electrode) may carry the decision alone.

    A class rather than a closure so it pickles into DataLoader worker processes.
    """

    def __init__(
        self,
        spec: Preprocessing,
        *,
        hflip_p: float = 0.5,
        rotation_degrees: float = 7.0,
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (0.9, 1.1),
        jitter: float = 0.1,
        erase_p: float = 0.0,
    ) -> None:
        from torchvision.transforms import v2

        if not 0.0 <= hflip_p <= 1.0:
            raise ValueError(f"hflip_p must be in [0, 1], got {hflip_p}")
        self.spec = spec
        self.hflip_p = hflip_p
        size = spec.image_size
        steps: list[Any] = [
            v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True),
            v2.RandomRotation(rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR),
        ]
        if hflip_p > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip_p))
        if jitter > 0:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter))
        if erase_p > 0:
            steps.append(v2.RandomErasing(p=erase_p, scale=(0.01, 0.06), value=0.5))
        self.transform = v2.Compose(steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"augmentation expects a (1, S, S) tensor, got {tuple(x.shape)}")
        unit = (x * self.spec.std + self.spec.mean).clamp_(0.0, 1.0)
        out = self.transform(unit)
        return ((out - self.spec.mean) / self.spec.std).contiguous()

    def __repr__(self) -> str:
        return f"TrainAugmentation(spec={self.spec!r}, transform={self.transform!r})"


def train_augmentation(
    spec: Preprocessing, *, hflip_p: float = 0.5, **kwargs: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training augmentation for ``spec``; see :class:`TrainAugmentation` for choices."""
    return TrainAugmentation(spec, hflip_p=hflip_p, **kwargs)
