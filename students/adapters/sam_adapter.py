"""In-encoder bottleneck adapters on every block, Medical SAM Adapter layout (arXiv 2304.12620).

Official ``SuperMedIntel/Medical-SAM-Adapter`` (``models/common/adapter.py``,
``models/ImageEncoder/vit/adapter_block.py``; our own code): an adapter is ``Linear(D -> D/4) -> GELU -> Linear(D/4 -> D)``; per block

    x = x + SpaceAdapter(attn(norm1(x)))         # after attention, with its skip
    x = x + mlp(norm2(x)) + 0.5 * MLPAdapter(norm2(x))   # parallel to the MLP

A DFA student's ``MLPOnlyBlock``s have no attention, so they get only the MLP adapter. Both are
attached by wrapping ``block.attn`` and ``block.mlp``, which fits SAM's ``Block`` and our blocks
alike (adapters are token-wise, so SAM's window partition does not change them). Unlike MSA the
up-projection is zero-initialised (weight and bias), so the adapted encoder equals the frozen one
exactly at init. SAM-Adapter's own prompt generator (Chen et al., arXiv 2304.09148: prompts from
patch embedding + high-frequency features added before each block) is not implemented; like it,
this method keeps every block's activations for backward, the baseline CAD is measured against.
Parameters per adapter: ``2 D h + h + D``, h = int(D * ratio), one per block plus one per
attention block.
"""

from __future__ import annotations

from torch import Tensor, nn

from students.adapters.base import AdaptedEncoder, register_adapter


class Bottleneck(nn.Module):
    """``[..., D] -> [..., D]``: down, GELU, up (zero-initialised up-projection)."""

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        if hidden < 1:
            raise ValueError(f"sam_adapter ratio={ratio} leaves no hidden unit at width {dim}")
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))


class AfterAdapter(nn.Module):
    """``y = f(x); y + adapter(y)``: MSA's ``Space_Adapter`` after the attention."""

    def __init__(self, inner: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        return y + self.adapter(y)


class ParallelAdapter(nn.Module):
    """``f(x) + weight * adapter(x)``: MSA's ``MLP_Adapter`` beside the MLP (weight 0.5)."""

    def __init__(self, inner: nn.Module, adapter: Bottleneck, weight: float = 0.5) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter
        self.weight = weight

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) + self.weight * self.adapter(x)


class SAMAdapterEncoder(AdaptedEncoder):
    """A frozen encoder with bottleneck adapters in every block (``encoder.blocks``)."""

    def __init__(self, encoder: nn.Module, ratio: float = 0.25, mlp_weight: float = 0.5) -> None:
        super().__init__(encoder)
        blocks = getattr(encoder, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or not all(
            hasattr(b, "mlp") and hasattr(b, "norm2") for b in blocks
        ):
            raise ValueError(
                f"{type(encoder).__name__}: sam_adapter needs encoder.blocks, each with norm2 and "
                "mlp (SAM's ImageEncoderViT and the DFA students have them)"
            )
        for block in blocks:
            dim = block.norm2.normalized_shape[0]
            if isinstance(getattr(block, "attn", None), nn.Module):
                block.attn = AfterAdapter(block.attn, Bottleneck(dim, ratio))
            block.mlp = ParallelAdapter(block.mlp, Bottleneck(dim, ratio), mlp_weight)


@register_adapter
def sam_adapter(
    encoder: nn.Module, ratio: float = 0.25, mlp_weight: float = 0.5
) -> SAMAdapterEncoder:
    """MSA-style adapters, hidden width ``ratio * D`` (0.25), MLP adapter weight 0.5."""
    return SAMAdapterEncoder(encoder, ratio, mlp_weight)
