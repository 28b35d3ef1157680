"""Adapters over the whole registry on both encoder kinds (a DFA student and SAM's ViT).

Identity at init, frozen encoder weights, saved-for-backward bytes inside the encoder (none for
the side networks cad and meta), parameter counts against each method's closed formula, LoRA merging, Conv-LoRA's gate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from torch import nn

from students import build_student
from students.adapters import AdaptedEncoder, build_adapter, list_adapters
from students.adapters.meta import tap_blocks
from teachers.build import random_vit_tiny
from tests.conftest import REPO, sam_mask_decoder_params

SIDE = 256
ENCODERS: dict[str, Callable[[], nn.Module]] = {
    "dfa_t": lambda: build_student("dfa_t", img_size=SIDE),
    "vit_tiny": lambda: random_vit_tiny(0).image_encoder,
}
# Small CAD for speed; the official size is checked by its parameter count alone.
OPTIONS: dict[str, dict] = {"cad": dict(width=16, input_size=128)}


def _image(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _adapted(method: str, kind: str, seed: int = 0, **kwargs: object) -> AdaptedEncoder:
    torch.manual_seed(seed)
    return build_adapter(method, ENCODERS[kind](), **{**OPTIONS.get(method, {}), **kwargs})


def _dims(encoder: nn.Module) -> tuple[int, int, int]:
    """(width C, number of blocks, number of blocks with attention), read off the encoder."""
    width = encoder.patch_embed.proj.out_channels
    blocks = list(encoder.blocks)
    return width, len(blocks), sum(hasattr(b, "attn") for b in blocks)


def _meta_formula(encoder: nn.Module, width: int = 64, depth: int = 1, hidden: int = 64) -> int:
    """META at its defaults: spatial prior, per tap a LayerNorm + Linear from the encoder width
    and a Linear from the state, MEA blocks (LN, qkv + proj, two 3x3 convs, 3x3 depth-wise), the
    zero-initialised output Linear to 256."""
    c, taps = encoder.patch_embed.proj.out_channels, len(tap_blocks(encoder))
    w1, w2 = width // 4, width // 2
    prior = (27 * w1 + w1) + (9 * w1 * w2 + w2) + (9 * w2 * width + width) + (9 * width**2 + width)
    block = 2 * width + (4 * width**2 + 4 * width) + (18 * width * hidden + hidden + width)
    block += 9 * width + width
    per_tap = 2 * c + c * width + width + width**2 + depth * block
    return prior + taps * per_tap + 256 * width + 256


def _formula(method: str, encoder: nn.Module, width: int = 16) -> int:
    c, num_blocks, num_attn = _dims(encoder)
    r, e = 3, 8
    if method == "lora":
        return num_attn * (r * c + 3 * c * r)
    if method == "conv_lora":
        return num_attn * (r * c + 3 * c * r + e * (9 * r * r + r) + 2 * r * e)
    if method == "sam_adapter":
        h = int(0.25 * c)
        return (num_blocks + num_attn) * (2 * c * h + h + c)
    if method == "cad":
        proj = 0 if width == 256 else 256 * width + 256
        return 6 * width + width + 3 * (9 * width * width + width + 2 * width) + proj
    if method == "meta":
        return _meta_formula(encoder)
    assert method == "decoder"
    return 0


def test_registry() -> None:
    assert list_adapters() == ["cad", "conv_lora", "decoder", "lora", "meta", "sam_adapter"]
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        build_adapter("nope", ENCODERS["dfa_t"]())


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("method", list_adapters())
def test_output_at_init(method: str, kind: str) -> None:
    torch.manual_seed(0)
    encoder = ENCODERS[kind]().eval()
    x = _image()
    own = list(encoder.parameters())
    with torch.no_grad():
        before = encoder(x)
    adapted = build_adapter(method, encoder, **OPTIONS.get(method, {}))
    assert adapted.img_size == SIDE
    assert not any(p.requires_grad for p in own)  # frozen by construction
    with torch.no_grad():
        after = adapted.eval()(x)
    assert after.shape == (2, 256, SIDE // 16, SIDE // 16)
    if method == "cad":
        diff = (after - before).abs().max().item()
        assert 0 < diff <= adapted.scale
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("method", list_adapters())
def test_num_trainable_matches_formula(method: str, kind: str) -> None:
    adapted = _adapted(method, kind)
    assert adapted.num_trainable == _formula(method, adapted.encoder)
    if method == "cad":
        official = _adapted("cad", kind, width=256, input_size=512)
        assert official.num_trainable == _formula("cad", official.encoder, 256) == 1_773_568
    encoder_params = {id(p) for p in adapted.encoder.parameters()}
    if method in ("cad", "meta", "decoder"):  # nothing trainable inside the encoder
        assert not any(id(p) in encoder_params for p in adapted.trainable_parameters())


def test_decoder_method_trains_sams_whole_mask_decoder_as_the_docs_say() -> None:
    """students/README.md's figure for the decoder every method trains is the parameter count
    of segment_anything's own MaskDecoder, and this project's SAM heads (the decoder of every
    student.pt and adapted model) have that many."""
    count = sam_mask_decoder_params()
    readme = (REPO / "students" / "README.md").read_text()
    assert f"trains the whole mask decoder ({count:,} parameters)" in " ".join(readme.split())
    sam = random_vit_tiny(0)
    assert sum(p.numel() for p in sam.mask_decoder.parameters()) == count


def _saved_bytes(adapted: AdaptedEncoder, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward; bytes of unique non-parameter storages autograd saves inside ``adapted.encoder``."""
    params = {p.untyped_storage().data_ptr() for p in adapted.parameters()}
    inside, seen = [False], {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    pre = adapted.encoder.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    post = adapted.encoder.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = adapted(x)
    finally:
        pre.remove()
        post.remove()
    return out, sum(seen.values())


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("method", list_adapters())
def test_gradients_reach_only_the_adapter(method: str, kind: str) -> None:
    adapted = _adapted(method, kind).train()
    out, inside = _saved_bytes(adapted, _image())
    trainable = {id(p) for p in adapted.trainable_parameters()}
    if method in ("cad", "meta", "decoder"):
        assert inside == 0
    else:
        assert inside > 0
    if method == "decoder":
        assert not out.requires_grad and adapted.num_trainable == 0
        return
    (out.square().mean() + adapted.aux_loss()).backward()
    for name, param in adapted.named_parameters():
        if id(param) not in trainable:
            assert param.grad is None, f"frozen {name} got a gradient"
        elif "lora_moe_experts" not in name:  # unrouted experts get none (top-1 routing)
            assert param.grad is not None, f"adapter {name} got no gradient"
            assert torch.isfinite(param.grad).all(), name
    # the zero-initialised output side gets a non-zero gradient, so training starts moving
    zero_init = ("lora_B.weight", "up.weight", "out_proj.weight")
    outputs = [p for n, p in adapted.named_parameters() if n.endswith(zero_init)]
    outputs += [p for n, p in adapted.named_parameters() if n.startswith("conv_adapter.")]
    assert outputs and all(p.grad.abs().sum() > 0 for p in outputs)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_cad_stores_less_inside_the_encoder_than_sam_adapter(kind: str) -> None:
    _, in_cad = _saved_bytes(_adapted("cad", kind).train(), _image())
    _, in_sam_adapter = _saved_bytes(_adapted("sam_adapter", kind).train(), _image())
    assert in_cad == 0 < in_sam_adapter


def _randomise_lora_b(adapted: AdaptedEncoder) -> None:
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if name.endswith("lora_B.weight"):
                param.normal_(0, 0.02)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_lora_merge_keeps_output_and_key_layout(kind: str) -> None:
    torch.manual_seed(0)
    plain = ENCODERS[kind]().eval()  # the same weights as the adapted encoder's
    adapted = _adapted("lora", kind).eval()
    _randomise_lora_b(adapted)
    x = _image()
    with torch.no_grad():
        frozen = plain(x)
        unmerged = adapted(x)
        encoder = adapted.merge()
        merged = encoder(x)
    assert (unmerged - frozen).abs().max() > 1e-3  # the bypass is active, so merging matters
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    keys = set(plain.state_dict())
    assert set(encoder.state_dict()) == keys and adapted.num_trainable == 0


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_conv_lora_gate(kind: str) -> None:
    adapted = _adapted("conv_lora", kind).train()
    _randomise_lora_b(adapted)
    out = adapted(_image())
    aux = adapted.aux_loss()
    assert torch.isfinite(aux) and aux > 0
    # official behaviour: the task loss alone does not reach the router (top-1, ungated output)
    out.square().mean().backward(retain_graph=True)
    gates = [p for n, p in adapted.named_parameters() if "lora_moe_gating" in n]
    assert gates and all(p.grad is None or not p.grad.any() for p in gates)
    aux.backward()
    assert any(p.grad is not None and p.grad.any() for p in gates)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        adapted.merge()
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(adapted(_image(seed=1)), adapted(_image(seed=1)))


def test_lora_needs_a_qkv_linear() -> None:
    encoder = build_student("dfa_t", img_size=SIDE, mlp_only_blocks=list(range(6)))
    with pytest.raises(ValueError, match="no attention module with a qkv Linear"):
        build_adapter("lora", encoder)


@pytest.mark.parametrize("method", ["lora", "cad", "meta"])
def test_adapted_encoder_replaces_sam_image_encoder(method: str) -> None:
    sam = random_vit_tiny(0)
    sam.image_encoder = _adapted(method, "vit_tiny")
    predictor = SamPredictor(sam.eval())
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8))
    masks, _, _ = predictor.predict(box=np.array([10, 20, 150, 180]), multimask_output=False)
    assert masks.shape == (1, 200, 240)
