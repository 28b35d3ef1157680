"""Structured pruning of a DFA student: attention heads or MLP hidden units.

The pruned student is an ordinary registry student: its builder kwargs gain per-block sizes
(``block_heads``, ``block_mlp_dims``, ``head_dim``, and ``mlp_only_blocks`` for a block that lost
every head), so ``build_student(name, **kwargs)`` and ``load_sam`` rebuild it from `student.pt`.
After pruning it is re-distilled from the same cache (``launch/distill.py --init pruned.pt``).

Scores (higher is kept):

* heads, ``activation``: a head's contribution to the residual stream, the mean over tokens of
  ``||W_proj[:, head] o_head||`` on calibration images (Michel et al., "Are Sixteen Heads Really
  Better than One?", NeurIPS 2019, prune heads by their effect; here by the size of what they add);
  ``weight``: ``||W_v[head]||_F * ||W_proj[:, head]||_F``.
* MLP units, ``activation``: mean ``|GELU(lin1 x)_j|`` times ``||lin2[:, j]||`` on calibration
  images; ``weight``: ``||lin1[j]|| * ||lin2[:, j]||``.

Heads are removed in units that keep the dilation's head groups whole: a pattern with dilation
r gives every one of its r**2 (2-D) offsets the same number of heads (``students.dfa``), so a
block's heads form ``G = lcm(r**2)`` contiguous parts and a unit takes the weakest remaining head
of every part. ``ratio`` is the fraction of all heads (or of every block's MLP units) removed,
rounded down to whole units; the result reports the fraction reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from students.encoder import DFABlock, DFAEncoder
from students.registry import build_student

TARGETS = ("heads", "mlp")
CRITERIA = ("activation", "weight")


def _check(target: str, ratio: float, criterion: str, images: Tensor | None) -> None:
    if target not in TARGETS:
        raise ValueError(f"--prune {target!r}: choose one of {', '.join(TARGETS)}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
    if criterion not in CRITERIA:
        raise ValueError(f"--criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    if criterion == "activation" and images is None:
        raise ValueError("--criterion activation needs calibration images: give --calib-shards")


def _attention_blocks(encoder: DFAEncoder) -> dict[int, DFABlock]:
    return {i: b for i, b in enumerate(encoder.blocks) if isinstance(b, DFABlock)}


@torch.inference_mode()
def _hooked_means(
    encoder: DFAEncoder, images: Tensor, modules: dict[int, nn.Module], fn: Callable
) -> dict[int, Tensor]:
    """Per block, the mean over images and tokens of ``fn(block, input of modules[block])``."""
    sums: dict[int, Tensor] = {}
    counts = dict.fromkeys(modules, 0)

    def hook(index: int):
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            value = fn(index, args[0].flatten(0, -2))  # [tokens, width] -> [tokens, units]
            sums[index] = sums.get(index, 0) + value.sum(0)
            counts[index] += value.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in modules.items()]
    try:
        encoder.eval()
        for start in range(0, len(images), 4):
            encoder(images[start : start + 4])
    finally:
        for handle in handles:
            handle.remove()
    return {i: sums[i] / counts[i] for i in modules}


def head_scores(
    encoder: DFAEncoder, images: Tensor | None, criterion: str = "activation"
) -> dict[int, Tensor]:
    """``{block: [num_heads]}`` scores of every attention block's heads (module docstring)."""
    blocks = _attention_blocks(encoder)
    if criterion == "weight":
        scores = {}
        for i, block in blocks.items():
            attn, d = block.attn, block.attn.head_dim
            v = attn.qkv.weight[2 * attn.num_heads * d :].view(attn.num_heads, d, -1)
            proj = attn.proj.weight.view(-1, attn.num_heads, d)
            scores[i] = v.flatten(1).norm(dim=1) * proj.transpose(0, 1).flatten(1).norm(dim=1)
        return {i: s.detach() for i, s in scores.items()}

    def contribution(index: int, heads_out: Tensor) -> Tensor:
        attn = blocks[index].attn
        out = heads_out.view(-1, attn.num_heads, attn.head_dim)
        proj = attn.proj.weight.view(-1, attn.num_heads, attn.head_dim)  # [C, nh, d]
        return torch.einsum("thd,chd->thc", out, proj).norm(dim=-1)  # [tokens, nh]

    return _hooked_means(encoder, images, {i: b.attn.proj for i, b in blocks.items()}, contribution)


def mlp_scores(
    encoder: DFAEncoder, images: Tensor | None, criterion: str = "activation"
) -> dict[int, Tensor]:
    """``{block: [hidden]}`` scores of every block's MLP hidden units (module docstring)."""
    mlps = {i: b.mlp for i, b in enumerate(encoder.blocks)}
    out_norm = {i: m.lin2.weight.norm(dim=0).detach() for i, m in mlps.items()}
    if criterion == "weight":
        return {i: m.lin1.weight.norm(dim=1).detach() * out_norm[i] for i, m in mlps.items()}
    means = _hooked_means(
        encoder, images, {i: m.lin2 for i, m in mlps.items()}, lambda i, x: x.abs()
    )
    return {i: means[i] * out_norm[i] for i in mlps}


def _group_count(block: DFABlock) -> int:
    attn = block.attn
    return math.lcm(*(r * r if attn.layout == "2d" else r for _, r in attn.patterns))


def choose_heads(
    encoder: DFAEncoder, scores: dict[int, Tensor], ratio: float
) -> dict[int, list[int]]:
    """``{block: kept head indices}``, ascending; an empty list drops the block's attention."""
    units = []  # (score per head, block, heads of the unit)
    total = 0
    for i, block in _attention_blocks(encoder).items():
        nh, groups = block.attn.num_heads, _group_count(block)
        part = nh // groups
        total += nh
        ranked = [
            sorted(range(g * part, (g + 1) * part), key=lambda h: float(scores[i][h]))
            for g in range(groups)
        ]
        for u in range(part):
            heads = [ranked[g][u] for g in range(groups)]
            units.append((float(scores[i][heads].sum()) / len(heads), i, heads))
    budget = int(ratio * total + 1e-9)
    removed: dict[int, set[int]] = {}
    num_removed = 0
    for _, i, heads in sorted(units, key=lambda unit: unit[0]):
        if num_removed + len(heads) <= budget:
            removed.setdefault(i, set()).update(heads)
            num_removed += len(heads)
    return {
        i: [h for h in range(b.attn.num_heads) if h not in removed.get(i, set())]
        for i, b in _attention_blocks(encoder).items()
    }


def choose_mlp(scores: dict[int, Tensor], ratio: float) -> dict[int, list[int]]:
    """``{block: kept hidden units}``, ascending: every block keeps its strongest ``1 - ratio``."""
    kept = {}
    for i, s in scores.items():
        keep = max(1, len(s) - int(ratio * len(s) + 1e-9))
        kept[i] = sorted(torch.argsort(s, descending=True)[:keep].tolist())
    return kept


def _rows(index: list[int], width: int) -> Tensor:
    return torch.tensor([h * width + j for h in index for j in range(width)], dtype=torch.long)


def _copy_block(old: nn.Module, new: nn.Module, heads: list[int] | None, units: list[int]) -> None:
    """Weights of ``old`` into the smaller ``new``: only kept heads and MLP units."""
    with torch.no_grad():
        new.norm2.load_state_dict(old.norm2.state_dict())
        keep = torch.tensor(units, dtype=torch.long)
        new.mlp.lin1.weight.copy_(old.mlp.lin1.weight[keep])
        new.mlp.lin1.bias.copy_(old.mlp.lin1.bias[keep])
        new.mlp.lin2.weight.copy_(old.mlp.lin2.weight[:, keep])
        new.mlp.lin2.bias.copy_(old.mlp.lin2.bias)
        if not isinstance(new, DFABlock):
            return
        new.norm1.load_state_dict(old.norm1.state_dict())
        attn, d = old.attn, old.attn.head_dim
        cols = _rows(heads, d)
        rows = torch.cat([part * attn.num_heads * d + cols for part in range(3)])
        new.attn.qkv.weight.copy_(attn.qkv.weight[rows])
        if attn.qkv.bias is not None:
            new.attn.qkv.bias.copy_(attn.qkv.bias[rows])
        new.attn.proj.weight.copy_(attn.proj.weight[:, cols])
        new.attn.proj.bias.copy_(attn.proj.bias)


def pruned_kwargs(
    encoder: DFAEncoder, heads: dict[int, list[int]], units: dict[int, list[int]]
) -> dict[str, Any]:
    """The builder kwargs of the pruned student (the unpruned one's, plus per-block sizes)."""
    kwargs = dict(encoder.student_kwargs)
    blocks = list(encoder.blocks)
    attention = _attention_blocks(encoder)
    widest = max((b.attn.num_heads for b in attention.values()), default=1)
    # An MLP-only block ignores its entry; it records the widest block's heads.
    kwargs["block_heads"] = [len(heads[i]) if heads.get(i) else widest for i in range(len(blocks))]
    kwargs["mlp_only_blocks"] = sorted(
        [i for i in range(len(blocks)) if i not in attention] + [i for i in heads if not heads[i]]
    )
    kwargs["block_mlp_dims"] = [len(units[i]) for i in range(len(blocks))]
    if attention:
        kwargs["head_dim"] = next(iter(attention.values())).attn.head_dim
    return kwargs


def prune_student(
    encoder: DFAEncoder,
    target: str,
    ratio: float,
    images: Tensor | None = None,
    criterion: str = "activation",
) -> tuple[DFAEncoder, dict[str, Any]]:
    """A pruned copy of a registry student and a report of what went.

    target: "heads" or "mlp"; ratio: fraction removed; images: ``[N, 3, S, S]`` preprocessed
    calibration images (``teachers.preprocess``), needed by ``criterion="activation"``.
    """
    _check(target, ratio, criterion, images)
    if not isinstance(encoder, DFAEncoder) or not hasattr(encoder, "student_name"):
        raise ValueError("only registry DFA students (students.build_student) can be pruned")
    blocks = list(encoder.blocks)
    heads = {i: list(range(b.attn.num_heads)) for i, b in _attention_blocks(encoder).items()}
    units = {i: list(range(b.mlp.lin1.out_features)) for i, b in enumerate(blocks)}
    if target == "heads":
        heads = choose_heads(encoder, head_scores(encoder, images, criterion), ratio)
    else:
        units = choose_mlp(mlp_scores(encoder, images, criterion), ratio)
    kwargs = pruned_kwargs(encoder, heads, units)
    pruned = build_student(encoder.student_name, **kwargs)
    with torch.no_grad():
        for name in ("patch_embed", "neck"):
            getattr(pruned, name).load_state_dict(getattr(encoder, name).state_dict())
        pruned.pos_embed.copy_(encoder.pos_embed)
    for i, (old, new) in enumerate(zip(blocks, pruned.blocks, strict=True)):
        _copy_block(old, new, heads.get(i), units[i])
    return pruned.eval(), _report(encoder, pruned, target, ratio, heads, units)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def structure_params(encoder: DFAEncoder, target: str) -> int:
    """Parameters of the structures ``target`` prunes: qkv + proj weights (heads), or lin1
    weight and bias + lin2 weight (mlp); these shrink by exactly the removed fraction."""
    total = 0
    for block in encoder.blocks:
        if target == "heads" and isinstance(block, DFABlock):
            total += block.attn.qkv.weight.numel() + block.attn.proj.weight.numel()
        elif target == "mlp":
            mlp = block.mlp
            total += mlp.lin1.weight.numel() + mlp.lin1.bias.numel() + mlp.lin2.weight.numel()
    return total


def _report(
    old: DFAEncoder,
    new: DFAEncoder,
    target: str,
    ratio: float,
    heads: dict[int, list[int]],
    units: dict[int, list[int]],
) -> dict[str, Any]:
    if target == "heads":
        before = sum(b.attn.num_heads for b in _attention_blocks(old).values())
        after = sum(len(kept) for kept in heads.values())
    else:
        before = sum(b.mlp.lin1.out_features for b in old.blocks)
        after = sum(len(kept) for kept in units.values())
    return {
        "target": target,
        "ratio": ratio,
        "units_before": before,
        "units_after": after,
        "removed_fraction": 1 - after / before,
        "structure_params_before": structure_params(old, target),
        "structure_params_after": structure_params(new, target),
        "params_before": num_params(old),
        "params_after": num_params(new),
    }
