"""META (Zhang et al., ICLR 2025, arXiv 2502.01962): a side network of MEA blocks
(``students/adapters/mea.py``) beside the frozen encoder, added to its final embedding.

META is a ViT-Adapter-style network for dense prediction (a convolutional spatial prior plus
interaction with a plain ViT, as its abstract describes); with no official code, this
is its PEFT form for SAM, built from what is known:

* the encoder runs under ``torch.no_grad()`` (as in ``cad``): it stores nothing for backward and
  gets no gradient. Unlike ViT-Adapter, nothing is injected back into it, which would need the
  encoder's activations for backward;
* a spatial prior ``F_sp``: four 3x3 stride-2 convolutions on the (preprocessed) image down to the
  embedding grid, widths ``width/4, width/2, width, width``, GELU between (``prior=0`` drops it);
* the encoder's tapped blocks ``F_vit``, the taps the distiller and the teacher cache use: SAM's
  global-attention blocks (``window_size == 0``; ViT-B 2, 5, 8, 11) and, for a DFA student, the
  blocks ``students.taps.student_taps_for`` pairs with them (``dfa_t`` 1, 2, 3, 5);
* the blocks are cascaded over the taps: the state starts as ``F_sp`` and, per tap ``k``,
  ``x = W_s x + W_t LN(F_vit_k)`` (a linear map of the concatenation ``[F_sp; F_vit]`` that the
  paper's Fig. 2a feeds to an MEA block, written as two matmuls so that no concatenated copy is
  made), then ``depth`` MEA blocks; shallow taps first;
* the final state goes through a zero-initialised ``Linear(width -> 256)`` and is added to the
  embedding, so the adapted model equals the frozen one at step 0.

Defaults (tuned on the synthetic domain of ``tests/distill/test_adapt_gain.py``): ``width`` 64,
``num_heads`` 4, ``stripe`` 2, ``ffn_ratio`` 1, ``depth`` 1 per tap, shared LayerNorm, no cascaded
heads; every MEA choice is an option (see ``mea.py``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from students.adapters.base import AdaptedEncoder, register_adapter
from students.adapters.mea import MEABlock, NHWCConv2d
from students.taps import student_taps_for
from teachers.build import DEFAULT_TAPS, TEACHER_SIZES

EMBED_CHANS = 256  # SAM's image embedding channels


def tap_blocks(encoder: nn.Module) -> list[int]:
    """The blocks of ``encoder`` whose outputs feed META: SAM's global-attention blocks, or a DFA
    student's blocks at the relative depths of ViT-H's (every SAM teacher's taps sit at the same
    quarters of its depth, so the choice does not depend on which teacher distilled it)."""
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(
            f"{type(encoder).__name__}: meta taps encoder.blocks (SAM's ImageEncoderViT and the "
            "DFA students have them)"
        )
    if all(hasattr(b, "window_size") for b in blocks):
        return [i for i, b in enumerate(blocks) if b.window_size == 0]
    depth = TEACHER_SIZES["vit_h"][1]
    return student_taps_for(DEFAULT_TAPS["vit_h"], depth, len(blocks))


class SpatialPrior(nn.Module):
    """``[B, 3, S, S] -> [B, S/16, S/16, width]``: four 3x3 stride-2 convs, GELU between."""

    def __init__(self, width: int) -> None:
        super().__init__()
        chans = [3, max(1, width // 4), max(1, width // 2), width, width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [NHWCConv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers[:-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class MetaSide(nn.Module):
    """The side network: ``(image, taps [B, h, w, C_enc] each) -> [B, 256, h, w]``."""

    def __init__(
        self, enc_dim: int, num_taps: int, width: int, depth: int, prior: bool, **block: object
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"meta needs width >= 1 and depth >= 1, got {width}, {depth}")
        self.prior = SpatialPrior(width) if prior else None
        self.tap_norms = nn.ModuleList(nn.LayerNorm(enc_dim) for _ in range(num_taps))
        self.tap_proj = nn.ModuleList(nn.Linear(enc_dim, width) for _ in range(num_taps))
        self.state_proj = nn.ModuleList(
            nn.Linear(width, width, bias=False) for _ in range(num_taps if prior else num_taps - 1)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*(MEABlock(width, **block) for _ in range(depth)))
            for _ in range(num_taps)
        )
        self.out_proj = nn.Linear(width, EMBED_CHANS)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, image: Tensor, taps: list[Tensor]) -> Tensor:
        state = self.prior(image) if self.prior is not None else None
        mix_state = iter(self.state_proj)
        for k, tap in enumerate(taps):
            x = self.tap_proj[k](self.tap_norms[k](tap))
            if state is not None:
                x = x + next(mix_state)(state)
            state = self.stages[k](x)
        return self.out_proj(state).permute(0, 3, 1, 2)


class METAEncoder(AdaptedEncoder):
    """Frozen encoder under ``no_grad`` plus the META side network: ``[B, 256, S/16, S/16]``."""

    def __init__(
        self, encoder: nn.Module, width: int, depth: int, prior: bool, **block: object
    ) -> None:
        super().__init__(encoder)
        self.taps = tap_blocks(encoder)
        enc_dim = encoder.patch_embed.proj.out_channels
        self.meta_adapter = MetaSide(enc_dim, len(self.taps), width, depth, prior, **block)

    @contextmanager
    def _capture(self, into: dict[int, Tensor]):
        """Record the tapped blocks' outputs during one encoder forward (hooks removed after, so
        a copied or saved model carries none)."""

        def keep(index: int):
            return lambda _m, _i, out: into.__setitem__(index, out)

        handles = [self.encoder.blocks[t].register_forward_hook(keep(t)) for t in self.taps]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, x: Tensor) -> Tensor:
        taps: dict[int, Tensor] = {}
        with torch.no_grad(), self._capture(taps):
            embedding = self.encoder(x)
        side = self.meta_adapter(x, [taps[t] for t in self.taps])
        return embedding + side


@register_adapter
def meta(
    encoder: nn.Module,
    width: int = 64,
    depth: int = 1,
    num_heads: int = 4,
    stripe: int = 2,
    ffn_ratio: float = 1.0,
    ffn_kernel: int = 3,
    conv_kernel: int = 3,
    cascade: int = 0,
    shared_norm: int = 1,
    prior: int = 1,
) -> METAEncoder:
    """META side network: ``depth`` MEA blocks of ``width`` per tapped block (options: ``mea.py``;
    ``cascade``, ``shared_norm``, ``prior`` are 0/1 switches, as ``--options`` passes numbers)."""
    block = dict(
        num_heads=num_heads,
        stripe=stripe,
        ffn_ratio=ffn_ratio,
        ffn_kernel=ffn_kernel,
        conv_kernel=conv_kernel,
        cascade=bool(cascade),
        shared_norm=bool(shared_norm),
    )
    return METAEncoder(encoder, width, depth, bool(prior), **block)
