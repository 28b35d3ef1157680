"""What every rendered table shares: markdown, a results file and the line naming its source,
and cell formats."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
RESULTS = REPO / "launch" / "bench" / "results"
Column = Callable[[dict], object]
MIB = 2**20


def markdown(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_results(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"{path.relative_to(REPO)} is missing: run the command its table names")
    return json.loads(path.read_text())


def machine_line(machine: dict) -> str:
    """'x86_64, 2 CPUs, 2 torch threads, torch 2.x' or the GPU's name."""
    if machine.get("cuda_device"):
        return f"{machine['cuda_device']}, torch {machine['torch']}"
    threads = machine["torch_threads"]
    return (
        f"{machine['processor']} CPU ({machine['cpu_count']} cores, {threads} torch "
        f"thread{'s' if threads != 1 else ''}), torch {machine['torch']}, no GPU"
    )


def source_line(name: str, data: dict) -> str:
    """Where a measured table comes from: its command, machine, date and results file."""
    date = data["date"].split(" ")[0]
    return (
        f"`{data['command']}`: {machine_line(data['machine'])}, {date} "
        f"(`launch/bench/results/{name}.json`).\n\n"
    )


def thousands(n: float) -> str:
    return f"{n:,.0f}"


def columns(rows: list[dict], spec: dict[str, Column]) -> str:
    """A markdown table with one column per entry of `spec`: its header, and its cell of a row."""
    return markdown(list(spec), [[cell(r) for cell in spec.values()] for r in rows])


def num(key: str, spec: str, scale: int = 1) -> Column:
    """The cell `format(row[key] / scale, spec)`."""
    return lambda r: format(r[key] if scale == 1 else r[key] / scale, spec)


def code(key: str) -> Column:
    return lambda r: f"`{r[key]}`"


def _sci(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def stored_table(name: str, key: str) -> Callable[[], str]:
    """A table that benchmark `name` keeps in its results JSON under "tables": its caption,
    header and rows of formatted cells, beside the figures they come from."""

    def render() -> str:
        data = load_results(name)
        table = data["tables"][key]
        head = table["caption"] + " " + source_line(name, data)
        return head + markdown(table["header"], table["rows"]) + table.get("note", "")

    return render
