"""The claims benchmark's arms: one function per question, each `(cfg, work) -> figures`, where
every comparison is `common.compare`'s paired per-instance difference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launch.bench import common
from launch.bench._claims.stages import (
    PROTOCOLS,
    STUDENT,
    calibration,
    distill,
    model_scores,
    phase1,
    scores,
    undistilled,
)
from teachers.runtime.files import write_text_atomic
from teachers.sam_mini import SAM_MINI_PATH

ATTENTION = {"dfa": "", "windowed": "tile=8", "global": "tile=64"}
mean, compare = common.mean, common.compare


def arm_distill(cfg, work: Path) -> dict:
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


def teacher_latency(cfg, work: Path) -> dict[str, float]:
    """CPU ms per image at the teacher's 512 px of its encoder and the student's, in turns."""
    from students import load_sam

    modules = {
        "teacher": load_sam(SAM_MINI_PATH).image_encoder,
        "student": load_sam(work / "runs" / "progressive" / "student.pt").image_encoder,
    }
    return common.latency_ms(modules, torch.randn(1, 3, 512, 512), cfg.sizes["repeats"])


def arm_dld(cfg, work: Path) -> dict:
    base = scores(work, "progressive", phase1(cfg, work, "progressive"))["gt"]
    out = {}
    for mode in ("stepwise", "uniform", "final_only"):
        other = scores(work, mode, phase1(cfg, work, mode, "--dld", mode))["gt"]
        out[f"progressive - {mode}"] = compare(other, base)
    return out


def latencies(cfg) -> dict[str, float]:
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


def arm_attention(cfg, work: Path) -> dict:
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


def arm_phase2(cfg, work: Path) -> dict:
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


def onnx_int8(work: Path, encoder: torch.nn.Module, mode: str) -> Path:
    """The encoder's ONNX quantized to int8 (`students.quant`: `dynamic`, or `static` calibrated
    on training scenes), written once under work/onnx."""
    from students.onnx import export_onnx
    from students.quant import quantize_onnx

    fp32, path = work / "onnx" / "encoder.onnx", work / "onnx" / f"encoder_int8_{mode}.onnx"
    if not fp32.exists():  # one export serves both modes
        fp32.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(encoder, fp32.with_suffix(".part")).replace(fp32)
    if not path.exists():
        quantize_onnx(fp32, path.with_suffix(".part"), mode, calibration(work)).replace(path)
    return path


def arm_deploy(cfg, work: Path) -> dict:
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
# its defaults and the same learning rate; CAD at the width and input size its CPU runs use. The
# box prompt is the mask's: the distilled student does not find a camouflaged object unprompted
# (under the full-image box the mask loss shrinks its masks towards empty; students/README.md).
ADAPT_OPTIONS = {"cad": "width=32,input_size=128"}


def camouflage(cfg, work: Path) -> Path:
    """The shifted domain: held-out photographs, each object cut from its own background."""
    from eval.scenes.photos import make_camouflage_domain

    root = work / "domain"
    if not (root / "val").exists():
        s = cfg.sizes
        num_train, num_val = s["train_images"], s["held_images"]
        make_camouflage_domain(root, num_train=num_train, num_val=num_val, size=256)
    return root


def adapt(cfg, work: Path, method: str, start: Path, domain: Path) -> Path:
    """One `launch/adapt.py` run (one process) of `method` from `start`; its adapted.pt."""
    steps = str(cfg.sizes["extra_steps"])
    args = ["--ckpt", str(start), "--method", method, "--data", str(domain)]
    args += ["--steps", steps, "--batch-size", str(cfg.sizes["batch_size"])]
    args += ["--seed", str(cfg.seed), "--engine", "torch", "--workers", "0", "--no-progress"]
    args += ["--device", "cpu", "--val-every", steps, "--checkpoint-every", steps]
    args += ["--prompt", "gt_box"]
    args += ["--options", ADAPT_OPTIONS[method]] if method in ADAPT_OPTIONS else []
    return common.train_once("launch/adapt.py", work / "adapt" / method, "adapted.pt", args)


def domain_scores(work: Path, name: str, ckpt: Path, domain: Path) -> dict[int, float]:
    """IoU x 100 per val image (in the split's order) of `ckpt` on the domain (eval/masks.py, the
    mask's box as in training), kept in work/eval."""
    from eval.config import MaskEvalConfig
    from eval.masks import evaluate

    path = work / "eval" / f"adapt_{name}.json"
    if not path.exists():
        cfg = MaskEvalConfig(ckpt=str(ckpt), data=str(domain))
        cfg.prompt = "gt_box"
        cfg.device, cfg.progress = "cpu", False
        report = evaluate(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(report))
    model = json.loads(path.read_text())["models"][0]  # the report's first model is --ckpt
    return dict(enumerate(100 * v for v in model["iou_per_image"]))


def adapter_costs(cfg, start: Path, ckpts: dict[str, Path]) -> dict[str, dict]:
    """Per method: trainable parameters (adapter, and with the mask decoder), bytes autograd saves
    in one training forward of one 512-px image, and encoder latency against the student's (CPU,
    timed in turns)."""
    from students import load_sam
    from students.adapters.model import PromptedSam, set_trainable

    x, box = torch.randn(1, 3, 512, 512), torch.tensor([[0.0, 0.0, 512.0, 512.0]])
    encoders, out = {"student": load_sam(start).image_encoder}, {}
    for method, ckpt in ckpts.items():
        sam = load_sam(ckpt)
        set_trainable(sam, train_decoder=True)
        model = PromptedSam(sam).train()
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


def arm_adapters(cfg, work: Path) -> dict:
    from students.adapters import list_adapters

    start, domain = phase1(cfg, work, "progressive"), camouflage(cfg, work)
    ckpts = {m: adapt(cfg, work, m, start, domain) for m in list_adapters()}
    scored = {m: domain_scores(work, m, c, domain) for m, c in ckpts.items()}
    none, decoder = domain_scores(work, "un-adapted", start, domain), scored["decoder"]
    out = {}
    for method, got in scored.items():
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
