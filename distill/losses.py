"""Training losses. Distillation: padding-masked MSE on the final embedding and on projected block
outputs. Adaptation: mask losses on decoder logits (`MASK_LOSSES`), padding masked as well.

The cached teacher features cover the padded square canvas; only embedding cells that see real
pixels carry signal (EdgeSAM's phase-1 loss masks padding the same way), so both losses average
over valid cells only, per image, then over the batch. From a cache with a token reduction
(`teachers.reduction`) the layer pairs run over the K stored tokens of each image instead, all of
them valid: an unbiased estimate of the same masked mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_mse(student: Tensor, teacher: Tensor, valid: Tensor, channels_last: bool) -> Tensor:
    """Mean squared error over valid cells and all channels, averaged per image then over the batch.

    student, teacher: [B, C, h, w] (channels_last False) or [B, h, w, C] (True).
    valid: [B, h, w] bool, True where the cell covers real pixels.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ"
        )
    sq = (student.float() - teacher.float()).pow(2)
    per_cell = sq.mean(-1) if channels_last else sq.mean(1)  # [B, h, w]
    mask = valid.to(per_cell.dtype)
    per_image = (per_cell * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
    return per_image.mean()


def gather_tokens(x: Tensor, tokens: Tensor) -> Tensor:
    """Block outputs ``[B, h, w, C]`` at each image's token positions ``tokens`` ``[B, K]``
    (row-major indices into ``h * w``): ``[B, K, C]``, one gather for the batch."""
    flat = x.flatten(1, 2)
    return flat.gather(1, tokens.to(x.device)[..., None].expand(-1, -1, flat.shape[-1]))


def token_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over the stored tokens and channels of ``[B, K, C]`` pairs, per image
    then over the batch (every image has the same K, so this is the plain mean)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ"
        )
    return (student.float() - teacher.float()).pow(2).mean()


class TapProjections(nn.Module):
    """Learned linear maps from student block width to teacher block width, one per layer pair.

    Used only during training: the export drops them.
    """

    def __init__(self, student_width: int, teacher_width: int, num_pairs: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(num_pairs))

    def forward(self, taps: Sequence[Tensor]) -> list[Tensor]:
        """taps: student block outputs [B, h, w, Cs] (or [B, K, Cs]) in pair order -> [B, h, w, Ct]
        (or [B, K, Ct]) each."""
        return [p(t) for p, t in zip(self.proj, taps, strict=True)]


def pair_losses(
    student_embed: Tensor,
    student_taps: Sequence[Tensor],
    teacher_embed: Tensor,
    teacher_taps: Sequence[Tensor],
    valid: Tensor,
    tokens: Tensor | None = None,
) -> list[Tensor]:
    """Loss of every pair, shallow to deep: projected taps first, the final embedding last.

    tokens: [B, K] positions of teacher taps stored as [B, K, Ct] (a token-reduced cache); the
    student's taps are then [B, K, Ct] already, or [B, h, w, Ct] and gathered here."""
    if tokens is None:
        losses = [
            masked_mse(s, t, valid, True) for s, t in zip(student_taps, teacher_taps, strict=True)
        ]
    else:
        losses = [
            token_mse(gather_tokens(s, tokens) if s.dim() == 4 else s, t)
            for s, t in zip(student_taps, teacher_taps, strict=True)
        ]
    return losses + [masked_mse(student_embed, teacher_embed, valid, False)]


def weighted_loss(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Sum of w_k * loss_k; pairs with weight 0 are left out of the graph."""
    if len(losses) != len(weights):
        raise ValueError(f"{len(losses)} losses but {len(weights)} weights")
    terms = [w * loss for w, loss in zip(weights, losses, strict=True) if w > 0]
    return torch.stack(terms).sum() if terms else losses[-1] * 0.0


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean over [H, W] of [B, 1, H, W] maps."""
    return (values * weights).sum((2, 3)) / weights.sum((2, 3)).clamp_min(1e-6)


def structure_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """PraNet's structure loss, as Conv-LoRA trains with it: boundary-weighted BCE plus
    boundary-weighted soft IoU. All [B, 1, H, W]; the weight is 1 + 5 |avgpool31(target) -
    target| (large near edges), multiplied by `valid` so padding counts nowhere; mean over B."""
    edge = 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)
    weight = edge * valid
    bce = _masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), weight)
    prob = torch.sigmoid(logits)
    inter = (prob * target * weight).sum((2, 3))
    union = ((prob + target) * weight).sum((2, 3))
    return (bce + 1 - (inter + 1) / (union - inter + 1)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice over the valid pixels, [B, 1, H, W] each; mean over B."""
    bce = _masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), valid)
    prob = torch.sigmoid(logits) * valid
    inter = (prob * target).sum((2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum((2, 3)) + (target * valid).sum((2, 3)) + 1)
    return (bce + dice).mean()


def soft_bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE to soft targets (probabilities) over the valid pixels, [B, 1, H, W] each; mean over B.
    Least where sigmoid(logits) equals the target."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return _masked_mean(bce, valid).mean()


MASK_LOSSES = {"structure": structure_loss, "bce_dice": bce_dice_loss}
