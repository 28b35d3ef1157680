"""Parts of the adapt stage, in process: config, mask losses, the sample order, the training set,
checkpoints without the frozen base, and the adapted.pt export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor

from distill.adapt import build_model
from distill.adapt_data import MaskTrainSet, SampleOrder
from distill.config import ADAPT_METHODS, AdaptConfig
from distill.engine import TorchEngine
from distill.losses import bce_dice_loss, structure_loss
from eval.scenes.domain import make_domain
from students import load_sam
from students.adapters import list_adapters
from students.adapters.export import adapt_sam, delta_state, save_adapted
from students.adapters.model import PromptedSam, predict_prob
from teachers.mask_folders import NonBinaryMaskError, list_pairs
from teachers.runtime.placement import DistEnv


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    return make_domain(tmp_path_factory.mktemp("adapt") / "dom", num_train=6, num_val=2, size=64)


def _cfg(tmp_path, ckpt, data, **kw) -> AdaptConfig:
    base = dict(ckpt=str(ckpt), data=str(data), out=str(tmp_path / "run"), engine="torch")
    return AdaptConfig(**(base | dict(device="cpu", workers=0, progress=False) | kw))


def _cfg_kw(tmp_path, **kw) -> AdaptConfig:
    return AdaptConfig(**(dict(ckpt="base.pth", data="dom", out=str(tmp_path)) | kw))


def test_methods_are_the_registry():
    assert sorted(ADAPT_METHODS) == list_adapters()


@pytest.mark.parametrize(
    "kw, text",
    [
        (dict(merge=True, method="cad"), "--merge folds LoRA into qkv: it needs --method lora"),
        (dict(method="decoder", freeze_decoder=True), "leaves nothing to train"),
        (dict(options="width:64"), "--options 'width:64': 'width:64' is not key=number"),
        (dict(options="width=big"), "'width=big' is not key=number"),
        (dict(val_every=0), "--val-every must be at least 1"),
        (dict(prompt="points"), "--prompt 'points': choose one of full_box, gt_box"),
        (dict(data=""), "--data is required"),
    ],
)
def test_config_errors_name_the_flag(tmp_path, kw, text):
    with pytest.raises(ValueError) as err:
        _cfg_kw(tmp_path, **kw)
    assert text in str(err.value)


def test_options_parse_to_numbers(tmp_path):
    cfg = _cfg(tmp_path, "b", "d", options="width=64, input_size=256,scale=0.2")
    assert cfg.adapter_kwargs() == {"width": 64, "input_size": 256, "scale": 0.2}
    assert isinstance(cfg.adapter_kwargs()["width"], int)


@pytest.mark.parametrize("loss", [structure_loss, bce_dice_loss])
def test_mask_losses_ignore_padding_and_prefer_the_truth(loss):
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 1, 40, 40, generator=g) > 0.6).float()
    valid = torch.zeros(2, 1, 40, 40)
    valid[..., :30, :25] = 1
    good, bad = 8 * (2 * target - 1), -8 * (2 * target - 1)
    assert loss(good, target, valid) < 0.2 * loss(bad, target, valid)
    changed = good.clone()
    changed[..., 30:, :] = -good[..., 30:, :]  # only padding differs
    changed[..., :, 25:] = 5.0
    torch.testing.assert_close(loss(changed, target, valid), loss(good, target, valid))


def test_structure_loss_weights_edges_more():
    target = torch.zeros(1, 1, 64, 64)
    target[..., 16:48, 16:48] = 1
    valid = torch.ones_like(target)
    logits = 4 * (2 * target - 1)
    edge, inner = logits.clone(), logits.clone()
    edge[..., 15:17, 16:48] *= -1  # wrong on two rows at the border
    inner[..., 31:33, 16:48] *= -1  # wrong on two rows in the middle
    assert structure_loss(edge, target, valid) > structure_loss(inner, target, valid)


def _orders(num, batch, micro, world, accum, steps):
    """{step: samples of the global batch} for every process of a layout."""
    seen = {}
    for rank in range(world):
        order = SampleOrder(num, batch, micro, rank, accum, seed=3)
        for draw in range(steps * accum):
            seen.setdefault(draw // accum, []).extend(order.indices(draw))
    return {step: sorted(v) for step, v in seen.items()}


def test_sample_order_is_the_same_for_any_layout_and_visits_every_pair_each_epoch():
    one = _orders(10, 4, 2, world=1, accum=2, steps=10)
    two = _orders(10, 4, 2, world=2, accum=1, steps=10)
    four = _orders(10, 4, 1, world=2, accum=2, steps=10)
    assert one == two == four
    flat = [i for step in range(10) for i in SampleOrder(10, 4, 4, 0, 1, 3).indices(step)]
    for epoch in range(4):
        assert sorted(flat[10 * epoch : 10 * epoch + 10]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch


def test_bad_pair_is_replaced_and_named_or_stops(domain, tmp_path):
    pairs = list_pairs(domain, "train")
    soft = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    broken = tmp_path / "soft.png"
    Image.fromarray(soft).save(broken)
    pairs[2] = type(pairs[2])(pairs[2].name, pairs[2].image, broken)  # a square image
    skip = MaskTrainSet(pairs, 128, "gt_box", "skip")
    sample = skip[2]
    assert len(sample["bad"]) == 1 and "soft.png" in sample["bad"][0]
    torch.testing.assert_close(sample["image"], skip[3]["image"])  # the next pair stands in
    assert sample["target"].shape == (1, 128, 128) and set(sample["target"].unique().tolist()) == {
        0,
        1,
    }
    with pytest.raises(NonBinaryMaskError, match="soft.png"):
        MaskTrainSet(pairs, 128, "gt_box", "stop")[2]


def test_training_sample_geometry(domain):
    pairs = list_pairs(domain, "train")
    sample = MaskTrainSet(pairs, 128, "full_box", "stop")[1]  # odd index: a 48 x 64 image
    valid = sample["valid"][0]
    assert valid[:96].all() and not valid[96:].any()  # 48 x 64 -> 96 x 128, padded below
    assert not sample["target"][0, 96:].any()
    assert sample["box"].tolist() == [0.0, 0.0, 128.0, 96.0]
    gt = MaskTrainSet(pairs, 128, "gt_box", "stop")[1]
    ys, xs = np.nonzero(gt["target"][0].numpy())
    x0, y0, x1, y1 = gt["box"].tolist()
    assert abs(x0 - xs.min()) <= 2 and abs(x1 - xs.max() - 1) <= 2 and abs(y0 - ys.min()) <= 2


def test_checkpoint_holds_what_trains_not_the_frozen_base(tmp_path, tiny_ckpt, domain):
    cfg = _cfg(tmp_path, tiny_ckpt, domain, method="lora", steps=2, batch_size=2)
    model = build_model(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = TorchEngine(cfg, model, trainable, lambda e, b: {}, DistEnv(0, 1, 0))
    g = torch.Generator().manual_seed(1)
    for p in trainable:  # one AdamW step: the weights move off the seed, the moments fill
        p.grad = torch.randn(p.shape, generator=g)
    engine.optimizer.step()
    engine.save(tmp_path / "ck", 1, {"x": 1})
    saved = torch.load(tmp_path / "ck" / "step00000001" / "engine.pt", weights_only=True)
    keys = set(saved["model"])
    assert any(".lora_B." in k for k in keys) and any("mask_decoder." in k for k in keys)
    assert not any(k.endswith("qkv.base.weight") or "patch_embed" in k for k in keys)
    assert not any(k.startswith("sam.prompt_encoder.") and "weight" in k for k in keys)
    fresh = build_model(cfg)
    with torch.no_grad():  # so that a resume which loads nothing fails below
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    other = TorchEngine(
        cfg, fresh, [p for p in fresh.parameters() if p.requires_grad], None, DistEnv(0, 1, 0)
    )
    assert other.resume(tmp_path / "ck")[0] == 1
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    want, got = engine.optimizer.state_dict(), other.optimizer.state_dict()
    assert len(got["state"]) == len(want["state"]) == len(trainable)
    for i, s in want["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[name], got["state"][i][name]), (i, name)


def _trained_like(base, method, seed=0, **kwargs):
    """An adapted Sam whose trainable weights are random (as if trained)."""
    sam = adapt_sam(load_sam(base), method, kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if ".lora_" in name or "mask_decoder.output_upscaling" in name or "adapter" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return sam.eval()


def _save(path, sam, base_path, method: str, kwargs: dict, *, merged: bool, step: int):
    """`save_adapted` of `sam`, adapted from the base at `base_path`."""
    base = {"base_path": base_path, "base_state": load_sam(base_path).state_dict()}
    options = {"method": method, "adapter_kwargs": kwargs, "merged": merged, "step": step}
    return save_adapted(path, sam, **base, **options)


ROUND_TRIP_OPTIONS = {"cad": {"width": 8, "input_size": 64}, "meta": {"width": 16, "stripe": 4}}


@pytest.mark.parametrize("method", ["lora", "conv_lora", "cad", "sam_adapter", "meta"])
def test_adapted_pt_round_trip_in_sam_predictor(tmp_path, tiny_ckpt, method):
    kwargs = ROUND_TRIP_OPTIONS.get(method, {})
    sam = _trained_like(tiny_ckpt, method, **kwargs)
    path = _save(tmp_path / "adapted.pt", sam, tiny_ckpt, method, kwargs, merged=False, step=7)
    payload = torch.load(path, weights_only=True)
    delta = payload["state_dict"]
    assert not any("patch_embed" in k or k.endswith("qkv.base.weight") for k in delta)
    assert any("mask_decoder" in k for k in delta)
    loaded = load_sam(path)
    assert type(loaded.image_encoder) is type(sam.image_encoder)
    for key, value in sam.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    box = np.array([5, 5, 70, 50])
    predictor = SamPredictor(loaded)
    predictor.set_image(image)
    masks, _, low = predictor.predict(box=box, multimask_output=False)
    assert masks.shape == (1, 60, 80)
    prob = predict_prob(PromptedSam(sam), image, box.tolist())
    np.testing.assert_array_equal(masks[0], prob > 0.5)


def test_adapted_pt_refuses_a_base_with_another_sha256(tmp_path, tiny_ckpt, other_base):
    sam = _trained_like(tiny_ckpt, "lora")
    path = _save(tmp_path / "a.pt", sam, tiny_ckpt, "lora", {}, merged=False, step=1)
    recorded = torch.load(path, weights_only=True)["base"]["sha256"]
    with pytest.raises(ValueError) as err:
        load_sam(path, base=other_base)
    from teachers.runtime.files import file_sha256

    assert recorded in str(err.value) and file_sha256(other_base) in str(err.value)
    with pytest.raises(FileNotFoundError, match="base checkpoint"):
        load_sam(path, base=tmp_path / "gone.pth")


def test_merged_lora_exports_plain_qkv_weights(tmp_path, tiny_ckpt):
    sam = _trained_like(tiny_ckpt, "lora")
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        before = sam.image_encoder(image)
    sam.image_encoder = sam.image_encoder.merge()
    path = _save(tmp_path / "m.pt", sam, tiny_ckpt, "lora", {}, merged=True, step=1)
    delta = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.endswith("attn.qkv.weight") for k in delta)
    assert not any("lora" in k for k in delta)
    loaded = load_sam(path)
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_encoder(image), before, atol=1e-4, rtol=1e-4)


def test_delta_leaves_out_what_is_unchanged(tiny_ckpt):
    sam = adapt_sam(load_sam(tiny_ckpt), "decoder", {})
    delta = delta_state(sam, load_sam(tiny_ckpt).state_dict())
    assert delta == {}  # nothing trained yet: the base alone rebuilds it


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    from teachers.build import random_vit_tiny

    path = tmp_path_factory.mktemp("other") / "sam_vit_tiny_other.pth"
    torch.save(random_vit_tiny(seed=5).state_dict(), path)
    return path
