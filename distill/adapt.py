"""Adaptation on the training engine: a frozen base encoder, an adapter and the mask decoder
trained on a domain's binary masks; `adapted.pt` out.

Read top to bottom: place the process, list the data (pairs the file names rule out are counted
and reported), load the base (`student.pt` or a SAM checkpoint) and attach the adapter, hand the
trainable parts to the engine with the mask loss, resume if asked, then the engine's loop
(`Engine.run`, the one every job shares) with a validation on the val split every `val_every`
steps (and once before the first step, into OUT/val_before.json: the model at initialisation,
which is the base itself for every method but cad), and at the end the export and the plot.
The validation's IoU and Dice come from the scorer the entry script hands in (`launch/adapt.py`
passes evaluation's, `eval.mask_metrics.iou_dice`), so training imports nothing of evaluation.

Checkpoints hold what trains (adapter, decoder, optimizer), not the frozen base, whose sha256
is stored with them and checked on resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.adapt_data import MaskBatches, MaskTrainSet, SampleOrder
from distill.config import AdaptConfig
from distill.engine import Engine, build_engine, prepare_run_dir, start_processes
from distill.logs import RunProgress, plot_adapt
from distill.losses import MASK_LOSSES
from students import load_sam
from students.adapters.export import adapt_sam, save_adapted
from students.adapters.model import PromptedSam, predict_prob, set_trainable
from teachers.mask_folders import Skips, coco_split, iter_pairs, list_pairs, prompt_box
from teachers.runtime.files import file_sha256
from teachers.runtime.preempt import StopRequest

VAL_COLUMNS = ["val_iou", "val_dice", "val_area_ratio"]
Scorer = Callable[[np.ndarray, np.ndarray], tuple[float, float]]
"""(foreground probability [H, W], true mask [H, W] bool) -> (IoU, Dice) of one image."""


def build_model(cfg: AdaptConfig) -> PromptedSam:
    """The base model with the adapter attached (seeded), in training mode."""
    torch.manual_seed(cfg.seed)
    sam = load_sam(cfg.ckpt)
    adapt_sam(sam, cfg.method, cfg.adapter_kwargs())
    set_trainable(sam, train_decoder=not cfg.freeze_decoder)
    model = PromptedSam(sam).train()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--method {cfg.method} with these flags leaves nothing to train")
    return model


class AdaptLoss:
    """The engine's loss function: the mask loss on the decoder's logits upsampled to the input
    side (padding masked), plus the adapter's auxiliary loss (Conv-LoRA's balancing loss)."""

    def __init__(self, cfg: AdaptConfig, model: PromptedSam) -> None:
        self.mask_loss, self.model = MASK_LOSSES[cfg.loss], model

    def __call__(self, engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
        torch.manual_seed(batch["noise_seed"])  # the gate's noise: a function of the position
        logits = engine(batch["image"].to(engine.dtype), batch["box"].to(engine.dtype))
        side = batch["target"].shape[-2:]
        logits = F.interpolate(logits.float(), size=side, mode="bilinear", align_corners=False)
        mask = self.mask_loss(logits, batch["target"], batch["valid"])
        aux = self.model.aux_loss().float()
        return {"loss": mask + aux, "mask": mask, "aux": aux}

    @staticmethod
    def columns() -> list[str]:
        return ["loss_total", "loss_mask", "loss_aux", "lr", "images_per_s", "num_bad"]


class Validation:
    """Mean IoU and Dice on the val split, and predicted over true foreground area (a decoder
    that collapses shows as a ratio near 0). Each process scores its share of the images; one
    all-reduce sums them."""

    def __init__(self, cfg: AdaptConfig, rank: int, world: int, scorer: Scorer) -> None:
        self.skips, self.scorer = Skips(), scorer
        pairs = list_pairs(cfg.data, "val", on_bad=cfg.on_bad, skips=self.skips)
        self.cfg, self.pairs = cfg, pairs[rank::world]
        if not pairs:
            skipped = self.skips.num_skipped
            raise ValueError(
                f"{cfg.data}/val has no usable image/mask pair to validate on: "
                + (
                    f"{self.skips.summary()} (see the warnings above)"
                    if skipped
                    else "the split is empty (no image and no mask in it)"
                )
            )

    def __call__(self, engine: Engine, model: PromptedSam) -> dict[str, float]:
        sums = np.zeros(5)  # iou, dice, predicted area, true area, images
        model.eval()
        pairs = iter_pairs(self.pairs, on_bad=self.cfg.on_bad, skips=self.skips)
        for _, image, mask in pairs:
            prob = predict_prob(model, image, prompt_box(mask, self.cfg.prompt), engine.dtype)
            area = float((prob > 0.5).sum())
            sums += [*self.scorer(prob, mask), area, mask.sum(), 1]
        model.train()
        iou, dice, pred_area, true_area, n = engine.all_reduce(sums.tolist())
        if n == 0:
            raise ValueError(
                f"no val image of {self.cfg.data} could be read: {self.skips.summary()}"
            )
        return {"val_iou": iou / n, "val_dice": dice / n, "val_area_ratio": pred_area / true_area}


def open_batches(cfg: AdaptConfig, engine: Engine, job, mine, base_sha: str) -> MaskBatches:
    """This process's training micro-batches, continued where the checkpoint left them."""
    if coco_split(cfg.data, "train") is not None and cfg.prompt != "gt_box":
        raise ValueError(
            f"--data {cfg.data} holds COCO instances, several per image: use --prompt gt_box"
        )
    skips = Skips()
    pairs = list_pairs(cfg.data, "train", on_bad=cfg.on_bad, skips=skips)
    if engine.env.rank == 0:
        print(f"{cfg.data}/train: {len(pairs)} pairs, {skips.summary()}", flush=True)
    dataset = MaskTrainSet(pairs, engine.model.img_size, cfg.prompt, cfg.on_bad)
    env = engine.env
    order = SampleOrder(
        len(pairs), cfg.batch_size, engine.micro_batch, env.rank, engine.accum, cfg.seed
    )
    batches = MaskBatches(dataset, order, env.world_size, cfg.workers, {"base_sha256": base_sha})
    batches.restore(job, mine, engine.step_index)
    return batches


def check_base(cfg: AdaptConfig, job: dict | None) -> str:
    """The base checkpoint's sha256; on resume it must be the one the checkpoint trained on."""
    sha = file_sha256(cfg.ckpt)
    if job is not None and job["base_sha256"] != sha:
        raise ValueError(
            f"--ckpt {cfg.ckpt} (sha256 {sha}) is not the base the checkpoint in {cfg.out} was "
            f"trained on (sha256 {job['base_sha256']})"
        )
    return sha


def export(cfg: AdaptConfig, model: PromptedSam) -> Path:
    """Rank 0 at the end: the training plot and adapted.pt (LoRA merged with --merge)."""
    out, sam = Path(cfg.out), model.sam
    plot_adapt(out)
    if cfg.merge:
        sam.image_encoder = sam.image_encoder.merge()
    path = save_adapted(
        out / "adapted.pt",
        sam.eval(),
        base_path=cfg.ckpt,
        base_state=load_sam(cfg.ckpt).state_dict(),
        method=cfg.method,
        adapter_kwargs=cfg.adapter_kwargs(),
        merged=cfg.merge,
        step=cfg.steps,
    )
    print(
        f"exported {path} ({cfg.method} on {cfg.ckpt}); log {out / 'log.csv'}, plot {out / 'training.png'}"
    )
    return path


def train(cfg: AdaptConfig, stop: StopRequest | None = None, *, scorer: Scorer) -> Path:
    """Run (or resume) an adaptation, validating with `scorer`; return the path of adapted.pt. A
    stop request (SIGUSR1/SIGTERM) saves a checkpoint after the current step and raises
    Preempted."""
    env = start_processes(cfg)
    ckpt_dir = prepare_run_dir(cfg, env.rank, "adapted.pt")
    model = build_model(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = build_engine(cfg, model, trainable, AdaptLoss(cfg, model), env, stop)
    start, job, mine = engine.resume(ckpt_dir) if cfg.resume == "auto" else (0, None, None)
    base_sha = check_base(cfg, job)
    batches = open_batches(cfg, engine, job, mine, base_sha)
    validate = Validation(cfg, env.rank, env.world_size, scorer)
    progress = RunProgress(cfg, AdaptLoss.columns() + VAL_COLUMNS, start, env.rank)
    if env.rank == 0:
        print(
            f"{cfg.method} on {cfg.ckpt}: {sum(p.numel() for p in trainable):,} trainable parameters",
            flush=True,
        )

    if start == 0:
        before = validate(engine, model)
        if env.rank == 0:
            (Path(cfg.out) / "val_before.json").write_text(json.dumps(before, indent=1))
            print(f"before adaptation: val IoU {before['val_iou']:.4f}", flush=True)

    def record(step: int, losses: dict, seconds: float) -> None:
        bad = int(engine.all_reduce([float(batches.num_bad)])[0])
        values = {
            "loss_total": losses["loss"],
            "loss_mask": losses["mask"],
            "loss_aux": losses["aux"],
        }
        values |= {"lr": engine.lr, "images_per_s": cfg.batch_size / seconds, "num_bad": bad}
        line = f"loss {losses['loss']:.4g} lr {engine.lr:.3g} bad pairs {bad}"
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            values |= validate(engine, model)
            line += f" val IoU {values['val_iou']:.4f} area ratio {values['val_area_ratio']:.2f}"
        progress.step(step + 1, values, line, loss=f"{losses['loss']:.4g}")

    engine.run(batches, ckpt_dir, start, record, also_close=(progress,))
    if env.rank == 0:
        export(cfg, model)
    engine.barrier()
    return Path(cfg.out) / "adapted.pt"
