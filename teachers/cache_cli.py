"""`python launch/cache_teacher.py`: cache a frozen SAM teacher's features, or verify a cache."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch

from distill.placement import dist_env, local_cuda_device
from distill.preempt import REQUEUE_EXIT, Preempted, StopRequest
from teachers.build import TEACHER_NAMES
from teachers.cache import plan_cache, write_cache
from teachers.cache_read import load_manifest, verify_cache
from teachers.codecs import CODECS
from teachers.flags import add_config_flags
from teachers.teacher import DTYPES, load_teacher


@dataclass
class CacheConfig:
    """Settings of one caching (or verify) run."""

    teacher: str = field(default="vit_h", metadata={"choices": TEACHER_NAMES})
    """Teacher architecture: vit_h, vit_l, vit_b, or vit_tiny (tests and demo)."""
    teacher_ckpt: str | None = None
    """Official SAM checkpoint file (flat state dict); optional only for vit_tiny."""
    images: str = ""
    """SPEC: a folder, a glob, tars ('sa_{000020..000029}.tar'), or a COCO layout."""
    out: str = ""
    """Output folder for shards and manifest.json."""
    layers: tuple[int, ...] | None = None
    """Tapped teacher blocks; None = the teacher's global-attention blocks."""
    codec: str = field(default="fp16", metadata={"choices": CODECS})
    """Storage codec for features: fp16, bf16 or int8 (per-token scale)."""
    samples_per_shard: int = 256
    """Samples per shard: ViT-H with 4 taps at fp16 is about 44 MB a sample."""
    batch_size: int = 8
    """Images per teacher forward."""
    workers: int = 2
    """DataLoader workers decoding and resizing images."""
    device: str = field(
        default="cuda" if torch.cuda.is_available() else "cpu",
        metadata={"choices": ("cpu", "cuda")},
    )
    """cpu or cuda; with several processes per node, cuda means cuda:LOCAL_RANK."""
    dtype: str = field(default="fp32", metadata={"choices": tuple(DTYPES)})
    """Teacher compute dtype: fp32 or bf16."""
    limit: int | None = None
    """Cache only the first N inputs (in key order)."""
    verify: int | None = field(default=None, metadata={"nargs": "?", "const": 8, "metavar": "N"})
    """Verify OUT instead of caching: re-check sha256 and counts, and recompute this many random
    samples (8 with a bare --verify)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_NAMES:
            raise ValueError(
                f"--teacher {self.teacher!r}: choose one of {', '.join(TEACHER_NAMES)}"
            )
        if self.codec not in CODECS:
            raise ValueError(f"--codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        if not self.out:
            raise ValueError("--out is required")
        if self.verify is None and not self.images:
            raise ValueError("--images is required (unless --verify)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    add_config_flags(p, CacheConfig)
    return p


def parse_args(argv: list[str] | None = None) -> CacheConfig:
    return CacheConfig(**vars(build_parser().parse_args(argv)))


def run_verify(cfg: CacheConfig) -> int:
    manifest = load_manifest(cfg.out)
    teacher = None
    if cfg.verify:
        teacher = load_teacher(
            manifest["teacher"],
            cfg.teacher_ckpt,
            taps=manifest["taps"],
            dtype=cfg.dtype,
            device=cfg.device,
        )
    report = verify_cache(cfg.out, teacher, cfg.verify or 0)
    print(
        f"checked {report.num_checked_shards} shards, {report.num_checked_samples} samples; "
        f"recomputed {report.num_recomputed} (worst error {report.max_error_ratio:.3f}x the codec bound)"
    )
    for name, reason in sorted(report.bad_shards.items()):
        print(f"BAD {name}: {reason}")
    print("cache OK" if report.ok else f"cache has {len(report.bad_shards)} bad shard(s)")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> int:
    """Run the CLI; user mistakes (bad flags, files, settings) print one line and return 2. With
    `stop` listening, a signal saves the finished shards and returns `REQUEUE_EXIT` (75)."""
    try:
        return _run(parse_args(argv), stop)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(err, file=sys.stderr, flush=True)
        return REQUEUE_EXIT


def _run(cfg: CacheConfig, stop: StopRequest | None = None) -> int:
    if cfg.verify is not None:
        return run_verify(cfg)
    env = dist_env()
    device = local_cuda_device(env) if cfg.device == "cuda" else "cpu"
    plan = plan_cache(cfg.images, cfg.samples_per_shard, cfg.limit)
    teacher = load_teacher(
        cfg.teacher, cfg.teacher_ckpt, taps=cfg.layers, dtype=cfg.dtype, device=device
    )
    manifest = write_cache(
        teacher,
        plan,
        cfg.out,
        codec=cfg.codec,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        env=env,
        progress=cfg.progress,
        stop=stop,
    )
    done = len(manifest["shards"])
    print(
        f"rank {env.rank}/{env.world_size}: {cfg.out} has {done} of {manifest['num_shards']} shards, "
        f"{manifest['num_samples']} samples"
        + ("" if manifest["complete"] else " (other ranks still writing)")
    )
    return 0
