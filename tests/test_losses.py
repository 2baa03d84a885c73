"""Loss terms, uncertainty combination and deep supervision, checked against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from uumamba.config import LossConfig
from uumamba.errors import ConfigError
from uumamba.losses import (
    DeepSupervisionLoss,
    UncertaintyWeightedLoss,
    build_loss,
    deep_supervision_weights,
    downsample_target,
    optimal_sigma_sq,
)

SMOOTH = 1e-5

# One sample, 3 classes, 2 x 3 voxels; labels cover background, class 1 and class 2.
LOGITS = [
    [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]],  # class 0
    [[0.1, 2.5, 0.3], [-0.5, 0.2, 0.0]],  # class 1
    [[-1.0, 0.0, 1.5], [1.0, 2.0, -2.0]],  # class 2
]
LABELS = [[0, 1, 2], [2, 1, 0]]


def _softmax(column: list[float]) -> list[float]:
    exps = [math.exp(v) for v in column]
    return [e / sum(exps) for e in exps]


def _hand_terms(logits, labels, gamma=2.0, alpha=None, ignore=None):
    """Dice loss (batch), CE and focal for one sample by plain Python arithmetic."""
    n_classes = len(logits)
    inter = [0.0] * n_classes
    psum = [0.0] * n_classes
    gsum = [0.0] * n_classes
    ce = focal = 0.0
    count = 0
    for i, row in enumerate(labels):
        for j, t in enumerate(row):
            if ignore is not None and t == ignore:
                continue
            p = _softmax([logits[c][i][j] for c in range(n_classes)])
            count += 1
            ce += -math.log(p[t])
            a = 1.0 if alpha is None else alpha[t]
            focal += -a * (1 - p[t]) ** gamma * math.log(p[t])
            for c in range(n_classes):
                g = 1.0 if c == t else 0.0
                inter[c] += p[c] * g
                psum[c] += p[c]
                gsum[c] += g
    dice = [(2 * inter[c] + SMOOTH) / (psum[c] + gsum[c] + SMOOTH) for c in range(1, n_classes)]
    return {"dice": 1 - sum(dice) / len(dice), "ce": ce / count, "focal": focal / count}


def _tensors(logits=LOGITS, labels=LABELS):
    return torch.tensor([logits]), torch.tensor([[labels]], dtype=torch.float32)


def test_terms_match_hand_computation():
    logits, target = _tensors()
    loss = UncertaintyWeightedLoss(3)
    values = {k: float(v) for k, v in loss.term_values(logits, target).items()}
    expected = _hand_terms(LOGITS, LABELS)
    for key in ("dice", "ce", "focal"):
        assert values[key] == pytest.approx(expected[key], rel=1e-5), key
    # Cross-entropy agrees with torch's reference implementation as well.
    ref = torch.nn.functional.cross_entropy(logits, target[:, 0].long())
    assert values["ce"] == pytest.approx(float(ref), rel=1e-6)


def test_focal_alpha_and_gamma_by_hand():
    logits, target = _tensors()
    alpha = [0.25, 1.0, 2.0]
    loss = UncertaintyWeightedLoss(3, focal_gamma=0.5, focal_alpha=alpha)
    focal = float(loss.term_values(logits, target)["focal"])
    assert focal == pytest.approx(
        _hand_terms(LOGITS, LABELS, gamma=0.5, alpha=alpha)["focal"], rel=1e-5
    )


@torch.no_grad()
def test_uncertainty_combination_by_hand():
    logits, target = _tensors()
    loss = UncertaintyWeightedLoss(3)
    hand = _hand_terms(LOGITS, LABELS)
    # sigma = 1 at initialisation: L = sum L_i / 2 + 3 ln 2.
    assert loss.sigmas() == {"dice": 1.0, "ce": 1.0, "focal": 1.0}
    expected = sum(v / 2 for v in hand.values()) + 3 * math.log(2)
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-5)
    # Arbitrary sigmas: L_i / (2 sigma_i^2) + ln(1 + sigma_i^2).
    sig_sq = {"dice": 0.3, "ce": 2.5, "focal": 1.7}
    with torch.no_grad():
        loss.log_sigma_sq.copy_(
            torch.log(torch.tensor([sig_sq["dice"], sig_sq["ce"], sig_sq["focal"]]))
        )
    expected = sum(hand[k] / (2 * s) + math.log(1 + s) for k, s in sig_sq.items())
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-5)
    assert loss.sigmas()["ce"] == pytest.approx(math.sqrt(2.5), rel=1e-6)


def test_fixed_and_dice_ce_variants():
    logits, target = _tensors()
    hand = _hand_terms(LOGITS, LABELS)
    fixed = UncertaintyWeightedLoss(3, name="fixed")
    dice_ce = UncertaintyWeightedLoss(3, name="dice_ce")
    assert list(fixed.parameters()) == [] and fixed.sigmas() == {}
    assert list(dice_ce.parameters()) == []
    assert float(fixed(logits, target)) == pytest.approx(sum(hand.values()), rel=1e-5)
    assert float(dice_ce(logits, target)) == pytest.approx(hand["dice"] + hand["ce"], rel=1e-5)


def test_per_sample_dice_differs_from_batch_dice_by_hand():
    logits_a = torch.tensor(LOGITS)
    logits_b = torch.tensor(LOGITS).flip(-1) * 0.5
    labels_b = [[1, 1, 0], [0, 0, 0]]  # class 2 absent in sample b
    logits = torch.stack([logits_a, logits_b])
    target = torch.tensor([[LABELS], [labels_b]], dtype=torch.float32)

    def dice_per_class(lg, lb):
        rows = []
        for c in (1, 2):
            inter = ps = gs = 0.0
            for i in range(2):
                for j in range(3):
                    p = _softmax([lg[k][i][j] for k in range(3)])[c]
                    g = float(lb[i][j] == c)
                    inter, ps, gs = inter + p * g, ps + p, gs + g
            rows.append((inter, ps, gs))
        return rows

    a = dice_per_class(logits_a.tolist(), LABELS)
    b = dice_per_class(logits_b.tolist(), labels_b)
    per_sample = [(2 * i + SMOOTH) / (p + g + SMOOTH) for i, p, g in a + b]
    batch = [
        (2 * (ia + ib) + SMOOTH) / (pa + pb + ga + gb + SMOOTH)
        for (ia, pa, ga), (ib, pb, gb) in zip(a, b, strict=True)
    ]
    loss_ps = UncertaintyWeightedLoss(3, batch_dice=False).term_values(logits, target)["dice"]
    loss_b = UncertaintyWeightedLoss(3, batch_dice=True).term_values(logits, target)["dice"]
    assert float(loss_ps) == pytest.approx(1 - sum(per_sample) / 4, rel=1e-5)
    assert float(loss_b) == pytest.approx(1 - sum(batch) / 2, rel=1e-5)
    assert abs(float(loss_ps) - float(loss_b)) > 1e-3


def test_ignore_index_contributes_to_no_term():
    ignore = 255
    labels = [[0, 255, 2], [255, 1, 0]]
    logits, target = _tensors(labels=labels)
    loss = UncertaintyWeightedLoss(3, ignore_index=ignore)
    values = {k: float(v) for k, v in loss.term_values(logits, target).items()}
    hand = _hand_terms(LOGITS, labels, ignore=ignore)
    for key in hand:
        assert values[key] == pytest.approx(hand[key], rel=1e-5), key
    # Wildly different logits at the ignored voxels change nothing and get no gradient.
    logits2 = logits.clone()
    logits2[0, :, 0, 1] = torch.tensor([50.0, -50.0, 10.0])
    logits2.requires_grad_(True)
    out = loss(logits2, target)
    assert float(out.detach()) == pytest.approx(float(loss(logits, target).detach()), rel=1e-6)
    out.backward()
    assert torch.all(logits2.grad[0, :, 0, 1] == 0) and torch.all(logits2.grad[0, :, 1, 0] == 0)
    assert logits2.grad[0, :, 0, 0].abs().sum() > 0


@pytest.mark.parametrize("batch_dice", [True, False])
def test_empty_classes_give_finite_loss_and_gradients(batch_dice):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 3, requires_grad=True)  # 3D, classes 1-3 absent
    target = torch.zeros(2, 1, 6, 5, 3)
    loss = UncertaintyWeightedLoss(4, batch_dice=batch_dice)
    values = loss.term_values(logits, target)
    out = loss.combine(values)
    out.backward()
    assert torch.isfinite(out) and all(torch.isfinite(v) for v in values.values())
    assert torch.isfinite(logits.grad).all() and torch.isfinite(loss.log_sigma_sq.grad).all()
    assert logits.grad.abs().sum() > 0
    # Confident, correct background prediction: Dice of the absent classes tends to 1.
    confident = torch.zeros(1, 4, 4, 4)
    confident[:, 0] = 30.0
    assert float(loss.term_values(confident, torch.zeros(1, 1, 4, 4))["dice"]) < 1e-3


@torch.no_grad()
def test_every_term_non_negative_and_total_bounded_below():
    torch.manual_seed(1)
    loss = UncertaintyWeightedLoss(3)
    for _ in range(5):
        logits = torch.randn(2, 3, 8, 8) * 5
        target = torch.randint(0, 3, (2, 1, 8, 8))
        values = loss.term_values(logits, target)
        assert all(float(v) >= 0 for v in values.values())
        loss.log_sigma_sq.uniform_(-8, 8)
        total = float(loss.combine(values))
        assert total >= float(torch.nn.functional.softplus(loss.log_sigma_sq).sum()) - 1e-6


def test_sigma_converges_to_closed_form_optimum():
    fixed_terms = {"dice": 0.35, "ce": 1.3, "focal": 0.04}
    loss = UncertaintyWeightedLoss(3)
    # The objective is strictly convex in log sigma^2, so L-BFGS converges in a few steps.
    opt = torch.optim.LBFGS(loss.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    values = {k: torch.tensor(v) for k, v in fixed_terms.items()}

    def closure():
        opt.zero_grad()
        total = loss.combine(values)
        total.backward()
        return total

    opt.step(closure)
    sig = loss.sigmas()
    for key, value in fixed_terms.items():
        s_star = optimal_sigma_sq(value)
        assert s_star == pytest.approx((value + math.sqrt(value**2 + 8 * value)) / 4)
        # Stationarity 2 s^2 = L (1 + s) holds at the closed form ...
        assert 2 * s_star**2 == pytest.approx(value * (1 + s_star), rel=1e-12)
        # ... and minimising over sigma alone reaches it.
        assert sig[key] ** 2 == pytest.approx(s_star, rel=1e-3), key
    minimum = sum(
        v / (2 * optimal_sigma_sq(v)) + math.log1p(optimal_sigma_sq(v))
        for v in fixed_terms.values()
    )
    assert float(loss.combine(values).detach()) == pytest.approx(minimum, rel=1e-5)
    assert minimum > 0


def test_input_validation():
    loss = UncertaintyWeightedLoss(3)
    with pytest.raises(ValueError, match="logits"):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="target"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\[3\]"):
        loss(torch.zeros(1, 3, 2, 2), torch.tensor([[[[0, 3], [1, 2]]]]))
    with pytest.raises(ValueError, match="focal_alpha"):
        UncertaintyWeightedLoss(3, focal_alpha=[1.0, 1.0])
    with pytest.raises(ValueError, match="num_classes"):
        UncertaintyWeightedLoss(1)


def test_deep_supervision_weights_by_value():
    assert deep_supervision_weights(1) == (1.0,)
    assert deep_supervision_weights(2) == (1.0, 0.0)
    w = deep_supervision_weights(4)
    assert w == pytest.approx((1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0))


def test_downsample_target_nearest_keeps_labels_and_ignore():
    target = torch.arange(64, dtype=torch.int64).reshape(1, 1, 8, 8) % 5
    target[0, 0, 3, 5] = 255
    small = downsample_target(target, (4, 4))
    assert small.dtype == torch.int64 and small.shape == (1, 1, 4, 4)
    # nearest-exact, factor 2: output voxel i samples input voxel 2 i + 1.
    assert torch.equal(small, target[:, :, 1::2, 1::2])
    assert int(small[0, 0, 1, 2]) == 255
    # factor 4: output voxel i samples input voxel 4 i + 2 (floor of the centre 4 i + 1.5).
    assert torch.equal(downsample_target(target.float(), (2, 2)), target[:, :, 2::4, 2::4].float())
    assert downsample_target(target, (8, 8)) is target


class _RecordingLoss(torch.nn.Module):
    """Mean of the logits; remembers the targets it was given."""

    def __init__(self):
        super().__init__()
        self.targets = []

    def forward(self, logits, target):
        self.targets.append(target)
        return logits.mean()


def test_deep_supervision_loss_weights_and_targets_by_value():
    inner = _RecordingLoss()
    ds = DeepSupervisionLoss(inner, 3)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    outputs = [
        torch.full((2, 3, 8, 8, 8), 1.0),
        torch.full((2, 3, 4, 4, 4), 4.0),
        torch.full((2, 3, 2, 2, 2), 100.0),
    ]
    outputs = [o.requires_grad_(True) for o in outputs]
    total = ds(outputs, target)
    assert float(total.detach()) == pytest.approx(2 / 3 * 1.0 + 1 / 3 * 4.0)
    assert len(inner.targets) == 2  # the weight-0 output is not scored
    assert torch.equal(inner.targets[0], target)
    assert torch.equal(inner.targets[1], target[:, :, 1::2, 1::2, 1::2])
    total.backward()
    assert torch.all(outputs[2].grad == 0)  # in the graph (DDP) but weighted 0
    assert float(outputs[1].grad[0, 0, 0, 0, 0]) == pytest.approx(1 / 3 / outputs[1].numel())
    # A single tensor (eval mode / no deep supervision) is the plain loss.
    assert float(ds(outputs[0], target).detach()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected 3 outputs"):
        ds(outputs[:2], target)


def test_build_loss_from_config_exposes_sigma_parameters():
    loss = build_loss(LossConfig(name="uncertainty", batch_dice=False), 4, 255, n_outputs=3)
    assert isinstance(loss, DeepSupervisionLoss) and loss.loss.ignore_index == 255
    params = list(loss.parameters())
    assert len(params) == 1 and params[0].shape == (3,)
    assert set(loss.sigmas()) == {"dice", "ce", "focal"}
    assert "loss.log_sigma_sq" in loss.state_dict()
    torch.manual_seed(0)
    outs = [
        torch.randn(1, 4, 16, 16, requires_grad=True),
        torch.randn(1, 4, 8, 8),
        torch.randn(1, 4, 4, 4),
    ]
    target = torch.randint(0, 4, (1, 1, 16, 16))
    value = loss(outs, target)
    logged = loss.terms()
    inner = loss.loss
    expected = 2 / 3 * inner(outs[0], target) + 1 / 3 * inner(outs[1], target[:, :, 1::2, 1::2])
    full = inner.term_values(outs[0], target)
    half = inner.term_values(outs[1], target[:, :, 1::2, 1::2])
    for key in ("dice", "ce", "focal"):
        assert logged[key] == pytest.approx(
            float(2 / 3 * full[key].detach() + 1 / 3 * half[key].detach()), rel=1e-6
        )
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    value.backward()
    assert params[0].grad is not None and torch.isfinite(params[0].grad).all()
    assert build_loss(LossConfig(name="fixed"), 3, None, 1).sigmas() == {}
    with pytest.raises(ConfigError, match="focal_alpha"):
        build_loss(LossConfig(focal_alpha=[1.0, 2.0]), 3, None, 1)
