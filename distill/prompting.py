"""Prompts for phase 2 (decoder alignment): sampled from a cached image's annotations, decoded by
SAM's prompt encoder and mask decoder, refined by clicks where student and teacher disagree.

EdgeSAM's prompt-in-the-loop distillation (Zhou et al., arXiv 2312.06660) samples box
or point prompts from the SA-1B annotations, decodes them with the teacher's and the student's
decoder, then adds clicks sampled in the regions where the two masks differ. Here:

- a prompt is one annotation's box (COCO `bbox` or SA-1B `bbox`, x, y, w, h in the image's own
  pixels) or, when the annotation has SA-1B `point_coords`, its first point with probability 1/2;
- prompts are given in the resized input frame of `teachers.preprocess` through SAM's own
  `ResizeLongestSide`, as `SamPredictor` does;
- every decoding asks for the single-mask output (`multimask_output=False`), for teacher and
  student alike, so a target is one mask;
- a refinement click is drawn uniformly from the larger of the two error regions of the
  low-resolution masks: positive in what the student missed, negative in what it spilled; a
  prompt whose masks already agree gets SAM's padding point (label -1), which adds nothing.

Per image the prompts are fixed-size tensors (P = max prompts): `prompt_box` [P, 4] and
`prompt_point` [P, 2] (x, y in the input frame) and `prompt_kind` [P] (0 none, 1 box, 2 point).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

NONE, BOX, POINT = 0, 1, 2
LOW_RES_STRIDE = 4  # SAM's mask decoder upsamples the S/16 embedding to S/4 logits


def usable_annotations(ann: dict | None) -> list[dict]:
    """The annotations of a cached `ann.json` that make a prompt: a box with positive size."""
    if not ann:
        return []
    return [
        a
        for a in ann.get("annotations", [])
        if len(a.get("bbox", ())) == 4 and a["bbox"][2] > 0 and a["bbox"][3] > 0
    ]


def sample_prompts(
    ann: dict | None,
    orig_hw: tuple[int, int],
    img_size: int,
    max_prompts: int,
    rng: random.Random,
) -> dict[str, Tensor]:
    """Up to `max_prompts` prompts of one image, drawn without replacement from its usable
    annotations (none when it has none: `prompt_kind` all 0)."""
    anns = usable_annotations(ann)
    chosen = rng.sample(anns, min(max_prompts, len(anns)))
    resize = ResizeLongestSide(img_size)
    boxes = np.zeros((max_prompts, 4), np.float64)
    points = np.zeros((max_prompts, 2), np.float64)
    kinds = np.zeros(max_prompts, np.int64)
    for i, a in enumerate(chosen):
        x, y, w, h = (float(v) for v in a["bbox"])
        boxes[i] = resize.apply_boxes(np.array([[x, y, x + w, y + h]]), orig_hw)[0]
        coords = a.get("point_coords") or []
        if coords and rng.random() < 0.5:
            points[i] = resize.apply_coords(np.array([coords[0]], np.float64), orig_hw)[0]
            kinds[i] = POINT
        else:
            kinds[i] = BOX
    return {
        "prompt_box": torch.as_tensor(boxes, dtype=torch.float32),
        "prompt_point": torch.as_tensor(points, dtype=torch.float32),
        "prompt_kind": torch.as_tensor(kinds),
    }


def refine_clicks(
    student: Tensor, teacher: Tensor, valid: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One click per prompt from its low-resolution masks: student, teacher [N, h, w] bool,
    valid [h, w] bool (the unpadded region). Returns coords [N, 2] (x, y at the pixel's centre
    in the input frame, S = 4 h) and labels [N]: 1 in a pixel the student missed, 0 in one it
    spilled (from the larger region; a tie goes to the positive), -1 where they agree."""
    missed = teacher & ~student & valid
    spilled = student & ~teacher & valid
    num_missed, num_spilled = missed.flatten(1).sum(1), spilled.flatten(1).sum(1)
    positive = num_missed >= num_spilled
    region = torch.where(positive[:, None, None], missed, spilled).flatten(1)
    agree = region.sum(1) == 0
    weights = torch.where(agree[:, None], torch.ones_like(region), region).float()
    index = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(region.device)
    width = student.shape[-1]
    rows, cols = index // width, index % width
    coords = torch.stack([cols, rows], 1).float().add(0.5).mul(LOW_RES_STRIDE)
    labels = torch.where(agree, -1, positive.long())
    return coords, labels


def decode(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    embedding: Tensor,
    boxes: Tensor | None,
    points: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """Low-resolution mask logits [N, 1, S/4, S/4] of N prompts on one image's embedding
    [1, 256, S/16, S/16]: boxes [N, 4] and/or points (coords [N, K, 2], labels [N, K]), in the
    input frame. The prompt encoder runs without a graph (it never trains); gradients reach the
    mask decoder's weights and the embedding."""
    dtype = next(mask_decoder.parameters()).dtype
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=None)
        dense_pe = prompt_encoder.get_dense_pe()
    logits, _ = mask_decoder(
        image_embeddings=embedding.to(dtype),
        image_pe=dense_pe.to(dtype),
        sparse_prompt_embeddings=sparse.to(dtype),
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=False,
    )
    return logits.float()
