"""The claims benchmark's report: the docs' tables (kept in the results JSON, rendered by
launch/bench/tables.py), the README's headline, the plot and the printout."""

from __future__ import annotations

from pathlib import Path

from launch.bench import common
from launch.bench._claims.stages import ARMS


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
        f"Adapters on the camouflage domain ({first['n']} val images, the mask's box as the "
        f"prompt): each method {s['extra_steps']} steps at batch {s['batch_size']} from the distilled `dfa_t`; "
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


def tables(result: dict) -> dict:
    """The tables the results JSON keeps: the claims table, the headline and, with the adapters
    arm, the adapters table."""
    out = {"claims": doc_table(result), "headline": headline(result)}
    return out | ({"adapters": adapter_table(result)} if "adapters" in result else {})
