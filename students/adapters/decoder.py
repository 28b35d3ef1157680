"""Decoder-only baseline: no adapter; the frozen encoder runs under ``torch.no_grad()``.

Only SAM's mask decoder trains (the baseline of CAD, arXiv 2409.15889, and of Conv-LoRA's
comparisons, arXiv 2401.17868). The encoder stores nothing for backward, so
its embeddings may be cached once per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from students.adapters.base import AdaptedEncoder, register_adapter


class FrozenEncoder(AdaptedEncoder):
    """The frozen encoder, unchanged: ``[B, 3, S, S] -> [B, 256, S/16, S/16]``, no gradient."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encoder(x)


@register_adapter
def decoder(encoder: nn.Module) -> FrozenEncoder:
    """No adapter: 0 trainable parameters in the encoder."""
    return FrozenEncoder(encoder)
