"""Measuring on a shared machine: timing in turns, peak memory, saved activations, the device
and the machine's facts."""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

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


# --- saved activations -----------------------------------------------------------------------


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
