"""Training augmentation of whole batches on the training device (GPU or CPU).

:class:`~training.preprocess.TrainAugmentation` augments one ``(1, S, S)`` tensor at a time
with torchvision ``v2`` transforms, in the DataLoader. That is the bottleneck of a fast GPU:
per-image Python calls on the CPU. torchvision's ``v2`` transforms do accept a batch tensor on
the GPU, but draw *one* set of random parameters per call, so every image of the batch would get
the same crop, rotation and flip; calling them per image costs ``B`` kernel launches per
transform. :class:`BatchAugmentation` draws the same distributions **per image** and applies
them to the whole batch at once: one sampling grid (``affine_grid``-style, built here so the
out-of-crop corners can be blacked out like ``RandomRotation``'s fill) and one
``grid_sample``, then per-image brightness and contrast.

Same choices and defaults as ``TrainAugmentation`` (see its docstring for why each): a resized
crop of 80-100% of the area with aspect 0.9-1.1, rotation within ±7° filled with black, a
horizontal flip with probability 0.5, brightness and contrast within ±10%.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.preprocess import Preprocessing

__all__ = ["BatchAugmentation"]


class BatchAugmentation(nn.Module):
    """Per-image random crop + rotation + flip + brightness/contrast of a ``(B, 1, S, S)`` batch.

    Input and output are pixel values in ``[0, 1]`` (before normalisation), on any device;
    randomness comes from ``generator`` (or torch's default generator of that device).
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
    ) -> None:
        super().__init__()
        if not 0.0 <= hflip_p <= 1.0:
            raise ValueError(f"hflip_p must be in [0, 1], got {hflip_p}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.spec = spec
        self.hflip_p = hflip_p
        self.rotation = math.radians(rotation_degrees)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.jitter = jitter

    def _uniform(
        self, n: int, low: float, high: float, like: torch.Tensor, gen: torch.Generator | None
    ) -> torch.Tensor:
        u = torch.rand(n, device=like.device, dtype=torch.float32, generator=gen)
        return low + (high - low) * u

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, S, S) batch, got {tuple(x.shape)}")
        b, _, h, w = x.shape
        x = x.float()
        # Crop: area fraction and aspect ratio per image (clipped to the image), random centre.
        area = self._uniform(b, *self.scale, x, generator)
        aspect = torch.exp(self._uniform(b, *self.log_ratio, x, generator))
        cw = torch.sqrt(area * aspect).clamp(max=1.0)
        ch = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = self._uniform(b, -1.0, 1.0, x, generator) * (1.0 - cw)
        cy = self._uniform(b, -1.0, 1.0, x, generator) * (1.0 - ch)
        angle = self._uniform(b, -self.rotation, self.rotation, x, generator)
        flip = torch.rand(b, device=x.device, generator=generator) < self.hflip_p
        # Output pixel p (normalised coordinates, align_corners=False) -> rotated (and flipped)
        # point q in the crop -> input point c + size * q. Points with |q| > 1 lie outside the
        # crop after rotation: black, as RandomRotation fills them.
        ys = (torch.arange(h, device=x.device, dtype=torch.float32) * 2 + 1) / h - 1
        xs = (torch.arange(w, device=x.device, dtype=torch.float32) * 2 + 1) / w - 1
        py, px = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
        px = px.expand(b, h, w) * torch.where(flip, -1.0, 1.0)[:, None, None]
        py = py.expand(b, h, w)
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        qx = cos * px - sin * py
        qy = sin * px + cos * py
        grid = torch.stack(
            (
                cx[:, None, None] + cw[:, None, None] * qx,
                cy[:, None, None] + ch[:, None, None] * qy,
            ),
            dim=-1,
        )
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        inside = ((qx.abs() <= 1.0) & (qy.abs() <= 1.0)).unsqueeze(1)
        out = out * inside
        if self.jitter > 0:
            bright = self._uniform(b, 1 - self.jitter, 1 + self.jitter, x, generator)
            contrast = self._uniform(b, 1 - self.jitter, 1 + self.jitter, x, generator)
            out = (out * bright[:, None, None, None]).clamp_(0.0, 1.0)
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = ((out - mean) * contrast[:, None, None, None] + mean).clamp_(0.0, 1.0)
        return out

    def extra_repr(self) -> str:
        return (
            f"hflip_p={self.hflip_p}, rotation_degrees={math.degrees(self.rotation):.1f}, "
            f"scale={self.scale}, jitter={self.jitter}"
        )
