"""What every benchmark of the wing shares: timing, peak memory, machine facts, the encoders they
build, runs in a child process, and the results JSON.

* Timing: `interleaved` times several calls in turns (round robin), so that a change of load on a
  shared machine hits all of them alike, and gives each one's median; `latency_ms` is that for
  modules in eval mode under `inference_mode`.
* Memory: `PeakMemory` measures the growth of the process's peak RSS (CPU; `/proc/self/clear_refs`
  resets the peak on Linux) and of `torch.cuda.max_memory_allocated` (CUDA) over a block.
* Machine: `machine_info` (platform, CPUs, torch and its threads, the GPU, the date).
* Encoders: `build_encoder` builds a student, a SAM ViT or a peer encoder with random weights
  (latency does not depend on weights).
* Children: `run_child` calls a function of a benchmark module in a fresh interpreter (a clean
  peak-memory reading, no warm caches shared between models) and returns its JSON result;
  `run_script` runs an entry script of the repository with its output in a log file, and
  `run_entry` runs distill, adapt or eval/coco.py in this process; `check_setup` keeps a work
  folder's stages from being reused under another setup.
* Saved activations: `SavedTensors` / `saved_bytes` count what autograd keeps for backward in an
  adapted model's training forward, by region (encoder, adapter branch, decoder).
* Paired comparisons: `paired` gives the mean per-instance difference of two models on the same
  instances, its standard error and the share improved.
* Results: `write_results` writes one JSON per run: the figures, the command that made them, the
  config, the machine and the date.

Benchmarks import this module and nothing of one another.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from students import build_student, list_students
from teachers.runtime.files import write_text_atomic

REPO = Path(__file__).resolve().parents[2]
SAM_SIZES = ("vit_b", "vit_l", "vit_h")
PEERS = {"mobilesam_vit_t": 1024, "efficientvit_sam_l0": 512, "efficientvit_sam_xl0": 1024}
DEVICES = ("cpu", "cuda")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")


# --- timing ----------------------------------------------------------------------------------


def synchronizer(device: str) -> Callable[[], None]:
    """What makes a timing wait for the device: CUDA's synchronize, nothing on the CPU."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def interleaved(
    calls: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each of `calls`, timed in turns after `warmup` untimed rounds;
    `sync` runs before the clock is read (CUDA)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            tic = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def seconds(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call of `fn` (CUDA: synchronised)."""
    return interleaved({"call": fn}, 1, warmup=0, sync=synchronizer(device))["call"]


def latency_ms(modules: dict[str, nn.Module], x: Tensor, repeats: int) -> dict[str, float]:
    """Median inference ms of each module (eval mode, `inference_mode`) on `x`, the runs
    interleaved; no warm-up (callers run every kernel before)."""
    for module in modules.values():
        module.eval()
    calls = {name: (lambda m=m: m(x)) for name, m in modules.items()}
    with torch.inference_mode():
        found = interleaved(calls, max(repeats, 1), warmup=0, sync=synchronizer(x.device.type))
    return {name: 1e3 * s for name, s in found.items()}


# --- memory ----------------------------------------------------------------------------------


def _reset_peak_rss() -> None:
    """Set the process's peak RSS to its current RSS (Linux >= 4.0; elsewhere nothing happens and
    the growth is measured over the peak so far, an underestimate)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


class PeakMemory:
    """Context: growth of the peak RSS (`rss_growth_bytes`) and, on CUDA, of the peak allocated
    bytes (`cuda_peak_bytes`) over what was allocated on entry (`cuda_before`)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.cuda_before = 0
        self.result: dict[str, int | None] = {}

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_before = torch.cuda.memory_allocated()
        _reset_peak_rss()
        self.rss_before = _peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.result["rss_growth_bytes"] = _peak_rss() - self.rss_before
        self.result["cuda_peak_bytes"] = (
            torch.cuda.max_memory_allocated() - self.cuda_before if self.cuda else None
        )


def print_table(header: list[str], rows: Iterable[Sequence[object]]) -> None:
    """A markdown table on stdout after a blank line: `header`, then one line per row of cells."""
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


# --- machine ---------------------------------------------------------------------------------


def machine_info(device: str) -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
        "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# --- encoders --------------------------------------------------------------------------------


def known_models() -> list[str]:
    return [*list_students(), *SAM_SIZES, *PEERS]


def random_init_(module: nn.Module) -> nn.Module:
    """Small random values everywhere (fast even for ViT-H; no denormals to slow the CPU)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def build_encoder(name: str, image_size: int, device: str) -> tuple[nn.Module, int]:
    """(encoder in eval mode, its input side): students and SAM at `image_size`, peers native."""
    if name in list_students():
        return build_student(name, img_size=image_size).to(device).eval(), image_size
    if name in SAM_SIZES:
        from segment_anything import sam_model_registry

        with torch.device("meta"):
            encoder = sam_model_registry[name]().image_encoder
        if image_size != 1024:
            raise ValueError(
                f"{name} is measured at its native 1024 only (its position embedding is fixed)"
            )
        return random_init_(encoder.to_empty(device=device)).eval(), 1024
    if name == "mobilesam_vit_t":
        try:
            from mobile_sam.build_sam import build_sam_vit_t
        except ImportError as err:
            raise ValueError(
                "mobilesam_vit_t needs the bench extra: pip install -e '.[bench]'"
            ) from err
        return build_sam_vit_t().image_encoder.to(device).eval(), PEERS[name]
    if name.startswith("efficientvit_sam_"):
        try:
            from efficientsam.sam_model_zoo import create_efficientvit_sam_model
        except ImportError as err:
            raise ValueError(f"{name} needs the bench extra: pip install -e '.[bench]'") from err
        zoo_name = name.replace("_sam_", "-sam-").replace("_", "-")
        return create_efficientvit_sam_model(zoo_name, pretrained=False).image_encoder.to(
            device
        ).eval(), PEERS[name]
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())}")


def check_names(flag: str, names: tuple[str, ...], known: list[str]) -> None:
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"{flag}: unknown {unknown}; known: {', '.join(known)}")


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


class SavedTensors:
    """Context: bytes of the unique storages autograd saves for backward during the forward of
    an adapted `PromptedSam` (`students.adapters.model`), parameters and buffers excluded, by
    where they were saved: `encoder` (the frozen encoder and adapters inside it), `branch`
    (adapter parts outside it: CAD's CNN, META's side network), `decoder` (the rest)."""

    def __init__(self, model: nn.Module) -> None:
        tensors = itertools.chain(model.parameters(), model.buffers())
        self.exclude = {t.untyped_storage().data_ptr() for t in tensors}
        self.seen: dict[int, tuple[str, int]] = {}
        self.where = ["decoder"]
        adapted = model.sam.image_encoder
        base = getattr(adapted, "encoder", adapted)
        self.regions = [(adapted, "branch"), (base, "encoder")]
        self.handles: list = []

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen[ptr] = (self.where[-1], storage.nbytes())
        return t

    def _leave_region(self, *_: object) -> None:  # returns None: a value would replace the output
        self.where.pop()

    def __enter__(self) -> SavedTensors:
        for module, name in self.regions:
            enter = module.register_forward_pre_hook(lambda *_, n=name: self.where.append(n))
            self.handles.append(enter)
            self.handles.append(module.register_forward_hook(self._leave_region))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def bytes(self) -> dict[str, int]:
        """`saved_bytes` (all) and `saved_bytes_{encoder,branch,decoder}`."""
        out = {f"saved_bytes_{r}": 0 for r in ("encoder", "branch", "decoder")}
        for region, nbytes in self.seen.values():
            out[f"saved_bytes_{region}"] += nbytes
        return {"saved_bytes": sum(out.values()), **out}


def saved_bytes(model: nn.Module, images: Tensor, boxes: Tensor) -> dict[str, int]:
    """Saved-for-backward bytes of one training forward of a `PromptedSam` (no backward)."""
    with SavedTensors(model) as saved:
        model(images, boxes)
    return saved.bytes()


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
