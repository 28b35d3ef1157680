r"""Benchmark: does phase 2 (decoder alignment) raise box-prompted teacher agreement on held-out
images over as many more phase-1 steps? One run, both arms from the same phase-1 student.

    python launch/bench/phase2_gain.py [--out runs/bench_phase2_gain] [--train-images 256] \
        [--held-images 96] [--phase1-steps 600] [--extra-steps 150] [--batch-size 8]

A random-weight SAM decoder is unsure everywhere (logits within a few hundredths of 0), so mask
agreement with it is decided by noise and no mask loss can show a gain. This benchmark first makes
a confident teacher: the random `vit_tiny` SAM adapted with merged LoRA and its decoder to a
generated camouflage domain with a colour cue (`launch/adapt.py --method lora --merge`), saved as
a plain SAM checkpoint. Then, on other images of that domain as COCO-format data (one object an
image, its box the prompt), it caches the teacher, distils `dfa_t` for `--phase1-steps`, and from
that student runs `--extra-steps` of phase 1 (`--init`, on the final embedding) and of phase 2 (`--phase decoder`, EdgeSAM's hard targets); a third arm distils phase 1 for all the
steps in one schedule, so neither restart costs it. `eval/coco.py --compare-ckpt` scores the three students on the held-out
images with the single-mask output, the one phase 2 trains for boxes (EdgeSAM's box protocol),
and with multimask argmax; the per-instance agreements give the paired difference of phase 2
against more phase 1 ("phase 2 - phase 1"), against the one-schedule phase 1 and against the student both arms start from ("phase
2 - start"), its standard error and the share of instances phase 2 improved. Writes
OUT/gain.json. About 4 minutes on a 2-core CPU; stages already done under OUT are reused.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from eval.scenes.domain import domain_as_coco, make_domain  # noqa: E402
from launch.bench import common  # noqa: E402
from students import load_sam  # noqa: E402
from teachers import load_teacher  # noqa: E402
from teachers.build import random_vit_tiny  # noqa: E402
from teachers.cache import plan_cache, write_cache  # noqa: E402
from teachers.runtime.files import save_atomic  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

# dfa_t at width 64 (0.84 M parameters, the teacher encoder 0.88 M): a student that cannot copy the
# teacher's embedding everywhere, as a real one cannot copy ViT-H's, so the loss decides where it
# errs; at dfa_t's own width 128 (1.4 M) the same run gains about half as much.
STUDENT = ["--student", "dfa_t", "--student-options", "embed_dim=64"]
TINT = 30.0  # the domain's colour cue (gray levels): learnable on a random encoder's features
PHASE2 = ["--phase", "decoder", "--mask-target", "hard", "--lr", "1e-4"]
# More phase 1 from student.pt: the final embedding only, since the tap projections start fresh
# with --init and, under the progressive weights, would first pull the encoder towards their
# random outputs (that continuation scores about 2.6 points below this one).
MORE_PHASE1 = ["--lr", "5e-4", "--dld", "final_only"]
PROTOCOLS = {"single": ["--single-mask"], "multimask": []}


@dataclass
class GainConfig:
    """One run of the phase-2 gain benchmark."""

    out: str = "runs/bench_phase2_gain"
    """Work folder (stages already done there are reused), and OUT/gain.json."""
    train_images: int = 1024
    """Images of the domain whose teacher features are cached for both arms."""
    held_images: int = 192
    """Held-out images of the domain, one object each, scored with its box as the prompt
    (eval/coco.py --compare-ckpt against the teacher)."""
    teacher_steps: int = 300
    """Steps of the teacher's adaptation (LoRA, merged, and its mask decoder)."""
    phase1_steps: int = 600
    """Steps of the phase-1 student both arms start from."""
    extra_steps: int = 150
    """Steps of each arm from that student: more phase 1 (the final embedding only), or phase 2
    (EdgeSAM's hard targets); the one-schedule arm distils phase1 + extra steps at once."""
    batch_size: int = 8
    """Batch size of every run."""
    seed: int = 0
    """Seed of the generated data."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name not in ("out", "seed") and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def make_teacher(out: Path, steps: int, seed: int) -> Path:
    """The confident teacher: random vit_tiny adapted (LoRA merged, decoder) to the tinted
    domain; saved as a plain SAM state dict at OUT/teacher.pth."""
    path = out / "teacher.pth"
    if path.exists():
        return path
    base = out / "vit_tiny_random.pth"
    torch.save(random_vit_tiny().state_dict(), base)
    make_domain(out / "teacher_domain", 32, 8, seed, size=160, tint=TINT)
    args = ["--ckpt", str(base), "--method", "lora", "--merge", "--prompt", "gt_box"]
    args += [
        "--loss",
        "bce_dice",
        "--data",
        str(out / "teacher_domain"),
        "--out",
        str(out / "teacher"),
    ]
    args += ["--steps", str(steps), "--batch-size", "4", "--lr", "1e-3", "--val-every", str(steps)]
    args += ["--engine", "torch", "--workers", "0", "--no-progress", "--device", "cpu"]
    common.run_script("launch/adapt.py", *args, log=out / "teacher.log")
    return save_atomic(load_sam(out / "teacher" / "adapted.pt").state_dict(), path)


def distill(out: Path, name: str, steps: int, batch_size: int, extra: list[str]) -> Path:
    """One launch/distill.py run (one process); its student.pt."""
    student = out / name / "student.pt"
    if not student.exists():
        args = ["--shards", str(out / "cache"), "--out", str(out / name), "--steps", str(steps)]
        args += ["--batch-size", str(batch_size), "--teacher-ckpt", str(out / "teacher.pth")]
        args += ["--engine", "torch", "--workers", "0", "--no-progress", "--device", "cpu"]
        args += ["--log-every", "50", "--checkpoint-every", str(steps), *extra]
        common.run_script("launch/distill.py", *args, log=out / f"{name}.log")
    return student


def agreements(out: Path, name: str, student: Path, protocol: str) -> dict[int, float]:
    """Per held-out instance: the IoU of the student's mask with the teacher's, in percent."""
    report = out / f"eval_{name}_{protocol}.json"
    if not report.exists():
        args = ["--ckpt", str(student), "--coco-root", str(out / "held"), "--device", "cpu"]
        args += ["--compare-ckpt", str(out / "teacher.pth"), "--out", str(report)]
        common.run_script(
            "eval/coco.py", *args, *PROTOCOLS[protocol], log=report.with_suffix(".log")
        )
    rows = report.with_name(report.name + ".instances.jsonl").read_text().splitlines()
    return {r["id"]: 100 * r["agreement"][0] for r in map(json.loads, rows)}


def measure(
    out: Path,
    train_images: int = 1024,
    held_images: int = 192,
    teacher_steps: int = 300,
    phase1_steps: int = 600,
    extra_steps: int = 150,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """The whole benchmark (stages already done under `out` are reused); gain.json's figures."""
    setup = {k: v for k, v in locals().items() if k != "out"}
    out.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(out, teacher_steps, seed + 10)
    if not (out / "cache" / "manifest.json").exists():
        make_domain(out / "data", train_images, held_images, seed + 20, size=160, tint=TINT)
        domain_as_coco(out / "data", "train", out / "coco")
        domain_as_coco(out / "data", "val", out / "held")
        tiny = load_teacher("vit_tiny", teacher, taps=(1, 3))
        write_cache(tiny, plan_cache(str(out / "coco"), 32), out / "cache", progress=False)
    base = distill(out, "phase1", phase1_steps, batch_size, [*STUDENT, "--lr", "2e-3"])
    init = ["--init", str(base)]
    students = {
        "phase 1": base,
        "+ phase 1": distill(out, "more_phase1", extra_steps, batch_size, [*init, *MORE_PHASE1]),
        "+ phase 2": distill(out, "phase2", extra_steps, batch_size, [*init, *PHASE2]),
        "phase 1, all steps": distill(
            out, "phase1_long", phase1_steps + extra_steps, batch_size, [*STUDENT, "--lr", "2e-3"]
        ),
    }
    result = {"setup": setup}
    for protocol in PROTOCOLS:
        scores = {k: agreements(out, s.parent.name, s, protocol) for k, s in students.items()}
        result[protocol] = {
            "agreement": {k: sum(v.values()) / len(v) for k, v in scores.items()},
            "phase 2 - phase 1": common.paired(scores["+ phase 1"], scores["+ phase 2"]),
            "phase 2 - phase 1, all steps": common.paired(
                scores["phase 1, all steps"], scores["+ phase 2"]
            ),
            "phase 2 - start": common.paired(scores["phase 1"], scores["+ phase 2"]),
        }
    return result


def print_result(result: dict) -> None:
    print(f"{'held-out agreement mIoU':<28} {'single mask':>12} {'multimask':>10}")
    for name in result["single"]["agreement"]:
        row = [result[p]["agreement"][name] for p in PROTOCOLS]
        print(f"{name:<28} {row[0]:>12.1f} {row[1]:>10.1f}")
    for p in PROTOCOLS:
        for key in ("phase 2 - phase 1", "phase 2 - phase 1, all steps", "phase 2 - start"):
            d = result[p][key]
            print(
                f"{p}: {key} = {d['mean']:+.2f} +- {d['se']:.2f} (paired over {d['n']} "
                f"instances, standard error), improved {d['improved']:.0%}"
            )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(GainConfig, argv, __doc__)
    out = Path(cfg.out).resolve()  # the scripts it runs start in the repository
    setup = {k: v for k, v in vars(cfg).items() if k != "out"}
    result = measure(out, **setup)
    print_result(result)
    common.write_results(out / "gain.json", result, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
