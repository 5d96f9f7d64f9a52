"""Distillation and segmentation losses against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regionkd.train.losses import imd_loss, pmd_loss, rad_loss, segmentation_loss, soft_dice_loss

torch.set_num_threads(1)


def _img(rows):
    """Feature map from per-pixel vectors: rows[n][pixel] = [c0, c1, ...] -> N x C x 1 x P."""
    return torch.tensor(rows, dtype=torch.float32).permute(0, 2, 1).unsqueeze(2)


def _onehot(labels, k):
    """labels[n][pixel] -> N x K x 1 x P one-hot."""
    return F.one_hot(torch.tensor(labels), k).permute(0, 2, 1).unsqueeze(2).float()


# ---------- PMD ----------

def test_pmd_hand_value():
    T = 4.0
    # pixel 0: teacher softmax(t/T) = (3/4, 1/4), student (1/2, 1/2); pixel 1: identical -> KL 0
    t = torch.tensor([[[[T * math.log(3), 1.0]], [[0.0, 1.0]]]])  # 1 x 2 x 1 x 2
    s = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert pmd_loss(s, t, T).item() == pytest.approx(kl / 2 * T * T, rel=1e-5)
    assert pmd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_pmd_only_student_gets_gradient():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    pmd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# ---------- IMD ----------

def test_imd_hand_value_and_batch_mean():
    # sample 0: student map |F|^4 channel-mean = (1, 0) -> (1, 0); teacher (1, 1) -> (1, 1)/sqrt2
    # sample 1: identical maps -> 0.  Mean over the batch: (2 - sqrt2) / 2
    s = _img([[[1.0, -1.0], [0.0, 0.0]], [[1.0, 1.0], [2.0, 0.5]]])
    t = _img([[[1.0, 0.0], [1.0, 0.0]], [[3.0, 3.0], [6.0, 1.5]]])  # sample 1 = 3 x student: same map
    assert imd_loss(s, t, p=4).item() == pytest.approx((2 - math.sqrt(2)) / 2, rel=1e-5)


def test_imd_resizes_student_to_teacher():
    s = torch.full((1, 5, 1, 1), 2.0)          # constant -> uniform 2x2 map (1/2 each)
    t = torch.zeros(1, 7, 2, 2)
    t[0, :, 0, 0] = 1.0                        # teacher map (1, 0, 0, 0)
    assert imd_loss(s, t).item() == pytest.approx((0.5 - 1) ** 2 + 3 * 0.25, rel=1e-5)


# ---------- RAD ----------

def test_rad_two_regions_hand_value_with_masked_mean():
    # student: bg pixels (1,0),(0,1) -> prototype (.5,.5); fg (0,1) -> cos = 1/sqrt2
    # teacher (3 channels): bg (1,0,0),(1,0,0); fg (0,1,0) -> cos = 0.  Loss (1/sqrt2 - 0)^2 = 0.5
    s = _img([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    t = _img([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    target = _onehot([[0, 0, 1]], 2)
    assert rad_loss(s, t, target).item() == pytest.approx(0.5, rel=1e-5)


def test_rad_resizes_target_nearest():
    # features 1 x 2; target 2 x 4 resized nearest picks rows 0, columns 0 and 2
    s = _img([[[1.0, 0.0], [0.0, 1.0]]])                        # cos(bg, fg) = 0
    t = _img([[[1.0, 0.0], [1.0, 1.0]]])                        # cos = 1/sqrt2
    labels = torch.tensor([[[0, 1, 1, 1], [1, 1, 1, 1]]])       # picked: (0,0)=0, (0,2)=1
    target = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    assert rad_loss(s, t, target).item() == pytest.approx(0.5, rel=1e-5)


def test_rad_two_classes_equals_paper_formula():
    torch.manual_seed(0)
    s, t = torch.randn(3, 8, 6, 6), torch.randn(3, 16, 6, 6)
    labels = torch.randint(0, 2, (3, 6, 6))
    labels[:, 0, 0], labels[:, 0, 1] = 0, 1                     # both regions in every sample
    terms = []
    for n in range(3):
        fg = (labels[n] == 1).float()
        bg = 1 - fg

        def cos(f):
            proto_bg = (f * bg).sum((1, 2)) / bg.sum()
            proto_fg = (f * fg).sum((1, 2)) / fg.sum()
            return F.cosine_similarity(proto_bg, proto_fg, dim=0)

        terms.append((cos(s[n]) - cos(t[n])) ** 2)
    expected = torch.stack(terms).mean()
    target = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    assert rad_loss(s, t, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_rad_three_regions_with_absent_tumour():
    # sample 0 has bg, organ, tumour -> pairs (0,1),(0,2),(1,2): squared diffs 1, 1/2, 1/2
    # sample 1 has no tumour -> only (0,1): organ prototype of teacher = mean((1,1),(1,-1)) = (1,0),
    #   cos 1 vs student 0 -> 1.   Mean over the 4 terms = 3/4 (5 terms, counting the absent pair, would give 0.6)
    s = _img([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]).requires_grad_()
    t = _img([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0], [1.0, -1.0]]])
    target = _onehot([[0, 1, 2], [0, 1, 1]], 3)
    loss = rad_loss(s, t, target)
    assert loss.item() == pytest.approx(0.75, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_rad_no_pairs_is_zero_and_differentiable():
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = _onehot([[0] * 9, [0] * 9], 3).reshape(2, 3, 3, 3)
    loss = rad_loss(s, torch.randn(2, 4, 3, 3), target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()


# ---------- segmentation ----------

def test_segmentation_loss_hand_value():
    # pixel 0: logits (0, 0), label 0 -> p = 1/2; pixel 1: logits (ln3, 0), label 0 -> p = 3/4
    logits = torch.tensor([[[[0.0, math.log(3)]], [[0.0, 0.0]]]])
    target = torch.tensor([[[0, 0]]])
    focal = (-(0.5 ** 2) * math.log(0.5) - (0.25 ** 2) * math.log(0.75)) / 2
    # soft Dice, smooth 1: class 0 probs (.5,.75) vs (1,1); class 1 probs (.5,.25) vs (0,0)
    dice0 = (2 * 1.25 + 1) / (1.25 + 2 + 1)
    dice1 = (0 + 1) / (0.75 + 0 + 1)
    assert segmentation_loss(logits, target).item() == pytest.approx(focal + (1 - dice1), rel=1e-5)  # foreground only
    assert soft_dice_loss(logits, target, include_background=True).item() == pytest.approx(
        ((1 - dice0) + (1 - dice1)) / 2, rel=1e-5)


def test_segmentation_loss_rejects_bad_target():
    with pytest.raises(ValueError, match="target"):
        segmentation_loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
