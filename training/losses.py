"""Training objectives by name: metric-learning losses and a classifier baseline.

Every loss is an ``nn.Module`` called as ``loss(embeddings, labels) -> scalar``. Losses that own
parameters (the pair head's weights, the classifier's linear layer) are modules so that the
training loop can hand ``loss.parameters()`` to the optimiser and save them in ``last.pt``.

What pytorch-metric-learning already does well (contrastive and triplet losses, miners,
distances) comes from it; the siamese pair head of the source work and the focal loss are small
modules written here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "ClassifierLoss",
    "HybridLoss",
    "MetricLoss",
    "PairLoss",
    "create_loss",
    "focal_loss",
    "list_losses",
]


def _distance(name: str) -> distances.BaseDistance:
    """Distance for pml losses. Euclidean on unit vectors is what the index measures."""
    if name == "euclidean":
        return distances.LpDistance(p=2, normalize_embeddings=True)
    if name == "cosine":
        return distances.CosineSimilarity()
    raise ValueError(f"unknown distance {name!r}; choose 'euclidean' or 'cosine'")


class MetricLoss(nn.Module):
    """A pml loss with an optional miner: ``loss(emb, labels, miner(emb, labels))``."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = embeddings.float()
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, tuples)


def _contrastive(
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    miner: str = "none",
    miner_margin: float = 0.2,
    distance: str = "euclidean",
    **_: Any,
) -> MetricLoss:
    """Contrastive loss over all pairs of the batch (Hadsell et al.), hinge at the margins.

    With unit-norm embeddings distances lie in [0, 2]; ``neg_margin=1.0`` pushes other classes
    beyond distance 1 (orthogonal-ish) while same-class pairs are pulled to ``pos_margin``.
    ``miner``: ``none`` (all pairs, pml averages the non-zero terms), ``pair_margin`` (only pairs
    violating the margins by ``miner_margin``), or ``multi_similarity``.
    """
    dist = _distance(distance)
    loss = losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, distance=dist)
    mined: nn.Module | None
    if miner == "none":
        mined = None
    elif miner == "pair_margin":
        mined = miners.PairMarginMiner(
            pos_margin=pos_margin + miner_margin,
            neg_margin=neg_margin - miner_margin,
            distance=dist,
        )
    elif miner == "multi_similarity":
        mined = miners.MultiSimilarityMiner(epsilon=0.1)
    else:
        raise ValueError(
            f"unknown contrastive miner {miner!r}; choose none, pair_margin or multi_similarity"
        )
    return MetricLoss(loss, mined)


def _triplet(
    *,
    margin: float = 0.2,
    triplets: str = "semihard",
    distance: str = "euclidean",
    **_: Any,
) -> MetricLoss:
    """Triplet margin loss on mined triplets (``semihard``, ``hard``, ``easy`` or ``all``).

    Semi-hard mining (FaceNet) picks negatives farther than the positive but within the margin:
    informative without the collapse that pure hard mining can cause early in training.
    """
    if triplets not in ("semihard", "hard", "easy", "all"):
        raise ValueError(f"unknown triplet type {triplets!r}; choose semihard, hard, easy or all")
    dist = _distance(distance)
    loss = losses.TripletMarginLoss(margin=margin, distance=dist)
    miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=triplets, distance=dist)
    return MetricLoss(loss, miner)


class PairLoss(nn.Module):
    """The source work's siamese pair head: ``p(same) = sigmoid(w . |e1 - e2| + b)``.

    Every pair ``i < j`` of the batch is a training pair, target 1 when the labels agree. ``w``
    (one weight per embedding dimension) and ``b`` are learnt with the encoder. With
    ``balanced=True`` the positive and negative pairs each contribute half of the loss, because a
    batch holds far more negative pairs than positive ones.

    ``w`` starts negative (``-1/sqrt(dim)``) and ``b`` at 1 so that a fresh network already says
    "near means same" instead of starting saturated.
    """

    def __init__(self, embedding_dim: int, *, balanced: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((embedding_dim,), -1.0 / embedding_dim**0.5))
        self.bias = nn.Parameter(torch.ones(()))
        self.balanced = balanced

    def pair_logits(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        """Logit of "same class" for aligned rows of ``e1`` and ``e2``."""
        return (e1 - e2).abs() @ self.weight + self.bias

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = embeddings.float()
        i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
        logits = self.pair_logits(embeddings[i], embeddings[j])
        target = (labels[i] == labels[j]).float()
        per_pair = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if not self.balanced:
            return per_pair.mean()
        pos, neg = target.bool(), ~target.bool()
        parts = [per_pair[m].mean() for m in (pos, neg) if m.any()]
        return torch.stack(parts).mean()


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017): ``mean(-alpha_t (1 - p_t)^gamma log p_t)``.

    Computed from ``log_softmax`` so that ``log p_t`` never underflows; ``gamma=0`` and no
    ``alpha`` is exactly cross-entropy. ``alpha`` (per-class weights) is optional.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, target[:, None]).squeeze(1)
    pt = log_pt.exp()
    # (1 - pt) can be a tiny negative number through rounding; clamp before a fractional power.
    loss = -((1.0 - pt).clamp(min=0.0) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * alpha.to(loss.device)[target]
    return loss.mean()


class ClassifierLoss(nn.Module):
    """Baseline: a linear head on the (unit-norm) embedding, cross-entropy or focal loss.

    The embedding is scaled by ``scale`` before the linear layer: unit vectors give tiny logits
    otherwise and the head would need huge weights (which weight decay fights) to be confident.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        focal_gamma: float = 0.0,
        scale: float = 16.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.head = nn.Linear(embedding_dim, num_classes)
        self.focal_gamma = focal_gamma
        self.scale = scale
        self.label_smoothing = label_smoothing

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head(embeddings.float() * self.scale)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.logits(embeddings)
        if self.focal_gamma > 0:
            return focal_loss(logits, labels, gamma=self.focal_gamma)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def _supcon(*, temperature: float = 0.1, **_: Any) -> MetricLoss:
    """Supervised contrastive loss (Khosla et al., 2020) over every pair of the batch.

    Each image is pulled towards all same-class images *relative to* all others through a
    softmax over cosine similarities, so every negative contributes in proportion to how hard
    it is; no miner or margin to tune, only the temperature (0.1 as in the paper). With the
    class-balanced sampler each batch holds ``m_per_class`` positives of every class, the rare
    COVID-19 class included.
    """
    if not temperature > 0:
        raise ValueError(f"supcon temperature must be positive, got {temperature}")
    return MetricLoss(losses.SupConLoss(temperature=temperature))


def _pair(*, embedding_dim: int, balanced: bool = True, **_: Any) -> PairLoss:
    return PairLoss(embedding_dim, balanced=balanced)


def _classifier(
    *,
    embedding_dim: int,
    num_classes: int,
    focal_gamma: float = 0.0,
    scale: float = 16.0,
    label_smoothing: float = 0.0,
    **_: Any,
) -> ClassifierLoss:
    return ClassifierLoss(
        embedding_dim,
        num_classes,
        focal_gamma=focal_gamma,
        scale=scale,
        label_smoothing=label_smoothing,
    )


class HybridLoss(nn.Module):
    """A metric loss plus ``ce_weight`` times the classifier's cross-entropy on the same batch.

    The pairwise term shapes the *distances* the service searches (what k-NN and the unknown
    flag rely on); the cross-entropy term, through a linear head that is thrown away after
    training, adds a global pull of every class away from every other one, which a batch of
    pairs only sees locally. Both act on the same unit-norm embedding.
    """

    def __init__(self, metric: nn.Module, classifier: ClassifierLoss, *, ce_weight: float) -> None:
        super().__init__()
        self.metric = metric
        self.classifier = classifier
        self.ce_weight = ce_weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.metric(embeddings, labels) + self.ce_weight * self.classifier(
            embeddings, labels
        )


def _hybrid(*, ce_weight: float = 0.5, **kwargs: Any) -> HybridLoss:
    """``contrastive`` (margins, miner, distance) + ``ce_weight`` x ``classifier`` (CE or focal,
    scale, label smoothing): each part takes the options it knows from the same ``kwargs``."""
    if not ce_weight >= 0:
        raise ValueError(f"hybrid ce_weight must be >= 0, got {ce_weight}")
    return HybridLoss(_contrastive(**kwargs), _classifier(**kwargs), ce_weight=ce_weight)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "contrastive": _contrastive,
    "triplet": _triplet,
    "supcon": _supcon,
    "pair": _pair,
    "classifier": _classifier,
    "hybrid": _hybrid,
}


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`."""
    return list(_REGISTRY)


def create_loss(name: str, *, embedding_dim: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the loss ``name``. Extra ``kwargs`` are loss options (margins, miner, gamma...).

    Options that a loss does not use are ignored, so one training config can carry the options
    of several losses (the bench switches losses without rewriting the config).
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; choose one of: {', '.join(list_losses())}"
        ) from None
    return factory(embedding_dim=embedding_dim, num_classes=num_classes, **kwargs)
