"""Flags made from config dataclasses (`teachers.runtime.flags`): the distill, cache and eval
parsers keep their public names, state no default of their own, and parse into the dataclass's
defaults."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import pytest

from distill.config import DistillConfig
from eval import cli as eval_cli
from eval.config import EvalConfig
from teachers import cache_cli
from teachers.cache_cli import CacheConfig
from teachers.runtime.flags import add_config_flags, field_docs, ints, parse_config
from tests.conftest import REPO


def _launch_distill():
    spec = importlib.util.spec_from_file_location("launch_distill", REPO / "launch/distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAUNCH = _launch_distill()

# The public flags of each parser before they were made from the dataclasses.
OLD_FLAGS = {
    "distill": "batch-size checkpoint-every codec config device dld dld-every-epochs dld-floor "
    "grad-clip img-size keep-checkpoints local-rank local_rank log-every lr max-nonfinite "
    "micro-batch-size min-lr-ratio no-progress on-corrupt out precision resume seed shards "
    "shuffle-buffer steps student student-taps teacher teacher-ckpt teacher-taps warmup-steps "
    "weight-decay workers zero-stage",
    "cache": "batch-size codec device dtype images layers limit no-progress out "
    "samples-per-shard teacher teacher-ckpt verify workers",
    "coco": "ap-keep-empty-gt ckpt coco-json coco-root compare-ckpt det-json device "
    "limit-images merge no-crowd no-progress num-clicks out prompt prompt-chunk protocol "
    "single-mask skip-missing split vis vis-limit",
    "lvis": "ap-keep-empty-gt ckpt coco-root compare-ckpt det-json device limit-images "
    "lvis-json lvis-root merge no-crowd no-progress num-clicks out prompt prompt-chunk "
    "protocol single-mask skip-missing vis vis-limit",
}
# (parser, its dataclass, the flags it cannot parse without, the fields those set)
PARSERS = {
    "distill": (LAUNCH.parser, DistillConfig, ["--shards", "s", "--out", "o"], {}),
    "cache": (cache_cli.build_parser, CacheConfig, ["--out", "o", "--images", "i"], {}),
    "coco": (
        lambda: eval_cli.build_parser("coco"),
        EvalConfig,
        ["--ckpt", "c", "--coco-root", "r"],
        {"dataset": "coco"},
    ),
    "lvis": (
        lambda: eval_cli.build_parser("lvis"),
        EvalConfig,
        ["--ckpt", "c", "--coco-root", "r", "--lvis-json", "v.json"],
        {"dataset": "lvis"},
    ),
}
NOT_FIELDS = {"help", "config", "local_rank"}


def _parse(name: str, *argv: str):
    build, cls, required, fixed = PARSERS[name]
    return cls(**fixed, **vars(build().parse_args([*required, *argv])))


@pytest.mark.parametrize("name", PARSERS)
def test_public_flags_kept(name: str) -> None:
    build = PARSERS[name][0]
    flags = {s.removeprefix("--") for a in build()._actions for s in a.option_strings}
    assert flags >= set(OLD_FLAGS[name].split())


@pytest.mark.parametrize("name", PARSERS)
def test_every_flag_is_a_field_without_default(name: str) -> None:
    build, cls = PARSERS[name][:2]
    names = {f.name for f in fields(cls)}
    for action in build()._actions:
        if action.dest in NOT_FIELDS:
            continue
        assert action.default is argparse.SUPPRESS, action.option_strings
        assert action.dest in names, action.option_strings


@pytest.mark.parametrize("name", PARSERS)
def test_no_flags_gives_the_dataclass_defaults(name: str) -> None:
    build, cls, required, fixed = PARSERS[name]
    given = vars(build().parse_args(required))
    typed = {
        a.removeprefix("--").replace("-", "_"): v for a, v in zip(required[::2], required[1::2])
    }
    assert given == typed  # the parser adds nothing of its own, and passes the values as typed
    parsed = _parse(name)
    for f in fields(cls):  # every other field holds the default its declaration gives
        if f.name not in typed and f.name not in fixed and f.init:
            default = f.default_factory() if f.default is MISSING else f.default
            assert getattr(parsed, f.name) == default, f.name


@pytest.mark.parametrize("name", PARSERS)
def test_help_has_docstring_and_default(name: str) -> None:
    build, cls = PARSERS[name][:2]
    docs = field_docs(cls)
    assert set(docs) >= {f.name for f in fields(cls)}, "every config field has a docstring"
    parser = build()
    parser.format_help()  # every `%` escaped
    for action in parser._actions:
        if action.dest in NOT_FIELDS:
            continue
        assert docs[action.dest].replace("%", "%%") in action.help


def test_help_examples() -> None:
    helps = {a.dest: a.help for a in LAUNCH.parser()._actions}
    assert helps["steps"] == "Optimizer steps. (default: 1000)"
    assert helps["engine"].startswith("Training engine: deepspeed")  # inherited from TrainConfig
    assert helps["progress"].endswith("(default: on)")
    assert helps["student_taps"].endswith("(default: unset)")
    assert "default 5% of steps" in " ".join(LAUNCH.parser().format_help().split())
    cache_helps = {a.dest: a.help for a in cache_cli.build_parser()._actions}
    assert cache_helps["samples_per_shard"].endswith("(default: 256)")


def test_distill_parses() -> None:
    cfg = _parse("distill", "--teacher-taps", "1,3", "--no-progress", "--zero-stage", "1")
    assert (cfg.teacher_taps, cfg.progress, cfg.zero_stage) == ((1, 3), False, 1)
    assert _parse("distill", "--student-taps", "").student_taps == ()
    cfg = _parse("distill", "--lr", "0.5", "--dld", "uniform", "--engine", "torch")
    assert (cfg.lr, cfg.dld, cfg.engine) == (0.5, "uniform", "torch")
    args = vars(LAUNCH.parser().parse_args(["--out", "o", "--local-rank", "3"]))
    assert args == {"out": "o", "local_rank": 3}


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("distill", ["--zero-stage", "3"], "invalid choice"),
        ("distill", ["--teacher-taps", "1,x"], "expected comma-separated integers"),
        ("cache", ["--dtype", "fp8"], "invalid choice"),
        ("coco", ["--prompt", "line"], "invalid choice"),
        ("lvis", ["--split", "val2017"], "unrecognized arguments"),
        ("coco", ["--lvis-json", "v.json"], "unrecognized arguments"),
    ],
)
def test_bad_flags_exit_with_argparse_error(name, argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        _parse(name, *argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file_under_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 5, "lr": 0.1, "teacher_taps": [2, 4]}))
    args = vars(LAUNCH.parser().parse_args(["--config", str(path), "--steps", "7", "--out", "o"]))
    cfg = DistillConfig.from_file(args.pop("config"), shards="s", **args)
    assert (cfg.steps, cfg.lr, cfg.teacher_taps, cfg.batch_size) == (7, 0.1, (2, 4), 8)


def test_cache_parses() -> None:
    assert _parse("cache").verify is None
    assert _parse("cache", "--verify").verify == 8
    assert _parse("cache", "--verify", "3").verify == 3
    cfg = _parse("cache", "--layers", "7,15,23,31", "--no-progress", "--dtype", "bf16")
    assert (cfg.layers, cfg.progress, cfg.dtype) == ((7, 15, 23, 31), False, "bf16")


def test_eval_parses() -> None:
    cfg = _parse("coco", "--prompt", "point", "--num-clicks", "3", "--single-mask", "--no-crowd")
    assert (cfg.prompt, cfg.num_clicks, cfg.single_mask, cfg.no_crowd) == ("point", 3, True, True)
    assert _parse("lvis", "--lvis-root", "l").lvis_root == "l"


def test_missing_required_is_a_user_error(capsys) -> None:
    assert eval_cli.main("coco", ["--coco-root", "r"]) == 2
    assert "error: --ckpt is required" in capsys.readouterr().err


def _default_keywords(fn) -> list[int]:
    tree = ast.parse(inspect.getsource(fn).lstrip())
    return [
        k.value.lineno for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "default"
    ]


@pytest.mark.parametrize(
    "fn",
    [LAUNCH.parser, cache_cli.build_parser, cache_cli.parse_args, eval_cli.build_parser],
    ids=lambda fn: f"{fn.__module__}.{fn.__name__}",
)
def test_parsers_state_no_default(fn) -> None:
    assert _default_keywords(fn) == []


@dataclass
class _Toy:
    """A config of every kind of field."""

    name: str = "a"
    """A name."""
    ratio: float | None = None
    """A ratio, 5% at most."""
    taps: tuple[int, ...] = (1, 2)
    """Taps."""
    fast: bool = False
    """Go fast."""
    color: str = field(default="red", metadata={"choices": ("red", "blue"), "metavar": "C"})
    """A color."""


def test_toy_config() -> None:
    p = argparse.ArgumentParser()
    add_config_flags(p, _Toy, exclude=("name",))
    helps = {a.dest: a.help for a in p._actions}
    assert "name" not in helps
    assert helps["ratio"] == "A ratio, 5%% at most. (default: unset)"
    assert helps["taps"] == "Taps. (default: 1,2)"
    assert helps["fast"] == "Go fast. (default: off)"
    assert vars(p.parse_args([])) == {}
    args = p.parse_args(["--ratio", "0.5", "--taps", "3", "--fast", "--color", "blue"])
    assert _Toy(**vars(args)) == _Toy(ratio=0.5, taps=(3,), fast=True, color="blue")
    assert ints("") == () and ints(" 7, 15 ") == (7, 15)


def test_unsupported_annotation() -> None:
    @dataclass
    class Bad:
        names: list[str] = field(default_factory=list)
        """Names."""

    with pytest.raises(TypeError, match="no flag type"):
        add_config_flags(argparse.ArgumentParser(), Bad)


@dataclass
class _Checked:
    steps: int = 1
    """Steps."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")


def test_parse_config_reports_a_refused_config_like_a_bad_flag(capsys) -> None:
    assert parse_config(_Checked, ["--steps", "3"]) == _Checked(steps=3)
    with pytest.raises(SystemExit) as stopped:
        parse_config(_Checked, ["--steps", "0"])
    assert stopped.value.code == 2
    assert "error: --steps must be at least 1, got 0" in capsys.readouterr().err
