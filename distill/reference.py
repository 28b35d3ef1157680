"""Training the reference teacher (`sam_mini`) on the engine, with SAM's own prompts.

Read top to bottom: the scenes come in as a function `scenes(split, index) -> (image [H, W, 3]
uint8, labels [H, W] int, 0 background, 1..K instances)` handed in by the entry script
(`launch/train_reference.py`), so this job knows nothing of how they are made. Each step draws
`batch_size` new training scenes (scene `i` is a pure function of `i`, so a resumed run reads the
same images); per image up to `prompts_per_image` instances are prompted, all with one kind of
prompt: a GT box with SAM's jitter (10 % of the box side, at most 20 px, from `segment_anything`'s
training recipe in the SAM paper, appendix A) or 1 to 3 clicks (the first inside the mask, the
others positive inside the mask or negative inside the box). The loss follows SAM's: the
single-mask output and the best of the three multimask outputs each get BCE + Dice against the
instance (min over the three for the ambiguity they model), 20 x focal + Dice as in SAM, and the IoU head regresses the IoU
each output actually reaches (MSE). Logits are compared at `loss_side` pixels, above the decoder's
own 4x-upscaled grid, so thin parts count.

Validation (every `val_every` steps and at the end): box-prompted mIoU on `val_scenes` held-out
scenes with EfficientViT-SAM's protocol at the input resolution (tight GT box, multimask output,
the mask with the highest predicted IoU), beside the box-fill baseline. The figure that the docs
publish comes from `eval/coco.py` on written scenes, not from this monitor.

Out: OUT/sam_mini.pth, the flat state dict in the official key layout (fp16 tensors), and the
log and plot every engine job writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torchvision.ops import sigmoid_focal_loss

from distill.config import TrainConfig
from distill.engine import Engine, build_engine, prepare_run_dir, start_processes
from distill.logs import RunProgress, StepLog, _save
from teachers.build import build_sam_mini, check_state_dict
from teachers.preprocess import preprocess
from teachers.runtime.files import read_checkpoint, save_atomic
from teachers.runtime.preempt import StopRequest
from teachers.sam_mini import SAM_MINI_IMG_SIZE

Scenes = Callable[[str, int], tuple[np.ndarray, np.ndarray]]
BOX, MAX_CLICKS = 0, 3
FOCAL_ALPHA = 0.75  # the weight of object pixels in the focal loss (see `mask_losses`)
VAL_OFFSET = 0  # held scenes 0 .. val_scenes - 1


@dataclass
class ReferenceConfig(TrainConfig):
    """`launch/train_reference.py`: the reference teacher's training run."""

    steps: int = 4000
    """Optimizer steps."""
    batch_size: int = 4
    """Images per step."""
    lr: float = 4e-4
    """Peak learning rate (AdamW); warm-up, then cosine to min_lr_ratio * lr."""
    engine: str = "torch"
    """Training engine: torch (one process, the default for a CPU run) or deepspeed."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    prompts_per_image: int = 4
    """Instances prompted per image and step (fewer when an image has fewer)."""
    loss_side: int = 256
    """Side of the square the mask loss is computed on (the logits are upsampled to it)."""
    box_share: float = 0.5
    """Share of images prompted with jittered GT boxes; the others with 1 to 3 clicks."""
    val_every: int = 250
    """Steps between validations on the held-out scenes."""
    val_scenes: int = 48
    """Held-out scenes the validation scores."""
    init: str | None = None
    """Start from these sam_mini weights (e.g. the shipped teachers/weights/sam_mini.pth, to
    train it further) instead of fresh ones; the optimizer starts fresh."""
    first_scene: int = 0
    """Index of the first training scene; a run that continues another (--init) passes the
    number of scenes that one saw (steps x batch size) so it trains on new scenes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompts_per_image", "loss_side", "val_every", "val_scenes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.first_scene < 0:
            raise ValueError(f"--first-scene must be at least 0, got {self.first_scene}")
        if not 0.0 <= self.box_share <= 1.0:
            raise ValueError(f"--box-share must be within 0..1, got {self.box_share}")


class PromptedTrainer(torch.nn.Module):
    """SAM with its prompt encoder and decoder run per image on several prompts.

    forward(images [B, 3, S, S], boxes [B, K, 4], points [B, K, P, 2], labels [B, K, P], kind [B])
    -> (low-res logits [B, K, 4, S/4, S/4], predicted IoU [B, K, 4]); output 0 is the
    single-mask token, 1..3 the multimask ones. kind 0: box prompts; n > 0: the first n clicks.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images, boxes, points, labels, kind):
        sam = self.sam
        embeddings = sam.image_encoder(images)
        pe = sam.prompt_encoder.get_dense_pe()
        masks, ious = [], []
        for i, k in enumerate(kind.tolist()):
            prompt = (
                {"boxes": boxes[i]}
                if k == BOX
                else {"points": (points[i, :, :k], labels[i, :, :k])}
            )
            sparse, dense = sam.prompt_encoder(
                **({"points": None, "boxes": None} | prompt), masks=None
            )
            low, iou = sam.mask_decoder.predict_masks(embeddings[i : i + 1], pe, sparse, dense)
            masks.append(low)
            ious.append(iou)
        return torch.stack(masks), torch.stack(ious)


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output: SAM's mask loss, 20 x focal + Dice (the SAM paper, section 3: a 20:1 linear
    combination; torchvision's sigmoid focal loss, gamma 2), and the IoU reached.
    logits [..., L, L], target [..., L, L] in {0, 1} -> (loss [...], iou [...]).

    From scratch, an object covers a few percent of the image, and a loss that weighs background
    pixels as much or more (BCE, or focal with RetinaNet's alpha 0.25) is first minimised by
    predicting background everywhere; the sigmoid then saturates and Dice pulls out slowly.
    `FOCAL_ALPHA` 0.75 weighs the object's pixels three to one instead: on one batch overfit for
    30 steps it reaches IoU 0.50 where 0.25 reaches 0.27 after sitting at empty masks for 20
    steps (and a full run with 0.25 still predicted empty masks at step 270)."""
    focal = sigmoid_focal_loss(logits, target, alpha=FOCAL_ALPHA, gamma=2.0, reduction="none")
    focal = focal.mean((-2, -1))
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum((-2, -1)) + 1) / (
        prob.sum((-2, -1)) + target.sum((-2, -1)) + 1
    )
    hard = (logits > 0).float()
    inter = (hard * target).sum((-2, -1))
    union = hard.sum((-2, -1)) + target.sum((-2, -1)) - inter
    return 20 * focal + dice, inter / union.clamp(min=1)


def prompt_loss(logits, iou_pred, target, valid) -> dict[str, torch.Tensor]:
    """SAM's loss over prompts. logits [B, K, 4, L, L] (upsampled), iou_pred [B, K, 4],
    target [B, K, L, L], valid [B, K] bool. Mean over valid prompts of: the single output's
    mask loss + the best multimask output's + MSE of the IoU head against the IoU reached."""
    per, iou = mask_losses(logits, target[:, :, None].expand_as(logits))
    single, multi = per[..., 0], per[..., 1:].min(-1).values
    iou_mse = ((iou_pred - iou.detach()) ** 2).mean(-1)
    w = valid.float() / valid.float().sum().clamp(min=1)
    mask = ((single + multi) * w).sum()
    iou_term = (iou_mse * w).sum()
    return {"loss": mask + iou_term, "mask": mask, "iou": iou_term}


def _jittered_box(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    noise = rng.normal(0.0, 0.1, 4) * side
    return box + np.clip(noise, -20, 20)


def _clicks(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MAX_CLICKS clicks [P, 2] (x, y) and labels [P]: the first inside the mask, the others
    inside it (positive) or inside its box but outside it (negative)."""
    inside = np.argwhere(mask)
    ys, xs = inside[:, 0], inside[:, 1]
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_out = np.argwhere(~mask[y0:y1, x0:x1]) + [y0, x0]
    points, labels = [], []
    for j in range(MAX_CLICKS):
        negative = j > 0 and len(box_out) and rng.random() < 0.5
        pool = box_out if negative else inside
        y, x = pool[rng.integers(len(pool))]
        points.append((x + 0.5, y + 0.5))
        labels.append(0 if negative else 1)
    return np.array(points), np.array(labels)


def image_sample(
    image: np.ndarray,
    labels: np.ndarray,
    cfg: ReferenceConfig,
    rng: np.random.Generator,
    img_size: int,
) -> dict[str, torch.Tensor]:
    """One training image: preprocessed pixels and its prompts and targets (shapes as in
    `PromptedTrainer` and `prompt_loss`, without the batch dimension)."""
    if rng.random() < 0.5:  # mirrored scenes: SAM is not flip-equivariant, so this is new data
        image, labels = image[:, ::-1].copy(), labels[:, ::-1].copy()
    pre = preprocess(image, img_size)
    h, w = pre.input_hw
    scale = h / image.shape[0]
    ids = np.unique(labels)
    ids = ids[ids > 0]
    chosen = rng.permutation(ids)[: cfg.prompts_per_image]
    k = cfg.prompts_per_image
    boxes, points, plabels = (
        np.zeros((k, 4)),
        np.zeros((k, MAX_CLICKS, 2)),
        np.ones((k, MAX_CLICKS)),
    )
    target = torch.zeros(k, cfg.loss_side, cfg.loss_side)
    valid = torch.zeros(k, dtype=torch.bool)
    th, tw = round(h * cfg.loss_side / img_size), round(w * cfg.loss_side / img_size)
    for j, inst in enumerate(chosen):
        mask = labels == inst
        boxes[j] = _jittered_box(rng, mask) * scale
        pts, lbl = _clicks(rng, mask)
        points[j], plabels[j] = pts * scale, lbl
        small = torch.from_numpy(mask.astype(np.float32))[None, None]
        target[j, :th, :tw] = F.interpolate(small, size=(th, tw), mode="area")[0, 0].round()
        valid[j] = True
    kind = BOX if rng.random() < cfg.box_share else int(rng.integers(1, MAX_CLICKS + 1))
    return {
        "images": pre.image,
        "boxes": torch.from_numpy(boxes).float(),
        "points": torch.from_numpy(points).float(),
        "labels": torch.from_numpy(plabels).float(),
        "kind": torch.tensor(kind),
        "target": target,
        "valid": valid,
    }


class SceneBatches:
    """The engine's micro-batches: step `s`, micro-batch `m` reads training scenes
    `(s * accum + m) * micro .. + micro`, each with its own seeded prompts, so a resumed run
    (the engine restores the step) reads exactly what an uninterrupted one would."""

    def __init__(self, scenes: Scenes, cfg: ReferenceConfig, engine: Engine, img_size: int) -> None:
        if engine.env.world_size != 1:
            raise ValueError("the reference teacher trains in one process: drop the launcher")
        self.scenes, self.cfg, self.img_size = scenes, cfg, img_size
        self.micro, self.position = engine.micro_batch, engine.step_index * engine.accum

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.cfg.first_scene + self.position * self.micro
        self.position += 1
        samples = []
        for index in range(first, first + self.micro):
            rng = np.random.default_rng((self.cfg.seed, index))
            image, labels = self.scenes("train", index)
            samples.append(image_sample(image, labels, self.cfg, rng, self.img_size))
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def job_state(self) -> dict:
        return {"position": self.position}

    def rank_state(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class ReferenceLoss:
    """The engine's loss function: `prompt_loss` on the logits upsampled to `loss_side`."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        self.side = cfg.loss_side

    def __call__(self, engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
        args = [batch[k] for k in ("images", "boxes", "points", "labels")]
        logits, iou = engine(*args, batch["kind"])
        b, k, n, h, w = logits.shape
        up = F.interpolate(logits.flatten(0, 1), size=(self.side, self.side), mode="bilinear")
        return prompt_loss(
            up.view(b, k, n, self.side, self.side), iou, batch["target"], batch["valid"]
        )


@torch.no_grad()
def box_miou(model: PromptedTrainer, scenes: Scenes, num: int, img_size: int) -> dict[str, float]:
    """Box-prompted mIoU x 100 over the instances of held-out scenes 0..num-1 at the input
    resolution (tight boxes, multimask, highest predicted IoU), with the single-mask output, and
    the box-fill baseline's."""
    model.eval()
    ious, singles, fills = [], [], []
    for index in range(VAL_OFFSET, VAL_OFFSET + num):
        image, labels = scenes("held", index)
        pre = preprocess(image, img_size)
        h, w = pre.input_hw
        small = F.interpolate(
            torch.from_numpy(labels)[None, None].float(), size=(h, w), mode="nearest"
        )[0, 0]
        ids = [i for i in torch.unique(small).tolist() if i > 0]
        if not ids:
            continue
        masks = torch.stack([small == i for i in ids])
        boxes = torch.stack([_tight_box(m) for m in masks]).float()
        nil = torch.zeros(len(ids), 1, 2), torch.ones(len(ids), 1)
        logits, iou = model(
            pre.image[None], boxes[None], nil[0][None], nil[1][None], torch.tensor([BOX])
        )
        best = iou[0, :, 1:].argmax(-1) + 1
        low = logits[0, torch.arange(len(ids)), best]
        pred = (
            F.interpolate(low[None], size=(img_size, img_size), mode="bilinear")[0, :, :h, :w] > 0
        )
        single = F.interpolate(logits[0, :, 0][None], size=(img_size, img_size), mode="bilinear")
        single = single[0, :, :h, :w] > 0
        for m, p, one, box in zip(masks, pred, single, boxes, strict=True):
            ious.append(_iou(p, m))
            singles.append(_iou(one, m))
            fill = torch.zeros_like(m)
            x0, y0, x1, y1 = box.int().tolist()
            fill[y0:y1, x0:x1] = True
            fills.append(_iou(fill, m))
    model.train()
    return {
        "val_box_miou": 100 * float(np.mean(ious)),
        "val_box_miou_single": 100 * float(np.mean(singles)),
        "val_box_fill_miou": 100 * float(np.mean(fills)),
    }


def _tight_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def _iou(pred: torch.Tensor, mask: torch.Tensor) -> float:
    inter = (pred & mask).sum().item()
    return inter / max((pred | mask).sum().item(), 1)


def save_reference(sam: Sam, path: Path) -> Path:
    """The official flat key layout, fp16 tensors (`teachers.build` casts them back on load),
    written to a temporary name first so that a crash leaves no half file."""
    state = {k: v.detach().to(torch.float16).clone() for k, v in sam.state_dict().items()}
    return save_atomic(state, path)


def train(cfg: ReferenceConfig, stop: StopRequest | None = None, *, scenes: Scenes) -> Path:
    """Run (or resume) the reference teacher's training; the path of OUT/sam_mini.pth."""
    env = start_processes(cfg)
    ckpt_dir = prepare_run_dir(cfg, env.rank, "sam_mini.pth")
    torch.manual_seed(cfg.seed)
    sam = build_sam_mini()
    if cfg.init is not None:
        state = read_checkpoint(cfg.init)
        check_state_dict(state, sam.state_dict(), "sam_mini", f"--init {cfg.init}")
        sam.load_state_dict({k: v.float() for k, v in state.items()})
    model = PromptedTrainer(sam).train()
    engine = build_engine(cfg, model, model.parameters(), ReferenceLoss(cfg), env, stop)
    start, _, _ = engine.resume(ckpt_dir) if cfg.resume == "auto" else (0, None, None)
    batches = SceneBatches(scenes, cfg, engine, SAM_MINI_IMG_SIZE)
    columns = ["loss_total", "loss_mask", "loss_iou", "lr", "images_per_s", "num_bad"]
    columns += ["val_box_miou", "val_box_miou_single", "val_box_fill_miou"]
    progress = RunProgress(cfg, columns, start, env.rank)
    print(f"sam_mini: {sum(p.numel() for p in sam.parameters()):,} parameters", flush=True)

    def record(step: int, losses: dict, seconds: float) -> None:
        values = {
            "loss_total": losses["loss"],
            "loss_mask": losses["mask"],
            "loss_iou": losses["iou"],
        }
        values |= {"lr": engine.lr, "images_per_s": cfg.batch_size / seconds, "num_bad": 0}
        line = f"loss {losses['loss']:.4g} lr {engine.lr:.3g}"
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            values |= box_miou(model, scenes, cfg.val_scenes, SAM_MINI_IMG_SIZE)
            line += (
                f" val box mIoU {values['val_box_miou']:.1f}, single mask "
                f"{values['val_box_miou_single']:.1f} (box fill {values['val_box_fill_miou']:.1f})"
            )
        progress.step(step + 1, values, line, loss=f"{losses['loss']:.4g}")

    engine.run(batches, ckpt_dir, start, record, also_close=(progress,))
    out = Path(cfg.out)
    plot_reference(out)
    path = save_reference(sam.eval(), out / "sam_mini.pth")
    (out / "sam_mini.json").write_text(
        json.dumps({"steps": cfg.steps, "config": cfg.to_json()}, indent=1)
    )
    print(f"exported {path}; log {out / 'log.csv'}, plot {out / 'training.png'}", flush=True)
    return path


def plot_reference(out: Path) -> Path:
    """OUT/training.png: the losses (log scale) and the held-out box mIoU beside the box-fill
    baseline's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = StepLog.read(out / "log.csv")
    steps = [int(r["step"]) for r in rows]
    val = [r for r in rows if r.get("val_box_miou")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("total", "mask", "iou"):
        axes[0].plot(steps, [float(r[f"loss_{name}"]) for r in rows], label=name, lw=1)
    axes[0].set(yscale="log", xlabel="step", title="training loss")
    val_steps = [int(r["step"]) for r in val]
    axes[1].plot(val_steps, [float(r["val_box_miou"]) for r in val], "o-", label="sam_mini")
    axes[1].plot(val_steps, [float(r["val_box_fill_miou"]) for r in val], "--", label="box fill")
    axes[1].set(xlabel="step", ylabel="mIoU", title="held-out box mIoU (input resolution)")
    return _save(fig, axes, out / "training.png")
