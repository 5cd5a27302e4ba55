"""Losses against hand computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import ClassifierLoss, PairLoss, create_loss, focal_loss, list_losses


def _unit(*points: tuple[float, float]) -> torch.Tensor:
    return F.normalize(torch.tensor(points, dtype=torch.float32), dim=1)


def test_names_and_unknown() -> None:
    assert list_losses() == ["contrastive", "triplet", "supcon", "pair", "classifier", "hybrid"]
    with pytest.raises(ValueError, match="supcon, pair, classifier, hybrid"):
        create_loss("arcface", embedding_dim=2, num_classes=2)


def test_contrastive_matches_hand_computation() -> None:
    # Unit vectors at angles 0, 90, 180, 270 degrees. Labels a, a, b, b.
    e = _unit((1, 0), (0, 1), (-1, 0), (0, -1))
    y = torch.tensor([0, 0, 1, 1])
    loss = create_loss(
        "contrastive", embedding_dim=2, num_classes=2, pos_margin=0.5, neg_margin=1.6
    )
    # Positive pairs (both orderings): d = sqrt(2) each -> relu(d - 0.5) = sqrt(2) - 0.5.
    # Negative pairs (0,2), (1,3): d = 2 -> 0; (0,3), (1,2): d = sqrt(2) -> 1.6 - sqrt(2).
    # pml averages positive and negative terms separately over the non-zero ones, then sums.
    pos = math.sqrt(2) - 0.5
    neg = 1.6 - math.sqrt(2)
    assert loss(e, y).item() == pytest.approx(pos + neg, abs=1e-5)


def test_contrastive_pair_margin_miner_option() -> None:
    e = _unit((1, 0), (0, 1), (-1, 0), (0, -1))
    y = torch.tensor([0, 0, 1, 1])
    loss = create_loss("contrastive", embedding_dim=2, num_classes=2, miner="pair_margin")
    assert loss.miner is not None
    assert torch.isfinite(loss(e, y))
    with pytest.raises(ValueError, match="miner"):
        create_loss("contrastive", embedding_dim=2, num_classes=2, miner="bogus")


def test_triplet_semihard_matches_hand_computation() -> None:
    # Anchor a0 at 0 deg, positive a1 at 60 deg (d = 1), negatives: b0 at 100 deg (d ~ 1.532,
    # semi-hard for margin 0.6: d_ap < d_an < d_ap + margin), b1 at 180 deg (d = 2, easy).
    def at(deg: float) -> tuple[float, float]:
        r = math.radians(deg)
        return (math.cos(r), math.sin(r))

    e = _unit(at(0), at(60), at(100), at(180))
    y = torch.tensor([0, 0, 1, 1])
    loss = create_loss("triplet", embedding_dim=2, num_classes=2, margin=0.6, triplets="semihard")
    d = lambda a, b: 2 * math.sin(math.radians(abs(a - b)) / 2)  # noqa: E731
    # Anchor 0: positive 60 (d_ap=1): negatives 100 (1.532, semi-hard), 180 (2.0, easy).
    # Anchor 60: positive 0 (d_ap=1): negatives 100 (0.684 < 1: hard), 180 (1.732 > 1.6: easy).
    # Anchor 100: positive 180 (d_ap=1.286): negatives 0 (1.532, semi-hard), 60 (0.684, hard).
    # Anchor 180: positive 100 (1.286): negatives 0 (2.0 easy), 60 (1.732, semi-hard).
    semihard = [
        (d(0, 60), d(0, 100)),
        (d(100, 180), d(100, 0)),
        (d(180, 100), d(180, 60)),
    ]
    expected = sum(max(0.0, ap - an + 0.6) for ap, an in semihard) / len(semihard)
    assert loss(e, y).item() == pytest.approx(expected, abs=1e-5)


def test_supcon_matches_hand_computation() -> None:
    # Unit vectors at 0, 90, 180 degrees; labels a, a, b. Cosine similarities: s01 = 0,
    # s02 = -1, s12 = 0. With temperature t, anchor i's positive p contributes
    # -log(exp(s_ip / t) / sum_{j != i} exp(s_ij / t)); anchors without a positive (2) are
    # left out, and the loss is the mean over anchors of the mean over their positives.
    e = _unit((1, 0), (0, 1), (-1, 0))
    y = torch.tensor([0, 0, 1])
    t = 0.5
    loss = create_loss("supcon", embedding_dim=2, num_classes=2, temperature=t)
    anchor0 = -math.log(math.exp(0 / t) / (math.exp(0 / t) + math.exp(-1 / t)))
    anchor1 = -math.log(math.exp(0 / t) / (math.exp(0 / t) + math.exp(0 / t)))
    assert loss(e, y).item() == pytest.approx((anchor0 + anchor1) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        create_loss("supcon", embedding_dim=2, num_classes=2, temperature=0.0)


def test_hybrid_is_contrastive_plus_weighted_cross_entropy() -> None:
    e = _unit((1, 0), (0, 1), (-1, 0), (0, -1))
    y = torch.tensor([0, 0, 1, 1])
    loss = create_loss(
        "hybrid",
        embedding_dim=2,
        num_classes=2,
        pos_margin=0.5,
        neg_margin=1.6,
        ce_weight=0.25,
        scale=2.0,
    )
    with torch.no_grad():
        loss.classifier.head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        loss.classifier.head.bias.zero_()
    contrastive = (math.sqrt(2) - 0.5) + (1.6 - math.sqrt(2))  # as in the contrastive test
    # Logits = head(2 e): (2, -2), (0, 0), (-2, 2), (0, 0); targets 0, 0, 1, 1.
    ce = (-math.log(1 / (1 + math.exp(-4))) - math.log(0.5)) / 2
    assert loss(e, y).item() == pytest.approx(contrastive + 0.25 * ce, abs=1e-5)
    assert len(list(loss.parameters())) == 2  # the head is trained with the encoder
    with pytest.raises(ValueError, match="ce_weight"):
        create_loss("hybrid", embedding_dim=2, num_classes=2, ce_weight=-1.0)


def test_pair_loss_matches_hand_bce() -> None:
    head = PairLoss(2, balanced=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([-2.0, -1.0]))
        head.bias.fill_(1.5)
    e = torch.tensor([[0.0, 0.0], [0.5, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    # Pairs (0,1) same: |d| = (0.5, 1) -> logit 1.5 - 1 - 1 = -0.5
    #       (0,2) diff: |d| = (1, 0)   -> logit 1.5 - 2 = -0.5
    #       (1,2) diff: |d| = (0.5, 1) -> logit -0.5
    p = 1 / (1 + math.exp(0.5))
    expected = (-math.log(p) - math.log(1 - p) - math.log(1 - p)) / 3
    assert head(e, y).item() == pytest.approx(expected, abs=1e-6)
    balanced = PairLoss(2, balanced=True)
    balanced.load_state_dict(head.state_dict())
    assert balanced(e, y).item() == pytest.approx((-math.log(p) - math.log(1 - p)) / 2, abs=1e-6)


def test_pair_loss_parameters_learn() -> None:
    head = create_loss("pair", embedding_dim=4, num_classes=2)
    params = list(head.parameters())
    assert len(params) == 2
    e = F.normalize(torch.randn(6, 4), dim=1)
    head(e, torch.tensor([0, 0, 0, 1, 1, 1])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_focal_equals_cross_entropy_at_gamma_zero() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 3)
    target = torch.randint(0, 3, (7,))
    torch.testing.assert_close(
        focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target)
    )


def test_focal_hand_value_at_gamma_two() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 1])
    # p_t = 0.75 and 0.5: -(0.25^2) ln 0.75 and -(0.5^2) ln 0.5, averaged.
    expected = (-(0.25**2) * math.log(0.75) - (0.5**2) * math.log(0.5)) / 2
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_focal_is_stable_for_confident_logits() -> None:
    logits = torch.tensor([[200.0, -200.0]], requires_grad=True)
    value = focal_loss(logits, torch.tensor([0]), gamma=2.0)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(logits.grad).all()


def test_classifier_loss_uses_head_and_focal_option() -> None:
    loss = create_loss("classifier", embedding_dim=4, num_classes=3, focal_gamma=2.0)
    assert isinstance(loss, ClassifierLoss)
    e = F.normalize(torch.randn(5, 4), dim=1)
    y = torch.tensor([0, 1, 2, 0, 1])
    expected = focal_loss(loss.logits(e), y, gamma=2.0)
    torch.testing.assert_close(loss(e, y), expected)
    assert sum(p.numel() for p in loss.parameters()) == 4 * 3 + 3
