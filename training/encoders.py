"""Image encoders for metric learning, built by name.

Every encoder maps a batch of single-channel images ``(B, 1, S, S)`` to L2-normalised embeddings
``(B, embedding_dim)``. Unit norm matters: the whole system measures Euclidean distance between
unit vectors (``d = sqrt(2 - 2 a.b)``), so distances are comparable across models and bounded.

Each encoder is ``backbone -> global average pool -> projection head -> L2 normalise``, split as
``forward_features`` (the last feature map) and ``embed_features`` (everything after it): Grad-CAM
explains a prediction at that feature map (`app.gradcam`), back-propagating through
``embed_features`` only.

Nothing is ever downloaded: torchvision backbones are built with ``weights=None``. Pretrained
weights come from a file the user supplies (``weights=PATH``); 3-channel (RGB) first-conv weights
are summed over the colour axis, which is exactly what an RGB network computes on a grey image
replicated into three channels.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "Encoder",
    "EncoderWeightsError",
    "WeightsReport",
    "create_encoder",
    "list_encoders",
    "load_weights",
]


class EncoderWeightsError(ValueError):
    """A ``--weights`` file is missing, unreadable or does not fit the chosen encoder."""


class Encoder(nn.Module):
    """Backbone + pooling + projection head + L2 normalisation.

    ``backbone`` returns a feature map ``(B, C, h, w)``; ``feature_dim`` is ``C``. The split
    ``forward = embed_features(forward_features(x))`` is what lets serving compute the feature
    map once (in ONNX Runtime) and still explain it with autograd through the small head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        embedding_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(feature_dim, embedding_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map ``(B, C, h, w)`` (what Grad-CAM explains)."""
        return self.backbone(x)

    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        """The L2-normalised embedding of a feature map: pool, project, normalise."""
        pooled = torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1)
        emb = self.head(self.dropout(pooled))
        # Normalise in float32: under bf16 autocast the norm of a 128-d vector loses precision.
        return F.normalize(emb.float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# ResNet-9 (the DAWNBench / Myrtle network), adapted to larger grey images with a strided stem.


def _conv_bn(c_in: int, c_out: int, *, stride: int = 1, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _resnet9(
    *, width: int = 64, stem_stride: int = 2, embedding_dim: int = 128, dropout: float = 0.0
) -> Encoder:
    """ResNet-9: prep conv, three stages (x2, x4, x8 width), residual blocks after stages 1 and 3.

    ``stem_stride=2`` halves the resolution up front: X-rays are resized to 96-224 px (not the
    32 px of CIFAR), and the strided stem keeps CPU training affordable at 112-128 px.
    """
    w = width
    # Built first, as it always was: a seed gives the same initial weights as before.
    layer3 = nn.Sequential(_conv_bn(4 * w, 8 * w, pool=True), _Residual(8 * w))
    backbone = nn.Sequential(
        _conv_bn(1, w, stride=stem_stride),
        nn.Sequential(_conv_bn(w, 2 * w, pool=True), _Residual(2 * w)),
        _conv_bn(2 * w, 4 * w, pool=True),
        layer3,
    )
    return Encoder(backbone, 8 * w, embedding_dim=embedding_dim, dropout=dropout)


# --------------------------------------------------------------------------------------------
# Compact COVID-Net (Wang & Wong, 2020): PEPX modules with skip connections.


class PEPX(nn.Module):
    """Projection-Expansion-Projection-eXtension module of COVID-Net.

    1x1 projection (to ``c_in/2``) -> 1x1 expansion (to ``c_in``) -> 3x3 depthwise ->
    1x1 projection (to ``c_out/2``) -> 1x1 extension (to ``c_out``). The design keeps the
    expensive spatial 3x3 work depthwise, so the network is light for its depth.
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1) -> None:
        super().__init__()
        mid = max(8, c_in // 2)
        proj = max(8, c_out // 2)
        self.body = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, proj, 1, bias=False),
            nn.BatchNorm2d(proj),
            nn.ReLU(inplace=True),
            nn.Conv2d(proj, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _CovidNetStage(nn.Module):
    """A stage of PEPX modules whose outputs are summed with a projected skip of the input.

    COVID-Net densely connects the modules of a stage; summing (instead of concatenating) keeps
    the compact version cheap while every module still sees the stage input through the skip.
    """

    def __init__(self, c_in: int, c_out: int, depth: int, *, stride: int) -> None:
        super().__init__()
        self.skip = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
        )
        blocks = [PEPX(c_in, c_out, stride=stride)]
        blocks += [PEPX(c_out, c_out) for _ in range(depth - 1)]
        self.blocks = nn.ModuleList(blocks)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.skip(x)
        out = self.act(total + self.blocks[0](x))
        for block in self.blocks[1:]:
            total = total + out
            out = self.act(total + block(out))
        return out


def _covidnet(
    *,
    widths: tuple[int, ...] = (32, 64, 128, 256),
    depths: tuple[int, ...] = (2, 2, 3, 2),
    embedding_dim: int = 128,
    dropout: float = 0.0,
) -> Encoder:
    """Compact COVID-Net: 7x7 strided stem, max-pool, four PEPX stages (each halves resolution)."""
    stem = nn.Sequential(
        nn.Conv2d(1, widths[0], 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    stages: list[nn.Module] = []
    c_in = widths[0]
    for i, (c_out, depth) in enumerate(zip(widths, depths, strict=True)):
        stages.append(_CovidNetStage(c_in, c_out, depth, stride=1 if i == 0 else 2))
        c_in = c_out
    backbone = nn.Sequential(stem, *stages)
    return Encoder(backbone, widths[-1], embedding_dim=embedding_dim, dropout=dropout)


# --------------------------------------------------------------------------------------------
# Depthwise-separable CNN.


def _sep_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _sepconv(
    *, widths: tuple[int, ...] = (32, 64, 128, 256), embedding_dim: int = 128, dropout: float = 0.0
) -> Encoder:
    """Small depthwise-separable CNN with batch norm: strided stem, stages of 2 blocks + pool."""
    layers: list[nn.Module] = [
        nn.Conv2d(1, widths[0], 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    c_in = widths[0]
    for i, c_out in enumerate(widths):
        stage = nn.Sequential(_sep_block(c_in, c_out), _sep_block(c_out, c_out))
        layers.append(stage)
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    backbone = nn.Sequential(*layers)
    return Encoder(backbone, widths[-1], embedding_dim=embedding_dim, dropout=dropout)


# --------------------------------------------------------------------------------------------
# torchvision backbones, single-channel input, never downloaded.


def _grey_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The same convolution with one input channel (RGB network -> grey images)."""
    return nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )


class _TorchvisionResNet(Encoder):
    """torchvision ResNet without its classifier; keys match torchvision's (``backbone.*``)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


class _TorchvisionDenseNet(Encoder):
    """torchvision DenseNet without its classifier (``features`` ends in norm5, then ReLU)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.backbone.features(x))


def _tv_resnet(arch: str, *, embedding_dim: int = 128, dropout: float = 0.0) -> Encoder:
    import torchvision.models as tvm

    net = getattr(tvm, arch)(weights=None)
    net.conv1 = _grey_conv(net.conv1)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return _TorchvisionResNet(net, feature_dim, embedding_dim=embedding_dim, dropout=dropout)


def _tv_densenet121(*, embedding_dim: int = 128, dropout: float = 0.0) -> Encoder:
    import torchvision.models as tvm

    net = tvm.densenet121(weights=None)
    net.features.conv0 = _grey_conv(net.features.conv0)
    feature_dim = net.classifier.in_features
    net.classifier = nn.Identity()
    return _TorchvisionDenseNet(net, feature_dim, embedding_dim=embedding_dim, dropout=dropout)


_REGISTRY: dict[str, Callable[..., Encoder]] = {
    "resnet9": lambda **kw: _resnet9(width=64, **kw),
    "resnet9_half": lambda **kw: _resnet9(width=32, **kw),
    "covidnet": _covidnet,
    "sepconv": _sepconv,
    "resnet18": lambda **kw: _tv_resnet("resnet18", **kw),
    "resnet50": lambda **kw: _tv_resnet("resnet50", **kw),
    "densenet121": _tv_densenet121,
}


def list_encoders() -> list[str]:
    """Names accepted by :func:`create_encoder`."""
    return list(_REGISTRY)


def create_encoder(
    name: str, *, embedding_dim: int = 128, weights: Path | str | None = None, **kwargs: Any
) -> Encoder:
    """Build the encoder ``name``; optionally load a user-supplied state dict from ``weights``.

    ``kwargs`` go to the architecture (e.g. ``dropout``, ``stem_stride`` for ResNet-9); they are
    what a checkpoint records so that ``app/`` can rebuild the same network.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown encoder {name!r}; choose one of: {', '.join(list_encoders())}"
        ) from None
    try:
        encoder = factory(embedding_dim=embedding_dim, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for encoder {name!r}: {exc}") from None
    if weights is not None:
        load_weights(encoder, weights)
    return encoder


# Old torchvision DenseNet checkpoints (and CheXNet copies of them) name layers ``norm.1``,
# ``conv.2``; current torchvision says ``norm1``, ``conv2``. The same pattern torchvision's own
# loader uses to rename them.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# torchxrayvision DenseNets were trained on images scaled to [-1024, 1024]: as a Preprocessing
# (x - mean) / std over [0, 1] pixels that is mean 0.5, std 1/2048.
XRV_INPUT_SCALE = (0.5, 1.0 / 2048.0)


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_weights` did: where the tensors went and what the file implies.

    ``input_scale`` is the ``(mean, std)`` the weights were trained with when the file's layout
    says so (torchxrayvision), else None: training must then feed inputs on that scale or the
    pretrained features are meaningless.
    """

    target: str  # "encoder" or "backbone"
    loaded: int
    missing: list[str]
    unexpected: list[str]
    skipped: list[str]
    layout: str
    input_scale: tuple[float, float] | None = None


def _torch_load(path: Path) -> Any:
    """``torch.load`` safely first; fall back to full unpickling only for layouts that need it.

    ``weights_only=True`` cannot read torchvision's old tar-format files or a whole pickled
    ``nn.Module``. The user named this file explicitly, so those are read with full unpickling,
    with a warning: unpickling runs code from the file, so only load files you trust.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_exc:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            raise EncoderWeightsError(
                f"cannot read weights file {str(path)!r} ({safe_exc.__class__.__name__}: "
                f"{str(safe_exc)[:300]}); it must be a torch.save()d state dict or model"
            ) from None
        log.warning(
            "weights file %s is not a plain tensor file (legacy tar format or a pickled "
            "model); it was read with full unpickling, which runs code from the file: load only "
            "files you trust",
            path,
        )
        return obj


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EncoderWeightsError(
            f"weights file {str(path)!r} does not exist; pass the path of a saved state dict "
            "(e.g. torchvision's resnet18-*.pth downloaded beforehand)"
        )
    obj = _torch_load(path)
    if isinstance(obj, nn.Module):  # a whole pickled model
        obj = obj.state_dict()
    # Accept the usual wrappers: {"state_dict": ...}, {"model": ...}, our own checkpoints.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "encoder"):
            if key in obj and isinstance(obj[key], Mapping | nn.Module):
                inner = obj[key]
                obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
                break
    if not isinstance(obj, Mapping):
        raise EncoderWeightsError(f"weights file {str(path)!r} does not hold a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise EncoderWeightsError(f"weights file {str(path)!r} does not hold a state dict")
    return {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}


def _strip_prefix(state: Mapping[str, torch.Tensor], own: Mapping[str, Any]) -> tuple[dict, str]:
    """Drop the key prefix (``module.``, ``densenet121.``, ``model.``...) that best matches.

    Wrappers (DataParallel/DDP, CheXNet's ``densenet121.``, Lightning's ``model.``) prepend
    names; the prefix kept is the one under which most keys exist in ``own``.
    """
    candidates = {""}
    for key in state:
        parts = key.split(".")
        for depth in range(1, min(4, len(parts))):
            candidates.add(".".join(parts[:depth]) + ".")
    best, best_hits = "", -1
    for prefix in sorted(candidates, key=len):
        hits = sum(1 for k in state if k.startswith(prefix) and k[len(prefix) :] in own)
        if hits > best_hits:
            best, best_hits = prefix, hits
    stripped = {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}
    return stripped, best


def load_weights(encoder: Encoder, weights: Path | str) -> WeightsReport:
    """Load a state dict into ``encoder`` (or into its backbone) and say what happened.

    A file of the whole encoder (keys ``backbone.*``, ``head.*``) is loaded as is; any other
    file is taken as backbone weights (e.g. a torchvision or torchxrayvision state dict, a
    CheXNet checkpoint), after removing wrapper prefixes and renaming old DenseNet keys.
    First-conv weights with 3 input channels are summed to one; tensors of other mismatched
    shapes (such as a 1000-class ``fc``) are skipped. A file that leaves any backbone weight
    unset is refused: training would otherwise start from a silently half-random network.
    """
    path = Path(weights).expanduser()
    state = _read_state_dict(path)
    whole = any(k.startswith(("backbone.", "head.")) for k in state)
    target: nn.Module = encoder if whole else encoder.backbone
    own = target.state_dict()
    state, prefix = _strip_prefix(state, own)
    fitted: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    unexpected: list[str] = []
    single_channel_stem = False
    for key, value in state.items():
        if key not in own:
            unexpected.append(key)
            continue
        want = own[key].shape
        if value.ndim == 4 and len(want) == 4 and want[1] == 1 and value.shape == want:
            single_channel_stem = single_channel_stem or key.endswith("conv0.weight")
        if value.shape != want and value.ndim == 4 and value.shape[1] == 3 and want[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != want:
            skipped.append(f"{key} {tuple(value.shape)}->{tuple(want)}")
            continue
        fitted[key] = value
    if not fitted:
        raise EncoderWeightsError(
            f"weights file {str(path)!r} matches none of the encoder's parameters; "
            "is it for a different architecture?"
        )
    target.load_state_dict(fitted, strict=False)
    # BatchNorm's step counter is absent from older files and not a weight.
    missing = [k for k in own if k not in fitted and not k.endswith("num_batches_tracked")]
    backbone_missing = [k for k in missing if not k.startswith("head.")]
    if backbone_missing:
        shown = ", ".join(backbone_missing[:8])
        more = f" and {len(backbone_missing) - 8} more" if len(backbone_missing) > 8 else ""
        raise EncoderWeightsError(
            f"weights file {str(path)!r} leaves {len(backbone_missing)} of the encoder's "
            f"{len(own)} {'weights' if whole else 'backbone weights'} unset ({shown}{more}); "
            "it is for another architecture or a different variant. Choose the matching "
            "--encoder, or train without --weights"
        )
    xrv = not whole and ("op_threshs" in state or single_channel_stem)
    layout = "encoder" if whole else ("torchxrayvision" if xrv else "backbone")
    report = WeightsReport(
        target="encoder" if whole else "backbone",
        loaded=len(fitted),
        missing=missing,
        unexpected=unexpected,
        skipped=skipped,
        layout=layout + (f" (prefix {prefix!r} removed)" if prefix else ""),
        input_scale=XRV_INPUT_SCALE if xrv else None,
    )
    log.info(
        "loaded weights from %s into the %s (%s): %d tensors; unexpected keys %s; skipped "
        "(shape) %s",
        path, report.target, report.layout, report.loaded, unexpected or "none",
        skipped or "none",
    )  # fmt: skip
    return report
