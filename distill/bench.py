"""Training throughput from the cache against computing the teacher online, side by side.

One run measures, on the same generated images, student and batch size:
  loader        the cache pipeline alone (shard read, feature decode, image decode + preprocess)
  step          the student step alone on a batch already in memory (forward, losses, backward, AdamW)
  from cache    loader + step: what distillation from the cache runs at
  online        image decode + preprocess + teacher forward + step: distillation without a cache
The teacher has random weights (timings do not depend on weights). Plain PyTorch AdamW stands in
for the DeepSpeed engine, whose per-step overhead is the same in both set-ups.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.data import DataSpec, StreamLayout, make_loader, resolve_shards
from distill.losses import pair_losses, student_taps_for, weighted_loss
from distill.train import DistillModel
from eval.synthetic import make_coco
from students import build_student
from teachers.build import TEACHER_SIZES, build_vit_tiny, sam_model_registry
from teachers.cache import plan_cache, write_cache
from teachers.preprocess import decode_image, preprocess, valid_mask
from teachers.sources import list_sources, read_item
from teachers.teacher import EMBED, Teacher, tap_name


@dataclass
class BenchConfig:
    """Benchmark settings."""

    teacher: str = "vit_tiny"
    """Teacher architecture with random weights: vit_tiny (img 256) or vit_b/vit_l/vit_h (img 1024)."""
    student: str = "dfa_s"
    """Student registry name."""
    batch_size: int = 4
    """Samples per step."""
    steps: int = 6
    """Timed steps per set-up (after one warm-up step)."""
    workers: int = 2
    """Loader workers for the cache pipeline."""
    out: str = "runs/bench_distill"
    """Scratch folder for the generated images and the cache."""

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_SIZES:
            raise ValueError(
                f"--teacher {self.teacher!r}: choose one of {', '.join(TEACHER_SIZES)}"
            )
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError("--batch-size and --steps must be at least 1")


def random_teacher(name: str) -> Teacher:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = build_vit_tiny() if name == "vit_tiny" else sam_model_registry[name]()
    depth = TEACHER_SIZES[name][1]
    return Teacher(
        name,
        sam.image_encoder,
        [depth // 4 * i - 1 for i in range(1, 5)] if depth >= 8 else [1, 3],
        checkpoint_sha256="random",
    )


def _interleaved(setups: dict, steps: int) -> dict[str, float]:
    """Median seconds per call of each set-up, timed in turns so that load changes on a shared
    machine hit every set-up alike; one untimed warm-up round first."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(steps + 1):
        for name, fn in setups.items():
            tic = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def run(cfg: BenchConfig) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    out = Path(cfg.out)
    teacher = random_teacher(cfg.teacher)
    size = teacher.img_size
    num_images = cfg.batch_size * 4
    make_coco(out / "coco", num_images=num_images, seed=0, min_side=size // 2, max_side=size)
    write_cache(
        teacher,
        plan_cache(str(out / "coco"), cfg.batch_size * 2),
        out / "cache",
        batch_size=cfg.batch_size,
        progress=False,
    )
    shards, _ = resolve_shards(str(out / "cache"))

    student = build_student(cfg.student, img_size=size)
    width, depth = TEACHER_SIZES[cfg.teacher]
    model = DistillModel(
        student, student_taps_for(list(teacher.taps), depth, len(student.blocks)), width
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = [1.0 / (len(teacher.taps) + 1)] * (len(teacher.taps) + 1)

    def step(batch: dict) -> None:
        embed, taps = model(batch["image"])
        losses = pair_losses(
            embed, taps, batch[EMBED], [batch[tap_name(t)] for t in teacher.taps], batch["valid"]
        )
        optim.zero_grad()
        weighted_loss(losses, weights).backward()
        optim.step()

    spec = DataSpec(shards, size, list(teacher.taps), cfg.batch_size)
    layout = StreamLayout.choose(0, 1, 1, cfg.workers)
    loader = iter(make_loader(spec, layout))
    fixed = next(loader)
    items = list_sources(str(out / "coco"))

    def online() -> None:
        chosen = [items[int(i)] for i in torch.randint(len(items), (cfg.batch_size,))]
        pres = [preprocess(decode_image(read_item(it)[0]), size) for it in chosen]
        feats = teacher(torch.stack([p.image for p in pres]))
        step(
            {
                "image": torch.stack([p.image for p in pres]),
                "valid": torch.stack([valid_mask(p.input_hw, size) for p in pres]),
                **feats,
            }
        )

    per_step = _interleaved(
        {
            "loader": lambda: next(loader),
            "step": lambda: step(fixed),
            "from cache": lambda: step(next(loader)),
            "online teacher": online,
        },
        cfg.steps,
    )
    return [(name, cfg.batch_size / seconds) for name, seconds in per_step.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in vars(BenchConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    cfg = BenchConfig(**vars(p.parse_args(argv)))
    print(
        f"teacher {cfg.teacher} (random weights), student {cfg.student}, batch {cfg.batch_size}, "
        f"{torch.get_num_threads()} threads, {cfg.workers} loader workers"
    )
    rates = dict(run(cfg))
    print("\n| set-up | images/s | vs online teacher |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / rates['online teacher']:.2f}x |")
    print(
        f"\nloader / step throughput: {rates['loader'] / rates['step']:.2f} "
        "(above 1: the loader keeps up with training)"
    )
    print(f"from cache / online teacher: {rates['from cache'] / rates['online teacher']:.2f}x")
    return 0
