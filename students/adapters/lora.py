"""LoRA on every attention ``qkv`` Linear (Hu et al., arXiv 2106.09685), mergeable for export.

``y = W0 x + s * B(A x)`` with ``A: r x C`` (Kaiming-uniform, a = sqrt(5)), ``B: 3C x r``
(zero-initialised, so the adapted encoder equals the frozen one exactly at init) and
``s = alpha / r``. Defaults r = 3, alpha = 32 are the Conv-LoRA preset ``semantic_segmentation``
of autogluon (``multimodal/src/autogluon/multimodal/utils/presets.py``, ``optim.lora``), where the
filter ``"q"`` matches SAM's fused ``qkv``: q, k and v are adapted jointly, ``proj`` is not.

Which layers: every attention ``qkv`` (SAM's ``Attention``, our ``DilatedFlashAttention``). A DFA
student's ``MLPOnlyBlock``s (``students/encoder.py``; the first two blocks of every builder) have
no ``qkv`` and get no bypass: they stay exactly the frozen student, and all adaptation capacity
sits in the DFA blocks (4 of 6 in ``dfa_t``, 6 of 8 in ``dfa_s``). Parameters: ``4 r C`` per
adapted Linear.

Why not ``peft``: its LoRA would wrap our ``qkv`` Linears given ``target_modules=["qkv"]``, but
Conv-LoRA (``conv_lora.py``) needs the ``[B', H, W, r]`` token grid inside the bypass, which a
generic Linear wrapper does not give; one small class serves both methods here, ``merge`` restores
the exact ``qkv.weight`` key layout of the export format, and the project keeps no extra
dependency (peft is not installed).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from students.adapters.base import AdaptedEncoder, attention_with_qkv, register_adapter


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with a low-rank bypass; tokens ``[..., C] -> [..., C_out]``."""

    def __init__(self, base: nn.Linear, r: int = 3, alpha: float = 32.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        base.requires_grad_(False)
        self.base = base
        self.r = r
        self.scale = alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_B(self.bottleneck(self.lora_A(x)))

    def bottleneck(self, z: Tensor) -> Tensor:
        """What happens between A and B: nothing for LoRA (Conv-LoRA adds its experts)."""
        return z

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with ``s * B A`` folded into its weight (the base is updated in place)."""
        self.base.weight += self.scale * (self.lora_B.weight @ self.lora_A.weight)
        return self.base


class LoRAEncoder(AdaptedEncoder):
    """A frozen encoder whose attention ``qkv`` Linears carry a LoRA bypass.

    ``bypass_kwargs`` go to ``bypass_cls`` (a subclass such as Conv-LoRA's takes more options).
    """

    bypass_cls: type[LoRALinear] = LoRALinear

    def __init__(
        self, encoder: nn.Module, r: int = 3, alpha: float = 32.0, **bypass_kwargs: int
    ) -> None:
        super().__init__(encoder)
        for attn in attention_with_qkv(encoder):
            attn.qkv = self.bypass_cls(attn.qkv, r, alpha, **bypass_kwargs)

    def bypasses(self) -> list[LoRALinear]:
        """Every bypassed Linear, in module order."""
        return [m for m in self.encoder.modules() if isinstance(m, LoRALinear)]

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold every ``B A`` into its ``qkv`` weight and put the plain Linears back.

        Afterwards the encoder has its original module and state-dict layout (``...attn.qkv.
        weight``), no trainable parameter, and (up to float rounding) the same output; it is
        returned for export. Merging is final: the bypass is gone.
        """
        for module in list(self.encoder.modules()):
            qkv = getattr(module, "qkv", None)
            if isinstance(qkv, LoRALinear):
                module.qkv = qkv.merged()
        return self.encoder


@register_adapter
def lora(encoder: nn.Module, r: int = 3, alpha: float = 32.0) -> LoRAEncoder:
    """LoRA r (default 3), alpha (default 32) on every attention ``qkv``; ``4 r C`` params each."""
    return LoRAEncoder(encoder, r, alpha)
