r"""One command that runs every CUDA path of the pipeline and records the GPU figures.

    python launch/bench/gpu_check.py --out runs/gpu_check                 # one GPU, about 8 min
    python launch/bench/gpu_check.py --device cpu --quick --out DIR       # the same stages, tiny

Three stages, each recorded as it ends in OUT/gpu_check.json (so a stage that crashes or runs out
of time loses nothing of the others) and printed as a table at the end:

1. kernels: `students.fused.attention_with_lse` (forward, lse and the exact gradient through the
   lse) against the explicit fp32 reference, in fp32, fp16 and bf16; DFA's fused training path and
   its union (export) form against the reference math, forward and backward. Bounds on the max
   absolute error, inputs of unit scale: fp32 1e-4, fp16 1e-2, bf16 5e-2 (bf16 keeps 8 mantissa
   bits: one rounding of a unit value is 4e-3, and a 256-key softmax sums many).
2. pipeline: scenes from the reference world, the `sam_mini` teacher's cache on the device,
   `deepspeed --num_gpus 1 launch/distill.py` (dfa_s, bf16 on CUDA, NCCL), phase 2, adaptation
   with cad and conv_lora, and `eval/coco.py` (GT-box mIoU beside the teacher and the box-fill
   baseline). Each step says whether it ran, how long it took, and the tail of its log if not.
   With --device cpu --quick the same commands run on 8 scenes for 2 steps each, with dfa_t and
   CAD's branch at 128 px (about 3 minutes on 2 cores): every code path short of the CUDA ones.
3. speed: per encoder (students, SAM ViT-B/H, MobileSAM's TinyViT, EfficientViT-SAM-L0, random
   weights: latency does not depend on them) latency at batch 1 (synchronised median) and
   throughput at batch 16, fp32 and bf16, peak memory, and for the students `torch.compile` and
   CUDA graphs (`mode="reduce-overhead"`). On CPU (--quick) only what a CPU has: no compile, no
   graphs, each said so in the row.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent.parent))

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from launch.bench.common import write_results  # noqa: E402
from teachers.runtime.exits import exit_status  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

REPO = _here.parent.parent
BOUNDS = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
STUDENTS = ("dfa_t", "dfa_s", "dfa_b")


@dataclass
class GpuCheckConfig:
    """`launch/bench/gpu_check.py`: what to run and at what size."""

    out: str = "runs/gpu_check"
    """Folder for the results JSON, the logs and every stage's files."""
    device: str = field(default="cuda", metadata={"choices": ("cuda", "cpu")})
    """cuda (the check) or cpu (the same stages, for a dry run and the test)."""
    quick: bool = False
    """Tiny sizes everywhere (a few images, steps and repeats)."""
    stages: tuple[str, ...] = ("kernels", "pipeline", "speed")
    """Stages to run, in order."""
    models: tuple[str, ...] = (
        *STUDENTS,
        "vit_b",
        "vit_h",
        "mobilesam_vit_t",
        "efficientvit_sam_l0",
    )
    """Encoders of the speed stage."""
    timeout: int = 240
    """Seconds any one child process may take before it is stopped and reported."""

    def __post_init__(self) -> None:
        unknown = set(self.stages) - {"kernels", "pipeline", "speed"}
        if unknown:
            raise ValueError(f"--stages {sorted(unknown)}: choose from kernels, pipeline, speed")
        if self.timeout < 1:
            raise ValueError(f"--timeout must be at least 1, got {self.timeout}")

    @property
    def sizes(self) -> dict:
        """Images, steps and repeats of each stage."""
        if self.quick:
            return dict(images=8, held=4, steps=2, phase2=2, adapt=2, repeats=2, side=256, batch=2)
        return dict(
            images=256, held=64, steps=200, phase2=20, adapt=20, repeats=20, side=1024, batch=16
        )


def _errors(dtype, device: str) -> dict:
    """attention_with_lse in `dtype` against the fp32 reference: max |error| of out, lse, grads."""
    import torch

    from students.fused import attention_with_lse, reference_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, 256, 32, generator=gen) for _ in range(3))
    bias = torch.zeros(1, 1, 1, 256)
    bias[..., 200:] = -1e4  # padding keys, as DFA's last tiles have
    cot_out, cot_lse = (
        torch.randn(8, 4, 256, 32, generator=gen),
        torch.randn(8, 4, 256, generator=gen),
    )

    def run(fn, dt, dev):
        xs = [t.to(dev, dt).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*xs, bias.to(dev, dt), 32**-0.5)
        loss = (out.float() * cot_out.to(dev)).sum() + (lse.float() * cot_lse.to(dev)).sum()
        grads = torch.autograd.grad(loss, xs)
        return [t.detach().float().cpu() for t in (out, lse, *grads)]

    got = run(attention_with_lse, dtype, device)
    want = run(reference_attention, torch.float32, "cpu")
    names = ("out", "lse", "grad_q", "grad_k", "grad_v")
    return {n: float((g - w).abs().max()) for n, g, w in zip(names, got, want, strict=True)}


def _dfa_errors(device: str) -> dict:
    """DFA (dfa_s's patterns on a 64 x 64 grid) fused and union against the reference, fp32."""
    import torch

    from students.dfa import dilated_attention
    from students.dfa_union import union_attention

    gen = torch.Generator().manual_seed(1)
    qkv = [torch.randn(2, 4, 64, 64, 32, generator=gen) for _ in range(3)]
    patterns = [(8, 1), (32, 2)]

    def run(backend, dev):
        xs = [t.to(dev).requires_grad_() for t in qkv]
        out = dilated_attention(*xs, patterns, backend=backend)
        grads = torch.autograd.grad(out.square().sum(), xs)
        return [t.detach().cpu() for t in (out, *grads)]

    fused, ref = run("fused", device), run("reference", "cpu")
    with torch.no_grad():
        union = union_attention(*[t.to(device) for t in qkv], patterns).cpu()
    errors = {
        f"dfa_fused_{n}": float((a - b).abs().max())
        for n, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), fused, ref, strict=True)
    }
    errors["dfa_union_out"] = float((union - ref[0]).abs().max())
    return errors


def kernels(cfg: GpuCheckConfig) -> dict:
    """Stage 1: the kernels' errors, each against its bound."""
    import torch

    rows = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        try:
            errors = _errors(dtype, cfg.device)
        except RuntimeError as err:  # a dtype the device's kernel lacks: said, not skipped
            rows[name] = {"ran": False, "error": str(err).splitlines()[0]}
            continue
        rows[name] = {
            "ran": True,
            "bound": BOUNDS[name],
            "ok": max(errors.values()) <= BOUNDS[name],
            **errors,
        }
    dfa = _dfa_errors(cfg.device)
    rows["dfa_fp32"] = {
        "ran": True,
        "bound": BOUNDS["fp32"],
        "ok": max(dfa.values()) <= BOUNDS["fp32"],
        **dfa,
    }
    return rows


def _child(cmd: list[str], log: Path, timeout: int, env: dict | None = None) -> dict:
    """Run one child process with its output in `log`: ran, seconds, and the log's tail if not."""
    tic = time.perf_counter()
    with open(log, "w") as f:
        try:
            done = subprocess.run(
                cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env
            )
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    row = {"ran": code == 0, "seconds": round(time.perf_counter() - tic, 1), "log": str(log)}
    if code != 0:
        row["exit"] = code
        row["tail"] = log.read_text().splitlines()[-8:]
    return row


def _flags(**values: object) -> list[str]:
    """`--key-name value` for each keyword (True: a bare flag)."""
    out: list[str] = []
    for key, value in values.items():
        out += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


def pipeline_commands(cfg: GpuCheckConfig) -> dict[str, list[str]]:
    """Each step of stage 2 as the command a user would type, in order."""
    out, s, py = Path(cfg.out), cfg.sizes, sys.executable
    student = out / "distill" / "student.pt"
    run = _flags(device=cfg.device, no_progress=True, log_every=10, workers=0)
    if cfg.device == "cuda":
        run += _flags(precision="bf16")
    port = os.environ.get("GPU_CHECK_PORT", "29671")
    deepspeed = [str(Path(py).parent / "deepspeed"), "--num_gpus", "1", "--master_port", port]
    adapt = _flags(ckpt=student, data=out / "domain", steps=s["adapt"], batch_size=4) + run
    # --quick: the small student, and CAD's own branch at the demo's size, so the CPU run of
    # every step takes seconds; on the GPU the check's sizes
    small = cfg.quick and cfg.device == "cpu"
    cad = _flags(options="width=32,input_size=128") if small else []
    cache = _flags(teacher="sam_mini", images=out / "train", out=out / "cache", workers=0)
    teacher = REPO / "teachers" / "weights" / "sam_mini.pth"
    return {
        "cache": [py, "launch/cache_teacher.py", *cache, *_flags(device=cfg.device)],
        "distill": [
            *deepspeed,
            "launch/distill.py",
            *_flags(shards=out / "cache", student="dfa_t" if small else "dfa_s"),
            *_flags(out=out / "distill"),
            *_flags(steps=s["steps"], batch_size=8, engine="deepspeed"),
            *run,
        ],
        "phase2": [
            py,
            "launch/distill.py",
            *_flags(phase="decoder", init=student, shards=out / "cache", out=out / "phase2"),
            *_flags(steps=s["phase2"], batch_size=4, engine="torch"),
            *run,
        ],
        "adapt_cad": [
            *[py, "launch/adapt.py", *adapt, *cad],
            *_flags(method="cad", out=out / "cad"),
        ],
        "adapt_conv_lora": [
            *[py, "launch/adapt.py", *adapt],
            *_flags(method="conv_lora", out=out / "conv_lora"),
        ],
        "eval": [
            *[py, "eval/coco.py", *_flags(ckpt=student, coco_root=out / "held")],
            *_flags(compare_ckpt=teacher, baseline="box", out=out / "eval.json"),
            *_flags(device=cfg.device, no_progress=True),
        ],
    }


def pipeline(cfg: GpuCheckConfig) -> dict:
    """Stage 2: cache, distill (DeepSpeed, one process), phase 2, adapt, evaluate, on the device."""
    from eval.scenes.photos import make_camouflage_domain, make_photo_coco

    out, s = Path(cfg.out), cfg.sizes
    out.mkdir(parents=True, exist_ok=True)
    make_photo_coco(out / "train", "train", s["images"], seed=1)
    make_photo_coco(out / "held", "held", s["held"], seed=1)
    make_camouflage_domain(out / "domain", s["images"], s["held"], seed=1)
    rows = {}
    for name, cmd in pipeline_commands(cfg).items():
        rows[name] = _child(cmd, out / f"{name}.log", cfg.timeout)
    if rows["eval"]["ran"]:
        figures = json.loads((out / "eval.json").read_text())
        rows["eval"] |= {
            "student_miou": figures["miou"]["all"],
            "teacher_miou": figures["compare"]["miou"]["all"],
            "box_fill_miou": figures["baseline_box"]["miou"]["all"],
        }
    return rows


def speed_row(name: str, device: str, side: int, batch: int, repeats: int, compiled: bool) -> dict:
    """One encoder's figures (run in a child process, so peak memory is its own)."""
    import torch

    from launch.bench.common import build_encoder, interleaved, synchronizer

    # SAM's ViTs run at their native 1024 only (a fixed position embedding); peers at theirs
    model, size = build_encoder(name, 1024 if name.startswith("vit_") else side, device)
    cuda = device == "cuda"

    def median_ms(fn, x, n: int) -> float:
        call = {"call": lambda: fn(x)}
        return 1e3 * interleaved(call, n, warmup=2, sync=synchronizer(device))["call"]

    row = {"model": name, "input": size}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x1, xb = (torch.randn(b, 3, size, size, device=device) for b in (1, batch))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with (
            torch.inference_mode(),
            torch.autocast(device, dtype=dtype, enabled=precision == "bf16"),
        ):
            row[f"latency_ms_{precision}"] = median_ms(model, x1, repeats)
            if cuda:  # at batch 1: the memory one image needs, weights included
                row[f"peak_mb_{precision}"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            row[f"images_per_s_{precision}"] = (
                1e3 * batch / median_ms(model, xb, max(2, repeats // 4))
            )
            if cuda:
                row[f"peak_mb_{precision}_batch{batch}"] = torch.cuda.max_memory_allocated() / 2**20
            if compiled and cuda and precision == "bf16":  # the goals are bf16 figures
                for mode in ("default", "reduce-overhead"):  # reduce-overhead: CUDA graphs
                    fast = torch.compile(model, mode=mode)
                    row[f"latency_ms_{precision}_compile_{mode}"] = median_ms(fast, x1, repeats)
    if not cuda:
        row["note"] = "cpu: no torch.compile, no CUDA graphs, no GPU memory"
    return row


def speed(cfg: GpuCheckConfig) -> dict:
    """Stage 3: one child process per encoder, each with its own row or its error."""
    s, rows = cfg.sizes, {}
    for name in cfg.models:
        call = (name, cfg.device, s["side"], s["batch"], s["repeats"], name in STUDENTS)
        code = (
            f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
            "from launch.bench.gpu_check import speed_row; "
            f"print('ROW ' + json.dumps(speed_row(*{call!r})))"
        )
        log = Path(cfg.out) / f"speed_{name}.log"
        row = _child([sys.executable, "-c", code], log, cfg.timeout)
        found = [line for line in log.read_text().splitlines() if line.startswith("ROW ")]
        rows[name] = row | (json.loads(found[-1][4:]) if found else {})
    if cfg.device == "cuda" and rows.get("dfa_s", {}).get("ran"):
        rows["goals"] = goals(rows["dfa_s"])
    return rows


# Published figures the GPU rows stand beside: SAM-Lightening (arXiv 2403.09195) reports 7 ms per
# 1024 x 1024 image and 244 MB for its student; EfficientViT-SAM (arXiv 2402.05008) reports 762
# images/s for L0 at batch 16 on an A100 with TensorRT fp16.
PUBLISHED = {"sam_lightening_ms": 7.0, "sam_lightening_mb": 244.0, "efficientvit_l0_img_s": 762.0}


def goals(row: dict) -> dict:
    """dfa_s against the goals: at most 2 ms at batch 1 in bf16 (compile or CUDA graphs allowed),
    at least 1,000 images/s at batch 16, peak inference memory at most 244 MB."""
    latency = min(v for k, v in row.items() if k.startswith("latency_ms_bf16"))
    return {
        **PUBLISHED,
        "dfa_s_best_bf16_ms": latency,
        "dfa_s_bf16_img_s": row["images_per_s_bf16"],
        "dfa_s_peak_mb": row["peak_mb_bf16"],
        "ok": latency <= 2.0 and row["images_per_s_bf16"] >= 1000 and row["peak_mb_bf16"] <= 244,
    }


def table(results: dict) -> str:
    """The printed summary: every stage and step, whether it ran, and its main figures."""
    lines = []
    for stage, rows in results["stages"].items():
        for name, row in rows.items():
            if not isinstance(row, dict):
                continue
            figures = {k: v for k, v in row.items() if isinstance(v, float) and k != "seconds"}
            shown = ", ".join(f"{k} {v:.3g}" for k, v in list(figures.items())[:6])
            state = "ok" if row.get("ran", True) and row.get("ok", True) else "FAILED"
            lines.append(f"{stage:<9} {name:<22} {state:<7} {row.get('seconds', '')!s:>7}  {shown}")
    return "\n".join(lines)


STAGES = {"kernels": kernels, "pipeline": pipeline, "speed": speed}


def run(cfg: GpuCheckConfig, argv: list[str] | None = None) -> dict:
    """All stages; OUT/gpu_check.json (figures, command, config, machine, date) rewritten after
    each, so a stage that fails or a run that is stopped keeps what was measured."""
    path, stages = Path(cfg.out) / "gpu_check.json", {}
    for stage in cfg.stages:
        tic = time.perf_counter()
        stages[stage] = STAGES[stage](cfg)
        stages[stage]["seconds"] = round(time.perf_counter() - tic, 1)
        write_results(path, {"stages": stages}, cfg, script=__file__, argv=argv, device=cfg.device)
        print(f"{stage}: done in {stages[stage]['seconds']} s", flush=True)
    results = {"stages": stages}
    print(table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(GpuCheckConfig, argv, __doc__)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                "error: --device cuda but no CUDA device is visible; use --device cpu --quick for a dry run",
                file=sys.stderr,
            )
            return 2
    return exit_status(lambda: run(cfg, argv))


if __name__ == "__main__":
    sys.exit(main())
