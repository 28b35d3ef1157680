"""Distillation losses: padding-masked MSE on the final embedding and on projected block outputs.

The cached teacher features cover the padded square canvas; only embedding cells that see real
pixels carry signal (EdgeSAM's phase-1 loss masks padding the same way), so both losses average
over valid cells only, per image, then over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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


class TapProjections(nn.Module):
    """Learned linear maps from student block width to teacher block width, one per layer pair.

    Used only during training: the export drops them.
    """

    def __init__(self, student_width: int, teacher_width: int, num_pairs: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(num_pairs))

    def forward(self, taps: Sequence[Tensor]) -> list[Tensor]:
        """taps: student block outputs [B, h, w, Cs] in pair order -> [B, h, w, Ct] each."""
        return [p(t) for p, t in zip(self.proj, taps, strict=True)]


def pair_losses(
    student_embed: Tensor,
    student_taps: Sequence[Tensor],
    teacher_embed: Tensor,
    teacher_taps: Sequence[Tensor],
    valid: Tensor,
) -> list[Tensor]:
    """Loss of every pair, shallow to deep: projected taps first, the final embedding last."""
    losses = [
        masked_mse(s, t, valid, True) for s, t in zip(student_taps, teacher_taps, strict=True)
    ]
    return losses + [masked_mse(student_embed, teacher_embed, valid, False)]


def weighted_loss(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Sum of w_k * loss_k; pairs with weight 0 are left out of the graph."""
    if len(losses) != len(weights):
        raise ValueError(f"{len(losses)} losses but {len(weights)} weights")
    terms = [w * loss for w, loss in zip(weights, losses, strict=True) if w > 0]
    return torch.stack(terms).sum() if terms else losses[-1] * 0.0


def student_taps_for(
    teacher_taps: Sequence[int], teacher_depth: int, student_depth: int
) -> list[int]:
    """Student blocks at the same relative depth as the teacher's taps (e.g. ViT-H 7,15,23,31 of 32
    -> 1,3,5,7 of 8)."""
    taps = [max(0, round((t + 1) * student_depth / teacher_depth) - 1) for t in teacher_taps]
    if len(set(taps)) != len(taps):
        raise ValueError(
            f"teacher taps {list(teacher_taps)} map onto repeated student blocks {taps}; "
            "give --student-taps explicitly"
        )
    return taps
