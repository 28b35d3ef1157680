"""From per-instance records to the figures of the output JSON and the printed table.

Records (one per evaluated annotation, or per detection) as `eval.runner.image_records` makes
them:

- GT prompts: `id` (annotation id), `image_id`, `area`, `iscrowd`, `iou` (IoU in [0, 1] with
  the GT after each click count; one value for boxes), and with a comparison model
  `compare_iou` and `agreement` (IoU between the two models' masks).
- Detections: `id` (index in the detections file), `image_id`, `category_id`, `score`,
  `segmentation` (RLE), and with a comparison model `compare_segmentation` and `agreement`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from eval.metrics import BUCKETS, detection_ap, miou_by_area


def _per_step(records: Sequence[dict], key: str) -> list[dict]:
    """miou_by_area after each step of `records[*][key]`."""
    areas = [r["area"] for r in records]
    num_steps = len(records[0][key])
    return [miou_by_area(areas, [r[key][k] for r in records]) for k in range(num_steps)]


def _miou_figures(records: Sequence[dict], key: str, points: bool) -> dict:
    steps = _per_step(records, key)
    out = {"miou": steps[-1]["miou"]}
    if points:
        out["miou_per_click"] = {str(k + 1): s["miou"] for k, s in enumerate(steps)}
    return out


def gt_figures(records: Sequence[dict], points: bool) -> dict:
    """mIoU x 100 by area bucket (after the last click for points, and per click count), the
    instance counts, and with a comparison model its mIoU and the agreement between the two."""
    if not records:
        raise ValueError("no instance was evaluated (every image skipped?)")
    figures = {"num_instances": len(records), "count": _per_step(records, "iou")[0]["count"]}
    figures.update(_miou_figures(records, "iou", points))
    if "agreement" in records[0]:
        figures["compare"] = {
            **_miou_figures(records, "compare_iou", points),
            "agreement": _miou_figures(records, "agreement", points),
        }
    if "baseline_iou" in records[0]:
        figures["baseline_box"] = _miou_figures(records, "baseline_iou", False)
    return figures


def det_figures(
    records: Sequence[dict], kind: str, gt: dict, img_ids: Sequence[int], min_gt_area: float | None
) -> dict:
    """Mask AP of the model's masks (and the comparison model's), over images `img_ids`."""
    figures = {
        "num_instances": len(records),
        "ap": detection_ap(kind, gt, records, img_ids, min_gt_area),
    }
    if records and "agreement" in records[0]:
        renamed = [{**r, "segmentation": r["compare_segmentation"]} for r in records]
        mean = 100.0 * sum(r["agreement"][-1] for r in records) / len(records)
        figures["compare"] = {
            "ap": detection_ap(kind, gt, renamed, img_ids, min_gt_area),
            "agreement": {"miou": {"all": mean}},
        }
    return figures


def _fmt(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.2f}"


def _miou_rows(label: str, figures: dict) -> list[str]:
    per_click = figures.get("miou_per_click")
    if per_click is None:
        return [f"{label:<34}" + " ".join(_fmt(figures["miou"][b]) for b in BUCKETS)]
    return [
        f"{label + f', {k} click' + ('s' if k != '1' else ''):<34}"
        + " ".join(_fmt(m[b]) for b in BUCKETS)
        for k, m in per_click.items()
    ]


def _labels(summary: dict) -> tuple[str, str]:
    """Row labels of the two models: file names, with their folder when the names clash
    (runs/a/student.pt vs runs/b/student.pt)."""
    paths = [Path(summary["model"]), Path(summary.get("compare_model") or "-")]
    if paths[0].name == paths[1].name:
        return tuple(str(Path(p.parent.name) / p.name) for p in paths)
    return paths[0].name, paths[1].name


def _ap_rows(summary: dict, model: str, other: str) -> list[str]:
    names = [k for k in summary["ap"] if k.startswith("AP")]
    lines = [f"{'mask AP':<34}" + " ".join(f"{n:>6}" for n in names)]
    lines.append(f"{model:<34}" + " ".join(_fmt(summary["ap"][n]) for n in names))
    if "compare" in summary:
        cmp = summary["compare"]
        lines.append(f"{other:<34}" + " ".join(_fmt(cmp["ap"][n]) for n in names))
        lines.append(f"{'agreement (mIoU)':<34}" + _fmt(cmp["agreement"]["miou"]["all"]))
    return lines


def format_table(summary: dict) -> str:
    """The table printed at the end of a run (or a merge)."""
    p, d = summary["protocol"], summary["dataset"]
    det = p["prompt"] == "detections"
    switches = "multimask argmax" if p["multimask_output"] else "single mask"
    if not det:
        switches = ("crowd included, " if p["include_crowd"] else "crowd dropped, ") + switches
    head = (
        f"{d['kind'].upper()} {d['split']} | {'detector-box' if det else p['prompt']} prompts | "
        f"protocol {p['name']} ({switches}) | {summary['num_instances']} "
        f"{'detections' if det else 'instances'} on {summary['num_images']} images "
        f"({summary['num_images_skipped']} skipped)"
    )
    if summary.get("num_annotations_skipped"):
        head += f" | {summary['num_annotations_skipped']} annotations skipped (bad geometry)"
    model, other = _labels(summary)
    if det:
        return "\n".join([head, *_ap_rows(summary, model, other)])
    lines = [head, f"{'mIoU':<34}" + " ".join(f"{b:>6}" for b in BUCKETS)]
    lines += _miou_rows(model, summary)
    if "compare" in summary:
        lines += _miou_rows(other, summary["compare"])
        lines += _miou_rows("agreement", summary["compare"]["agreement"])
    if "baseline_box" in summary:
        lines += _miou_rows("box-fill baseline", summary["baseline_box"])
    lines.append(f"{'instances':<34}" + " ".join(f"{summary['count'][b]:6d}" for b in BUCKETS))
    return "\n".join(lines)
