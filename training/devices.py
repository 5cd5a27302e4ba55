"""Where tensors run: the one rule that turns a device name into a `torch.device`.

Used by training, evaluation, the service and the retrain, so `auto` means the same thing
everywhere and asking for a GPU that is not there fails at once with what to do instead of
later, inside a forward pass.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` (or empty) picks CUDA when available, else CPU; `cuda`/`cuda:N` without a GPU is
    a `ValueError`; any other name is passed to `torch.device`."""
    if isinstance(device, torch.device):
        return device
    name = device.strip()
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was requested but no CUDA GPU is available; use auto or cpu "
            "(--device, or CXR_DEVICE for the service)"
        )
    return torch.device(name)
