"""Conv-LoRA (Zhong et al., ICLR 2024, arXiv 2401.17868): LoRA with a mixture of conv experts.

``y = W0 x + s * B(z + MoE(z))``, ``z = A x``, on every attention ``qkv`` Linear, as in the
official ``ConvLoRALinear`` / ``MoEGate`` of autogluon
(``multimodal/src/autogluon/multimodal/models/adaptation_layers.py``; this is our own
code):

* ``z`` is laid out on the token grid ``[B', r, H, W]``. The ``qkv`` Linear receives ``[B', H, W,
  C]`` tokens, so no square-root guess is needed. In SAM's windowed blocks B' = B x windows and
  the convs and the routing work per window (14 x 14 in SAM ViT-H), in its global blocks on the
  whole grid. In a DFA student every attention block's ``qkv`` runs before the dilated tiling,
  so the experts and the router always see the whole image grid (one route per image).
* Expert k of E (k = 1..E) works at scale k: bicubic upsampling by k, ``Conv2d(r, r, 3,
  padding=1)`` (bias zero-initialised), GELU, bicubic resampling back to ``(H, W)``; expert 1
  skips both resamplings.
* Gate: noisy top-1 (Shazeer et al. 2017, arXiv 1701.06538): ``g = GAP(z) [B', r]``, logits
  ``g @ w_gate`` plus, in training, ``randn * (softplus(g @ w_noise) + 1e-2)``; both ``r x E``
  and zero-initialised. Each sample goes to its top expert, the output is not multiplied by the
  gate (``multiply_by_gates=False``; with k = 1 the gate is exactly 1). So, as in the official
  code, the task loss sends no gradient to the router: it is trained only by the balancing loss
  ``coef * (cv2(importance) + cv2(load))``, ``cv2 = var / (mean^2 + 1e-10)``, coef = 1e-2 per
  layer, summed over layers by ``aux_loss()`` and added with weight 1 to the task loss.

A DFA student's ``MLPOnlyBlock``s have no ``qkv``, hence no bypass and no experts (see
``lora.py``). Parameters per adapted ``Linear(C -> 3C)``: ``r C + 3 C r + E (9 r^2 + r) + 2 r E``.
Not mergeable: the bypass resamples and has a GELU, so ``B(z + MoE(z))`` is not linear in ``x``
and cannot be folded into ``W0``; it costs inference time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from students.adapters.base import register_adapter
from students.adapters.lora import LoRAEncoder, LoRALinear


class ScaleExpert(nn.Module):
    """Conv expert at one scale: ``[N, r, H, W] -> [N, r, H, W]``."""

    def __init__(self, r: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(r, r, kernel_size=3, padding=1, bias=True)
        nn.init.zeros_(self.conv.bias)

    def forward(self, z: Tensor) -> Tensor:
        size = z.shape[-2:]
        if self.scale > 1:
            z = F.interpolate(z, scale_factor=self.scale, mode="bicubic")
        z = F.gelu(self.conv(z))
        if self.scale > 1:
            z = F.interpolate(z, size=size, mode="bicubic")
        return z


def _cv_squared(x: Tensor) -> Tensor:
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyTop1Gate(nn.Module):
    """Route each ``[r]`` feature to one of E experts; returns (expert index ``[N]``, aux loss)."""

    def __init__(self, r: int, num_experts: int, coef: float = 1e-2) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.coef = coef
        self.w_gate = nn.Parameter(torch.zeros(r, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(r, num_experts))

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        clean = feats @ self.w_gate  # [N, E]
        if self.training:
            std = F.softplus(feats @ self.w_noise) + 1e-2
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        top = logits.topk(min(2, self.num_experts), dim=1)
        index = top.indices[:, :1]
        # softmax over the single top logit is 1, kept as a graph node as in Shazeer's gate
        gates = torch.zeros_like(logits).scatter(1, index, top.values[:, :1].softmax(1))
        if self.num_experts == 1:
            return index[:, 0], clean.sum() * 0
        if self.training:
            load = self._prob_in_top1(clean, logits, std, top.values).sum(0)
        else:
            load = (gates > 0).to(gates.dtype).sum(0)
        aux = self.coef * (_cv_squared(gates.sum(0)) + _cv_squared(load))
        return index[:, 0], aux

    @staticmethod
    def _prob_in_top1(clean: Tensor, noisy: Tensor, std: Tensor, top2: Tensor) -> Tensor:
        """Differentiable P(expert e is the top-1 under fresh noise), ``[N, E]``.

        Shazeer et al. 2017, appendix A: an expert already on top must beat the runner-up, any
        other expert must beat the current top value.
        """
        is_top = noisy >= top2[:, :1]
        p_if_top = _normal_cdf((clean - top2[:, 1:2]) / std)
        p_if_not = _normal_cdf((clean - top2[:, :1]) / std)
        return torch.where(is_top, p_if_top, p_if_not)


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x * 2.0**-0.5))


class ConvLoRALinear(LoRALinear):
    """LoRA bypass with a top-1 mixture of multi-scale conv experts on ``z = A x``.

    Input ``[B', H, W, C]`` tokens (or ``[B', L, C]`` with a square L), output ``[..., 3C]``.
    After each forward, ``last_aux_loss`` holds this layer's balancing loss.
    """

    def __init__(
        self, base: nn.Linear, r: int = 3, alpha: float = 32.0, num_experts: int = 8
    ) -> None:
        super().__init__(base, r, alpha)
        if num_experts < 1:
            raise ValueError(f"conv_lora needs num_experts >= 1, got {num_experts}")
        self.lora_moe_experts = nn.ModuleList(ScaleExpert(r, k) for k in range(1, num_experts + 1))
        self.lora_moe_gating = NoisyTop1Gate(r, num_experts)
        self.last_aux_loss: Tensor | None = None

    def bottleneck(self, z: Tensor) -> Tensor:
        shape = z.shape
        grid = _to_grid(z)  # [N, r, H, W]
        index, self.last_aux_loss = self.lora_moe_gating(grid.mean(dim=(2, 3)))
        mixed = torch.zeros_like(grid)
        for e in index.unique().tolist():
            rows = (index == e).nonzero().squeeze(1)
            mixed = mixed.index_copy(0, rows, self.lora_moe_experts[e](grid[rows]))
        return (grid + mixed).permute(0, 2, 3, 1).reshape(shape)


def _to_grid(z: Tensor) -> Tensor:
    """``[N, H, W, r]`` or ``[N, L, r]`` (L a square) -> ``[N, r, H, W]``."""
    if z.dim() == 3:
        side = int(round(z.shape[1] ** 0.5))
        if side * side != z.shape[1]:
            raise ValueError(f"conv_lora needs a square token grid, got {z.shape[1]} tokens")
        z = z.view(z.shape[0], side, side, z.shape[2])
    if z.dim() != 4:
        raise ValueError(f"conv_lora expects [B, H, W, C] or [B, L, C] tokens, got {z.shape}")
    return z.permute(0, 3, 1, 2)


class ConvLoRAEncoder(LoRAEncoder):
    """A frozen encoder whose attention ``qkv`` Linears carry a Conv-LoRA bypass."""

    bypass_cls = ConvLoRALinear

    def aux_loss(self) -> Tensor:
        """Sum over layers of the balancing losses of the last forward (add with weight 1)."""
        losses = [m.last_aux_loss for m in self.bypasses() if m.last_aux_loss is not None]
        return torch.stack(losses).sum() if losses else super().aux_loss()

    def merge(self) -> nn.Module:
        raise NotImplementedError(
            "conv_lora cannot be merged: its bypass resamples and applies GELU, so it is not a "
            "linear map that folds into the qkv weight; export the adapted encoder as is"
        )


@register_adapter
def conv_lora(
    encoder: nn.Module, r: int = 3, alpha: float = 32.0, num_experts: int = 8
) -> ConvLoRAEncoder:
    """Conv-LoRA, official defaults r = 3, alpha = 32, 8 experts at scales 1..8 (autogluon)."""
    return ConvLoRAEncoder(encoder, r, alpha, num_experts=num_experts)
