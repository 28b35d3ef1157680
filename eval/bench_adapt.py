"""Training memory and speed of every adapter method on students and SAM, side by side in one run.

python eval/bench_adapt.py [--encoders dfa_s,vit_b] [--methods cad,sam_adapter,...]
    [--img-size 1024] [--device cpu|cuda] [--repeats 1] [--out runs/bench_adapt.json]
    [--sweep-encoder dfa_s] [--cad-widths 32,64,128,256] [--cad-input-sizes 256,512] [--no-sweep]

Each (encoder, method) is measured in its own child process (a clean peak-memory reading), with
random weights, batch 1, fp32, the full-image box, on `PromptedSam` exactly as `launch/adapt.py`
trains it (`adapt_sam`, `set_trainable(sam, True)`, structure loss, AdamW). Per row:

* trainable parameters: everything `set_trainable` leaves trainable (adapter + mask decoder), and
  the adapter's share (`AdaptedEncoder.num_trainable`);
* bytes saved for backward in one training forward: unique tensor storages seen by
  `torch.autograd.graph.saved_tensors_hooks`, parameters and buffers excluded (the method of
  `reference/adapters.md` section 6), split into the frozen encoder (with any adapter inside it),
  the adapter's parts beside it (CAD's CNN, META's side network), and the rest (mask decoder);
* peak memory of the first training step (forward, backward, AdamW step with its state): growth
  of the process's peak RSS (CPU; `/proc/self/clear_refs` resets the peak on Linux) and of
  `torch.cuda.max_memory_allocated` (CUDA);
* seconds of a training step (median of `--repeats` after that first one; the first when 0) and
  inference latency of the adapted encoder, as a ratio to the un-adapted encoder's.

The sweep measures only saved bytes of CAD over widths and input sizes, on one encoder, against
`sam_adapter` on it: where CAD keeps the memory advantage its paper claims (< 1/2 of SAM-Adapter).
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from distill.losses import structure_loss  # noqa: E402
from eval.speedbench import SAM_SIZES, build_encoder  # noqa: E402
from students import list_students  # noqa: E402
from students.adapters import list_adapters  # noqa: E402
from students.adapters.export import adapt_sam  # noqa: E402
from students.adapters.model import PromptedSam, set_trainable  # noqa: E402
from students.export import assemble_sam  # noqa: E402

MIB = 2**20


def build_model(encoder: nn.Module, method: str, kwargs: dict, device: str) -> PromptedSam:
    """`encoder` in a random-headed `Sam`, adapted with `method` as `launch/adapt.py` does."""
    torch.manual_seed(0)  # adapter init and Conv-LoRA's gate noise
    sam = assemble_sam(encoder)
    adapt_sam(sam, method, kwargs)
    set_trainable(sam, train_decoder=True)
    return PromptedSam(sam).to(device).train()


def make_batch(img_size: int, device: str) -> dict[str, Tensor]:
    """One image with the full-image box and a centred square as its mask."""
    target = torch.zeros(1, 1, img_size, img_size, device=device)
    target[..., img_size // 4 : 3 * img_size // 4, img_size // 4 : 3 * img_size // 4] = 1
    return {
        "images": torch.randn(1, 3, img_size, img_size, device=device),
        "boxes": torch.tensor([[0.0, 0.0, img_size, img_size]], device=device),
        "target": target,
    }


class SavedTensors:
    """Context: bytes of the unique storages autograd saves for backward during `model`'s forward,
    parameters and buffers excluded, by where they were saved: `encoder` (the frozen encoder and
    adapters inside it), `branch` (adapter parts outside it: CAD's CNN, META's side network),
    `decoder` (the rest)."""

    def __init__(self, model: PromptedSam) -> None:
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

    def __enter__(self) -> "SavedTensors":
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


def saved_bytes(model: PromptedSam, batch: dict[str, Tensor]) -> dict[str, int]:
    """Saved-for-backward bytes of one training forward (no backward: the sweep's measurement)."""
    with SavedTensors(model) as saved:
        model(batch["images"], batch["boxes"])
    return saved.bytes()


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
    bytes (`cuda_peak_bytes`) over what was there on entry."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.result: dict[str, int | None] = {}

    def __enter__(self) -> "PeakMemory":
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


def train_step(
    model: PromptedSam,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    saved: SavedTensors | None = None,
) -> None:
    """Forward (recorded by `saved`), `distill.adapt.AdaptLoss`'s loss, backward, AdamW step."""
    with saved if saved is not None else contextlib.nullcontext():
        logits = model(batch["images"], batch["boxes"])
    side = batch["target"].shape[-2:]
    logits = F.interpolate(logits.float(), size=side, mode="bilinear", align_corners=False)
    valid = torch.ones_like(batch["target"])
    loss = structure_loss(logits, batch["target"], valid) + model.aux_loss().float()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def seconds(fn, device: str) -> float:
    """Seconds of one call of `fn` (CUDA: synchronised)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    tic = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - tic


def latency_ms(encoders: dict[str, nn.Module], images: Tensor, repeats: int) -> dict[str, float]:
    """Median inference ms of each encoder (eval mode, `inference_mode`) on `images`, the runs
    interleaved so that a change of load on the machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in encoders}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, encoder in encoders.items():
                encoder.eval()
                times[name].append(1e3 * seconds(lambda e=encoder: e(images), images.device.type))
    return {name: statistics.median(t) for name, t in times.items()}


def measure_config(
    encoder: nn.Module, method: str, kwargs: dict, device: str, repeats: int
) -> dict:
    """One row: `encoder` (frozen, in place) adapted with `method`; see the module docstring."""
    base = copy.deepcopy(encoder).to(device)  # the un-adapted encoder, for the latency ratio
    model = build_model(encoder, method, kwargs, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=1e-4)  # AdaptConfig's
    batch = make_batch(model.img_size, device)
    saved = SavedTensors(model)
    tic = time.perf_counter()
    with PeakMemory(device) as peak:
        train_step(model, optimizer, batch, saved)
    first = time.perf_counter() - tic
    steps = [seconds(lambda: train_step(model, optimizer, batch), device) for _ in range(repeats)]
    # the training steps ran every kernel of both encoders already: no warm-up
    encoders = {"adapted": model.sam.image_encoder, "base": base}
    latency = latency_ms(encoders, batch["images"], max(repeats, 1))
    return {
        "method": method,
        "adapter_kwargs": dict(kwargs),
        "img_size": model.img_size,
        "num_trainable": sum(p.numel() for p in trainable),
        "num_trainable_encoder": model.sam.image_encoder.num_trainable,
        **saved.bytes(),
        **peak.result,
        "train_step_s": statistics.median(steps) if steps else first,
        "latency_ms": latency["adapted"],
        "base_latency_ms": latency["base"],
        "latency_ratio": latency["adapted"] / latency["base"],
    }


def sweep_cad(
    make_encoder, widths: list[int], input_sizes: list[int], device: str
) -> dict[str, object]:
    """Saved bytes of `cad` at every width x input size, and of `sam_adapter` as reference, each
    on a fresh `make_encoder()`."""
    model = build_model(make_encoder(), "sam_adapter", {}, device)
    reference = saved_bytes(model, make_batch(model.img_size, device))
    del model
    points = []
    for width, input_size in itertools.product(widths, input_sizes):
        kwargs = {"width": width, "input_size": input_size}
        model = build_model(make_encoder(), "cad", kwargs, device)
        row = saved_bytes(model, make_batch(model.img_size, device))
        branch = model.sam.image_encoder.num_trainable
        points.append({**kwargs, "num_trainable_branch": branch, **row})
        del model
        gc.collect()
    return {"sam_adapter_saved_bytes": reference["saved_bytes"], "points": points}


def ratio(rows: list[dict], encoder: str, num: str, den: str, key: str = "saved_bytes"):
    """`key` of `num` over `key` of `den` on `encoder`, None where either row is missing."""
    found = {r["method"]: r for r in rows if r["encoder"] == encoder and key in r}
    if num not in found or den not in found or not found[den][key]:
        return None
    return found[num][key] / found[den][key]


def summary_ratios(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per encoder: the saved-bytes ratios the CAD and Conv-LoRA claims are about, and each
    method's encoder latency over the un-adapted encoder's."""
    pairs = {
        "cad/sam_adapter": ("cad", "sam_adapter"),
        "cad/decoder": ("cad", "decoder"),
        "conv_lora/lora": ("conv_lora", "lora"),
    }
    out = {}
    for encoder in dict.fromkeys(r["encoder"] for r in rows):
        out[encoder] = {k: ratio(rows, encoder, *pair) for k, pair in pairs.items()}
        out[encoder] |= {
            f"latency/{r['method']}": r["latency_ratio"] for r in rows if r["encoder"] == encoder
        }
    return out


def cad_choice(sweep: dict, bound: float) -> dict | None:
    """The sweep's CAD with the most parameters (then the larger input) whose saved bytes are at
    most `bound` x sam_adapter's; None if none is."""
    fits = [
        p for p in sweep["points"] if p["saved_bytes"] <= bound * sweep["sam_adapter_saved_bytes"]
    ]
    return max(fits, key=lambda p: (p["num_trainable_branch"], p["input_size"]), default=None)


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


def child_row(args: argparse.Namespace) -> dict:
    """The child process's work: the one encoder and method of its command line."""
    (name,), (method,) = args.encoders, args.methods
    encoder, _ = build_encoder(name, args.img_size, args.device)
    return {"encoder": name, **measure_config(encoder, method, {}, args.device, args.repeats)}


def run_child(name: str, method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--encoders", name, "--methods", method]
    cmd += ["--img-size", str(args.img_size), "--repeats", str(args.repeats), "--no-sweep"]
    cmd += ["--device", args.device]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:  # a killed child (out of memory) has no traceback: say so
        why = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        return {"encoder": name, "method": method, "error": why[0]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.1f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_rows(rows: list[dict]) -> None:
    print(
        "\n| encoder | method | trainable (all / encoder side) | saved MiB (all / encoder / side "
        "branch / decoder) | peak RSS growth MiB | CUDA peak MiB | train step s | encoder ms "
        "(adapted / un-adapted) | latency ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['encoder']} | {r['method']} | failed: {r['error']} |")
            continue
        saved = " / ".join(
            _mib(r[f"saved_bytes{k}"]) for k in ("", "_encoder", "_branch", "_decoder")
        )
        print(
            f"| {r['encoder']} | {r['method']} | {r['num_trainable']:,} / "
            f"{r['num_trainable_encoder']:,} | {saved} | {_mib(r['rss_growth_bytes'])} | "
            f"{_mib(r['cuda_peak_bytes'])} | {r['train_step_s']:.2f} | {r['latency_ms']:.0f} / "
            f"{r['base_latency_ms']:.0f} | {_x(r['latency_ratio'])} |"
        )


def print_ratios(ratios: dict[str, dict[str, float | None]]) -> None:
    if not ratios:
        return
    keys = list(dict.fromkeys(k for r in ratios.values() for k in r))
    print(f"\n| encoder | {' | '.join(keys)} |\n|---|{'---|' * len(keys)}")
    for encoder, r in ratios.items():
        print(f"| {encoder} | {' | '.join(_x(r.get(k)) for k in keys)} |")
    for encoder, r in ratios.items():
        if (value := r["cad/sam_adapter"]) is not None:
            print(
                f"{encoder}: CAD (default 256 ch at 512 px) saves {value:.3f}x the bytes of "
                f"sam_adapter: {'less' if value < 1 else 'MORE'}; the claim 'at most 1/2' "
                f"{'holds' if value <= 0.5 else 'does not hold'}"
            )


def print_sweep(encoder: str, sweep: dict) -> None:
    ref = sweep["sam_adapter_saved_bytes"]
    print(f"\nCAD sweep on {encoder}, saved bytes only (sam_adapter: {_mib(ref)} MiB)")
    print("| width | input | CAD params | saved MiB (all / CAD branch) | / sam_adapter |")
    print("|---|---|---|---|---|")
    for p in sweep["points"]:
        print(
            f"| {p['width']} | {p['input_size']} | {p['num_trainable_branch']:,} | "
            f"{_mib(p['saved_bytes'])} / {_mib(p['saved_bytes_branch'])} | "
            f"{_x(p['saved_bytes'] / ref)} |"
        )
    for bound, what in ((1.0, "less than sam_adapter"), (0.5, "at most 1/2 of sam_adapter")):
        best = cad_choice(sweep, bound)
        found = f"width {best['width']} at {best['input_size']} px" if best else "none swept"
        print(f"largest CAD of the sweep that saves {what} on {encoder}: {found}")


def _names(text: str) -> list[str]:
    return [n for n in text.split(",") if n]


def _ints(text: str) -> list[int]:
    return [int(n) for n in _names(text)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    known = [*list_students(), *SAM_SIZES]
    p.add_argument("--encoders", type=_names, default="dfa_s,vit_b", help=", ".join(known))
    methods = ",".join(list_adapters())
    p.add_argument("--methods", type=_names, default=methods, help=methods)
    p.add_argument("--img-size", type=int, default=1024, help="encoder input side (SAM: 1024)")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the first (median)")
    p.add_argument("--out", default="runs/bench_adapt.json", help="JSON file of every figure")
    p.add_argument("--sweep-encoder", default="dfa_s", help="encoder of the CAD sweep")
    p.add_argument("--cad-widths", type=_ints, default="32,64,128,256", help="CAD widths swept")
    p.add_argument("--cad-input-sizes", type=_ints, default="256,512", help="CAD inputs swept")
    p.add_argument("--no-sweep", action="store_true", help="skip the CAD sweep")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    encoders = [*args.encoders, *([] if args.no_sweep else [args.sweep_encoder])]
    for flag, names, allowed in (
        ("--encoders", encoders, known),
        ("--methods", args.methods, list_adapters()),
    ):
        if unknown := [n for n in names if n not in allowed]:
            p.error(f"{flag}: unknown {unknown}; known: {', '.join(allowed)}")
    if args.img_size != 1024 and set(SAM_SIZES) & set(encoders):
        p.error(
            f"--img-size {args.img_size}: SAM's ViTs run at 1024 only (fixed position embedding)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child_row(args)))
        return 0
    machine = machine_info(args.device)
    print(f"{json.dumps(machine)}\nbatch 1, fp32, {args.img_size} px, full-image box", flush=True)
    rows = []
    for name, method in itertools.product(args.encoders, args.methods):
        tic = time.perf_counter()
        rows.append(run_child(name, method, args))
        print(f"  {name} {method}: {time.perf_counter() - tic:.0f} s", flush=True)
    result = {"machine": machine, "settings": vars(args), "rows": rows}
    result["ratios"] = summary_ratios([r for r in rows if "error" not in r])
    print_rows(rows)
    print_ratios(result["ratios"])
    if not args.no_sweep:

        def make() -> nn.Module:
            return build_encoder(args.sweep_encoder, args.img_size, args.device)[0]

        result["cad_sweep"] = sweep_cad(make, args.cad_widths, args.cad_input_sizes, args.device)
        print_sweep(args.sweep_encoder, result["cad_sweep"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
