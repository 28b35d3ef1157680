"""Structured pruning: the pruned student computes what the unpruned one computes with the removed
heads / units zeroed, has exactly the removed share fewer parameters there, and round-trips
through student.pt and load_sam."""

from __future__ import annotations

import copy

import pytest
import torch

from students import build_student
from students.encoder import DFABlock
from students.export import save_student
from students.load import load_sam
from students.prune import choose_heads, head_scores, prune_student, structure_params

SIDE = 64


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    # 8 heads: the dilated patterns (r = 2, 4 offset groups) leave 2 heads per group, so a
    # block can lose heads and keep its attention.
    return build_student("dfa_t", img_size=SIDE, num_heads=8).eval()


def _zeroed_heads(student, kept: dict[int, list[int]]):
    """The unpruned student with the removed heads' output projection columns zeroed (and the
    projection bias of a block that lost every head)."""
    model = copy.deepcopy(student)
    with torch.no_grad():
        for i, heads in kept.items():
            attn = model.blocks[i].attn
            for h in set(range(attn.num_heads)) - set(heads):
                attn.proj.weight[:, h * attn.head_dim : (h + 1) * attn.head_dim] = 0
            if not heads:
                attn.proj.bias.zero_()
    return model


@pytest.mark.parametrize(
    "criterion", [pytest.param("activation", marks=pytest.mark.slow), "weight"]
)
def test_head_pruning_equals_zeroing_the_removed_heads(student, criterion):
    images = _images()
    kept = choose_heads(student, head_scores(student, images, criterion), 0.375)
    pruned, report = prune_student(student, "heads", 0.375, images, criterion)
    assert report["units_before"] == 32 and report["units_after"] == 20  # 12 of 32 heads
    # Every block keeps the same number of heads in each of its 4 dilation groups.
    for heads in kept.values():
        assert [sum(h // 2 == g for h in heads) for g in range(4)] == [len(heads) // 4] * 4
    with torch.inference_mode():
        expected = _zeroed_heads(student, kept)(images)
        assert torch.allclose(pruned(images), expected, atol=1e-5)
        assert not torch.allclose(pruned(images), student(images), atol=1e-3)
    # Heads that add the least to the residual stream go first.
    scores = head_scores(student, images, criterion)
    removed = [float(scores[i][h]) for i, hs in kept.items() for h in range(8) if h not in hs]
    survived = [float(scores[i][h]) for i, hs in kept.items() for h in hs]
    assert sum(removed) / len(removed) < sum(survived) / len(survived)


def test_head_pruning_of_whole_attention_makes_mlp_only_blocks():
    torch.manual_seed(1)
    student = build_student("dfa_t", img_size=SIDE).eval()  # 4 heads, one per offset group
    pruned, report = prune_student(student, "heads", 0.5, _images())
    attention = [i for i, b in enumerate(pruned.blocks) if isinstance(b, DFABlock)]
    assert len(attention) == 2 and report["removed_fraction"] == 0.5
    assert sorted(pruned.student_kwargs["mlp_only_blocks"]) == sorted(
        {0, 1, 2, 3, 4, 5} - set(attention)
    )


@pytest.mark.parametrize("criterion", ["activation", "weight"])
def test_mlp_pruning_equals_zeroing_the_removed_units(student, criterion):
    images = _images()
    pruned, report = prune_student(student, "mlp", 0.25, images, criterion)
    model = copy.deepcopy(student)
    with torch.no_grad():
        for old, new in zip(model.blocks, pruned.blocks, strict=True):
            kept = {tuple(row.tolist()) for row in new.mlp.lin1.weight}
            for j, row in enumerate(old.mlp.lin1.weight):
                if tuple(row.tolist()) not in kept:
                    old.mlp.lin2.weight[:, j] = 0
        assert torch.allclose(pruned(images), model(images), atol=1e-5)
        assert not torch.allclose(pruned(images), student(images), atol=1e-3)
    assert [b.mlp.lin1.out_features for b in pruned.blocks] == [192] * 6  # 256 * 0.75


@pytest.mark.parametrize("target,ratio", [("heads", 0.5), ("mlp", 0.5), ("mlp", 0.25)])
def test_pruned_student_has_the_ratio_fewer_parameters_and_loads(
    student, tiny_sam, tmp_path, target, ratio
):
    images = _images()
    pruned, report = prune_student(student, target, ratio, images)
    before, after = structure_params(student, target), structure_params(pruned, target)
    assert after == pytest.approx((1 - ratio) * before, rel=1e-9)
    assert report["params_before"] - report["params_after"] == pytest.approx(
        before - after, abs=8 * 128 * 4
    )  # whole-attention removal also drops LayerNorm and proj bias (a few per block)
    path = save_student(
        tmp_path / "pruned.pt", pruned, tiny_sam, teacher="vit_tiny", teacher_sha256="x", step=3
    )
    sam = load_sam(path)
    assert sum(p.numel() for p in sam.image_encoder.parameters()) == report["params_after"]
    rebuilt = build_student(pruned.student_name, **pruned.student_kwargs)
    rebuilt.load_state_dict(sam.image_encoder.state_dict())
    with torch.inference_mode():
        assert torch.equal(sam.image_encoder(images), pruned(images))
        assert torch.equal(rebuilt(images), pruned(images))


def test_per_block_defaults_rebuild_the_unpruned_student(student):
    same = build_student(
        "dfa_t",
        img_size=SIDE,
        num_heads=8,
        block_heads=[8] * 6,
        block_mlp_dims=[256] * 6,
        head_dim=16,
    )
    assert {k: v.shape for k, v in same.state_dict().items()} == {
        k: v.shape for k, v in student.state_dict().items()
    }
    same.load_state_dict(student.state_dict())
    with torch.inference_mode():
        assert torch.equal(same(_images(1)), student(_images(1)))


def test_bad_arguments_name_the_flag(student):
    with pytest.raises(ValueError, match="--ratio"):
        prune_student(student, "heads", 1.0, _images())
    with pytest.raises(ValueError, match="--prune"):
        prune_student(student, "layers", 0.5, _images())
    with pytest.raises(ValueError, match="--calib-shards"):
        prune_student(student, "mlp", 0.5, None, "activation")
    with pytest.raises(ValueError, match="block_mlp_dims has 2 entries"):
        build_student("dfa_t", img_size=SIDE, block_mlp_dims=[4, 4])
