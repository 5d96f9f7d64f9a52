"""The losses of region-aware knowledge distillation (Qin et al., IEEE TMI 2021), plus the
segmentation loss (focal + soft Dice).

All take raw logits / feature maps of shape N x C x H x W and return a scalar tensor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError

_EPS = 1e-8


def pmd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
             balance: str = "pixels") -> torch.Tensor:
    """Prediction-map distillation: per-pixel KL(softmax(t/T) || softmax(s/T)) times T^2 (keeps
    the gradient scale independent of T).

    balance "pixels" (the paper): the mean over all pixels and the batch. balance "classes": the
    mean within each class the teacher predicts (its argmax), then the mean over the classes it
    predicts anywhere in the batch, so that a lesion of 0.2% of the pixels weighs as much as the
    background instead of 0.2%."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"pmd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ")
    t = float(temperature)
    log_s = F.log_softmax(student_logits / t, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)  # N x H x W
    if balance == "pixels":
        return kl.mean() * t * t
    if balance != "classes":
        raise ConfigError(f"pmd_loss: balance must be 'pixels' or 'classes', got {balance!r}")
    cls = F.one_hot(teacher_logits.detach().argmax(1), teacher_logits.shape[1]).to(kl.dtype)  # N x H x W x C
    count = cls.sum((0, 1, 2))
    per_class = torch.einsum("nhw,nhwc->c", kl, cls) / count.clamp_min(1)
    present = count > 0
    return per_class[present].mean() * t * t


def importance_map(feat: torch.Tensor, p: int = 4) -> torch.Tensor:
    """Attention map of a feature map: mean over channels of |F|^p, flattened, L2-normalised
    per sample -> N x (H*W)."""
    att = feat.abs().pow(p).mean(1).flatten(1)
    return F.normalize(att, p=2, dim=1, eps=_EPS)


def imd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: int = 4) -> torch.Tensor:
    """Importance-map distillation (attention transfer): squared L2 distance between the
    student's and teacher's importance maps, averaged over the batch. A student map of another
    spatial size is first resized (bilinear) to the teacher's."""
    t_map = importance_map(teacher_feat.detach(), p).view(teacher_feat.shape[0], *teacher_feat.shape[-2:])
    return imd_loss_to_map(student_feat, t_map, p)


def imd_loss_to_map(student_feat: torch.Tensor, teacher_map: torch.Tensor, p: int = 4) -> torch.Tensor:
    """IMD against a teacher importance map given as N x h x w (what the teacher cache stores)."""
    if student_feat.shape[-2:] != teacher_map.shape[-2:]:
        student_feat = F.interpolate(student_feat, size=teacher_map.shape[-2:], mode="bilinear",
                                     align_corners=False)
    diff = importance_map(student_feat, p) - teacher_map.flatten(1)
    return diff.pow(2).sum(1).mean()


def region_affinity(feat: torch.Tensor, target_onehot: torch.Tensor):
    """Cosine similarities between region prototypes -> (N x K x K affinities, N x K presence).

    The one-hot target (N x K x H' x W') is resized nearest to the feature size; a region's
    prototype is the masked mean feature vector; absent regions are flagged, never divided by."""
    masks = F.interpolate(target_onehot.float(), size=feat.shape[-2:], mode="nearest")
    area = masks.sum((2, 3))                                    # N x K
    protos = torch.einsum("nchw,nkhw->nkc", feat, masks) / area.clamp_min(1.0).unsqueeze(-1)
    protos = F.normalize(protos, p=2, dim=2, eps=_EPS)
    return protos @ protos.transpose(1, 2), area > 0


def rad_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, target_onehot: torch.Tensor) -> torch.Tensor:
    """Region affinity distillation: for every pair of regions present in a sample, the squared
    difference between the student's and teacher's cosine affinity of the two region prototypes;
    the mean over all (sample, pair) terms. Two classes give exactly the paper's
    (cos_s(bg, fg) - cos_t(bg, fg))^2 averaged over the batch. Samples with fewer than two
    regions contribute nothing; if no sample has a pair the loss is 0 (still differentiable).
    Channel counts of student and teacher may differ."""
    if target_onehot.dim() != 4 or target_onehot.shape[0] != student_feat.shape[0]:
        raise ValueError(f"rad_loss: target_onehot must be N x K x H x W with N={student_feat.shape[0]}, "
                         f"got {tuple(target_onehot.shape)}")
    aff_t, present_t = region_affinity(teacher_feat.detach(), target_onehot)
    return rad_loss_to_affinity(student_feat, target_onehot, aff_t, present_t)


def rad_loss_to_affinity(student_feat: torch.Tensor, target_onehot: torch.Tensor, teacher_affinity: torch.Tensor,
                         teacher_present: torch.Tensor) -> torch.Tensor:
    """RAD against the teacher's region affinities (N x K x K) and region presence (N x K) at the
    teacher's feature size, as `region_affinity` gives them (what the teacher cache stores)."""
    aff_s, present_s = region_affinity(student_feat, target_onehot)
    present = present_s & teacher_present.bool()
    k = present.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=present.device).triu(1)
    pairs = present.unsqueeze(2) & present.unsqueeze(1) & upper  # N x K x K, i < j, both present
    sq = (aff_s - teacher_affinity.to(aff_s.dtype)).pow(2)
    count = pairs.sum()
    return torch.where(pairs, sq, torch.zeros_like(sq)).sum() / count.clamp_min(1)


def pseudo_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The segmentation loss (focal + soft Dice) of the student against the teacher's own labels
    (its argmax): hard-label distillation, as self-training uses on unlabelled images. Unlike
    PMD's mean over pixels, the Dice part weighs a small lesion class like a large one."""
    return segmentation_loss(student_logits, teacher_logits.detach().argmax(1))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Multi-class focal loss -(1 - p_y)^gamma log p_y, mean over pixels and batch."""
    log_p = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-(1 - log_p.exp()).pow(gamma) * log_p).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   include_background: bool = False) -> torch.Tensor:
    """1 - soft Dice per class (softmax probabilities vs one-hot, summed over batch and pixels),
    averaged over the foreground classes (nnU-Net's default; with `include_background` over all).
    Background is left out because it is nearly all of a CT slice: its Dice is about 1 whatever
    the network does with the small classes, and averaging it in halves the Dice gradient of the
    organ and lesion. smooth=1 (added to numerator and denominator) keeps a class absent from
    the batch near loss 0 once its predicted mass is small, instead of a constant 1."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return (1 - (dice if include_background else dice[1:])).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_seg = focal (gamma=2) + soft Dice, equal weights; target is N x H x W int64 labels."""
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"segmentation_loss: target {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)} (expected N x H x W labels)")
    target = target.long()
    return focal_loss(logits, target) + soft_dice_loss(logits, target)
