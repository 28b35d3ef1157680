"""The adapted-model export (`adapted.pt`): adapter weights and what else training changed, on
top of a base checkpoint named by its sha256.

One `torch.save`d dict that `torch.load(..., weights_only=True)` reads:

  format          "sam-distill-adapted"
  format_version  1
  base            {"path": the base checkpoint as given at training, "sha256": its sha256}
  method          adapter method (`students.adapters.list_adapters()`), "lora" also when merged
  adapter_kwargs  the method's options (plain types)
  merged          True when LoRA was folded into qkv: the encoder then has its original layout
  img_size        input side
  step            training step of the weights
  state_dict      the *delta*: every entry of the adapted `Sam`'s state dict that does not come
                  unchanged from the base (adapter parameters and buffers, the trained mask
                  decoder, merged qkv weights)

`students.load.load_sam` rebuilds the `Sam`: the base (a `student.pt` or an official SAM
checkpoint) that `base_path_of` names, its sha256 checked against the record (a mismatch is refused
naming both), loaded through `load_sam` itself; then `load_adapted` attaches the adapter as at
training and loads the delta over it. The result has the
adapter inside `sam.image_encoder` and is a plain `segment_anything` `Sam` that `SamPredictor`
takes unchanged.

An adapted key maps to its base key by dropping the `encoder.` of the `AdaptedEncoder` wrapper and
the attribute names under which adapters keep a module they wrap (`WRAPPED`), e.g.
`image_encoder.encoder.blocks.0.attn.qkv.base.weight` -> `image_encoder.blocks.0.attn.qkv.weight`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from students.adapters.base import WRAPPED, build_adapter
from teachers.runtime.files import file_sha256, safe_load, save_atomic

FORMAT = "sam-distill-adapted"
FORMAT_VERSION = 1
_WRAPPED_SEGMENT = re.compile(r"\.(?:" + "|".join(WRAPPED) + r")(?=\.)")


def base_key(key: str) -> str:
    """The base model's state-dict key of an adapted `Sam`'s key (unchanged for other keys)."""
    if key.startswith("image_encoder.encoder."):
        key = "image_encoder." + key[len("image_encoder.encoder.") :]
    return _WRAPPED_SEGMENT.sub("", key)


def delta_state(sam: Sam, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `sam`'s state dict that are not the base's, unchanged."""
    delta = {}
    for key, value in sam.state_dict().items():
        ref = base_state.get(base_key(key))
        if ref is None or ref.shape != value.shape or not torch.equal(ref, value.cpu()):
            delta[key] = value.detach().cpu().contiguous()
    return delta


def save_adapted(
    path: str | Path,
    sam: Sam,
    *,
    base_path: str | Path,
    base_state: dict[str, torch.Tensor],
    method: str,
    adapter_kwargs: dict,
    merged: bool,
    step: int,
) -> Path:
    """Write `adapted.pt` atomically: `sam` (adapted, or merged) as a delta over `base_state`,
    the state dict of the base `sam` was made from, loaded from `base_path`."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": {"path": str(base_path), "sha256": file_sha256(base_path)},
        "method": method,
        "adapter_kwargs": dict(adapter_kwargs),
        "merged": bool(merged),
        "img_size": int(sam.image_encoder.img_size),
        "step": int(step),
        "state_dict": delta_state(sam, base_state),
    }
    return save_atomic(payload, path)


def adapt_sam(sam: Sam, method: str, adapter_kwargs: dict) -> Sam:
    """`sam` with `method`'s adapter around its image encoder (frozen), in place."""
    sam.image_encoder = build_adapter(method, sam.image_encoder, **adapter_kwargs)
    return sam


def base_path_of(payload: dict, source: str, base: str | Path | None = None) -> Path:
    """The base checkpoint of an `adapted.pt` payload, `base` overriding the recorded path; a
    ValueError (or FileNotFoundError) when the payload is malformed, the base is not there, or its
    sha256 is not the one the adapter was trained on."""
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{source}: adapted format version {payload.get('format_version')} is not {FORMAT_VERSION}"
        )
    missing = [
        k for k in ("base", "state_dict", "method", "adapter_kwargs", "merged") if k not in payload
    ]
    if missing:
        raise ValueError(f"{source}: malformed adapted export (no {missing[0]!r})")
    record = payload["base"]
    base_path = Path(base if base is not None else record["path"])
    if not base_path.is_file():
        raise FileNotFoundError(
            f"{source}: its base checkpoint {base_path} is not there; pass the base's path "
            "(load_sam(path, base=...), --base)"
        )
    found = file_sha256(base_path)
    if found != record["sha256"]:
        raise ValueError(
            f"{source} was trained on a base with sha256 {record['sha256']}, but {base_path} has "
            f"sha256 {found}: pass the base checkpoint the adapter was trained on"
        )
    return base_path


def load_adapted(payload: dict, source: str, sam: Sam) -> Sam:
    """The adapted `Sam` of an `adapted.pt` payload on its base `sam`, already loaded (in place;
    `students.load.load_sam` loads the base from `base_path_of`)."""
    delta, method = payload["state_dict"], payload["method"]
    base_keys = set(sam.state_dict())
    if not payload["merged"]:
        adapt_sam(sam, method, payload["adapter_kwargs"])
    missing, unexpected = sam.load_state_dict(delta, strict=False)
    not_from_base = [k for k in missing if base_key(k) not in base_keys]
    if unexpected or not_from_base:
        raise ValueError(
            f"{source}: its weights do not fit method {method!r} on its base: "
            f"unexpected {sorted(unexpected)[:5]}, missing {sorted(not_from_base)[:5]}"
        )
    return sam.eval()


def read_adapted_meta(path: str | Path) -> dict:
    """The metadata of an `adapted.pt` (everything but the weights)."""
    payload = safe_load(path)
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
        raise ValueError(f"{path}: not a sam-distill adapted export")
    return {k: v for k, v in payload.items() if k != "state_dict"}
