"""What every adapter shares: the frozen-encoder wrapper, the registry, and where to attach.

An adapter method is a builder ``(encoder, **kwargs) -> AdaptedEncoder`` registered by name, in
the style of timm's ``@register_model`` (``students/registry.py`` does the same for students).
``AdaptedEncoder`` keeps the encoder contract of ``DESIGN.md``: ``[B, 3, S, S] -> [B, 256, S/16,
S/16]`` with an ``img_size`` attribute, so it can replace ``sam.image_encoder``.

The encoder is frozen by construction (every parameter ``requires_grad=False``, set here) and is
modified in place by methods that work inside it (``lora``, ``conv_lora``, ``sam_adapter``), the
way peft and timm attach adapters. Only adapter parameters are trainable. Train/eval mode
propagates as usual: SAM's ViT and the DFA students have no dropout or batch norm, so the mode
only matters to adapter parts (Conv-LoRA's noisy gate, CAD's batch norm).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

# Attribute names under which adapters keep a module they wrap (LoRA's `base` Linear, the
# bottleneck adapters' `inner` attention/MLP): an export maps adapted keys to base keys by them.
WRAPPED = ("base", "inner")

_BUILDERS: dict[str, Callable[..., AdaptedEncoder]] = {}

BuilderT = TypeVar("BuilderT", bound=Callable[..., "AdaptedEncoder"])


def register_adapter(builder: BuilderT) -> BuilderT:
    """Decorator: register ``builder(encoder, **kwargs)`` under its function name."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"adapter {name!r} is registered twice")
    _BUILDERS[name] = builder
    return builder


def list_adapters() -> list[str]:
    """Names of every registered adapter method, sorted."""
    return sorted(_BUILDERS)


def build_adapter(name: str, encoder: nn.Module, **kwargs: object) -> AdaptedEncoder:
    """Freeze ``encoder`` and wrap it with adapter method ``name``; ``kwargs`` are its options.

    ``encoder`` is any encoder of this project (a DFA student or SAM's ``ImageEncoderViT``);
    methods that work inside it modify it in place.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {', '.join(list_adapters())}")
    adapted = _BUILDERS[name](encoder, **kwargs)
    adapted.adapter_name = name
    adapted.adapter_kwargs = dict(kwargs)
    return adapted


class AdaptedEncoder(nn.Module):
    """A frozen encoder plus adapter parts: ``[B, 3, S, S] -> [B, 256, S/16, S/16]``.

    The base class is the in-encoder case: the adapter parts live inside ``encoder`` (set up by
    the subclass after this constructor froze it), so ``forward`` just runs the encoder.
    Subclasses that run the encoder under ``torch.no_grad()`` override ``forward``.
    """

    adapter_name: str = ""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not hasattr(encoder, "img_size"):
            raise ValueError(
                f"{type(encoder).__name__} has no img_size attribute; adapters wrap the project's "
                "encoders (students.build_student(...) or a SAM image_encoder)"
            )
        encoder.requires_grad_(False)
        self.encoder = encoder
        self.img_size = int(encoder.img_size)
        self.adapter_kwargs: dict[str, object] = {}

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, S, S]`` preprocessed images -> ``[B, 256, S/16, S/16]`` embeddings."""
        return self.encoder(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters (what the optimizer gets); the encoder's are frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def num_trainable(self) -> int:
        """Number of trainable (adapter) parameters; each method's module gives its formula."""
        return sum(p.numel() for p in self.trainable_parameters())

    def aux_loss(self) -> Tensor:
        """Auxiliary loss of the last forward, to add to the task loss (0 for most methods)."""
        return torch.zeros((), device=_device(self.encoder))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def attention_with_qkv(encoder: nn.Module) -> list[nn.Module]:
    """Every attention module of ``encoder`` that has a fused ``qkv`` ``nn.Linear`` (C -> 3C).

    SAM's ``Attention`` and our ``DilatedFlashAttention`` both call ``self.qkv`` on
    ``[B', H, W, C]`` tokens (B' = B x windows in SAM's windowed blocks).
    """
    found = [m for m in encoder.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]
    if not found:
        raise ValueError(
            f"{type(encoder).__name__} has no attention module with a qkv Linear; lora and "
            "conv_lora adapt qkv projections (use cad, sam_adapter or decoder instead)"
        )
    return found
