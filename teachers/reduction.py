"""Per-tap reductions of the cache: block outputs stored at a subset of token positions.

A ViT-H block output at 1024 px is ``[64, 64, 1280]``: four of them are 21 MB a sample in int8,
ten times the final embedding. Token subsampling keeps, per sample, ``K`` token positions drawn
uniformly from the cells that cover real pixels (the cells the layer loss averages over, see
`teachers.preprocess.valid_mask`) and stores each tapped block at those positions only,
``[K, C]``; the same positions serve every tap, and the final embedding stays whole.

The positions are a seeded random permutation of the valid cells, tiled to ``K`` when a sample
has fewer valid cells than ``K``, then sorted. Every valid cell therefore appears ``K / n`` times
in expectation (``n`` valid cells), so the mean squared error over the stored tokens is an unbiased
estimate of the masked mean over all valid cells, which is what `distill.losses.masked_mse`
computes on a whole tap; with ``n >= K`` the positions are distinct (sampling without
replacement). The seed is the sample's key (sha256), so the writer, a verify run and a
recomputation agree on the positions without storing a seed, and they do not depend on ranks,
batches or restarts.

Specs (``--reduction``): ``none`` (whole taps), ``tokens=K``. The spec is part of the cache's
identity: recorded in run.json, manifest.json and every sample's json, and checked like the codec.
The stored positions are ``tokens.npy``, int32 ``[K]``, row-major indices into the ``h * w`` grid.

Why token subsampling rather than a fixed per-layer projection (PCA or random orthogonal, to a few
hundred channels): it needs no calibration set and no change to the student's tap projections, it
keeps the loss exact in expectation instead of dropping the teacher's low-variance directions, and
it costs the same fraction of the bytes at any width.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from teachers import codecs
from teachers.preprocess import valid_mask
from teachers.teacher import EMBED

NONE = "none"
TOKENS = "tokens"  # the stored positions' field: tokens.npy
TOKEN_DTYPE = np.dtype(np.int32)
_PREFIX = "tokens="


def num_tokens(spec: str, flag: str = "--reduction") -> int | None:
    """K of a ``tokens=K`` spec, or None for ``none``. Raises ``ValueError`` naming ``flag``."""
    spec = spec.strip()
    if spec == NONE:
        return None
    value = spec.removeprefix(_PREFIX)
    if value == spec or not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"{flag} {spec!r}: give {NONE} (whole block outputs) or {_PREFIX}K with K >= 1 token "
            "positions per sample, e.g. tokens=256"
        )
    return int(value)


def canonical(spec: str, flag: str = "--reduction") -> str:
    """The spec as the manifest records it ("none", "tokens=256")."""
    k = num_tokens(spec, flag)
    return NONE if k is None else f"{_PREFIX}{k}"


def token_positions(key: str, input_hw: Sequence[int], img_size: int, k: int) -> torch.Tensor:
    """The ``k`` stored token positions of the sample ``key``: int64 ``[k]``, sorted row-major
    indices into the ``(img_size / 16) ** 2`` grid, all on cells that cover real pixels."""
    valid = valid_mask(tuple(input_hw), img_size).flatten().nonzero()[:, 0]
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
    order = torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed))
    return valid[order[torch.arange(k) % len(valid)]].sort().values


def take_tokens(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A block output ``[h, w, C]`` at ``positions`` ``[K]``: ``[K, C]`` (one gather)."""
    return x.flatten(0, 1).index_select(0, positions.to(x.device))


def reduce_features(
    features: dict[str, torch.Tensor], positions: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Every tapped block at ``positions`` (the final embedding whole); unchanged for None."""
    if positions is None:
        return features
    return {f: v if f == EMBED else take_tokens(v, positions) for f, v in features.items()}


def sample_nbytes(
    grid: int,
    tap_widths: dict[str, int],
    field_codecs: dict[str, str],
    reduction: str,
    embed_channels: int = 256,
) -> dict[str, int]:
    """Bytes of a sample's stored feature arrays, from the shapes alone (.npy and tar headers
    aside): {field: bytes}, with "tokens" for the positions of a token reduction.

    grid: tokens per side (img_size / 16); tap_widths: {"block{i}": C}; field_codecs: each
    field's codec (`teachers.codecs.parse_codecs`)."""
    k = num_tokens(reduction)
    shapes = {EMBED: (embed_channels, grid, grid)}
    shapes |= {f: (grid, grid, c) if k is None else (k, c) for f, c in tap_widths.items()}
    out = {
        f: codecs.stored_nbytes(s, field_codecs[f], 0 if f == EMBED else -1)
        for f, s in shapes.items()
    }
    if k is not None:
        out[TOKENS] = k * TOKEN_DTYPE.itemsize
    return out
