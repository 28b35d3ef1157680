"""The claims benchmark's stages, each done once under --work and reused after: the training and
held-out scenes, the teacher's cache, distillation runs (one process, `--engine torch`) and their
per-instance scores on the held-out scenes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launch.bench import common
from teachers.sam_mini import SAM_MINI_PATH

ARMS = ("distill", "dld", "attention", "phase2", "deploy", "adapters")
CODEC = "embed=fp16,blocks=int8"
TRAIN_SEED, HELD_SEED = 1, 2
STUDENT = "dfa_t"
PROTOCOLS = {"multimask": [], "single": ["--single-mask"]}


def make_data(cfg, work: Path) -> None:
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


def distill(cfg, work: Path, name: str, steps: int, extra: list[str]) -> Path:
    """One `launch/distill.py` run (one process) into work/runs/NAME; its student.pt."""
    args = ["--shards", str(work / "cache"), "--steps", str(steps)]
    args += ["--batch-size", str(cfg.sizes["batch_size"]), "--seed", str(cfg.seed)]
    args += ["--engine", "torch", "--workers", "0", "--no-progress", "--device", "cpu"]
    args += ["--log-every", "25", "--checkpoint-every", str(steps), *extra]
    return common.train_once("launch/distill.py", work / "runs" / name, "student.pt", args)


def phase1(cfg, work: Path, name: str, *flags: str) -> Path:
    """A phase-1 `dfa_t` from the cache at the arms' steps and learning rate."""
    extra = ["--student", STUDENT, "--lr", str(cfg.lr), *flags]
    return distill(cfg, work, name, cfg.sizes["steps"], extra)


def scores(work: Path, name: str, ckpt: Path, protocol: str = "multimask", teacher=False) -> dict:
    """Per held-out instance (by id): GT IoU x 100, and with `teacher` the agreement x 100 with
    the teacher's mask, the teacher's and the box fill's GT IoU; from `eval/coco.py`."""
    flags = PROTOCOLS[protocol]
    flags += ["--compare-ckpt", str(SAM_MINI_PATH), "--baseline", "box"] if teacher else []
    report = work / "eval" / f"{name}_{protocol}.json"
    rows = common.coco_records(report, ckpt, work / "held", *flags)
    keys = {"gt": "iou"} | (
        {"teacher": "compare_iou", "box_fill": "baseline_iou", "agreement": "agreement"}
        if teacher
        else {}
    )
    return {k: {r["id"]: 100 * r[field][0] for r in rows} for k, field in keys.items()}


def model_scores(work: Path, name: str, sam, ckpt: Path) -> dict[int, float]:
    """GT IoU x 100 per held-out instance of an in-memory SAM (`common.memory_scores`)."""
    path = work / "eval" / f"{name}_multimask.instances.json"
    return common.memory_scores(path, name, sam, ckpt, work / "held")


def undistilled(cfg, work: Path) -> Path:
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


def calibration(work: Path, num: int = 8) -> torch.Tensor:
    """Preprocessed training scenes for the pruning criterion."""
    from teachers.cache_read import cache_images

    return cache_images(str(work / "cache"), num, 512, flag="--work")
