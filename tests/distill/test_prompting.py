"""Phase 2's prompts, clicks and targets (`distill.prompting`, `distill.align`), without a run."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from distill.align import AlignLoss
from distill.prompting import BOX, NONE, POINT, decode, refine_clicks, sample_prompts
from teachers.build import random_vit_tiny
from teachers.cache_read import read_cache
from teachers.preprocess import decode_image
from tests.distill.runs import tiny_coco_cache

ANN = {
    "annotations": [
        {"bbox": [10, 20, 30, 40]},
        {"bbox": [0, 0, 50, 10], "point_coords": [[5.0, 6.0]]},
        {"bbox": [5, 5, 0, 10]},  # zero width: no prompt
    ]
}


def test_prompts_are_the_annotations_boxes_and_points_in_the_input_frame():
    resize = ResizeLongestSide(256)
    kinds_seen = set()
    for seed in range(20):
        p = sample_prompts(ANN, (100, 200), 256, 4, random.Random(seed))
        kinds = p["prompt_kind"].tolist()
        assert kinds.count(NONE) == 2 and len(kinds) == 4  # two usable annotations of three
        for i in range(2):
            box = p["prompt_box"][i].numpy()
            expected = [
                resize.apply_boxes(np.array([b]), (100, 200))[0]
                for b in ([10, 20, 40, 60], [0, 0, 50, 10])
            ]
            assert any(np.allclose(box, e, atol=1e-4) for e in expected)
            if kinds[i] == POINT:  # only the annotation that has a point can give one
                assert np.allclose(box, expected[1], atol=1e-4)
                want = resize.apply_coords(np.array([[5.0, 6.0]]), (100, 200))[0]
                np.testing.assert_allclose(p["prompt_point"][i].numpy(), want, atol=1e-4)
            kinds_seen.add(kinds[i])
    assert kinds_seen == {BOX, POINT}
    again = sample_prompts(ANN, (100, 200), 256, 4, random.Random(3))
    first = sample_prompts(ANN, (100, 200), 256, 4, random.Random(3))
    assert all(torch.equal(again[k], first[k]) for k in first)
    one = sample_prompts(ANN, (100, 200), 256, 1, random.Random(0))
    assert one["prompt_kind"].tolist() in ([BOX], [POINT])
    empty = sample_prompts({"annotations": []}, (100, 200), 256, 3, random.Random(0))
    assert empty["prompt_kind"].tolist() == [NONE] * 3
    assert sample_prompts(None, (100, 200), 256, 2, random.Random(0))["prompt_kind"].sum() == 0


def test_refinement_clicks_land_only_where_student_and_teacher_disagree():
    g = torch.Generator().manual_seed(0)
    student = torch.rand(64, 16, 16, generator=g) > 0.5
    teacher = torch.rand(64, 16, 16, generator=g) > 0.6
    student[0] = teacher[0]  # agreement: no click
    valid = torch.zeros(16, 16, dtype=torch.bool)
    valid[:12, :10] = True
    coords, labels = refine_clicks(student, teacher, valid, torch.Generator().manual_seed(1))
    assert labels[0] == -1 and set(labels[1:].tolist()) == {0, 1}
    for n in range(1, 64):
        col, row = (int(v) // 4 for v in coords[n])
        assert valid[row, col]
        if labels[n] == 1:
            assert teacher[n, row, col] and not student[n, row, col]
        else:
            assert student[n, row, col] and not teacher[n, row, col]
        missed = (teacher[n] & ~student[n] & valid).sum()
        spilled = (student[n] & ~teacher[n] & valid).sum()
        assert bool(labels[n]) == bool(missed >= spilled)  # the larger region is clicked


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Two images, two to a shard: smaller than the distillation tests' cache (conftest.py)."""
    root = tmp_path_factory.mktemp("prompting")
    return tiny_coco_cache(root, num_images=2, seed=5, per_shard=2)


def test_targets_from_the_cached_embedding_equal_sam_predictor_with_the_teacher(cache):
    teacher = random_vit_tiny(0)  # the cache's teacher (sha256 "random-seed-0")
    predictor = SamPredictor(teacher)
    size = teacher.image_encoder.img_size
    num = 0
    for sample in read_cache(cache):
        image = decode_image(sample.image)
        predictor.set_image(image)
        anns = sample.ann["annotations"]
        prompts = sample_prompts(sample.ann, image.shape[:2], size, len(anns), random.Random(0))
        embed = torch.as_tensor(sample.features["embed"])[None]
        for i, kind in enumerate(prompts["prompt_kind"].tolist()):
            if kind == NONE:
                continue
            if kind == BOX:
                got = decode(
                    teacher.prompt_encoder,
                    teacher.mask_decoder,
                    embed,
                    prompts["prompt_box"][i : i + 1],
                    None,
                )
                box = prompts["prompt_box"][i : i + 1]  # the input frame predict_torch takes
                _, _, want = predictor.predict_torch(None, None, boxes=box, multimask_output=False)
            else:
                pt = prompts["prompt_point"][i : i + 1, None]
                got = decode(
                    teacher.prompt_encoder,
                    teacher.mask_decoder,
                    embed,
                    None,
                    (pt, torch.ones(1, 1, dtype=torch.long)),
                )
                _, _, want = predictor.predict_torch(pt, torch.ones(1, 1), multimask_output=False)
            # fp16 cache: logits (median |logit| 0.06) within a small absolute error; measured
            # at most 6.7e-5 over these prompts; 10x margin. Masks equal away from 0.
            torch.testing.assert_close(got, want, atol=7e-4, rtol=0)
            confident = want.abs() > 7e-4
            assert torch.equal((got > 0)[confident], (want > 0)[confident])
            num += 1
    assert num >= 3


def test_a_micro_batch_without_prompts_gives_zero_mask_loss_that_still_has_a_graph():
    teacher = random_vit_tiny(0)
    cfg = SimpleNamespace(
        seed=0, img_size=256, decode_iters=1, feature_weight=0.0, mask_target="soft"
    )
    loss = AlignLoss(cfg, teacher)
    model = SimpleNamespace(
        prompt_encoder=teacher.prompt_encoder, mask_decoder=teacher.mask_decoder
    )
    embed = torch.randn(2, 256, 16, 16, requires_grad=True)
    batch = {
        "keys": ["a", "b"],
        "input_hw": torch.tensor([[256, 200], [100, 256]]),
        "prompt_kind": torch.zeros(2, 3, dtype=torch.long),
        "prompt_box": torch.zeros(2, 3, 4),
        "prompt_point": torch.zeros(2, 3, 2),
        "embed": torch.randn(2, 256, 16, 16),
    }
    value = loss.mask_loss(model, embed, batch, 0)
    assert value.item() == 0.0 and value.requires_grad
    batch["prompt_kind"][1, 0] = BOX
    batch["prompt_box"][1, 0] = torch.tensor([10.0, 10.0, 90.0, 60.0])
    value = loss.mask_loss(model, embed, batch, 0)
    value.backward()
    assert value.item() > 0 and embed.grad[1].abs().sum() > 0 and embed.grad[0].abs().sum() == 0


def test_soft_targets_are_met_by_the_teachers_own_embedding_hard_ones_are_not():
    """At the teacher's embedding, the soft loss is at its least (no gradient); the hard loss
    still pushes, towards masks more confident than the teacher's (a random teacher's logits
    are all near 0)."""
    teacher = random_vit_tiny(0)
    batch = {
        "keys": ["a"],
        "input_hw": torch.tensor([[256, 192]]),
        "prompt_kind": torch.tensor([[BOX, BOX]]),
        "prompt_box": torch.tensor([[[10.0, 20.0, 120.0, 150.0], [60.0, 40.0, 180.0, 100.0]]]),
        "prompt_point": torch.zeros(1, 2, 2),
        "embed": torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(0)),
    }
    model = SimpleNamespace(
        prompt_encoder=teacher.prompt_encoder, mask_decoder=teacher.mask_decoder
    )
    grads = {}
    for target in ("soft", "hard"):
        cfg = SimpleNamespace(
            seed=0, img_size=256, decode_iters=0, feature_weight=0.0, mask_target=target
        )
        embed = batch["embed"].clone().requires_grad_(True)
        AlignLoss(cfg, teacher).mask_loss(model, embed, batch, 0).backward()
        grads[target] = embed.grad.norm().item()
    assert grads["soft"] < 1e-5 * grads["hard"] and grads["hard"] > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"phase": "decoder"}, "--init"),
        ({"phase": "decoder", "init": "s.pt", "max_prompts": 0}, "--max-prompts"),
        ({"phase": "decoder", "init": "s.pt", "decode_iters": -1}, "--decode-iters"),
        ({"phase": "decoder", "init": "s.pt", "tune": "decoder", "feature_weight": 1.0}, "--tune"),
        ({"tune": "both"}, "--phase decoder"),
    ],
)
def test_phase_two_flags_are_checked_with_the_flag_named(kwargs, flag):
    from distill.config import DistillConfig

    with pytest.raises(ValueError, match=flag):
        DistillConfig(out="o", shards="c", **kwargs)
