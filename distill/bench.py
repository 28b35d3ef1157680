"""Training throughput from the cache against computing the teacher online, side by side.

One run measures, on the same generated images, student and batch size:
  loader        the cache pipeline alone (shard read, feature decode, image decode + preprocess)
  step          the student step alone on a batch already in memory (forward, losses, backward, AdamW)
  from cache    loader + step: what distillation from the cache runs at
  online        image decode + preprocess + teacher forward + step: distillation without a cache
The teacher has random weights (timings do not depend on weights). Every step is the training
engine's `step` (`distill.engine`, its plain-PyTorch variant: the DeepSpeed one adds the same
per-step overhead to both set-ups), with the distillation loss of `distill.train`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.config import DistillConfig
from distill.data import DataSpec, StreamLayout, make_loader
from distill.engine import build_engine
from distill.train import DistillLoss, DistillModel
from students import build_student
from students.taps import student_taps_for
from teachers.build import TEACHER_SIZES, build_vit_tiny, sam_model_registry
from teachers.cache import plan_cache, write_cache
from teachers.cache_read import open_cache
from teachers.preprocess import decode_image, preprocess, valid_mask
from teachers.runtime.flags import add_config_flags
from teachers.runtime.placement import DistEnv
from teachers.runtime.preempt import stop_workers
from teachers.sources import list_sources, read_item
from teachers.teacher import Teacher


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


def prepare(cfg: BenchConfig, images: str, teacher: Teacher) -> str:
    """Cache `teacher`'s features of the images in `images` under OUT/cache; the cache folder."""
    cache = Path(cfg.out) / "cache"
    plan = plan_cache(images, cfg.batch_size * 2)
    write_cache(teacher, plan, cache, batch_size=cfg.batch_size, progress=False)
    return str(cache)


def run(cfg: BenchConfig, images: str, teacher: Teacher) -> list[tuple[str, float]]:
    """Images/s of each set-up, on the images in `images` and their cache (see `prepare`)."""
    torch.manual_seed(0)
    cache = open_cache(prepare(cfg, images, teacher))
    size = teacher.img_size
    student = build_student(cfg.student, img_size=size)
    width, depth = TEACHER_SIZES[cfg.teacher]
    model = DistillModel(student, student_taps_for(cache.taps, depth, len(student.blocks)), width)
    train_cfg = DistillConfig(
        shards=str(cache.folder),
        out=cfg.out,
        engine="torch",
        device="cpu",
        steps=1 << 30,
        batch_size=cfg.batch_size,
        dld="uniform",
    )
    engine = build_engine(
        train_cfg, model, model.parameters(), DistillLoss(train_cfg, cache), DistEnv()
    )

    spec = DataSpec(cache.shards, size, cache.taps, cfg.batch_size)
    loader = iter(make_loader(spec, StreamLayout.choose(0, 1, 1, cfg.workers)))
    fixed = next(loader)
    items = list_sources(images)

    def online() -> None:
        chosen = [items[int(i)] for i in torch.randint(len(items), (cfg.batch_size,))]
        pres = [preprocess(decode_image(read_item(it)[0]), size) for it in chosen]
        feats = teacher(torch.stack([p.image for p in pres]))
        batch = {
            "image": torch.stack([p.image for p in pres]),
            "valid": torch.stack([valid_mask(p.input_hw, size) for p in pres]),
            **feats,
        }
        engine.step(iter([batch]))

    per_step = _interleaved(
        {
            "loader": lambda: next(loader),
            "step": lambda: engine.step(iter([fixed])),
            "from cache": lambda: engine.step(loader),
            "online teacher": online,
        },
        cfg.steps,
    )
    stop_workers(loader)
    return [(name, cfg.batch_size / seconds) for name, seconds in per_step.items()]


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_flags(p, BenchConfig)
    return BenchConfig(**vars(p.parse_args(argv)))


def report(cfg: BenchConfig, rates: dict[str, float]) -> None:
    print("\n| set-up | images/s | vs online teacher |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / rates['online teacher']:.2f}x |")
    print(
        f"\nloader / step throughput: {rates['loader'] / rates['step']:.2f} "
        "(above 1: the loader keeps up with training)"
    )
    print(f"from cache / online teacher: {rates['from cache'] / rates['online teacher']:.2f}x")
