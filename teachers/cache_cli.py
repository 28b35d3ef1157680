"""`python launch/cache_teacher.py`: cache a frozen SAM teacher's features, or verify a cache."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teachers.build import DEFAULT_TAPS, TEACHER_NAMES, TEACHER_SIZES
from teachers.cache import ON_BAD, CachePlan, plan_cache, write_cache
from teachers.cache_read import load_manifest, verify_cache
from teachers.codecs import parse_codecs
from teachers.manifest import drop_shard, repair_cache, shard_index
from teachers.reduction import num_tokens
from teachers.runtime.exits import exit_status
from teachers.runtime.files import check_out_dir
from teachers.runtime.flags import add_config_flags
from teachers.runtime.placement import DistEnv, dist_env, local_cuda_device, share_cpu_threads
from teachers.runtime.preempt import StopRequest
from teachers.teacher import DTYPES, feature_names, load_teacher


@dataclass
class CacheConfig:
    """Settings of one caching (or verify) run."""

    teacher: str | None = field(default=None, metadata={"choices": TEACHER_NAMES})
    """Teacher architecture: vit_h (unset: vit_h when caching), vit_l, vit_b, or vit_tiny (tests
    and demo). With --verify, unset means the cache's, and another is refused."""
    teacher_ckpt: str | None = None
    """Official SAM checkpoint file (flat state dict); optional only for vit_tiny."""
    images: str = ""
    """SPEC: a folder, a glob, tars ('sa_{000020..000029}.tar'), or a COCO layout."""
    out: str = ""
    """Output folder for shards and manifest.json."""
    layers: tuple[int, ...] | None = None
    """Tapped teacher blocks; None = the teacher's global-attention blocks."""
    codec: str = field(default="fp16", metadata={"metavar": "CODEC|embed=CODEC,blocks=CODEC"})
    """Storage codec of the features: fp16, bf16 or int8 (per-token scale) for all of them, or
    per field: embed (the final embedding), blocks (every tapped block) or block{i}, e.g.
    embed=fp16,blocks=int8 (fields not named keep fp16)."""
    reduction: str = field(default="none", metadata={"metavar": "none|tokens=K"})
    """Store each tapped block at K token positions per sample (the same for every tap, seeded by
    the sample key; the final embedding stays whole): tokens=256 with blocks=int8 makes ViT-H's
    four taps 1.3 MB a sample instead of 21 MB, 2.4 MB a sample in all with --codec int8
    (teachers/reduction.py). none stores them whole."""
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
    repair: bool = False
    """With --verify: delete every bad shard it finds and cache it again (give --images, and
    --limit and --teacher-ckpt, as when the cache was made); the other settings come from the
    cache's manifest."""
    on_bad: str = field(default="skip", metadata={"choices": ON_BAD})
    """An input that cannot be read or decoded: skip (leave it out, listed with its reason in
    manifest.json) or stop (exit 2 naming it; finished shards are kept)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.teacher is not None and self.teacher not in TEACHER_NAMES:
            raise ValueError(
                f"--teacher {self.teacher!r}: choose one of {', '.join(TEACHER_NAMES)}"
            )
        name = self.teacher or "vit_h"
        depth = TEACHER_SIZES[name][1]
        layers = DEFAULT_TAPS[name] if self.layers is None else self.layers
        bad = [t for t in layers if not 0 <= t < depth]
        if bad:
            raise ValueError(
                f"--layers {','.join(map(str, layers))}: {name} has blocks 0..{depth - 1}; "
                f"{', '.join(map(str, bad))} is not one of them"
            )
        parse_codecs(self.codec, feature_names(sorted(set(layers))))
        num_tokens(self.reduction)
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
        if self.repair and (self.verify is None or not self.images):
            raise ValueError(
                "--repair rebuilds bad shards from the inputs: give it with --verify and --images "
                "(and --limit, --teacher-ckpt) as when the cache was made"
            )
        if self.on_bad not in ON_BAD:
            raise ValueError(f"--on-bad {self.on_bad!r}: choose one of {', '.join(ON_BAD)}")
        for flag, value in (
            ("--batch-size", self.batch_size),
            ("--samples-per-shard", self.samples_per_shard),
            ("--limit", self.limit),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.workers < 0:
            raise ValueError(
                f"--workers must be 0 (decode in the main process) or more, got {self.workers}"
            )
        if self.verify is not None and self.verify < 0:
            raise ValueError(
                f"--verify N recomputes N samples: give 0 (checksums only) or more, got {self.verify}"
            )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    add_config_flags(p, CacheConfig)
    return p


def parse_args(argv: list[str] | None = None) -> CacheConfig:
    return CacheConfig(**vars(build_parser().parse_args(argv)))


def run_verify(cfg: CacheConfig) -> int:
    repaired = repair_cache(cfg.out)  # before the manifest is read: it may be merged again
    manifest = load_manifest(cfg.out)
    if cfg.teacher not in (None, manifest["teacher"]):
        raise ValueError(
            f"--teacher {cfg.teacher}: {cfg.out} was made by {manifest['teacher']} (leave "
            "--teacher out to verify with the cache's)"
        )
    num_samples = manifest["num_samples"]
    if cfg.verify and cfg.verify > num_samples:
        print(
            f"note: --verify {cfg.verify} asks for more samples than {cfg.out} holds "
            f"({num_samples}): recomputing all of them (--verify {num_samples} says so)"
        )
    teacher = None
    if cfg.verify or cfg.repair:
        teacher = load_teacher(
            manifest["teacher"],
            cfg.teacher_ckpt,
            taps=manifest["taps"],
            dtype=cfg.dtype,
            device=cfg.device,
        )
    report = verify_cache(cfg.out, teacher, cfg.verify or 0, repair=False)
    for name, what in sorted(repaired.items()):
        print(f"REPAIRED {name}: {what}")
    print(
        f"checked {report.num_checked_shards} shards, {report.num_checked_samples} samples; "
        f"recomputed {report.num_recomputed} (worst error {report.max_error_ratio:.3f}x the codec bound)"
    )
    for name, reason in sorted(report.bad_shards.items()):
        print(f"BAD {name}: {reason}")
    if report.ok:
        print("cache OK")
        return 0
    if cfg.repair:
        return rebuild_shards(cfg, teacher, manifest, report.bad_shards)
    print(
        f"cache has {len(report.bad_shards)} bad shard(s): add --repair --images SPEC (and "
        "--limit, --teacher-ckpt as when it was made) to rebuild them"
    )
    return 1


def rebuild_shards(cfg: CacheConfig, teacher, manifest: dict, bad: dict[str, str]) -> int:
    """--verify --repair: delete the bad shards and cache them again with the manifest's
    settings, from --images, which must name the inputs the cache was made from."""
    plan = plan_cache(cfg.images, manifest["samples_per_shard"], cfg.limit)
    if plan.inputs_sha256() != manifest["inputs_sha256"]:
        raise ValueError(
            f"--images {cfg.images} (--limit {cfg.limit}) names {len(plan.items)} inputs, not the "
            f"{manifest['num_inputs']} {cfg.out} was made from: give the same --images and --limit"
        )
    for name in sorted(bad):
        drop_shard(Path(cfg.out), shard_index(name))
    fresh = write_cache(
        teacher,
        plan,
        cfg.out,
        codec=manifest["codec"],
        reduce=manifest.get("reduction", "none"),
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        progress=cfg.progress,
        on_bad=cfg.on_bad,
    )
    for name in sorted(bad):
        print(f"REBUILT {name}")
    report = verify_cache(cfg.out, repair=False)
    print(
        f"{cfg.out}: {len(fresh['shards'])} of {fresh['num_shards']} shards, "
        f"{fresh['num_samples']} samples; "
        + ("cache OK" if report.ok else "still bad: " + ", ".join(sorted(report.bad_shards)))
    )
    return 0 if report.ok else 1


def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> int:
    """Run the CLI; user mistakes (bad flags, files, settings) print one line and return 2. With
    `stop` listening, a signal saves the finished shards and returns `REQUEUE_EXIT` (75)."""
    return exit_status(lambda: _run(parse_args(argv), stop))


def explain_plan(cfg: CacheConfig, plan: CachePlan, env: DistEnv) -> None:
    """Notes (rank 0) on settings that still work but not as a user would expect."""
    num = len(plan.items)
    if env.rank != 0:
        return
    if cfg.limit is not None and cfg.limit > num:
        print(f"note: --limit {cfg.limit} is more than the {num} inputs of --images: caching all")
    if plan.num_shards < env.world_size:
        fix = (
            f"--samples-per-shard {num // env.world_size} or less"
            if num >= env.world_size
            else f"at most {num} processes"
        )
        print(
            f"note: {num} inputs make {plan.num_shards} shard(s) of --samples-per-shard "
            f"{plan.samples_per_shard} for {env.world_size} processes, so "
            f"{env.world_size - plan.num_shards} process(es) have nothing to cache: use {fix}"
        )


def _run(cfg: CacheConfig, stop: StopRequest | None = None) -> int:
    share_cpu_threads()
    if cfg.verify is not None:
        return run_verify(cfg)
    env = dist_env()
    device = local_cuda_device(env) if cfg.device == "cuda" else "cpu"
    check_out_dir(cfg.out)
    plan = plan_cache(cfg.images, cfg.samples_per_shard, cfg.limit)
    explain_plan(cfg, plan, env)
    teacher = load_teacher(
        cfg.teacher or "vit_h", cfg.teacher_ckpt, taps=cfg.layers, dtype=cfg.dtype, device=device
    )
    manifest = write_cache(
        teacher,
        plan,
        cfg.out,
        codec=cfg.codec,
        reduce=cfg.reduction,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        env=env,
        progress=cfg.progress,
        stop=stop,
        on_bad=cfg.on_bad,
    )
    done = len(manifest["shards"])
    skipped = manifest["num_skipped"]
    print(
        f"rank {env.rank}/{env.world_size}: {cfg.out} has {done} of {manifest['num_shards']} shards, "
        f"{manifest['num_samples']} samples"
        + (f", {skipped} input(s) skipped (listed in {cfg.out}/manifest.json)" if skipped else "")
        + ("" if manifest["complete"] else " (other ranks still writing)")
    )
    return 0
