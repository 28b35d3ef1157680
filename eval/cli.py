"""Flags shared by every evaluation entry script (`eval/coco.py`, `eval/lvis.py`), made from
`eval.config.EvalConfig`."""

from __future__ import annotations

import argparse

from eval.config import EvalConfig
from eval.evaluate import run
from teachers.runtime.exits import exit_status
from teachers.runtime.flags import add_config_flags


def build_parser(dataset: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"eval/{dataset}.py",
        description=f"Box- and point-prompted mIoU (or detector-box mask AP) on {dataset.upper()}.",
    )
    other = ("lvis_root", "lvis_json") if dataset == "coco" else ("split", "coco_json")
    add_config_flags(p, EvalConfig, exclude=("dataset", *other))
    return p


def parse_args(dataset: str, argv: list[str] | None = None) -> EvalConfig:
    return EvalConfig(dataset=dataset, **vars(build_parser(dataset).parse_args(argv)))


def main(dataset: str, argv: list[str] | None = None) -> int:
    """Run one entry script; user mistakes (flags, files, data) print one line and return 2."""
    return exit_status(lambda: run(parse_args(dataset, argv)))
