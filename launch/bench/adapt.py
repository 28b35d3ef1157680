r"""Training memory and speed of every adapter method on students and SAM, side by side in one run.

    python launch/bench/adapt.py [--encoders dfa_s,vit_b] [--methods cad,sam_adapter,...]
        [--img-size 1024] [--device cpu|cuda] [--repeats 1] [--out runs/bench_adapt.json]
        [--sweep-encoder dfa_s] [--cad-widths 32,64,128,256] [--cad-input-sizes 256,512] \
        [--no-sweep]

Each (encoder, method) is measured in its own child process (a clean peak-memory reading), with
random weights, batch 1, fp32, the full-image box, on `PromptedSam` exactly as `launch/adapt.py`
trains it (`adapt_sam`, `set_trainable(sam, True)`, structure loss, AdamW). Per row:

* trainable parameters: everything `set_trainable` leaves trainable (adapter + mask decoder), and
  the adapter's share (`AdaptedEncoder.num_trainable`);
* bytes saved for backward in one training forward: unique tensor storages seen by
  `torch.autograd.graph.saved_tensors_hooks`, parameters and buffers excluded, split into the
  frozen encoder (with any adapter inside it), the adapter's parts beside it (CAD's CNN, META's
  side network), and the rest (mask decoder);
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
sys.path.insert(0, str(_here.parents[1]))

import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from distill.losses import structure_loss  # noqa: E402
from launch.bench import common  # noqa: E402
from students import list_students  # noqa: E402
from students.adapters import list_adapters  # noqa: E402
from students.adapters.export import adapt_sam  # noqa: E402
from students.adapters.model import PromptedSam, set_trainable  # noqa: E402
from students.export import assemble_sam  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

MIB = 2**20


@dataclass
class AdaptBenchConfig:
    """One run of the adapter benchmark."""

    encoders: tuple[str, ...] = ("dfa_s", "vit_b")
    """Encoders, comma-separated: the registered students and SAM's vit_b, vit_l, vit_h."""
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(list_adapters()))
    """Adapter methods, comma-separated (`students.adapters.list_adapters()`)."""
    img_size: int = 1024
    """Encoder input side (SAM: 1024)."""
    device: str = field(default_factory=common.default_device, metadata={"choices": common.DEVICES})
    """Device to measure on."""
    repeats: int = 1
    """Timed runs after the first (median)."""
    out: str = "runs/bench_adapt.json"
    """Results JSON: every figure, the command, the machine and the date."""
    sweep_encoder: str = "dfa_s"
    """Encoder of the CAD sweep."""
    cad_widths: tuple[int, ...] = (32, 64, 128, 256)
    """CAD widths swept."""
    cad_input_sizes: tuple[int, ...] = (256, 512)
    """CAD inputs swept."""
    sweep: bool = True
    """Sweep CAD's width and input size (saved bytes only)."""

    def __post_init__(self) -> None:
        encoders = [*self.encoders, *([self.sweep_encoder] if self.sweep else [])]
        common.check_names("--encoders", tuple(encoders), [*list_students(), *common.SAM_SIZES])
        common.check_names("--methods", self.methods, list_adapters())
        if self.img_size != 1024 and set(common.SAM_SIZES) & set(encoders):
            raise ValueError(
                f"--img-size {self.img_size}: SAM's ViTs run at 1024 only "
                "(fixed position embedding)"
            )
        common.check_device(self.device)


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


def saved_bytes(model: PromptedSam, batch: dict[str, Tensor]) -> dict[str, int]:
    """Saved-for-backward bytes of one training forward (no backward: the sweep's measurement)."""
    return common.saved_bytes(model, batch["images"], batch["boxes"])


def train_step(
    model: PromptedSam,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    saved: common.SavedTensors | None = None,
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


def measure_config(
    encoder: nn.Module, method: str, kwargs: dict, device: str, repeats: int
) -> dict:
    """One row: `encoder` (frozen, in place) adapted with `method`; see the module docstring."""
    base = copy.deepcopy(encoder).to(device)  # the un-adapted encoder, for the latency ratio
    model = build_model(encoder, method, kwargs, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=1e-4)  # AdaptConfig's
    batch = make_batch(model.img_size, device)
    saved = common.SavedTensors(model)
    tic = time.perf_counter()
    with common.PeakMemory(device) as peak:
        train_step(model, optimizer, batch, saved)
    first = time.perf_counter() - tic

    def step() -> None:
        train_step(model, optimizer, batch)

    steps = [common.seconds(step, device) for _ in range(repeats)]
    # the training steps ran every kernel of both encoders already: no warm-up
    encoders = {"adapted": model.sam.image_encoder, "base": base}
    latency = common.latency_ms(encoders, batch["images"], max(repeats, 1))
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


def child_row(name: str, method: str, img_size: int, device: str, repeats: int) -> dict:
    """A child process's work: one encoder with one method (a clean peak-memory reading)."""
    encoder, _ = common.build_encoder(name, img_size, device)
    return {"encoder": name, **measure_config(encoder, method, {}, device, repeats)}


def measure_in_child(name: str, method: str, cfg: AdaptBenchConfig) -> dict:
    """`child_row` in its own process; a failed child (out of memory: no traceback) is a row
    that says why."""
    settings = {"img_size": cfg.img_size, "device": cfg.device, "repeats": cfg.repeats}
    try:
        return common.run_child(
            "launch.bench.adapt:child_row", name=name, method=method, **settings
        )
    except common.ChildFailed as failed:
        return {"encoder": name, "method": method, "error": failed.last_line}


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


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(AdaptBenchConfig, argv, __doc__)
    machine = common.machine_info(cfg.device)
    print(f"{json.dumps(machine)}\nbatch 1, fp32, {cfg.img_size} px, full-image box", flush=True)
    rows = []
    for name, method in itertools.product(cfg.encoders, cfg.methods):
        tic = time.perf_counter()
        rows.append(measure_in_child(name, method, cfg))
        print(f"  {name} {method}: {time.perf_counter() - tic:.0f} s", flush=True)
    figures = {"rows": rows, "ratios": summary_ratios([r for r in rows if "error" not in r])}
    print_rows(rows)
    print_ratios(figures["ratios"])
    if cfg.sweep:

        def make() -> nn.Module:
            return common.build_encoder(cfg.sweep_encoder, cfg.img_size, cfg.device)[0]

        figures["cad_sweep"] = sweep_cad(make, cfg.cad_widths, cfg.cad_input_sizes, cfg.device)
        print_sweep(cfg.sweep_encoder, figures["cad_sweep"])
    common.write_results(cfg.out, figures, cfg, script=__file__, argv=argv, device=cfg.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
