"""Speed and memory of image encoders side by side: students, SAM teachers and peer encoders.

Every encoder is measured in its own child process (clean peak-memory reading, no warm caches
shared between models), one after the other in one run, with random weights: latency does not
depend on weights. Columns: parameters, GFLOPs (`torch.utils.flop_counter`, 2 per multiply-add,
counted on the meta device), median latency after warm-up, peak memory (CUDA: peak allocated
bytes; CPU: the process's peak RSS growth during inference), and latency ratios to a baseline.
A second table times one attention layer against token count: DFA, global and windowed.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from students import build_student, list_students

SAM_SIZES = ("vit_b", "vit_l", "vit_h")
PEERS = {"mobilesam_vit_t": 1024, "efficientvit_sam_l0": 512, "efficientvit_sam_xl0": 1024}


def known_models() -> list[str]:
    return [*list_students(), *SAM_SIZES, *PEERS]


def _random_init_(module: nn.Module) -> nn.Module:
    """Small random values everywhere (fast even for ViT-H; no denormals to slow the CPU)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def build_encoder(name: str, image_size: int, device: str) -> tuple[nn.Module, int]:
    """(encoder in eval mode, its input side): students and SAM at `image_size`, peers native."""
    if name in list_students():
        return build_student(name, img_size=image_size).to(device).eval(), image_size
    if name in SAM_SIZES:
        from segment_anything import sam_model_registry

        with torch.device("meta"):
            encoder = sam_model_registry[name]().image_encoder
        if image_size != 1024:
            raise ValueError(
                f"{name} is measured at its native 1024 only (its position embedding is fixed)"
            )
        return _random_init_(encoder.to_empty(device=device)).eval(), 1024
    if name == "mobilesam_vit_t":
        try:
            from mobile_sam.build_sam import build_sam_vit_t
        except ImportError as err:
            raise ValueError(
                "mobilesam_vit_t needs the bench extra: pip install -e '.[bench]'"
            ) from err
        return build_sam_vit_t().image_encoder.to(device).eval(), PEERS[name]
    if name.startswith("efficientvit_sam_"):
        try:
            from efficientsam.sam_model_zoo import create_efficientvit_sam_model
        except ImportError as err:
            raise ValueError(f"{name} needs the bench extra: pip install -e '.[bench]'") from err
        zoo_name = name.replace("_sam_", "-sam-").replace("_", "-")
        return create_efficientvit_sam_model(zoo_name, pretrained=False).image_encoder.to(
            device
        ).eval(), PEERS[name]
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())}")


def count_gflops(name: str, image_size: int) -> float:
    """Forward GFLOPs at batch 1, counted on the meta device (nothing is computed)."""
    if name in SAM_SIZES:
        model, size = build_encoder(name, image_size, "meta")
    else:  # some peers compute values while they build, so build on the CPU and move
        model, size = build_encoder(name, image_size, "cpu")
        model = model.to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 1e9


def _median_seconds(
    fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]
) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure(name: str, image_size: int, device: str, warmup: int, repeats: int) -> dict:
    """One encoder's row (run in a child process)."""
    model, size = build_encoder(name, image_size, device)
    x = torch.randn(1, 3, size, size, device=device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        seconds = _median_seconds(lambda: model(x), warmup, repeats, sync)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {
        "model": name,
        "input": size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": count_gflops(name, image_size),
        "latency_ms": seconds * 1e3,
        "peak_mb": peak_mb,
    }


def run_child(name: str, image_size: int, device: str, warmup: int, repeats: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("speed.py")),
        "--child",
        name,
        "--image-size",
        str(image_size),
        "--device",
        device,
        "--warmup",
        str(warmup),
        "--repeats",
        str(repeats),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


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
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
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
            rows.append(
                {"tokens": side * side}
                | {key: 1e3 * _median_seconds(fn, 1, repeats, sync) for key, fn in calls.items()}
            )
    return rows
