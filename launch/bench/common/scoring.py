"""Scoring students on a COCO folder of held-out scenes with the project's evaluation, per instance,
so that two models compare paired: `eval/coco.py` on a checkpoint (run in this process once, its
report reused after), or eval's own loop on a SAM held in memory (an int8 or pruned encoder with
no checkpoint of its own); and the paired comparison of two such score sets."""

from __future__ import annotations

import json
from pathlib import Path

from launch.bench.common.results import paired
from launch.bench.common.runs import run_entry
from teachers.runtime.files import write_text_atomic


def coco_records(report: Path, ckpt: Path, coco_root: Path, *flags: str) -> list[dict]:
    """The per-instance records of `eval/coco.py --ckpt CKPT --coco-root ROOT FLAGS` on CPU, its
    report at `report` (reused when it exists)."""
    if not report.exists():
        args = ["--ckpt", str(ckpt), "--coco-root", str(coco_root), "--device", "cpu"]
        args += ["--out", str(report), "--no-progress", *flags]
        report.parent.mkdir(parents=True, exist_ok=True)
        run_entry("eval/coco.py", args, report.with_suffix(".log"))
    lines = report.with_name(report.name + ".instances.jsonl").read_text().splitlines()
    return [json.loads(r) for r in lines]


def memory_scores(path: Path, name: str, sam, ckpt: Path, coco_root: Path) -> dict[int, float]:
    """GT IoU x 100 per instance of an in-memory SAM through eval's own loop and protocol (GT
    boxes, multimask argmax), kept in `path` (reused when it exists). `ckpt` names the dataset
    run in eval's config; the model scored is `sam`."""
    from segment_anything import SamPredictor

    from eval.config import EvalConfig
    from eval.evaluate import load_dataset, select_images
    from eval.runner import Model, Task, run_images

    if not path.exists():
        cfg = EvalConfig(dataset="coco", ckpt=str(ckpt), coco_root=str(coco_root))
        ds = load_dataset(cfg)
        images, _ = select_images(cfg, ds)
        task = Task(cfg.prompt, cfg.num_clicks, cfg.task_protocol, cfg.prompt_chunk, None)
        model = Model(name, SamPredictor(sam.eval()))
        records = [r for recs in run_images(ds, images, [model], task, False) for r in recs]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({r["id"]: 100 * r["iou"][0] for r in records}))
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def mean(values: dict) -> float:
    return sum(values.values()) / len(values)


def compare(base: dict[int, float], new: dict[int, float]) -> dict[str, float]:
    """`new - base`, paired per instance (`paired`), with both means."""
    return paired(base, new) | {"base_miou": mean(base), "new_miou": mean(new)}
