r"""SAM-Lightening's claims (and EdgeSAM's phase 2), measured against the reference teacher: one
benchmark, every arm at equal data, steps and seed, paired per held-out instance.

    python launch/bench/claims.py [--work runs/claims] [--quick] \
        [--arms distill,dld,attention,phase2,deploy,adapters] [--out launch/bench/results/claims.json]

The teacher is the shipped `sam_mini` (teachers/sam_mini.py). Training scenes are
`eval.scenes.photos`' train split (seed 1), held-out scenes its held split (seed 2: photographs the
teacher never trained on). The teacher's features (`embed=fp16,blocks=int8`, its taps) are cached
once; every student is `dfa_t` distilled from that cache with the same batch, learning rate, seed
and steps, one process (`--engine torch`), and scored by `eval/coco.py` on the held-out scenes with
the GT-box protocol (multimask argmax; phase 2 also single-mask): per-instance GT IoU, and for the
distilled student the IoU with the teacher's mask (agreement). Each comparison is the paired mean
of the per-instance differences (points of IoU x 100), its standard error and the instances.

Arms (the questions of the plot's panels):

- distill: the distilled student (progressive DLD) against the undistilled one (the same `dfa_t`,
  initial weights, the teacher's decoder), the teacher and the box-fill baseline; the share of the
  teacher's GT mIoU the student keeps; and the same run with the next seed, the noise floor of
  every comparison (the paired standard error counts the held-out instances, not the training
  run's own spread).
- dld: progressive, stepwise, uniform and final_only layer weights (`--dld`).
- attention: DFA against windowed-only (`tile=8`) and global attention (`tile=64`) in every block
  of the same width, depth and MLP; plus CPU latency at 1024 px of the three, timed in turns.
- phase2: from the distilled student, `--extra-steps` of phase 2 (`--mask-target soft` and `hard`)
  against as many more phase-1 steps (final embedding, `--init`), single-mask and multimask.
- deploy: int8 through PyTorch (`torch.ao` dynamic, the Linear layers) and through onnxruntime
  (the encoder ONNX quantized dynamic and static, `students.quant`, scored through
  `students.onnx.OrtEncoder`), and heads/MLP pruning at half (`students.prune`, activation
  criterion on training scenes), before and after `--extra-steps` of re-distillation: the change
  in GT mIoU against the fp32 student.
- adapters: every registered adapter method (`students.adapters`) trained `--extra-steps` from the
  distilled student on a camouflage domain (held-out photographs, each object cut from its own
  background) and scored by eval/masks.py on its val split: the gain over the un-adapted student
  and over `decoder` (the mask decoder alone), with trainable parameters, saved-activation bytes
  and encoder latency against the student's.

Stages done under `--work` are reused; `--work` records the setup (work/setup.json), and a run
with another setup there is refused, naming what differs. --quick: a few scenes and steps (the
test's budget): the figures that must hold at any size are that distillation beats no
distillation and int8 keeps the fp32 student's mIoU within a point.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from launch.bench import common  # noqa: E402
from teachers.runtime.exits import exit_status  # noqa: E402
from teachers.runtime.files import write_text_atomic  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402
from teachers.sam_mini import SAM_MINI_PATH  # noqa: E402

ARMS = ("distill", "dld", "attention", "phase2", "deploy", "adapters")
CODEC = "embed=fp16,blocks=int8"
TRAIN_SEED, HELD_SEED = 1, 2
STUDENT = "dfa_t"
ATTENTION = {"dfa": "", "windowed": "tile=8", "global": "tile=64"}
PROTOCOLS = {"multimask": [], "single": ["--single-mask"]}
QUICK = dict(train_images=8, held_images=3, steps=8, extra_steps=2, batch_size=4, repeats=1)


@dataclass
class ClaimsConfig:
    """One run of the claims benchmark."""

    work: str = "runs/claims"
    """Folder for scenes, the cache, runs and evaluations (stages done there are reused)."""
    out: str = "launch/bench/results/claims.json"
    """The results JSON (the plot is written beside it, .png)."""
    arms: tuple[str, ...] = ARMS
    """Arms to run (distill always runs: the others start from or compare with it)."""
    quick: bool = False
    """The test's budget: a few scenes and steps (overrides the sizes below)."""
    train_images: int = 128
    """Training scenes cached for every arm."""
    held_images: int = 40
    """Held-out scenes scored (all their instances)."""
    steps: int = 150
    """Distillation steps of every phase-1 arm."""
    extra_steps: int = 40
    """Steps of each continuation from the distilled student (phase 2, more phase 1,
    re-distillation of a pruned student)."""
    batch_size: int = 8
    """Batch size of every run."""
    lr: float = 2e-3
    """Peak learning rate of every phase-1 arm."""
    repeats: int = 5
    """Timed runs per encoder in the attention arm's latency."""
    seed: int = 0
    """Seed of every distillation run."""

    def __post_init__(self) -> None:
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"--arms {sorted(unknown)}: choose from {', '.join(ARMS)}")
        for name, value in self.sizes.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    @property
    def sizes(self) -> dict:
        """The sizes this run uses: the flags', or --quick's."""
        return {k: getattr(self, k) for k in QUICK} | (QUICK if self.quick else {})

    def setup(self) -> dict:
        """What the stages under --work depend on."""
        from teachers.runtime.files import file_sha256

        teacher = {"teacher": "sam_mini", "teacher_sha256": file_sha256(SAM_MINI_PATH)}
        return {**self.sizes, "lr": self.lr, "seed": self.seed, "codec": CODEC, **teacher}


# --- stages ----------------------------------------------------------------------------------


def make_data(cfg: ClaimsConfig, work: Path) -> None:
    """Training and held-out scenes, and the teacher's cache of the training scenes."""
    from eval.scenes.photos import make_photo_coco
    from teachers import load_teacher
    from teachers.cache import plan_cache, write_cache

    s = cfg.sizes
    if not (work / "held" / "annotations").exists():
        make_photo_coco(work / "held", "held", s["held_images"], seed=HELD_SEED)
    if not (work / "cache" / "manifest.json").exists():
        make_photo_coco(work / "train", "train", s["train_images"], seed=TRAIN_SEED)
        plan = plan_cache(str(work / "train"), samples_per_shard=32)
        write_cache(load_teacher("sam_mini"), plan, work / "cache", codec=CODEC, progress=False)


def distill(cfg: ClaimsConfig, work: Path, name: str, steps: int, extra: list[str]) -> Path:
    """One `launch/distill.py` run (one process) into work/runs/NAME; its student.pt."""
    run = work / "runs" / name
    student = run / "student.pt"
    if not student.exists():
        args = ["--shards", str(work / "cache"), "--out", str(run), "--steps", str(steps)]
        args += ["--batch-size", str(cfg.sizes["batch_size"]), "--seed", str(cfg.seed)]
        args += ["--engine", "torch", "--workers", "0", "--no-progress", "--device", "cpu"]
        args += ["--log-every", "25", "--checkpoint-every", str(steps), *extra]
        # a run stopped part-way (a signal saves a checkpoint) continues where it stopped
        args += ["--resume", "auto"] if (run / "checkpoints").exists() else []
        common.run_entry("launch/distill.py", args, run.with_suffix(".log"))
    return student


def phase1(cfg: ClaimsConfig, work: Path, name: str, *flags: str) -> Path:
    """A phase-1 `dfa_t` from the cache at the arms' steps and learning rate."""
    extra = ["--student", STUDENT, "--lr", str(cfg.lr), *flags]
    return distill(cfg, work, name, cfg.sizes["steps"], extra)


def scores(work: Path, name: str, ckpt: Path, protocol: str = "multimask", teacher=False) -> dict:
    """Per held-out instance (by id): GT IoU x 100, and with `teacher` the agreement x 100 with
    the teacher's mask; from `eval/coco.py` (reused when its report exists)."""
    report = work / "eval" / f"{name}_{protocol}.json"
    if not report.exists():
        args = ["--ckpt", str(ckpt), "--coco-root", str(work / "held"), "--device", "cpu"]
        args += ["--out", str(report), "--no-progress", *PROTOCOLS[protocol]]
        args += ["--compare-ckpt", str(SAM_MINI_PATH), "--baseline", "box"] if teacher else []
        report.parent.mkdir(parents=True, exist_ok=True)
        common.run_entry("eval/coco.py", args, report.with_suffix(".log"))
    rows = [json.loads(r) for r in report.with_name(report.name + ".instances.jsonl").open()]
    out = {"gt": {r["id"]: 100 * r["iou"][0] for r in rows}}
    if teacher:
        out["teacher"] = {r["id"]: 100 * r["compare_iou"][0] for r in rows}
        out["box_fill"] = {r["id"]: 100 * r["baseline_iou"][0] for r in rows}
        out["agreement"] = {r["id"]: 100 * r["agreement"][0] for r in rows}
    return out


def mean(values: dict) -> float:
    return sum(values.values()) / len(values)


def model_scores(work: Path, name: str, sam, ckpt: Path) -> dict[int, float]:
    """GT IoU x 100 per held-out instance of an in-memory SAM (an int8 or pruned encoder that
    has no checkpoint of its own), through eval's own loop and protocol (multimask argmax)."""
    from segment_anything import SamPredictor

    from eval.config import EvalConfig
    from eval.evaluate import load_dataset, select_images
    from eval.runner import Model, Task, run_images

    path = work / "eval" / f"{name}_multimask.instances.json"
    if not path.exists():
        cfg = EvalConfig(dataset="coco", ckpt=str(ckpt), coco_root=str(work / "held"))
        ds = load_dataset(cfg)
        images, _ = select_images(cfg, ds)
        task = Task(cfg.prompt, cfg.num_clicks, cfg.task_protocol, cfg.prompt_chunk, None)
        model = Model(name, SamPredictor(sam.eval()))
        records = [r for recs in run_images(ds, images, [model], task, False) for r in recs]
        ious = {r["id"]: 100 * r["iou"][0] for r in records}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(ious))
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def compare(base: dict[int, float], new: dict[int, float]) -> dict[str, float]:
    """`new - base`, paired per instance (common.paired), with both means."""
    return common.paired(base, new) | {"base_miou": mean(base), "new_miou": mean(new)}


# --- arms ------------------------------------------------------------------------------------


def undistilled(cfg: ClaimsConfig, work: Path) -> Path:
    """`dfa_t` as distillation starts it (seeded initial weights) with the teacher's decoder."""
    from students import build_student, load_sam
    from students.export import save_student

    path = work / "runs" / "undistilled" / "student.pt"
    if not path.exists():
        manifest = json.loads((work / "cache" / "manifest.json").read_text())
        torch.manual_seed(cfg.seed)
        student = build_student(STUDENT, img_size=manifest["img_size"])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_student(
            path,
            student,
            load_sam(SAM_MINI_PATH),
            teacher="sam_mini",
            teacher_sha256=manifest["teacher_sha256"],
            step=0,
        )
    return path


def arm_distill(cfg: ClaimsConfig, work: Path) -> dict:
    student = scores(work, "progressive", phase1(cfg, work, "progressive"), teacher=True)
    none = scores(work, "undistilled", undistilled(cfg, work))["gt"]
    reseeded = phase1(cfg, work, "reseeded", "--seed", str(cfg.seed + 1))
    gt, teacher, fill = student["gt"], student["teacher"], student["box_fill"]
    return {
        "miou": {
            "student": mean(gt),
            "undistilled": mean(none),
            "teacher": mean(teacher),
            "box_fill": mean(fill),
        },
        "agreement": mean(student["agreement"]),
        "share_of_teacher": mean(gt) / mean(teacher),
        "student - undistilled": compare(none, gt),
        "student - teacher": compare(teacher, gt),
        "student - box fill": compare(fill, gt),
        # the noise floor of every other comparison: the same run with another seed
        "student, next seed - student": compare(gt, scores(work, "reseeded", reseeded)["gt"]),
        "latency_ms_512": teacher_latency(cfg, work),
    }


def teacher_latency(cfg: ClaimsConfig, work: Path) -> dict[str, float]:
    """CPU ms per image at the teacher's 512 px of its encoder and the student's, in turns."""
    from students import load_sam

    modules = {
        "teacher": load_sam(SAM_MINI_PATH).image_encoder,
        "student": load_sam(work / "runs" / "progressive" / "student.pt").image_encoder,
    }
    return common.latency_ms(modules, torch.randn(1, 3, 512, 512), cfg.sizes["repeats"])


def arm_dld(cfg: ClaimsConfig, work: Path) -> dict:
    base = scores(work, "progressive", phase1(cfg, work, "progressive"))["gt"]
    out = {}
    for mode in ("stepwise", "uniform", "final_only"):
        other = scores(work, mode, phase1(cfg, work, mode, "--dld", mode))["gt"]
        out[f"progressive - {mode}"] = compare(other, base)
    return out


def latencies(cfg: ClaimsConfig) -> dict[str, float]:
    """CPU ms per 1024 px image of the three attention forms, timed in turns."""
    from distill.config import parse_number_options
    from students import build_student

    modules = {
        name: build_student(
            STUDENT, img_size=1024, **parse_number_options(options, "--student-options", "tile=8")
        )
        for name, options in ATTENTION.items()
    }
    x = torch.randn(1, 3, 1024, 1024)
    return common.latency_ms(modules, x, cfg.sizes["repeats"])


def arm_attention(cfg: ClaimsConfig, work: Path) -> dict:
    base = scores(work, "progressive", phase1(cfg, work, "progressive"))["gt"]
    out = {}
    for name, options in ATTENTION.items():
        if name != "dfa":
            ckpt = phase1(cfg, work, f"attention_{name}", "--student-options", options)
            out[f"dfa - {name}"] = compare(scores(work, f"attention_{name}", ckpt)["gt"], base)
    ms = latencies(cfg)
    return out | {
        "latency_ms_1024": ms,
        "latency_ratio_to_dfa": {k: v / ms["dfa"] for k, v in ms.items()},
    }


# Continuations from the distilled student, at one learning rate: more phase 1 on the final
# embedding (the tap projections would start fresh under --init), or phase 2 (the decoder's
# masks as targets). A fresh AdamW's first steps move every weight by about the learning rate,
# so a larger one first undoes part of what the student learned.
MORE_PHASE1 = ["--lr", "1e-4", "--dld", "final_only"]
PHASE2 = ["--phase", "decoder", "--lr", "1e-4"]


def arm_phase2(cfg: ClaimsConfig, work: Path) -> dict:
    start = phase1(cfg, work, "progressive")
    steps, init = cfg.sizes["extra_steps"], ["--init", str(start)]
    runs = {"more_phase1": distill(cfg, work, "more_phase1", steps, [*init, *MORE_PHASE1])}
    for target in ("soft", "hard"):
        flags = [*init, *PHASE2, "--mask-target", target]
        runs[f"phase2_{target}"] = distill(cfg, work, f"phase2_{target}", steps, flags)
    out = {}
    for protocol in PROTOCOLS:
        got = {k: scores(work, k, ckpt, protocol)["gt"] for k, ckpt in runs.items()}
        for target in ("soft", "hard"):
            out[f"{protocol}: phase2 {target} - phase1"] = compare(
                got["more_phase1"], got[f"phase2_{target}"]
            )
    return out


def calibration(work: Path, num: int = 8) -> torch.Tensor:
    """Preprocessed training scenes for the pruning criterion."""
    from teachers.cache_read import cache_images

    return cache_images(str(work / "cache"), num, 512, flag="--work")


def onnx_int8(work: Path, encoder: torch.nn.Module, mode: str) -> Path:
    """The encoder's ONNX quantized to int8 (`students.quant`: `dynamic`, or `static` calibrated
    on training scenes), written once under work/onnx."""
    from students.onnx import export_onnx
    from students.quant import quantize_onnx

    path = work / "onnx" / f"encoder_int8_{mode}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fp32 = export_onnx(encoder, work / "onnx" / "encoder.onnx")
        part = quantize_onnx(fp32, path.with_suffix(".part"), mode, calibration(work))
        part.replace(path)
    return path


def arm_deploy(cfg: ClaimsConfig, work: Path) -> dict:
    from students import load_sam
    from students.export import save_student
    from students.onnx import OrtEncoder
    from students.prune import prune_student
    from students.quant import quantize_torch

    ckpt = phase1(cfg, work, "progressive")
    base = scores(work, "progressive", ckpt)["gt"]
    sam = load_sam(ckpt)
    encoder = sam.image_encoder
    sam.image_encoder = quantize_torch(encoder)
    out = {"int8_torch - fp32": compare(base, model_scores(work, "int8_torch", sam, ckpt))}
    for mode in ("dynamic", "static"):  # the encoder file a user deploys, through onnxruntime
        sam.image_encoder = OrtEncoder(onnx_int8(work, encoder, mode))
        got = model_scores(work, f"int8_onnx_{mode}", sam, ckpt)
        out[f"int8_onnx_{mode} - fp32"] = compare(base, got)
    sam.image_encoder = encoder
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    for target in ("heads", "mlp"):
        path = work / "runs" / f"pruned_{target}" / "student.pt"
        if not path.exists():
            pruned, _ = prune_student(encoder, target, 0.5, calibration(work))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_student(
                path,
                pruned,
                sam,
                teacher="sam_mini",
                teacher_sha256=manifest["teacher_sha256"],
                step=0,
            )
        again = distill(
            cfg,
            work,
            f"redistilled_{target}",
            cfg.sizes["extra_steps"],
            ["--init", str(path), *MORE_PHASE1],
        )
        out[f"pruned {target} 0.5 - fp32"] = compare(
            base, scores(work, f"pruned_{target}", path)["gt"]
        )
        out[f"pruned {target} 0.5, re-distilled - fp32"] = compare(
            base, scores(work, f"redistilled_{target}", again)["gt"]
        )
    return out


# The adapters train on a camouflage domain at the arms' extra steps and batch, each method with
# its defaults and the same learning rate; CAD at the width and input size its CPU runs use.
ADAPT_OPTIONS = {"cad": "width=32,input_size=128"}


def camouflage(cfg: ClaimsConfig, work: Path) -> Path:
    """The shifted domain: held-out photographs, each object cut from its own background."""
    from eval.scenes.photos import make_camouflage_domain

    root = work / "domain"
    if not (root / "val").exists():
        s = cfg.sizes
        num_train, num_val = max(4, s["train_images"] // 8), max(2, s["held_images"] // 2)
        make_camouflage_domain(root, num_train=num_train, num_val=num_val, size=256)
    return root


def adapt(cfg: ClaimsConfig, work: Path, method: str, start: Path, domain: Path) -> Path:
    """One `launch/adapt.py` run (one process) of `method` from `start`; its adapted.pt."""
    run = work / "adapt" / method
    if not (run / "adapted.pt").exists():
        steps = str(cfg.sizes["extra_steps"])
        args = ["--ckpt", str(start), "--method", method, "--data", str(domain)]
        args += ["--out", str(run), "--steps", steps, "--batch-size", str(cfg.sizes["batch_size"])]
        args += ["--seed", str(cfg.seed), "--engine", "torch", "--workers", "0", "--no-progress"]
        args += ["--device", "cpu", "--val-every", steps, "--checkpoint-every", steps]
        args += ["--options", ADAPT_OPTIONS[method]] if method in ADAPT_OPTIONS else []
        args += ["--resume", "auto"] if (run / "checkpoints").exists() else []
        common.run_entry("launch/adapt.py", args, run.with_suffix(".log"))
    return run / "adapted.pt"


def domain_scores(work: Path, method: str, ckpt: Path, start: Path, domain: Path) -> tuple:
    """IoU x 100 per val image of the adapted model and of the un-adapted student (eval/masks.py,
    full-image box as in training), kept in work/eval."""
    from eval.config import MaskEvalConfig
    from eval.masks import evaluate

    path = work / "eval" / f"adapt_{method}.json"
    if not path.exists():
        cfg = MaskEvalConfig(ckpt=str(ckpt), compare_ckpt=str(start), data=str(domain))
        cfg.device, cfg.progress = "cpu", False
        report = evaluate(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(report))
    models = json.loads(path.read_text())["models"]
    return tuple({i: 100 * v for i, v in enumerate(m["iou_per_image"])} for m in models)


def adapter_costs(cfg: ClaimsConfig, start: Path, ckpts: dict[str, Path]) -> dict[str, dict]:
    """Per method: trainable parameters (adapter, and with the mask decoder), bytes autograd saves
    in one training forward of one 512-px image, and encoder latency against the student's (CPU,
    timed in turns)."""
    from students import load_sam
    from students.adapters.model import PromptedSam, set_trainable

    x = torch.randn(1, 3, 512, 512)
    encoders, out = {"student": load_sam(start).image_encoder}, {}
    for method, ckpt in ckpts.items():
        sam = load_sam(ckpt)
        set_trainable(sam, train_decoder=True)
        model = PromptedSam(sam).train()
        box = torch.tensor([[0.0, 0.0, 512.0, 512.0]])
        out[method] = {
            "trainable": sum(p.numel() for p in sam.parameters() if p.requires_grad),
            "trainable_adapter": getattr(sam.image_encoder, "num_trainable", 0),
            **common.saved_bytes(model, x, box),
        }
        encoders[method] = sam.image_encoder.eval()
    ms = common.latency_ms(encoders, x, cfg.sizes["repeats"])
    for method in ckpts:
        out[method]["latency_ratio"] = ms[method] / ms["student"]
    return out


def arm_adapters(cfg: ClaimsConfig, work: Path) -> dict:
    from students.adapters import list_adapters

    start, domain = phase1(cfg, work, "progressive"), camouflage(cfg, work)
    ckpts = {m: adapt(cfg, work, m, start, domain) for m in list_adapters()}
    scored = {m: domain_scores(work, m, c, start, domain) for m, c in ckpts.items()}
    none, decoder = scored["decoder"][1], scored["decoder"][0]
    out = {}
    for method, (got, _) in scored.items():
        out[f"{method} - un-adapted"] = compare(none, got)
        if method != "decoder":
            out[f"{method} - decoder"] = compare(decoder, got)
    return out | {"costs": adapter_costs(cfg, start, ckpts)}


RUNNERS = {
    "distill": arm_distill,
    "dld": arm_dld,
    "attention": arm_attention,
    "phase2": arm_phase2,
    "deploy": arm_deploy,
    "adapters": arm_adapters,
}


# --- output ----------------------------------------------------------------------------------


def comparisons(result: dict) -> list[tuple[str, str, dict]]:
    """(arm, comparison, paired figures) of every paired comparison in `result`, in order."""
    return [
        (arm, key, value)
        for arm in ARMS
        for key, value in result.get(arm, {}).items()
        if isinstance(value, dict) and "se" in value
    ]


def plot(result: dict, path: Path) -> Path:
    """Bars with error bars (paired mean difference +- standard error), one panel per arm."""
    rows = comparisons(result)
    panels = {a: [(k, v) for arm, k, v in rows if arm == a] for a in ARMS if a in result}
    label = "held-out GT mIoU difference, points (paired mean +- standard error)"
    return common.paired_bars(panels, path, label)


def doc_table(result: dict) -> dict:
    """The docs' table (launch/bench/tables.py renders it): one row per paired comparison."""
    rows = [
        [
            arm,
            key,
            f"{v['base_miou']:.1f}",
            f"{v['new_miou']:.1f}",
            f"{v['mean']:+.2f} +- {v['se']:.2f}",
            v["n"],
            f"{v['improved']:.0%}",
        ]
        for arm, key, v in comparisons(result)
        if arm != "adapters"  # scored on their own domain: `adapter_table`
    ]
    s = result["setup"]
    caption = (
        f"Claims on the reference teacher `sam_mini` (sha256 {s['teacher_sha256'][:12]}): "
        f"`dfa_t` students, {s['steps']} steps at batch "
        f"{s['batch_size']} from {s['train_images']} cached training scenes, scored on "
        f"{s['held_images']} held-out scenes (GT boxes, all instances). Difference: new - base, "
        "held-out GT IoU points, paired per instance, +- one standard error."
    )
    header = ["arm", "comparison", "base mIoU", "new mIoU", "difference", "instances"]
    return {"caption": caption, "header": [*header, "improved"], "rows": rows}


def adapter_table(result: dict) -> dict:
    """The docs' adapter table: per method its gains (paired per val image) and its costs."""
    arm = result["adapters"]

    def gain(key: str) -> str:
        v = arm.get(key)
        return "" if v is None else f"{v['mean']:+.1f} +- {v['se']:.1f}"

    rows = [
        [
            f"`{method}`",
            f"{arm[f'{method} - un-adapted']['new_miou']:.1f}",
            gain(f"{method} - un-adapted"),
            gain(f"{method} - decoder"),
            f"{c['trainable_adapter']:,}",
            f"{c['trainable']:,}",
            f"{c['saved_bytes'] / 2**20:.0f}",
            f"{c['latency_ratio']:.2f}x",
        ]
        for method, c in arm["costs"].items()
    ]
    first = next(iter(arm.values()))
    s = result["setup"]
    caption = (
        f"Adapters on the camouflage domain ({first['n']} val images, full-image box): each "
        f"method {s['extra_steps']} steps at batch {s['batch_size']} from the distilled `dfa_t`; "
        f"val IoU x 100, gains paired per image +- one standard error (the un-adapted student: "
        f"{first['base_miou']:.1f}). Saved bytes: what autograd keeps in one training forward of "
        "one 512-px image; latency: the adapted encoder's CPU time over the student's."
    )
    header = ["method", "val IoU", "gain over un-adapted", "gain over decoder"]
    header += ["trainable (adapter)", "trainable (with decoder)", "saved MiB", "latency"]
    return {"caption": caption, "header": header, "rows": rows}


def headline(result: dict) -> str:
    """One sentence for the README: the share of the teacher's mIoU kept, at what latency."""
    d = result["distill"]
    ms = d["latency_ms_512"]
    return (
        f"distilled from the reference teacher, `dfa_t` keeps {d['share_of_teacher']:.0%} of its "
        f"held-out GT mIoU ({d['miou']['student']:.1f} against {d['miou']['teacher']:.1f}; box "
        f"fill {d['miou']['box_fill']:.1f}) at {ms['student'] / ms['teacher']:.2f}x its CPU "
        "latency"
    )


def print_result(result: dict) -> None:
    if "distill" in result:
        d = result["distill"]
        m = d["miou"]
        print(
            f"held-out GT mIoU: student {m['student']:.1f}, undistilled {m['undistilled']:.1f}, "
            f"teacher {m['teacher']:.1f}, box fill {m['box_fill']:.1f}; the student keeps "
            f"{d['share_of_teacher']:.0%} of the teacher's, agreement {d['agreement']:.1f}"
        )
    for table in [doc_table(result)] + ([adapter_table(result)] if "adapters" in result else []):
        common.print_table(table["header"], table["rows"])
    if "attention" in result:
        ms = result["attention"]["latency_ms_1024"]
        print("CPU latency at 1024 px: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items()))


def run(cfg: ClaimsConfig) -> dict:
    """Every asked arm (distill first); the figures."""
    work = Path(cfg.work).resolve()  # the scripts it runs start in the repository
    common.check_setup(work, cfg.setup())
    make_data(cfg, work)
    result = {"setup": cfg.setup()}
    for arm in ARMS:
        if arm == "distill" or arm in cfg.arms:
            print(f"== {arm}", flush=True)
            result[arm] = RUNNERS[arm](cfg, work)
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ClaimsConfig, argv, __doc__)

    def bench() -> None:
        result = run(cfg)
        print_result(result)
        out = Path(cfg.out)
        result["tables"] = {"claims": doc_table(result), "headline": headline(result)}
        if "adapters" in result:
            result["tables"]["adapters"] = adapter_table(result)
        result["plot"] = str(plot(result, out.with_suffix(".png")))
        common.write_results(out, result, cfg, script=__file__, argv=argv)
        print(f"wrote {out} and {result['plot']}")

    return exit_status(bench)


if __name__ == "__main__":
    sys.exit(main())
