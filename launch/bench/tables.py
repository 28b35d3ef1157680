r"""Every table of the docs, rendered from its source into the markdown between its markers.

    python launch/bench/tables.py            # rewrite every marked table in place
    python launch/bench/tables.py --check    # change nothing; exit 1 naming each stale table

A table sits between `<!-- table: NAME -->` and `<!-- /table -->` in one of `DOCS`. Measured
tables are rendered from the results JSON a benchmark wrote (`launch/bench/results/*.json`, or
`teachers/weights/sam_mini.json` for the reference teacher), with the command, machine and date
that JSON records; deterministic ones (parameters, GFLOPs, bytes per cached sample, trainable
adapter parameters) are computed from the code. `tests/launch/test_docs_tables.py` fails when a
marked table differs from what this script renders, so a figure in the docs cannot drift from
its source. A benchmark rerun with `--out launch/bench/results/NAME.json`, then this script,
updates the docs.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import re  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from launch.bench._tables.cells import RESULTS, stored_table  # noqa: E402, F401
from launch.bench._tables.computed import (  # noqa: E402
    adapters_table,
    cache_bytes_table,
    students_table,
)
from launch.bench._tables.measured import (  # noqa: E402
    adapt_table,
    attention_table,
    claims_headline,
    codecs_table,
    distill_throughput_table,
    eval_runner_table,
    meta_table,
    sam_mini_table,
    speed_headline,
    speed_table,
)

REPO = _here.parents[1]
DOCS = (
    "README.md",
    "teachers/README.md",
    "students/README.md",
    "distill/README.md",
    "eval/README.md",
    "launch/bench/README.md",
)
MARKED = re.compile(r"(<!-- table: (\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


@dataclass
class TablesConfig:
    """Render the docs' tables."""

    check: bool = False
    """Change nothing: exit 1 and name each marked table that differs from its rendering."""


TABLES: dict[str, Callable[[], str]] = {
    "students": students_table,
    "adapters": adapters_table,
    "cache_bytes": cache_bytes_table,
    "sam_mini": sam_mini_table,
    "speed": speed_table,
    "speed_headline": speed_headline,
    "attention": attention_table,
    "codecs": codecs_table,
    "distill_throughput": distill_throughput_table,
    "eval_runner": eval_runner_table,
    "adapt": adapt_table,
    "meta": meta_table,
    "cache_io": stored_table("cache_io", "loader"),
    "storage_feed": stored_table("cache_io", "storage"),
    "cache_fidelity": stored_table("cache_fidelity", "fidelity"),
    "claims": stored_table("claims", "claims"),
    "claims_headline": claims_headline,
    "claims_adapters": stored_table("claims", "adapters"),
    "deploy": stored_table("deploy", "forms"),
    "deploy_summary": stored_table("deploy", "summary"),
    "deploy_gt": stored_table("deploy", "gt"),
}
# The results file (launch/bench/results/NAME.json) behind each measured table.
MEASURED = {
    "speed": "speed",
    "speed_headline": "speed",
    "attention": "speed",
    "codecs": "cache_codecs",
    "distill_throughput": "distill_throughput",
    "eval_runner": "eval_runner",
    "adapt": "adapt",
    "meta": "meta",
    "cache_io": "cache_io",
    "storage_feed": "cache_io",
    "cache_fidelity": "cache_fidelity",
    "claims": "claims",
    "claims_headline": "claims",
    "claims_adapters": "claims",
    "deploy": "deploy",
    "deploy_summary": "deploy",
    "deploy_gt": "deploy",
}


def render(text: str, cache: dict[str, str], doc: str = "") -> str:
    """`text` with every marked table rendered (`cache` keeps each table rendered once)."""

    def fill(found: re.Match) -> str:
        name = found.group(2)
        if name not in TABLES:
            raise ValueError(f"{doc}: unknown table {name!r}; known: {', '.join(TABLES)}")
        if name not in cache:
            cache[name] = TABLES[name]()
        return found.group(1) + cache[name] + found.group(4)

    return MARKED.sub(fill, text)


def stale_tables(cache: dict[str, str] | None = None) -> list[str]:
    """'doc: table' for every marked table that differs from its rendering."""
    cache = {} if cache is None else cache
    stale = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for found in MARKED.finditer(text):
            fresh = render(found.group(0), cache, doc)
            if fresh != found.group(0):
                stale.append(f"{doc}: {found.group(2)}")
    return stale


def main(argv: list[str] | None = None) -> int:
    from teachers.runtime.exits import exit_status
    from teachers.runtime.flags import parse_config

    cfg = parse_config(TablesConfig, argv, __doc__)
    return exit_status(lambda: run(cfg))


def run(cfg: TablesConfig) -> int:
    if cfg.check:
        stale = stale_tables()
        for line in stale:
            print(f"stale: {line} (python launch/bench/tables.py rewrites it)")
        return 1 if stale else 0
    cache: dict[str, str] = {}
    for doc in DOCS:
        path = REPO / doc
        text = path.read_text()
        fresh = render(text, cache, doc)
        if fresh != text:
            path.write_text(fresh)
            print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
