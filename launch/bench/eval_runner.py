"""Instances per second of the evaluation runner against a plain per-instance SamPredictor loop.

    python launch/bench/eval_runner.py [--arch vit_tiny|vit_b] [--ckpt F] [--num-images 8]
        [--min-side 320 --max-side 640] [--out runs/bench_eval.json]

Both sides score the same GT-box instances of a generated COCO-format dataset
(eval.scenes.synthetic)
with the same model, the EfficientViT-SAM box protocol, and IoU against the pycocotools GT:

- runner: `eval.runner.run_images`, the image encoder once per image and all boxes of an image
  through the decoder together;
- plain loop: for every instance `SamPredictor.set_image` then `predict(box=...)`, as a
  straightforward script (or the reference one, which encodes once per image but decodes one
  box at a time) would do.

`--arch vit_b` builds a ViT-B SAM with random weights (1024 input): latency does not depend on
the weights, and it makes the encoder's share of the cost realistic. The speed-up comes from
encoding each image once, so it approaches the number of instances per image when the encoder
dominates (ViT-B and up; COCO val2017 has about 7 annotations per image, LVIS about 12). With
vit_tiny the SAM mask decoder costs more than the 4-block encoder, and batching prompts does
not cut the decoder's work (every prompt attends over the whole image embedding), so the gain
there is mostly per-call overhead. The mIoU of both sides is
printed as a check that they computed the same thing. The two sides run interleaved image by
image, so that a busy machine slows both alike; the runner is timed one image per call, which
leaves out its read-ahead of the next image.
"""

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# `python launch/bench/eval_runner.py` puts launch/bench/ first on sys.path, where its files would
# shadow packages; drop it before importing anything but the standard library.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from segment_anything import SamPredictor, sam_model_registry  # noqa: E402

from eval.datasets import gt_images, load_coco  # noqa: E402
from eval.metrics import encode_masks, mask_iou  # noqa: E402
from eval.prompts import Protocol, box_xyxy  # noqa: E402
from eval.runner import Model, Task, run_images  # noqa: E402
from eval.scenes.synthetic import make_coco  # noqa: E402
from launch.bench import common  # noqa: E402
from students.load import load_sam  # noqa: E402
from teachers.build import random_vit_tiny  # noqa: E402
from teachers.preprocess import load_image  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402


@dataclass
class EvalBenchConfig:
    """One run of the runner benchmark."""

    arch: str = field(
        default="vit_tiny", metadata={"choices": ("vit_tiny", "vit_b", "vit_l", "vit_h")}
    )
    """SAM architecture with random weights (vit_b and up: 1024 input)."""
    ckpt: str | None = None
    """Benchmark this checkpoint instead of random weights."""
    coco_root: str | None = None
    """A COCO root to read instead of generating one."""
    num_images: int = 8
    """Images scored."""
    min_side: int = 320
    """Generated images' short side, min."""
    max_side: int = 640
    """Generated images' long side, max."""
    out: str = "runs/bench_eval.json"
    """Results JSON: every figure, the command, the machine and the date."""

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError("--num-images must be at least 1")


def build_model(arch: str, ckpt: str | None):
    """The benchmarked SAM: a checkpoint file, or random weights of `arch`."""
    if ckpt:
        return load_sam(ckpt)
    if arch == "vit_tiny":
        return random_vit_tiny(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return sam_model_registry[arch]().eval()


def plain_loop(sam, ds, images) -> tuple[list[float], float]:
    """Per instance: set_image, predict(box), argmax, IoU. (ious, seconds)"""
    predictor, ious = SamPredictor(sam), []
    start = time.perf_counter()
    for item in images:
        image = load_image(item.path)
        for ann in item.anns:
            predictor.set_image(image)
            masks, scores, _ = predictor.predict(box=np.array(box_xyxy(ann["bbox"])))
            rle = encode_masks(masks[int(np.argmax(scores))][None])[0]
            ious.append(mask_iou(rle, ds.gt_rle(ann)))
    return ious, time.perf_counter() - start


def runner(sam, ds, images) -> tuple[list[float], float]:
    """eval.runner over the same images. (ious, seconds)"""
    model, ious = Model("bench", SamPredictor(sam)), []
    start = time.perf_counter()
    for records in run_images(ds, images, [model], Task("box"), progress=False):
        ious += [r["iou"][0] for r in records]
    return ious, time.perf_counter() - start


@torch.no_grad()
def bench(args: EvalBenchConfig) -> dict:
    sam = build_model(args.arch, args.ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.coco_root or tmp)
        if not args.coco_root:
            make_coco(
                root, num_images=args.num_images, min_side=args.min_side, max_side=args.max_side
            )
        ds = load_coco(root)
        images = gt_images(ds, Protocol())[: args.num_images]
        runner(sam, ds, images[:1])  # warm-up: first calls allocate and pick kernels
        plain_loop(sam, ds, images[:1])
        fast, slow, fast_s, slow_s = [], [], 0.0, 0.0
        # Interleaved image by image, alternating which side goes first, so that load from
        # other processes on the machine hits both sides alike.
        for i, item in enumerate(images):
            for side in (0, 1) if i % 2 == 0 else (1, 0):
                ious, seconds = (runner if side == 0 else plain_loop)(sam, ds, [item])
                (fast if side == 0 else slow).extend(ious)
                fast_s, slow_s = (
                    (fast_s + seconds, slow_s) if side == 0 else (fast_s, slow_s + seconds)
                )
    n = len(fast)
    return {
        "model": args.ckpt or f"{args.arch} (random weights)",
        "img_size": int(sam.image_encoder.img_size),
        "num_images": len(images),
        "num_instances": n,
        "threads": torch.get_num_threads(),
        "runner_instances_per_s": n / fast_s,
        "plain_instances_per_s": n / slow_s,
        "speedup": slow_s / fast_s,
        "runner_miou": 100 * float(np.mean(fast)),
        "plain_miou": 100 * float(np.mean(slow)),
    }


def format_result(r: dict) -> str:
    return "\n".join(
        [
            f"model {r['model']}, img_size {r['img_size']}, {r['num_instances']} instances on "
            f"{r['num_images']} images, {r['threads']} threads",
            f"{'':<34}{'instances/s':>12}{'mIoU':>8}",
            f"{'runner (encode once, batched)':<34}{r['runner_instances_per_s']:12.2f}{r['runner_miou']:8.2f}",
            f"{'plain loop (set_image+predict)':<34}{r['plain_instances_per_s']:12.2f}{r['plain_miou']:8.2f}",
            f"speedup {r['speedup']:.1f}x",
        ]
    )


def parse_args(argv: list[str] | None = None) -> EvalBenchConfig:
    return parse_config(EvalBenchConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    result = bench(cfg)
    print(format_result(result))
    common.write_results(cfg.out, result, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
