r"""Speed and memory of image encoders side by side (students, SAM teachers, peer encoders), and one
attention layer's time against token count.

    python launch/bench/speed.py --models dfa_s,vit_h,mobilesam_vit_t,efficientvit_sam_l0 \
        [--image-size 1024] [--device cpu|cuda] [--baseline vit_h] [--repeats 5] [--out F.json]
    python eval/speed.py ...        # the same: the documented command forwards here

Every encoder is measured in its own child process (clean peak-memory reading, no warm caches
shared between models), one after the other in one run, with random weights: latency does not
depend on weights. Columns: parameters, GFLOPs (`torch.utils.flop_counter`, 2 per multiply-add,
counted on the meta device), median latency after warm-up, peak memory (CUDA: peak allocated
bytes; CPU: the process's peak RSS growth during inference), and latency ratios to a baseline.
A second table times one attention layer against token count: DFA, global and windowed.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

from dataclasses import dataclass, field  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from launch.bench import common  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

DEFAULT_MODELS = (
    "dfa_t,dfa_s,dfa_b,vit_b,vit_l,vit_h,mobilesam_vit_t,efficientvit_sam_l0,efficientvit_sam_xl0"
)


@dataclass
class SpeedConfig:
    """One speed table."""

    models: tuple[str, ...] = tuple(DEFAULT_MODELS.split(","))
    """Encoders, comma-separated: the registered students (dfa_t, dfa_s, dfa_b), SAM's vit_b,
    vit_l, vit_h, and the peers mobilesam_vit_t, efficientvit_sam_l0, efficientvit_sam_xl0."""
    image_size: int = 1024
    """Input side for students and SAM (peers use their native size)."""
    device: str = field(default_factory=common.default_device, metadata={"choices": common.DEVICES})
    """Device to measure on."""
    baseline: str = "vit_h"
    """Model the ratios are taken against."""
    warmup: int = 1
    """Untimed runs per model first."""
    repeats: int = 5
    """Timed runs per model (median)."""
    attention: bool = True
    """Also time one attention layer against token count."""
    out: str = "runs/bench_speed.json"
    """Results JSON: every figure, the command, the machine and the date."""

    def __post_init__(self) -> None:
        common.check_names("--models", self.models, common.known_models())
        common.check_device(self.device)
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("--repeats must be at least 1 and --warmup at least 0")


def count_gflops(name: str, image_size: int) -> float:
    """Forward GFLOPs at batch 1, counted on the meta device (nothing is computed)."""
    if name in common.SAM_SIZES:
        model, size = common.build_encoder(name, image_size, "meta")
    else:  # some peers compute values while they build, so build on the CPU and move
        model, size = common.build_encoder(name, image_size, "cpu")
        model = model.to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 1e9


def measure(name: str, image_size: int, device: str, warmup: int, repeats: int) -> dict:
    """One encoder's row (run in a child process)."""
    model, size = common.build_encoder(name, image_size, device)
    x = torch.randn(1, 3, size, size, device=device)
    forward, sync = {"forward": lambda: model(x)}, common.synchronizer(device)
    with common.PeakMemory(device) as peak, torch.inference_mode():
        seconds = common.interleaved(forward, repeats, warmup, sync)["forward"]
    if device == "cuda":
        peak_bytes = peak.result["cuda_peak_bytes"] + peak.cuda_before
    else:
        peak_bytes = peak.result["rss_growth_bytes"]
    return {
        "model": name,
        "input": size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": count_gflops(name, image_size),
        "latency_ms": seconds * 1e3,
        "peak_mb": peak_bytes / 2**20,
    }


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """SAM-style non-overlapping windows (zero-padded grid): [B, nh, H, W, d] -> same."""
    b, nh, h, w, d = q.shape
    ph, pw = -h % window, -w % window

    def split(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0, 0, pw, 0, ph))
        t = t.view(b, nh, (h + ph) // window, window, (w + pw) // window, window, d)
        return t.permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, nh, window * window, d)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.view(b, (h + ph) // window, (w + pw) // window, nh, window, window, d)
    return out.permute(0, 3, 1, 4, 2, 5, 6).reshape(b, nh, h + ph, w + pw, d)[:, :, :h, :w]


def attention_table(device: str, repeats: int, dim: int = 128, heads: int = 4) -> list[dict]:
    """Seconds of one attention call at 64^2, 96^2 and 128^2 tokens (dfa_t's width and heads,
    the local + dilated patterns of every DFA student's middle blocks)."""
    from students.dfa import dilated_attention

    patterns = ((8, 1), (32, 2))
    rows = []
    for side in (64, 96, 128):
        q, k, v = (torch.randn(1, heads, side, side, dim // heads, device=device) for _ in range(3))
        calls = {
            "dfa_ms": partial(dilated_attention, q, k, v, patterns),
            "global_ms": partial(
                F.scaled_dot_product_attention, *(t.flatten(2, 3) for t in (q, k, v))
            ),
            "windowed_ms": partial(windowed_attention, q, k, v, 14),
        }
        with torch.inference_mode():
            found = common.interleaved(calls, repeats, 1, common.synchronizer(device))
        rows.append({"tokens": side * side} | {key: 1e3 * s for key, s in found.items()})
    return rows


def print_tables(rows: list[dict], baseline: str, attention: list[dict] | None) -> None:
    base = next((r for r in rows if r["model"] == baseline), None)
    header = ["model", "input", "params (M)", "GFLOPs", "latency (ms)", "peak memory (MB)"]
    common.print_table(
        [*header, f"speed-up vs {baseline}"],
        (
            [r["model"], r["input"], f"{r['params_m']:.2f}", f"{r['gflops']:.1f}"]
            + [f"{r['latency_ms']:.1f}", f"{r['peak_mb']:.0f}"]
            + [f"{base['latency_ms'] / r['latency_ms']:.1f}x" if base else "n/a"]
            for r in rows
        ),
    )
    if not attention:
        return
    first = attention[0]
    times = ["DFA (ms)", "global (ms)", "windowed 14 (ms)"]
    common.print_table(
        ["tokens", *times, "DFA growth", "global growth"],
        (
            [r["tokens"], *(f"{r[k]:.2f}" for k in ("dfa_ms", "global_ms", "windowed_ms"))]
            + [f"{r[k] / first[k]:.2f}x" for k in ("dfa_ms", "global_ms")]
            for r in attention
        ),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SpeedConfig, argv, __doc__)
    machine = common.machine_info(cfg.device)
    where = machine["cuda_device"] or f"{machine['processor']}, {machine['torch_threads']} threads"
    print(f"{cfg.device} ({where}), torch {torch.__version__}, batch 1, fp32, {machine['date']}")
    rows = []
    for name in cfg.models:
        settings = {"image_size": cfg.image_size, "device": cfg.device}
        settings |= {"warmup": cfg.warmup, "repeats": cfg.repeats}
        rows.append(common.run_child("launch.bench.speed:measure", name=name, **settings))
        print(f"  measured {name}: {rows[-1]['latency_ms']:.1f} ms", flush=True)
    attention = attention_table(cfg.device, cfg.repeats) if cfg.attention else None
    print_tables(rows, cfg.baseline, attention)
    figures = {"models": rows} | ({"attention": attention} if attention else {})
    common.write_results(cfg.out, figures, cfg, script=__file__, argv=argv, device=cfg.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
