"""Phase 2, decoder alignment: the masks SAM's decoder draws from the student's embedding are
trained to match the ones the teacher's decoder draws from the teacher's, prompt by prompt.

EdgeSAM's prompt-in-the-loop distillation (Zhou et al., arXiv 2312.06660) with its
trick that fits a feature cache: the teacher's prompt encoder and mask decoder run on the
*cached* teacher embedding, so phase 2 never runs the teacher's image encoder. Per image, up to
`--max-prompts` prompts come from the annotations the cache carries (`distill.prompting`); the
target is the teacher's single-mask output on the low-resolution logits over the unpadded
region: its probabilities under BCE (`--mask-target soft`, the default), or its mask binarised at
logit 0 under BCE + Dice (`hard`, EdgeSAM's), averaged over prompts and over the `--decode-iters` refinement rounds that follow the first decoding. An image
without a usable annotation adds no mask loss; the data streams count it (`num_unprompted` in
log.csv). The phase-1 feature loss can stay beside it with `--feature-weight`.

What trains is `--tune`: the image encoder (gradients pass through the frozen decoder), the
student's own copy of the mask decoder, or both; the prompt encoder never does.
"""

from __future__ import annotations

import zlib

import torch
from segment_anything.modeling import Sam

from distill.config import DistillConfig
from distill.losses import bce_dice_loss, soft_bce_loss
from distill.prompting import BOX, LOW_RES_STRIDE, POINT, decode, refine_clicks
from teachers.preprocess import valid_mask


def click_generator(seed: int, step: int, keys: list[str]) -> torch.Generator:
    """The refinement clicks' generator of one micro-batch: seeded by the run's seed, the step
    and the batch's sample keys, so clicks do not depend on processes or restarts."""
    text = f"{seed}:{step}:{','.join(keys)}".encode()
    return torch.Generator().manual_seed(zlib.crc32(text))


def set_trainable_parts(model: torch.nn.Module, cfg: DistillConfig) -> None:
    """Freeze what `--tune` and `--feature-weight` leave out: the prompt encoder always, the tap
    projections without a feature loss, the encoder or the decoder as `--tune` says."""
    model.prompt_encoder.requires_grad_(False)
    model.student.requires_grad_(cfg.tune in ("encoder", "both"))
    model.mask_decoder.requires_grad_(cfg.tune in ("decoder", "both"))
    model.projections.requires_grad_(cfg.feature_weight > 0)


class AlignLoss:
    """The engine's loss function for `--phase decoder`: "loss", "mask" and, with a feature
    weight, "feature" (phase 1's DLD-weighted loss, from `features`)."""

    def __init__(self, cfg: DistillConfig, teacher: Sam, features=None) -> None:
        self.cfg, self.teacher, self.features = cfg, teacher.eval(), features
        self.teacher.requires_grad_(False)

    def __call__(self, engine, batch: dict) -> dict[str, torch.Tensor]:
        embed, taps = engine(batch["image"].to(engine.dtype))
        mask = self.mask_loss(engine.model, embed, batch, engine.step_index)
        if self.features is None or self.cfg.feature_weight == 0:
            return {"loss": mask, "mask": mask}
        feature = self.features.terms(embed, taps, batch, engine.step_index)["loss"]
        return {"loss": mask + self.cfg.feature_weight * feature, "mask": mask, "feature": feature}

    def mask_loss(self, model, embed: torch.Tensor, batch: dict, step: int) -> torch.Tensor:
        """Mean BCE + Dice over the micro-batch's prompts and decoding rounds (0 with a graph
        when it has no prompt, so every process still steps)."""
        teacher = self.teacher.to(embed.device)
        generator = click_generator(self.cfg.seed, step, batch["keys"])
        total, count = embed.float().sum() * 0.0, 0
        for i in range(embed.shape[0]):
            hw = tuple(int(v) for v in batch["input_hw"][i])
            valid = valid_mask(hw, self.cfg.img_size, LOW_RES_STRIDE).to(embed.device)
            for kind in (BOX, POINT):
                index = (batch["prompt_kind"][i] == kind).nonzero()[:, 0]
                if len(index) == 0:
                    continue
                student = (model.prompt_encoder, model.mask_decoder, embed[i : i + 1])
                target = (teacher.prompt_encoder, teacher.mask_decoder, batch["embed"][i : i + 1])
                total = total + self.prompt_rounds(
                    batch, i, kind, index, student, target, valid, generator
                )
                count += len(index)
        return total / max(count, 1)

    def prompt_rounds(
        self, batch, i, kind, index, student, target, valid, generator
    ) -> torch.Tensor:
        """Sum over one image's prompts of one kind of their loss, averaged over the rounds."""
        num = len(index)
        boxes = batch["prompt_box"][i, index] if kind == BOX else None
        device = batch["prompt_box"].device
        coords = torch.zeros(num, 0, 2, device=device)
        labels = torch.zeros(num, 0, dtype=torch.long, device=device)
        if kind == POINT:
            coords = batch["prompt_point"][i, index][:, None]
            labels = torch.ones(num, 1, dtype=torch.long, device=device)
        rounds = self.cfg.decode_iters + 1
        total = 0.0
        for r in range(rounds):
            points = (coords, labels) if coords.shape[1] else None
            with torch.no_grad():
                teacher_logits = decode(*target, boxes, points)
            goal = teacher_logits > 0
            logits = decode(*student, boxes, points)
            region = valid.expand_as(logits).float()
            if self.cfg.mask_target == "soft":
                loss = soft_bce_loss(logits, torch.sigmoid(teacher_logits), region)
            else:
                loss = bce_dice_loss(logits, goal.float(), region)
            total = total + loss * num
            if r + 1 < rounds:
                xy, lab = refine_clicks(logits[:, 0].detach() > 0, goal[:, 0], valid, generator)
                coords = torch.cat([coords, xy[:, None].to(device)], 1)
                labels = torch.cat([labels, lab[:, None].to(device)], 1)
        return total / rounds
