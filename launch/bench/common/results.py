"""What a benchmark reports: paired comparisons (figures and bars), markdown tables on stdout, and
the results JSON with the command, config, machine and date."""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from launch.bench.common.measure import machine_info
from launch.bench.common.runs import REPO
from teachers.runtime.files import write_text_atomic


def print_table(header: list[str], rows: Iterable[Sequence[object]]) -> None:
    """A markdown table on stdout after a blank line: `header`, then one line per row of cells."""
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


# --- paired comparisons ----------------------------------------------------------------------


def paired(base: dict[int, float], new: dict[int, float]) -> dict[str, float]:
    """Mean of new - base over the instances, its standard error, the share new improved."""
    diffs = [new[k] - base[k] for k in sorted(base)]
    n = len(diffs)
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    return {
        "mean": statistics.fmean(diffs),
        "se": sd / math.sqrt(n),
        "improved": sum(d > 0 for d in diffs) / n,
        "n": n,
    }


def paired_bars(panels: dict[str, list[tuple[str, dict]]], path: Path, xlabel: str) -> Path:
    """A PNG of paired comparisons: per panel (its title), one horizontal bar per (label,
    `paired` figures): the mean difference with its standard error, green above zero."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sum(len(v) for v in panels.values())
    fig = Figure(figsize=(7.5, 1.0 + 0.42 * rows + 0.5 * len(panels)))
    FigureCanvasAgg(fig)
    heights = [max(1, len(v)) for v in panels.values()]
    axes = fig.subplots(len(panels), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, bars) in zip(axes[:, 0], panels.items(), strict=True):
        means = [v["mean"] for _, v in bars]
        ys = range(len(bars))
        colors = ["tab:green" if m > 0 else "tab:red" for m in means]
        ax.barh(ys, means, xerr=[v["se"] for _, v in bars], capsize=3, color=colors)
        ax.set_yticks(list(ys), [k for k, _ in bars], fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


# --- results ---------------------------------------------------------------------------------


def command_line(script: str, argv: list[str] | None) -> str:
    """How the benchmark was started: `python launch/bench/NAME.py FLAGS`."""
    path = Path(script).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])


def write_results(
    path: str | Path,
    figures: dict,
    cfg: object,
    *,
    script: str,
    argv: list[str] | None,
    device: str = "cpu",
) -> Path:
    """Write one run's results JSON: `figures` with the command, the config (a dataclass), the
    machine and the date; atomically."""
    machine = machine_info(device)
    record = {
        "command": command_line(script, argv),
        "date": machine["date"],
        "machine": machine,
        "config": asdict(cfg),
        **figures,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path
