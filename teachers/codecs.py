"""Codecs for teacher features in the cache shards: fp16, bf16 and int8 with a per-token scale.

A feature is a float32 tensor such as SAM's final embedding ``[256, h, w]`` (``channel_axis=0``)
or a ViT block output ``[h, w, C]`` (``channel_axis=-1``). ``encode`` turns it into numpy arrays
that the cache writer stores as ``.npy`` entries (``to_npy_bytes``), so stock ``numpy`` and
``webdataset`` read the shards; ``decode`` turns them back into a float32 tensor of the same
shape. ``error_bound`` gives, element by element, the largest absolute error ``decode(encode(x))``
may have; ``tests/teachers/test_codecs.py`` checks that it holds and that it is tight.

========  =================  ===============  ========================================
codec     stored arrays      bytes / element  max abs error of one element (bound)
========  =================  ===============  ========================================
fp16      q: float16         2                ``|x| * 2^-11 + 2^-25``
bf16      q: uint16 (bits)   2                ``|x| * 2^-8 + 2^-126``
int8      q: int8,           1 + 4 / C        ``scale * (0.5 + 2^-16) + 2^-119``
          scale: float32
========  =================  ===============  ========================================

Why these bounds (IEEE round to nearest even, float32 input):

- fp16 has an 11-bit significand, so rounding moves a normal value by at most half an ulp,
  ``|x| * 2^-11``; below 2^-14 values are subnormal with a fixed spacing of 2^-24, so at most
  2^-25. Values beyond the fp16 maximum 65504 raise ``ValueError`` instead of becoming inf.
- bf16 keeps float32's exponent and 8 significand bits, so ``|x| * 2^-8``. The absolute term
  is 2^-126, the smallest normal float32, rather than bf16's subnormal half-ulp 2^-134, because
  some hardware converts with subnormals flushed to zero (AVX512-BF16's ``VCVTNEPS2BF16``).
- int8 stores, per token (one spatial position), ``scale = max|x| over channels / 127`` in
  float32 and ``q = round(x / scale)`` clamped to [-127, 127]: symmetric, as in LLM.int8()
  (Dettmers et al., arXiv 2208.07339), whose vector-wise scales are the per-token scales here.
  Rounding ``q`` costs at most ``scale / 2``. The float32 arithmetic adds at most
  ``127 * 2^-24 * scale`` in ``x / scale`` and as much again in ``q * scale`` on decode:
  ``254 * 2^-24 < 2^-16``. Tokens whose max is below ``127 * 2^-126`` get scale 0 and decode to
  zeros (an all-zero token never makes NaN), which costs less than ``127 * 2^-126 < 2^-119``.
  C is the number of channels: 1.016 bytes per element for the 256-channel embedding, 1.003 for
  ViT-H's 1280-wide blocks.

Per-field codecs: a cache may store each field with its own codec (`parse_codecs`). The spec is
one codec name for every field, or comma-separated ``field=codec`` items where the field is
``embed`` (the final embedding), ``blocks`` (every tapped block output) or one ``block{i}``
(which wins over ``blocks``); fields not named keep fp16. ``embed=fp16,blocks=int8`` keeps the
embedding the mask decoder reads at fp16 and halves the block outputs, 95% of a ViT-H sample.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch

from teachers.teacher import EMBED

CODECS: tuple[str, ...] = ("fp16", "bf16", "int8")
DEFAULT_CODEC = "fp16"
BLOCKS = "blocks"  # a spec's name for every tapped block output

FP16_MAX = 65504.0
BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # (2 - 2^-7) * 2^127
_FP32_MIN_NORMAL = 2.0**-126
_INT8_MAX = 127
_INT8_ALLOWANCE = 2.0**-16  # float32 rounding in x / scale and q * scale, in units of scale
# Stored arrays per codec: field name -> numpy dtype.
_FIELDS: dict[str, dict[str, np.dtype]] = {
    "fp16": {"q": np.dtype(np.float16)},
    "bf16": {"q": np.dtype(np.uint16)},
    "int8": {"q": np.dtype(np.int8), "scale": np.dtype(np.float32)},
}


def encode(x: torch.Tensor, codec: str, channel_axis: int) -> dict[str, np.ndarray]:
    """Encode a float32 feature ``x`` (e.g. ``[256, h, w]`` with ``channel_axis=0``, or
    ``[h, w, C]`` with ``channel_axis=-1``) as numpy arrays.

    Returns ``{"q": array}``, plus ``{"scale": float32 array}`` for int8, whose shape is
    ``x``'s with the channel axis kept as size 1. ``x`` may live on any device; float16 and
    bfloat16 inputs are accepted because float32 holds them exactly. Raises ``ValueError`` for an
    unknown codec, a bad ``channel_axis``, non-finite values, or values fp16/bf16 cannot hold.
    """
    x = _check_input(x, codec, channel_axis)
    if codec == "fp16":  # torch's cast: same bits as numpy's, an order of magnitude faster
        return {"q": x.to(torch.float16).cpu().numpy()}
    if codec == "bf16":  # numpy has no bfloat16: store the raw bits
        return {"q": x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)}
    scale = _int8_scale(x, channel_axis)
    q = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    q = q.round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return {"q": q.cpu().numpy(), "scale": scale.cpu().numpy()}


def decode(fields: dict[str, np.ndarray], codec: str, channel_axis: int) -> torch.Tensor:
    """Decode arrays written by ``encode`` into a float32 CPU tensor of the original shape.

    Raises ``ValueError`` when a field is missing or has the wrong dtype or shape for ``codec``.
    """
    _check_codec(codec)
    for name, dtype in _FIELDS[codec].items():
        if name not in fields:
            raise ValueError(f"{codec} features need the field {name!r}; got {sorted(fields)}")
        if fields[name].dtype != dtype:
            raise ValueError(
                f"{codec} field {name!r} must be {dtype}, got {fields[name].dtype}; "
                "was it written with another codec?"
            )
    q = _as_tensor(fields["q"])
    if codec == "fp16":
        return q.to(torch.float32)
    if codec == "bf16":
        return q.view(torch.int16).view(torch.bfloat16).to(torch.float32)
    scale = _as_tensor(fields["scale"])
    axis = _normalize_axis(channel_axis, q.dim())
    expected = list(q.shape)
    expected[axis] = 1
    if list(scale.shape) != expected:
        raise ValueError(
            f"int8 field 'scale' has shape {list(scale.shape)}, expected {expected} for q of "
            f"shape {list(q.shape)} with channel_axis={channel_axis}"
        )
    return q.to(torch.float32).mul_(scale)


def error_bound(x: torch.Tensor, codec: str, channel_axis: int) -> torch.Tensor:
    """Element-wise bound on ``|decode(encode(x)) - x|``, float32, shaped and placed like ``x``.

    The formulas and their derivation are in this module's docstring.
    """
    x = _check_input(x, codec, channel_axis)
    if codec == "fp16":
        return x.abs().mul_(2.0**-11).add_(2.0**-25)
    if codec == "bf16":
        return x.abs().mul_(2.0**-8).add_(_FP32_MIN_NORMAL)
    scale = _int8_scale(x, channel_axis)
    per_token = scale.mul(0.5 + _INT8_ALLOWANCE).add_(2.0**-119)
    return per_token.expand_as(x).clone()


def parse_codecs(spec: str, fields: Sequence[str], flag: str = "--codec") -> dict[str, str]:
    """{field: codec} for every field of ``fields`` ("embed", "block{i}", ...) from a spec:
    "int8" (every field), or "embed=fp16,blocks=int8" (see the module docstring).

    Raises ``ValueError`` naming ``flag`` for an unknown codec or field, or a field given twice.
    """
    spec = spec.strip()
    if "=" not in spec:
        if spec not in CODECS:
            raise ValueError(
                f"{flag} {spec!r}: choose one of {', '.join(CODECS)}, or per field "
                "as embed=CODEC,blocks=CODEC"
            )
        return dict.fromkeys(fields, spec)
    named: dict[str, str] = {}
    for item in spec.split(","):
        name, sep, codec = (t.strip() for t in item.partition("="))
        if not sep or not name:
            raise ValueError(f"{flag} {spec!r}: {item.strip()!r} is not FIELD=CODEC")
        if codec not in CODECS:
            raise ValueError(
                f"{flag} {spec!r}: {name}={codec!r}: choose one of {', '.join(CODECS)}"
            )
        if name in named:
            raise ValueError(f"{flag} {spec!r}: {name} is given twice")
        named[name] = codec
    known = [EMBED, BLOCKS, *fields]
    unknown = [n for n in named if n not in known]
    if unknown:
        raise ValueError(
            f"{flag} {spec!r}: no field {', '.join(unknown)}; the fields are "
            f"{', '.join(dict.fromkeys(known))}"
        )
    blocks = named.get(BLOCKS, DEFAULT_CODEC)
    return {
        f: named.get(f, named.get(EMBED, DEFAULT_CODEC) if f == EMBED else blocks) for f in fields
    }


def codec_spec(per_field: dict[str, str]) -> str:
    """The shortest spec for {field: codec}: one name when every field agrees, else
    "embed=X,blocks=Y" when the blocks agree, else every field named."""
    values = set(per_field.values())
    if len(values) == 1:
        return values.pop()
    blocks = {c for f, c in per_field.items() if f != EMBED}
    if len(blocks) == 1 and EMBED in per_field:
        return f"{EMBED}={per_field[EMBED]},{BLOCKS}={blocks.pop()}"
    return ",".join(f"{f}={c}" for f, c in per_field.items())


def stored_nbytes(shape: Sequence[int], codec: str, channel_axis: int) -> int:
    """Bytes of the arrays ``encode`` returns for a feature of ``shape`` (.npy headers aside)."""
    _check_codec(codec)
    axis = _normalize_axis(channel_axis, len(shape))
    numel = math.prod(shape)
    nbytes = numel * _FIELDS[codec]["q"].itemsize
    if codec == "int8":
        nbytes += numel // shape[axis] * _FIELDS[codec]["scale"].itemsize
    return nbytes


def to_npy_bytes(a: np.ndarray) -> bytes:
    """Serialize an array as ``.npy`` bytes, the format the cache shards store."""
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return buffer.getvalue()


def from_npy_bytes(b: bytes) -> np.ndarray:
    """Read ``.npy`` bytes written by ``to_npy_bytes``; pickled object arrays are refused."""
    return np.load(io.BytesIO(b), allow_pickle=False)


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def _normalize_axis(channel_axis: int, ndim: int) -> int:
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for a {ndim}-d feature")
    return channel_axis % ndim


def _check_input(x: torch.Tensor, codec: str, channel_axis: int) -> torch.Tensor:
    """Validate ``x`` for ``codec`` and return it detached as float32 on its device."""
    _check_codec(codec)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"features must be float32 (or float16/bfloat16), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"features are empty (shape {list(x.shape)})")
    _normalize_axis(channel_axis, x.dim())
    x = x.detach().to(torch.float32)
    lo, hi = torch.aminmax(x)  # one pass finds NaN (propagated), inf and overflow
    max_abs = max(-lo.item(), hi.item())
    if not np.isfinite(max_abs):
        num_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"features hold {num_bad} non-finite values (NaN or inf); cannot encode")
    limit = {"fp16": FP16_MAX, "bf16": BF16_MAX}.get(codec)
    if limit is not None and max_abs > limit:
        raise ValueError(
            f"max |x| = {max_abs:.6g} exceeds the {codec} maximum {limit:.6g}; "
            "use another codec (int8 or bf16 for fp16) or rescale the features"
        )
    return x


def _int8_scale(x: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """Per-token scale ``max|x| over channels / 127`` as float32, channel axis kept as size 1.

    Scales below the smallest normal float32 become 0 so that all arithmetic on nonzero scales
    stays in the normal range, where the rounding analysis in the module docstring holds.
    """
    hi = x.amax(dim=channel_axis, keepdim=True)
    lo = x.amin(dim=channel_axis, keepdim=True)
    scale = torch.maximum(hi, lo.neg_()).div_(_INT8_MAX)
    return scale.masked_fill_(scale < _FP32_MIN_NORMAL, 0.0)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Wrap a numpy array without copying, unless it is read-only (torch wants writable memory)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())
