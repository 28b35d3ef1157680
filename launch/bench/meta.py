r"""META's own claim, block against block: an MEA block launches fewer memory-access kernels
(normalisations, reshapes and copies) than a ViT block of the same width and parameter count,
and so runs faster (Zhang et al., ICLR 2025, arXiv 2502.01962, its abstract).

    python launch/bench/meta.py [--width 256] [--heads 4] [--grid 64] [--batches 1,8] \
        [--repeats 5] [--stripe 2] [--window 14] [--device cpu|cuda] [--out runs/bench_meta.json]

Blocks, all on ``[B, grid, grid, width]`` tokens, random weights, fp32, eval mode, in one run:

* ``vit``: segment_anything's own ``Block`` (pre-norm, two LayerNorms, window attention with
  ``window_partition``/``window_unpartition``, SAM's window 14 with its padding of 64 to 70, MLP),
  its MLP width chosen so that its parameters equal the MEA block's;
* ``vit_sdpa``: the same block with ``scaled_dot_product_attention`` in place of SAM's explicit
  softmax (the MEA block uses it too), so the two differ in layout and normalisation work only;
* ``mea``: ``students.adapters.mea.MEABlock`` with META's defaults (shared LayerNorm, cross-shaped
  attention, conv FFN, depth-wise branch); ``mea_two_norms``: the same with two LayerNorms in ViT
  order; ``mea_cascade``: with cascaded heads.

Per block and batch: parameters, GFLOPs (``torch.utils.flop_counter``), the median latency of
``--repeats`` interleaved runs (``inference_mode``), and from one ``torch.profiler`` run of one
forward: the normalisation kernels, the copy kernels (``aten::copy_``, ``aten::cat``,
``aten::fill_``: every materialising reshape, permute-contiguous, pad or concatenation ends in one
of them; the bias broadcast inside CPU ``addmm`` is left out, as part of the matmul), the bytes
those copies write (from the shapes and allocations the profiler records), their profiled time
and that of all profiled ops (medians over ``--repeats`` profiled runs), and the calls of view
ops (reshape/view/permute/transpose: metadata only, no kernel, no bytes).
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from segment_anything.modeling.image_encoder import Attention, Block  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from launch.bench import common  # noqa: E402
from students.adapters.mea import MEABlock  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

NORMS = ("aten::native_layer_norm", "aten::native_group_norm", "aten::native_batch_norm")
COPIES = ("aten::copy_", "aten::cat", "aten::fill_")
VIEWS = ("aten::reshape", "aten::view", "aten::permute", "aten::transpose", "aten::_unsafe_view")
INSIDE_MATMUL = ("aten::addmm",)


@dataclass
class MetaBenchConfig:
    """One run of the block benchmark."""

    width: int = 256
    """Token width of every block."""
    heads: int = 4
    """Attention heads (even, for MEA)."""
    grid: int = 64
    """Token grid side (64: SAM at 1024 px)."""
    batches: tuple[int, ...] = (1, 8)
    """Batch sizes, comma-separated."""
    repeats: int = 5
    """Timed runs per block (median)."""
    stripe: int = 2
    """MEA stripe width (meta's default)."""
    window: int = 14
    """ViT window side (SAM's)."""
    device: str = field(default_factory=common.default_device, metadata={"choices": common.DEVICES})
    """Device to measure on."""
    out: str = "runs/bench_meta.json"
    """Results JSON: every figure, the command, the machine and the date."""

    def __post_init__(self) -> None:
        if self.repeats < 1 or not self.batches or min(self.batches) < 1:
            raise ValueError("--repeats and every --batches entry must be at least 1")
        if self.heads < 2 or self.heads % 2 or self.width % self.heads:
            raise ValueError(f"--heads {self.heads}: must be even and divide --width {self.width}")
        common.check_device(self.device)


class SdpaAttention(Attention):
    """SAM's ``Attention`` (no relative positions) with the fused attention kernel instead of the
    explicit ``softmax(q k^T) v``; the same qkv layout and output reshape."""

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(*qkv.unbind(0))  # [B, heads, HW, d]
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_mlp_dim(params: int, dim: int) -> int:
    """MLP width of a ViT block (two LayerNorms, qkv, proj, MLP with biases) of ``params``."""
    rest = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + dim  # + fc2 bias
    return max(1, round((params - rest) / (2 * dim + 1)))


def build_blocks(width: int, heads: int, stripe: int, window: int) -> dict[str, nn.Module]:
    """The blocks of the module docstring, the ViT ones parameter-matched to ``mea``."""
    mea = MEABlock(width, heads, stripe)
    mlp = matched_mlp_dim(num_params(mea), width)
    vit = Block(width, heads, mlp_ratio=(mlp + 0.5) / width, window_size=window)
    vit_sdpa = Block(width, heads, mlp_ratio=(mlp + 0.5) / width, window_size=window)
    vit_sdpa.attn = SdpaAttention(width, heads, input_size=(window, window))
    return {
        "vit": vit,
        "vit_sdpa": vit_sdpa,
        "mea": mea,
        "mea_two_norms": MEABlock(width, heads, stripe, shared_norm=False),
        "mea_cascade": MEABlock(width, heads, stripe, cascade=True),
    }


def _in_matmul(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in INSIDE_MATMUL:
            return True
        parent = parent.cpu_parent
    return False


def _written_bytes(event, itemsize: int) -> int:
    """Bytes a copy kernel writes: its destination (``copy_``, ``fill_``: the first recorded
    shape) or, for ``cat``, the output it allocates (the profiler records no tensor-list shapes)."""
    if event.name == "aten::cat":
        return max(0, event.cpu_memory_usage)
    shape = (event.input_shapes or [[]])[0]
    return math.prod(shape) * itemsize if isinstance(shape, list) else 0


def profile_counts(block: nn.Module, x: Tensor, repeats: int = 1) -> dict[str, float]:
    """Kernel counts and copy bytes of one forward of ``block`` on ``x`` (the same in every run),
    and the median over ``repeats`` profiled forwards of the time in those kernels."""
    activities = [ProfilerActivity.CPU]
    if x.is_cuda:
        activities.append(ProfilerActivity.CUDA)
    runs = []
    with torch.inference_mode():
        block(x)  # warm-up: first-call allocations and kernel selection stay out of the profile
        for _ in range(repeats):
            with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
                block(x)
            events = prof.events()
            norms = [e for e in events if e.name in NORMS]
            copies = [e for e in events if e.name in COPIES and not _in_matmul(e)]
            runs.append(
                {
                    "norm_kernels": len(norms),
                    "copy_kernels": len(copies),
                    "copy_bytes": sum(_written_bytes(e, x.element_size()) for e in copies),
                    "view_calls": sum(e.name in VIEWS for e in events),
                    "norm_ms": sum(e.self_cpu_time_total for e in norms) / 1e3,
                    "copy_ms": sum(e.self_cpu_time_total for e in copies) / 1e3,
                    "profiled_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
                }
            )
    times = {
        k: statistics.median(r[k] for r in runs) for k in ("norm_ms", "copy_ms", "profiled_ms")
    }
    return runs[0] | times


def gflops(block: nn.Module, x: Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        block(x)
    return counter.get_total_flops() / 1e9


def measure(cfg: MetaBenchConfig) -> list[dict]:
    """One row per (block, batch): see the module docstring."""
    torch.manual_seed(0)
    blocks = build_blocks(cfg.width, cfg.heads, cfg.stripe, cfg.window)
    blocks = {name: b.to(cfg.device).eval() for name, b in blocks.items()}
    rows = []
    for batch in cfg.batches:
        x = torch.randn(batch, cfg.grid, cfg.grid, cfg.width, device=cfg.device)
        latency = common.latency_ms(blocks, x, cfg.repeats)
        for name, block in blocks.items():
            row = {"block": name, "batch": batch, "params": num_params(block)}
            row |= {"gflops": gflops(block, x), "latency_ms": latency[name]}
            rows.append(row | profile_counts(block, x, cfg.repeats))
    return rows


def verdict(rows: list[dict], baseline: str = "vit_sdpa") -> list[str]:
    """Per batch: MEA's memory-access kernels and latency over the baseline's, and whether the
    paper's direction (fewer such kernels and faster) holds."""
    lines = []
    for batch in dict.fromkeys(r["batch"] for r in rows):
        found = {r["block"]: r for r in rows if r["batch"] == batch}
        mea, base = found["mea"], found[baseline]
        kernels = mea["norm_kernels"] + mea["copy_kernels"]
        base_kernels = base["norm_kernels"] + base["copy_kernels"]
        speed = mea["latency_ms"] / base["latency_ms"]
        holds = kernels < base_kernels and speed < 1
        lines.append(
            f"batch {batch}: mea launches {kernels} normalisation + copy kernels against "
            f"{baseline}'s {base_kernels}, writes {mea['copy_bytes'] / base['copy_bytes']:.2f}x "
            f"its copy bytes and takes {speed:.2f}x its latency: the paper's direction "
            f"(fewer memory-access kernels, faster) {'holds' if holds else 'does NOT hold'} here"
        )
    return lines


def print_table(rows: list[dict]) -> None:
    header = ["block", "batch", "params", "GFLOPs", "latency ms", "norm kernels", "copy kernels"]
    header += ["copy MiB", "norm + copy ms / all ms (profiled)", "view calls"]
    common.print_table(header, (_cells(r) for r in rows))


def _cells(r: dict) -> list[object]:
    kernels = [r["norm_kernels"], r["copy_kernels"], f"{r['copy_bytes'] / 2**20:.1f}"]
    times = f"{r['norm_ms'] + r['copy_ms']:.1f} / {r['profiled_ms']:.1f}"
    cells = [f"`{r['block']}`", r["batch"], f"{r['params']:,}", f"{r['gflops']:.1f}"]
    return [*cells, f"{r['latency_ms']:.1f}", *kernels, times, r["view_calls"]]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(MetaBenchConfig, argv, __doc__)
    machine = common.machine_info(cfg.device)
    print(
        f"{json.dumps(machine)}\n{cfg.grid}x{cfg.grid} tokens, width {cfg.width}, "
        f"{cfg.heads} heads, stripe {cfg.stripe}, window {cfg.window}, fp32",
        flush=True,
    )
    rows = measure(cfg)
    print_table(rows)
    lines = verdict(rows)
    print("\n" + "\n".join(lines))
    figures = {"rows": rows, "verdict": lines}
    common.write_results(cfg.out, figures, cfg, script=__file__, argv=argv, device=cfg.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
