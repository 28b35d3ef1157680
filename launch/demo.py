"""The CPU demo: the whole pipeline in the reference world, with the shipped teacher `sam_mini`.

    python launch/demo.py [--out runs/demo] [--num-images 64] [--steps 150]

`sam_mini` is a small SAM trained by this project on scenes cut from scikit-image's photographs
(teachers/sam_mini.py). Stages: training scenes and held-out scenes (photographs the teacher never
trained on), the teacher-feature cache (written, read back and verified), distillation of `dfa_t`
with `deepspeed` on 2 CPU processes, COCO-protocol evaluation on the held-out scenes (GT-box mIoU
of the student, the teacher and the box-fill baseline, teacher agreement, overlays of the student
beside the teacher), phase-2 decoder alignment from that student on the same prompts, adaptation
of the student to a camouflage domain (objects cut from their own background, held-out
photographs; CAD, scored with eval/masks.py against the un-adapted student), and the speed table.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from eval.scenes.photos import make_camouflage_domain, make_photo_coco  # noqa: E402
from teachers import load_teacher  # noqa: E402
from teachers.cache import plan_cache, write_cache  # noqa: E402
from teachers.cache_read import read_cache, verify_cache  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402
from teachers.sam_mini import SAM_MINI_PATH  # noqa: E402

REPO = _here.parent


STARTS: list[tuple[str, float]] = []  # (stage, time.time() at its banner)


def banner(text: str, short: str) -> None:
    """Print a stage's title and note when it started under its `short` name (the summary's
    time row)."""
    STARTS.append((short, time.time()))
    print(f"\n=== {text} ===", flush=True)


def time_line(start: float) -> str:
    """'T s in all: stage S s, ...' from the stages' start times."""
    ends = [t for _, t in STARTS[1:]] + [time.time()]
    parts = [f"{name} {end - t:.0f} s" for (name, t), end in zip(STARTS, ends, strict=True)]
    return f"{time.time() - start:.1f} s in all: " + ", ".join(parts[:-1])


def distill(out: Path, steps: int, processes: int) -> list[dict[str, str]]:
    """Run launch/distill.py under the deepspeed launcher (gloo on CPU); return its log rows."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(deepspeed),
        "--num_gpus",
        str(processes),
        "--master_port",
        os.environ.get("DEMO_PORT", "29651"),
        str(REPO / "launch" / "distill.py"),
        "--shards",
        str(out / "cache"),
        "--out",
        str(out / "run"),
        "--student",
        "dfa_t",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--workers",
        "1",
        "--checkpoint-every",
        "20",
        "--log-every",
        "10",
        "--no-progress",
        "--device",
        "cpu",
    ]
    if (out / "run" / "checkpoints" / "latest").exists():
        cmd += ["--resume", "auto"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    with open(out / "run" / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_script(*args: str) -> None:
    cmd = [sys.executable, *args]
    print("$ python", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def evaluate(out: Path, ckpt: Path, name: str, vis: bool = True) -> dict:
    """A student on the held-out scenes with the teacher beside it (GT mIoU of both, agreement,
    the box-fill baseline, and overlays when `vis`); the figures, also in OUT/<name>.json."""
    cmd = ["eval/coco.py", "--ckpt", str(ckpt), "--coco-root", str(out / "held")]
    cmd += ["--compare-ckpt", str(SAM_MINI_PATH), "--baseline", "box"]
    cmd += ["--out", str(out / f"{name}.json"), "--device", "cpu"]
    cmd += ["--vis", str(out / "overlays"), "--vis-limit", "6"] if vis else []
    run_script(*cmd)
    return json.loads((out / f"{name}.json").read_text())


def phase_two(out: Path, steps: int) -> dict:
    """Phase 2 (decoder alignment) from the distilled student on the same cache,
    one process; its figures on the same images and box prompts as the phase-1 student."""
    run = out / "phase2"
    cmd = ["launch/distill.py", "--phase", "decoder", "--init", str(out / "run" / "student.pt")]
    cmd += ["--shards", str(out / "cache"), "--out", str(run), "--steps", str(steps)]
    cmd += ["--batch-size", "4", "--lr", "3e-4", "--max-prompts", "8", "--engine", "torch"]
    cmd += ["--workers", "0", "--log-every", "10", "--no-progress", "--device", "cpu"]
    cmd += ["--checkpoint-every", "1000"]
    cmd += ["--resume", "auto"] if (run / "checkpoints" / "latest").exists() else []
    run_script(*cmd)
    return evaluate(out, run / "student.pt", "eval_phase2", vis=False)


def cache_stage(out: Path) -> tuple[dict, object, int, str]:
    """Cache the teacher's features of the training scenes, verify them; (manifest, report,
    bytes, shapes)."""
    teacher = load_teacher("sam_mini")
    plan = plan_cache(str(out / "train"), samples_per_shard=32)
    manifest = write_cache(teacher, plan, out / "cache", codec="fp16", batch_size=4)
    report = verify_cache(out / "cache", teacher, num_recompute=4)
    num_bytes = sum((out / "cache" / s["name"]).stat().st_size for s in manifest["shards"])
    sample = next(read_cache(out / "cache", teacher="sam_mini", codec="fp16"))
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sample.features.items())
    return manifest, report, num_bytes, shapes


ADAPT_TRAIN, ADAPT_VAL = 240, 24  # camouflage pairs: 60 steps x 4 draw each training pair once
# The adapt stage's settings (launch/adapt.py flags; tests/launch/test_demo_adapt.py trains with
# them): GT-box prompts, CAD's own lr, CAD narrowed to 32 channels at 128 px for the CPU.
SPEED_BASELINE = "mobilesam_vit_t"  # MobileSAM's TinyViT, the speed table's reference
ADAPT_SETTINGS = dict(
    method="cad", options="width=32,input_size=128", prompt="gt_box", lr=2e-4, batch_size=4
)


def adapt(out: Path, steps: int) -> dict:
    """Adapt the distilled student to the camouflage domain (held-out photographs, each object cut
    from its own background) with CAD (the encoder stays frozen), then score both on its val
    split with eval/masks.py, both under the mask's box; the figures.

    Why these settings (measured on the demo's student, 60 steps of batch 4): under the
    full-image box the student finds no camouflaged object (val IoU 0.21, what a centred disc
    scores), so the mask loss drives the decoder to the training masks' layout or to an empty
    mask (val IoU 0.04 after 60 steps on 16 training images, 0.00 on 240); under the mask's box
    it segments (0.48) and CAD at its own lr 2e-4 gains (0.50), where lr 1e-3 costs 0.04. The
    training split holds one image per sample drawn (ADAPT_TRAIN), so no pair repeats."""
    make_camouflage_domain(out / "domain", num_train=ADAPT_TRAIN, num_val=ADAPT_VAL, size=256)
    run = out / "adapt"
    cmd = ["launch/adapt.py", "--ckpt", str(out / "run" / "student.pt")]
    for name, value in ADAPT_SETTINGS.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    cmd += ["--data", str(out / "domain"), "--out", str(run)]
    cmd += ["--steps", str(steps), "--val-every", "30"]
    cmd += ["--engine", "torch", "--workers", "1", "--log-every", "20", "--no-progress"]
    cmd += ["--device", "cpu"] + (["--resume", "auto"] if (run / "checkpoints").exists() else [])
    run_script(*cmd)
    run_script(
        "eval/masks.py",
        "--ckpt",
        str(run / "adapted.pt"),
        "--compare-ckpt",
        str(out / "run" / "student.pt"),
        "--data",
        str(out / "domain"),
        "--out",
        str(out / "masks.json"),
        "--prompt",
        ADAPT_SETTINGS["prompt"],
        "--device",
        "cpu",
    )
    return json.loads((out / "masks.json").read_text())


def adapt_line(out: Path, adapted: dict) -> str:
    """The summary's adaptation row: the adapted student against the un-adapted one."""
    new, base = (m["results"] for m in adapted["models"])
    return (
        f"CAD on the frozen student: val IoU {base['iou']:.3f} -> {new['iou']:.3f} under GT "
        f"boxes, S-measure {base['s_measure']:.3f} -> {new['s_measure']:.3f} ({out / 'masks.json'}; plot "
        f"{out / 'adapt' / 'training.png'})"
    )


NEXT_STEPS = (
    "\nThe same with SAM ViT-H on SA-1B (sam_vit_h_4b8939.pth):\n"
    "  python launch/cache_teacher.py --teacher vit_h --teacher-ckpt sam_vit_h_4b8939.pth \\\n"
    "      --images '/data/sa1b/sa_{000020..000029}.tar' --out /data/cache/vit_h\n"
    "  deepspeed launch/distill.py --shards /data/cache/vit_h --student dfa_s --out runs/dfa_s \\\n"
    "      --teacher-ckpt sam_vit_h_4b8939.pth --steps 20000 --batch-size 64 --precision bf16\n"
    "  deepspeed launch/adapt.py --ckpt runs/dfa_s/student.pt --method conv_lora \\\n"
    "      --data /data/COD10K --out runs/cod_conv_lora --steps 6000 --precision bf16"
)


@dataclass
class DemoConfig:
    """The demo's scale and where it writes."""

    out: str = "runs/demo"
    """Output folder."""
    num_images: int = 64
    """Training scenes cached."""
    held_images: int = 24
    """Held-out scenes."""
    steps: int = 150
    """Distillation steps."""
    processes: int = 2
    """Distillation processes."""
    phase2_steps: int = 20
    """Phase-2 alignment steps."""
    adapt_steps: int = 60
    """Adaptation steps."""
    speed_models: str = "dfa_t,dfa_s,dfa_b,mobilesam_vit_t,efficientvit_sam_l0"
    """Models of the speed table, against MobileSAM's TinyViT (SAM's vit_b takes 13 s and
    vit_h minutes a forward on a 2-core CPU: add them for the full table)."""


def main(argv: list[str] | None = None) -> int:
    args = parse_config(DemoConfig, argv, __doc__)
    out = Path(args.out)
    start = time.time()

    banner("1. scenes from real photographs (COCO format, exact instance masks)", "scenes")
    make_photo_coco(out / "train", "train", args.num_images, seed=1)
    held = make_photo_coco(out / "held", "held", args.held_images, seed=1)
    print(
        f"{args.num_images} training scenes in {out / 'train'}; {args.held_images} held-out: {held}"
    )

    banner("2. teacher-feature cache", "cache")
    manifest, report, num_bytes, shapes = cache_stage(out)

    banner("3. distillation (DeepSpeed, CPU)", "distillation")
    log = distill(out, args.steps, args.processes)

    banner(
        "4. COCO-protocol evaluation on held-out scenes (box prompts), student beside teacher",
        "evaluation",
    )
    figures = evaluate(out, out / "run" / "student.pt", "eval")

    banner("4b. phase 2: decoder alignment from the student, same prompts", "phase 2")
    aligned = phase_two(out, args.phase2_steps)

    banner(
        "5. adaptation to a generated camouflage domain (CAD on the frozen student)", "adaptation"
    )
    adapted = adapt(out, args.adapt_steps)

    banner("6. speed table (1024 x 1024, CPU, random weights)", "speed")
    run_script(
        "launch/bench/speed.py",
        "--models",
        args.speed_models,
        "--baseline",
        SPEED_BASELINE,
        "--repeats",
        "2",
        "--out",
        str(out / "speed.json"),
    )
    speed = {r["model"]: r for r in json.loads((out / "speed.json").read_text())["models"]}

    banner("summary", "summary")
    stages = dict(manifest=manifest, report=report, num_bytes=num_bytes, shapes=shapes, log=log)
    rows = summary(out, args, stages, figures, adapted, speed)
    rows.insert(-2, ("phase 2", phase_two_line(out, args, figures, aligned)))
    rows.append(("time", time_line(start)))
    for name, value in rows:
        print(f"{name:>20}  {value}")
    print(NEXT_STEPS)
    return 0 if report.ok else 1


def phase_two_line(out: Path, args, figures: dict, aligned: dict) -> str:
    """The summary's phase-2 row: teacher agreement before and after, on the same prompts."""
    before = figures["compare"]["agreement"]["miou"]["all"]
    after = aligned["compare"]["agreement"]["miou"]["all"]
    return (
        f"teacher agreement {before:.1f} (phase 1) -> {after:.1f} mIoU after {args.phase2_steps} "
        f"phase-2 steps, same {figures['num_instances']} box prompts; GT mIoU "
        f"{figures['miou']['all']:.1f} -> {aligned['miou']['all']:.1f} ({out / 'eval_phase2.json'})"
    )


def gt_line(figures: dict) -> str:
    """The summary's ground-truth row: student, teacher, box-fill baseline, share kept."""
    student, teacher = figures["miou"]["all"], figures["compare"]["miou"]["all"]
    fill = figures["baseline_box"]["miou"]["all"]
    return (
        f"student {student:.1f}, teacher {teacher:.1f}, box-fill baseline {fill:.1f} (held-out "
        f"scenes, box prompts): the student keeps {100 * student / teacher:.0f}% of the teacher's"
    )


def summary(out, args, stages: dict, figures: dict, adapted: dict, speed: dict) -> list:
    """(name, value) rows of the demo's summary."""
    manifest, report, log = stages["manifest"], stages["report"], stages["log"]
    num_bytes, shapes = stages["num_bytes"], stages["shapes"]
    first, last = float(log[0]["loss_embed"]), float(log[-1]["loss_embed"])
    rows = [
        ("images", str(manifest["num_samples"])),
        ("shards", f"{len(manifest['shards'])} in {out / 'cache'}"),
        (
            "cache size",
            f"{num_bytes / 1e6:.2f} MB ({num_bytes / manifest['num_samples'] / 1e3:.1f} kB per sample)",
        ),
        ("features per sample", shapes),
        (
            "verify",
            f"{'OK' if report.ok else 'FAILED'}: {report.num_recomputed} samples recomputed, "
            f"worst error {report.max_error_ratio:.2f}x the fp16 bound",
        ),
        (
            "distillation",
            f"{len(log)} steps on {args.processes} processes, final-embedding loss "
            f"{first:.4f} -> {last:.4f}",
        ),
        ("student", f"{out / 'run' / 'student.pt'} (plot {out / 'run' / 'training.png'})"),
        (
            "teacher agreement",
            f"{figures['compare']['agreement']['miou']['all']:.1f} mIoU between student and teacher masks "
            f"({figures['num_instances']} box prompts; overlays in {out / 'overlays'})",
        ),
        ("GT mIoU", gt_line(figures)),
        (
            "speed",
            ", ".join(f"{m} {r['latency_ms']:.0f} ms" for m, r in speed.items())
            + (
                f" ({speed[SPEED_BASELINE]['latency_ms'] / speed['dfa_s']['latency_ms']:.1f}x: "
                f"dfa_s vs {SPEED_BASELINE})"
                if {SPEED_BASELINE, "dfa_s"} <= speed.keys()
                else ""
            ),
        ),
    ]
    rows.append(("adaptation", adapt_line(out, adapted)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
