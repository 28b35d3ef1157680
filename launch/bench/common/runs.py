"""Runs a benchmark makes: a function in a fresh interpreter, an entry script in a child process
or in this one, and the record of a work folder's setup."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from teachers.runtime.files import write_text_atomic

REPO = Path(__file__).resolve().parents[3]


# --- child processes -------------------------------------------------------------------------

_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from importlib import import_module
module, function = {target!r}.split(":")
print(json.dumps(getattr(import_module(module), function)(**json.loads(sys.argv[1]))))
"""


class ChildFailed(RuntimeError):
    """A child process ended with an error; `last_line` is its last line of stderr (a killed
    child, out of memory, has no traceback: then its exit status)."""

    def __init__(self, message: str, last_line: str) -> None:
        super().__init__(message)
        self.last_line = last_line


def run_child(target: str, **kwargs: object) -> dict:
    """`module:function(**kwargs)` in a fresh interpreter; its JSON result (the last line it
    prints)."""
    code = _CHILD.format(repo=str(REPO), target=target)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True
    )
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ChildFailed(f"{target}({kwargs}) failed:\n{done.stderr[-2000:]}", why[0])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_script(script: str, *args: str, log: Path) -> None:
    """Run the repository's `script` with this interpreter, its output in `log`; on failure,
    raise with the log's tail."""
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, script, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT
        )
    if done.returncode:
        tail = log.read_text().splitlines()[-20:]
        raise RuntimeError(f"{script} failed ({done.returncode}), log {log}:\n" + "\n".join(tail))


def _entries() -> dict[str, Callable[[list[str]], int]]:
    """The entry scripts `run_entry` calls in this process, by their path in the repository."""
    from functools import partial

    from distill.adapt import train as adapt_train
    from distill.config import AdaptConfig, DistillConfig
    from distill.jobs import job_parser, run_job
    from distill.train import train
    from eval.cli import main as eval_main
    from eval.mask_metrics import iou_dice

    adapt = partial(adapt_train, scorer=iou_dice)  # as launch/adapt.py wires it
    return {
        "launch/distill.py": lambda a: run_job(
            job_parser("", DistillConfig), DistillConfig, train, a, None
        ),
        "launch/adapt.py": lambda a: run_job(
            job_parser("", AdaptConfig), AdaptConfig, adapt, a, None
        ),
        "eval/coco.py": lambda a: eval_main("coco", a),
    }


def run_entry(script: str, args: list[str], log: Path) -> None:
    """Run `launch/distill.py`, `launch/adapt.py` or `eval/coco.py` with `args` in this process
    (torch and the project load once for a benchmark's few dozen runs), its output in `log`; on
    failure, raise with the log's tail. One process: no launcher, `--engine torch`."""
    entry = _entries()[script]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = entry(args)
    if code:
        tail = log.read_text().splitlines()[-20:]
        raise RuntimeError(f"{script} failed ({code}), log {log}:\n" + "\n".join(tail))


def train_once(script: str, run: Path, product: str, args: list[str]) -> Path:
    """`run/product` (student.pt, adapted.pt): made once by a `launch/distill.py` or
    `launch/adapt.py` run with `args --out run` in this process (its log beside, run.log), and
    reused after; a run stopped part-way (a signal saves a checkpoint) continues where it
    stopped."""
    if not (run / product).exists():
        resume = ["--resume", "auto"] if (run / "checkpoints").exists() else []
        run_entry(script, [*args, "--out", str(run), *resume], run.with_suffix(".log"))
    return run / product


def check_setup(work: Path, setup: dict) -> None:
    """Record `setup` (what the stages kept under `work` depend on) in work/setup.json, or refuse
    a folder made with another one, naming what differs."""
    path = work / "setup.json"
    if path.exists():
        old = json.loads(path.read_text())
        differs = sorted(k for k in setup.keys() | old.keys() if old.get(k) != setup.get(k))
        if differs:
            raise ValueError(
                f"--work {work} holds a run made with another setup ({', '.join(differs)}: "
                f"{[old.get(k) for k in differs]} there, {[setup.get(k) for k in differs]} now); "
                "give another --work or remove it"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(setup, indent=1))
