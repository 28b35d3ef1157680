r"""Binary-mask evaluation of an adapted model (or a student, or SAM) on a domain's split.

    python eval/masks.py --ckpt runs/cod_conv_lora/adapted.pt --data /data/COD10K \
        [--split val] [--prompt full_box|gt_box] [--compare-ckpt runs/dfa_s/student.pt] \
        [--base runs/dfa_s/student.pt] [--out results.json] [--vis DIR --vis-limit N]

Every image is prompted with one box (`teachers.mask_folders.prompt_box`: the whole image, or the
ground-truth mask's box) and scored by `students.adapters.model.predict_prob`, the function the
training's validation uses, so the two agree. Metrics (`eval.mask_metrics.MaskScores`): IoU,
Dice, MAE, BER (x 100) and pysodmetrics' S-measure, weighted F and mean E-measure. With
--compare-ckpt both models see the same images and prompts; the table's last row and the JSON's
`difference` are --ckpt minus --compare-ckpt. Bad pairs: --on-bad skip counts them (the table's
header and the JSON's `skips`), stop ends with exit 2 naming the file.
"""

import sys
from pathlib import Path

# `python eval/masks.py` puts eval/ first on sys.path, where its files would shadow packages
# (eval/lvis.py hides the `lvis` package); drop it and put the repository root instead.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from tqdm import tqdm  # noqa: E402

from eval.config import MaskEvalConfig  # noqa: E402
from eval.mask_metrics import THRESHOLD, MaskScores  # noqa: E402
from eval.parts import write_json  # noqa: E402
from eval.vis import blend  # noqa: E402
from students import load_sam  # noqa: E402
from students.adapters.model import PromptedSam, predict_prob  # noqa: E402
from teachers.mask_folders import (  # noqa: E402
    MaskDataError,
    Skips,
    coco_split,
    iter_pairs,
    list_pairs,
    prompt_box,
)
from teachers.runtime.exits import exit_status  # noqa: E402
from teachers.runtime.files import check_out_file  # noqa: E402
from teachers.runtime.flags import add_config_flags  # noqa: E402

# (result key, column title, format); BER is x 100, the others in [0, 1].
COLUMNS = (
    ("iou", "IoU", "{:.4f}"),
    ("dice", "Dice", "{:.4f}"),
    ("mae", "MAE", "{:.4f}"),
    ("ber", "BER", "{:.2f}"),
    ("s_measure", "S_m", "{:.4f}"),
    ("weighted_f", "wF", "{:.4f}"),
    ("e_measure", "E_m", "{:.4f}"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval/masks.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(p, MaskEvalConfig)
    return p


def save_mask_overlay(
    path: Path, image: np.ndarray, gt: np.ndarray, box: list[float], panels: list[tuple]
) -> None:
    """One PNG: the image, then per (title, prob [H, W]) its mask `prob > 0.5` tinted; the GT
    contour (green) on every panel, the box prompt on the model panels."""
    h, w = gt.shape
    n = 1 + len(panels)
    fig = Figure(figsize=(3.2 * n, 3.2 * h / w + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image, GT contour", fontsize=8)
    x0, y0, x1, y1 = box
    for ax, (title, prob) in zip(axes[1:], panels, strict=True):
        ax.imshow(blend(image, (prob > THRESHOLD)[None]))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1))
        ax.set_title(title, fontsize=8)
    for ax in axes:
        ax.contour(gt, levels=[0.5], colors="lime", linewidths=1)
        ax.set_axis_off()
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def difference(a: dict, b: dict) -> dict:
    """a - b per metric (None where either is None)."""
    keys = [k for k in a if k != "num_images"]
    return {k: None if a[k] is None or b[k] is None else a[k] - b[k] for k in keys}


def evaluate(cfg: MaskEvalConfig) -> dict:
    """Score --ckpt (and --compare-ckpt) on every pair of the split that loads; the summary."""
    if coco_split(cfg.data, cfg.split) is not None and cfg.prompt != "gt_box":
        raise ValueError(
            f"--data {cfg.data} holds COCO instances, several per image: use --prompt gt_box"
        )
    skips = Skips()
    pairs = list_pairs(cfg.data, cfg.split, on_bad=cfg.on_bad, skips=skips)
    ckpts = [cfg.ckpt] + ([cfg.compare_ckpt] if cfg.compare_ckpt else [])
    device = cfg.torch_device
    models = [PromptedSam(load_sam(c, device, cfg.base)).eval() for c in ckpts]
    scores = [MaskScores() for _ in models]
    names: list[str] = []
    start = time.perf_counter()
    total = len(pairs) if cfg.limit is None else min(cfg.limit, len(pairs))
    with tqdm(total=total, unit="img", disable=not cfg.progress, dynamic_ncols=True) as bar:
        for pair, image, mask in iter_pairs(pairs, on_bad=cfg.on_bad, skips=skips):
            box = prompt_box(mask, cfg.prompt)
            probs = [predict_prob(m, image, box) for m in models]
            for s, prob in zip(scores, probs, strict=True):
                s.add(prob, mask)
            if cfg.vis and len(names) < cfg.vis_limit:
                titles = [
                    f"{Path(c).name}: IoU {s.ious[-1]:.3f}"
                    for c, s in zip(ckpts, scores, strict=True)
                ]
                path = Path(cfg.vis) / f"{len(names):03d}_{pair.name}.png"
                save_mask_overlay(path, image, mask, box, list(zip(titles, probs, strict=True)))
            names.append(pair.name)
            bar.update()
            if len(names) == cfg.limit:
                break
    if not names:
        raise ValueError(f"no image of {cfg.data}/{cfg.split} could be scored: {skips.summary()}")
    results = [s.results() for s in scores]
    return {
        "data": str(Path(cfg.data).resolve()),
        "split": cfg.split,
        "prompt": cfg.prompt,
        "device": device,
        "num_pairs": len(pairs),
        "num_images": len(names),
        "limit": cfg.limit,
        "skips": {
            "summary": skips.summary(),
            "num_skipped": skips.num_skipped,
            "counts": dict(sorted(skips.counts.items())),
            "entries": [{"path": str(p), "reason": r, "message": m} for p, r, m in skips.entries],
        },
        "images": names,
        "models": [
            {"ckpt": c, "results": r, "iou_per_image": s.ious}
            for c, r, s in zip(ckpts, results, scores, strict=True)
        ],
        "difference": difference(*results) if len(results) == 2 else None,
        "seconds": time.perf_counter() - start,
    }


def _cell(fmt: str, value: float | None, signed: bool) -> str:
    if value is None:
        return "-"
    return (fmt.replace("{:", "{:+") if signed else fmt).format(value)


def format_table(summary: dict) -> str:
    """The console table: a header line, one row per model, the difference row when compared."""
    rows = [(m["ckpt"], m["results"], False) for m in summary["models"]]
    if summary["difference"] is not None:
        rows.append(("difference (ckpt - compare)", summary["difference"], True))
    width = max(len(label) for label, _, _ in rows)
    head = f"{'model':<{width}}  " + "  ".join(f"{t:>8}" for _, t, _ in COLUMNS)
    lines = [
        f"{summary['data']} {summary['split']}: {summary['num_images']} images, prompt "
        f"{summary['prompt']}, {summary['skips']['summary']}",
        head,
        "-" * len(head),
    ]
    for label, figures, signed in rows:
        cells = (_cell(fmt, figures[key], signed) for key, _, fmt in COLUMNS)
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, evaluate, print the table, write --out; user mistakes print one line, return 2."""
    args = vars(build_parser().parse_args(argv))
    return exit_status(lambda: report(MaskEvalConfig(**args)))


def report(cfg: MaskEvalConfig) -> None:
    """Evaluate, print the table, write --out; a bad pair under --on-bad stop says how to go on."""
    if cfg.out:
        check_out_file(cfg.out)  # before the evaluation, not after it
    try:
        summary = evaluate(cfg)
    except MaskDataError as err:
        raise ValueError(f"{err} (--on-bad skip counts such pairs and goes on)") from err
    print(format_table(summary))
    if cfg.out:
        write_json(cfg.out, summary)
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    sys.exit(main())
