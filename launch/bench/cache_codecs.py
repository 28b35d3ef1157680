r"""Benchmark the teacher-cache codecs side by side at real SAM shapes, on one machine in one run.

    python launch/bench/cache_codecs.py [--samples 8] [--taps 7,15,23,31] [--teacher vit_h] \
        [--out runs/bench_codecs.json]

For fp32 (the reference), each codec in `teachers.codecs.CODECS` and the per-field codecs in
`MIXED` (the final embedding in one codec, the block outputs in another), one sample is the final
embedding [256, 64, 64] plus one [64, 64, C] block output per tap (C = 1280 for vit_h, 1024 for
vit_l, 768 for vit_b). The table gives the .npy bytes a shard stores per sample (int8's scale
array included), the cache size for 1% of SA-1B, encode (tensor -> npy bytes) and decode (npy
bytes -> float32 tensor) throughput as the median over samples, and the error against fp32.
Codecs run interleaved on the same samples, in a rotating order, so their ratios are fair even
when the absolute times drift. The features are synthetic (see `synthetic_sample`).
"""

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# `python launch/bench/cache_codecs.py` puts launch/bench/ first on sys.path, where its files
# would shadow packages; drop it before importing anything but the standard library.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from launch.bench import common  # noqa: E402
from teachers import DEFAULT_TAPS  # noqa: E402
from teachers.codecs import (  # noqa: E402
    CODECS,
    decode,
    encode,
    error_bound,
    from_npy_bytes,
    parse_codecs,
    to_npy_bytes,
)
from teachers.runtime.flags import parse_config  # noqa: E402

# Widths and depths of SAM's image encoders (segment_anything/build_sam.py).
WIDTHS = {"vit_h": 1280, "vit_l": 1024, "vit_b": 768}
DEPTHS = {"vit_h": 32, "vit_l": 24, "vit_b": 12}
GRID = 64  # 1024 / 16 tokens per side
EMBED_CHANNELS = 256
SA1B_IMAGES_PER_PERCENT = 112_000  # SA-1B has about 11.2M images
MB = 1e6
FP32 = "fp32"  # the reference row: float32 arrays saved as .npy
# Per-field rows: the final embedding, which SAM's mask decoder reads directly, kept at 16 bits;
# the block outputs, only layer-loss targets, at int8.
MIXED = ("embed=fp16,blocks=int8", "embed=bf16,blocks=int8")


@dataclass
class BenchConfig:
    """What to benchmark."""

    samples: int = 8
    """Synthetic samples; every codec runs on each, and throughputs are medians over them."""
    teacher: str = field(default="vit_h", metadata={"choices": tuple(WIDTHS)})
    """Teacher whose shapes to use: vit_h, vit_l or vit_b."""
    taps: tuple[int, ...] = ()
    """Tapped block indices; empty means the teacher's default taps (its global-attention
    blocks, `teachers.DEFAULT_TAPS`)."""
    seed: int = 0
    """Seed of the synthetic features."""
    threads: int = 1
    """Torch intra-op threads; 0 keeps torch's default. One by default: the codecs are
    memory-bound element-wise passes, and on a small shared CPU a second OpenMP thread that has
    to wait for a core made every pass about 10 ms slower, swamping the differences measured."""
    out: str = "runs/bench_codecs.json"
    """Results JSON: every row, the command, the machine and the date."""

    def __post_init__(self) -> None:
        if self.teacher not in WIDTHS:
            raise ValueError(f"--teacher {self.teacher!r}: choose one of {', '.join(WIDTHS)}")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (torch's default) or more, got {self.threads}")
        if self.samples < 1:
            raise ValueError(f"--samples must be at least 1, got {self.samples}")
        self.taps = tuple(self.taps) or tuple(DEFAULT_TAPS[self.teacher])
        depth = DEPTHS[self.teacher]
        if any(not 0 <= t < depth for t in self.taps) or len(set(self.taps)) != len(self.taps):
            raise ValueError(
                f"--taps {','.join(map(str, self.taps))}: {self.teacher} has blocks 0..{depth - 1}"
                " and each may be tapped once"
            )


@dataclass
class CodecStats:
    """Measurements of one codec accumulated over the samples."""

    bytes_per_field: dict[str, int] = field(default_factory=dict)
    encode_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    max_abs_err: dict[str, float] = field(default_factory=lambda: {"embed": 0.0, "blocks": 0.0})
    sq_err: dict[str, float] = field(default_factory=lambda: {"embed": 0.0, "blocks": 0.0})
    sq_ref: dict[str, float] = field(default_factory=lambda: {"embed": 0.0, "blocks": 0.0})
    max_err_over_bound: float = 0.0


def synthetic_sample(
    teacher: str, taps: tuple[int, ...], gen: torch.Generator
) -> dict[str, tuple[torch.Tensor, int]]:
    """One sample of synthetic teacher features: field name -> (tensor, channel_axis).

    The data is synthetic (no checkpoint or images at hand), shaped after what SAM emits:
    - "embed" [256, 64, 64]: SAM's neck ends in LayerNorm2d (segment_anything/modeling/
      common.py), which normalizes each token over its 256 channels and then applies a learned
      per-channel affine, so values are near zero mean and unit variance; the affine here is
      close to identity.
    - "block{i}" [64, 64, C]: ViT residual streams carry a few channels whose magnitude is tens of
      times the rest across all tokens (Bondarenko et al., arXiv 2306.12929, show them in ViTs; cf.
      LLM.int8(), arXiv 2208.07339). They matter for int8: a per-token scale is set by the token's
      largest channel, so outliers coarsen the step for every other channel of that token. Here
      4 channels sit at ~30x the typical channel, and the stream grows with depth. These numbers
      are assumptions: rerun on real cached features before trusting the int8 error columns.
    """
    gamma = 1 + 0.1 * torch.randn(EMBED_CHANNELS, 1, 1, generator=gen)
    beta = 0.1 * torch.randn(EMBED_CHANNELS, 1, 1, generator=gen)
    embed = torch.randn(EMBED_CHANNELS, GRID, GRID, generator=gen).mul_(gamma).add_(beta)
    sample = {"embed": (embed, 0)}
    width, depth = WIDTHS[teacher], DEPTHS[teacher]
    channel_std = torch.exp(0.3 * torch.randn(width, generator=gen))
    outliers = torch.randperm(width, generator=gen)[:4]
    signs = torch.where(torch.rand(4, generator=gen) < 0.5, -1.0, 1.0)
    for t in taps:
        gain = 1 + 2 * t / depth
        block = torch.randn(GRID, GRID, width, generator=gen).mul_(channel_std * gain)
        jitter = 1 + 0.1 * torch.randn(GRID, GRID, 4, generator=gen)
        block[..., outliers] = 30 * gain * signs * jitter
        sample[f"block{t}"] = (block, -1)
    return sample


def encode_fields(x: torch.Tensor, codec: str, axis: int) -> dict[str, bytes]:
    """Tensor -> the .npy entries a shard stores for it."""
    if codec == FP32:
        return {"q": to_npy_bytes(x.numpy())}
    return {name: to_npy_bytes(a) for name, a in encode(x, codec, axis).items()}


def decode_fields(blobs: dict[str, bytes], codec: str, axis: int) -> torch.Tensor:
    """The .npy entries of one field -> float32 tensor."""
    if codec == FP32:
        return torch.from_numpy(from_npy_bytes(blobs["q"]))
    return decode({name: from_npy_bytes(b) for name, b in blobs.items()}, codec, axis)


def measure(sample: dict[str, tuple[torch.Tensor, int]], spec: str, stats: CodecStats) -> None:
    """Time one round trip of a whole sample through the codec `spec` (one codec, or one per
    field as `--codec` takes it) and record bytes and errors."""
    per_field = dict.fromkeys(sample, FP32) if spec == FP32 else parse_codecs(spec, list(sample))
    start = time.perf_counter()
    blobs = {name: encode_fields(x, per_field[name], axis) for name, (x, axis) in sample.items()}
    encoded = time.perf_counter()
    out = {
        name: decode_fields(blobs[name], per_field[name], axis)
        for name, (_, axis) in sample.items()
    }
    stats.encode_s.append(encoded - start)
    stats.decode_s.append(time.perf_counter() - encoded)
    for name, (x, axis) in sample.items():
        stats.bytes_per_field[name] = sum(len(b) for b in blobs[name].values())
        group = "embed" if name == "embed" else "blocks"
        err = (out[name] - x).abs_()
        stats.max_abs_err[group] = max(stats.max_abs_err[group], err.max().item())
        stats.sq_err[group] += err.square().sum().item()
        stats.sq_ref[group] += x.square().sum().item()
        if per_field[name] != FP32:
            ratio = err.div_(error_bound(x, per_field[name], axis)).max().item()
            stats.max_err_over_bound = max(stats.max_err_over_bound, ratio)


def run(cfg: BenchConfig) -> dict[str, CodecStats]:
    """Measure fp32, every codec and the per-field ones on `cfg.samples` synthetic samples,
    interleaved."""
    codecs = (FP32, *CODECS, *MIXED)
    stats = {codec: CodecStats() for codec in codecs}
    gen = torch.Generator().manual_seed(cfg.seed)
    warmup = synthetic_sample(cfg.teacher, cfg.taps[:1], torch.Generator().manual_seed(-1))
    warmup = {name: (x[:8, :8].contiguous(), axis) for name, (x, axis) in warmup.items()}
    for codec in codecs:  # first calls pay for lazy initialisation; keep them out of the medians
        measure(warmup, codec, CodecStats())
    for i in tqdm(range(cfg.samples), desc="samples", disable=None, file=sys.stderr):
        sample = synthetic_sample(cfg.teacher, cfg.taps, gen)
        for codec in codecs[i % len(codecs) :] + codecs[: i % len(codecs)]:
            measure(sample, codec, stats[codec])
    return stats


def table_rows(stats: dict[str, CodecStats]) -> list[dict[str, float | str | None]]:
    """Per-codec summary rows: sizes, throughputs, errors, and their ratios."""
    ref_bytes = sum(stats[FP32].bytes_per_field.values())
    fp32_mb = ref_bytes / MB  # throughput counts float32 feature bytes for every codec
    fp16_enc = 1 / statistics.median(stats["fp16"].encode_s)
    fp16_dec = 1 / statistics.median(stats["fp16"].decode_s)
    rows = []
    for codec, s in stats.items():
        total = sum(s.bytes_per_field.values())
        enc, dec = 1 / statistics.median(s.encode_s), 1 / statistics.median(s.decode_s)
        rows.append(
            {"codec": codec}
            | {f"{name} MB": b / MB for name, b in s.bytes_per_field.items()}
            | {
                "total MB": total / MB,
                "x fp32": total / ref_bytes,
                "1% SA-1B TB": total * SA1B_IMAGES_PER_PERCENT / 1e12,
                "enc samples/s": enc,
                "enc MB/s": enc * fp32_mb,
                "enc x fp16": enc / fp16_enc,
                "dec samples/s": dec,
                "dec MB/s": dec * fp32_mb,
                "dec x fp16": dec / fp16_dec,
            }
            | {f"max abs err {g}": e for g, e in s.max_abs_err.items()}
            | {f"rel RMS {g}": (s.sq_err[g] / s.sq_ref[g]) ** 0.5 for g in s.sq_err}
            | {"max err/bound": None if codec == FP32 else s.max_err_over_bound}
        )
    return rows


def _cell(key: str, value: float | str | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if key.startswith(("max abs", "rel RMS")):
        return "0" if value == 0 else f"{value:.2e}"
    if key == "max err/bound":
        return f"{value:.4f}"  # so that a violated bound cannot round to 1.00
    return f"{value:.0f}" if key.endswith("MB/s") else f"{value:.2f}"


def format_table(rows: list[dict[str, float | str | None]]) -> str:
    """A markdown table, one row per codec (or per-field codec spec)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_cell(k, row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def describe(cfg: BenchConfig) -> str:
    """The caption: shapes, data, units and software, so the table can be read on its own."""
    width = WIDTHS[cfg.teacher]
    return (
        f"{cfg.teacher}: embed [256, {GRID}, {GRID}] + blocks {','.join(map(str, cfg.taps))} of "
        f"[{GRID}, {GRID}, {width}] per sample; {cfg.samples} synthetic samples (seed {cfg.seed}).\n"
        "MB = 1e6 bytes of .npy entries as stored in a shard; MB/s counts float32 feature bytes; "
        "throughputs are medians over samples; errors are against the float32 features.\n"
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"python {platform.python_version()}, {platform.machine()} with {os.cpu_count()} CPUs."
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BenchConfig, argv, __doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # before any work, so describe() reports it
    rows = table_rows(run(cfg))
    print(describe(cfg))
    print()
    print(format_table(rows))
    common.write_results(cfg.out, {"rows": rows}, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
