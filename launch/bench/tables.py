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

import json  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import cache  # noqa: E402

REPO = _here.parents[1]
RESULTS = REPO / "launch" / "bench" / "results"
SAM_MINI_RESULTS = REPO / "teachers" / "weights" / "sam_mini.json"
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


# --- helpers ---------------------------------------------------------------------------------


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


# --- deterministic tables: computed from the code --------------------------------------------


@cache
def student_figures(name: str, img_size: int = 1024) -> dict:
    """Width, heads, blocks, MLP-only blocks, parameters and forward GFLOPs of a registered
    student (`torch.utils.flop_counter`, 2 per multiply-add, on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from students import build_student

    with torch.device("meta"):
        student = build_student(name, img_size=img_size).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        student(torch.empty(1, 3, img_size, img_size, device="meta"))
    heads = {b.attn.num_heads for b in student.blocks if hasattr(b, "attn")}
    assert len(heads) == 1, f"{name}: one head count per student in this table"
    return {
        "width": student.embed_dim,
        "heads": heads.pop(),
        "blocks": len(student.blocks),
        "mlp_only": sum(not hasattr(b, "attn") for b in student.blocks),
        "params": sum(p.numel() for p in student.parameters()),
        "gflops": counter.get_total_flops() / 1e9,
    }


def students_table() -> str:
    from students import list_students
    from students.registry import DEFAULT_STUDENT

    rows = []
    for name in sorted(list_students(), key=lambda n: student_figures(n)["params"]):
        f = student_figures(name)
        shown = f"`{name}`" + (" (default)" if name == DEFAULT_STUDENT else "")
        sizes = f"{f['width']} / {f['heads']} / {f['blocks']} ({f['mlp_only']})"
        rows.append([shown, sizes, f"{f['params'] / 1e6:.2f} M", f"{f['gflops']:.1f}"])
    header = ["student", "width / heads / blocks (MLP-only)", "params", "GFLOPs at 1024"]
    return markdown(header, rows)


def adapters_table(encoders: tuple[str, ...] = ("dfa_s", "vit_b")) -> str:
    """Trainable adapter parameters (the mask decoder aside) of every method on each encoder."""
    import torch
    from segment_anything import sam_model_registry

    from students import build_student, list_students
    from students.adapters import build_adapter, list_adapters

    def encoder(name: str) -> torch.nn.Module:
        if name in list_students():
            return build_student(name, img_size=1024)
        return sam_model_registry[name]().image_encoder

    methods = sorted(m for m in list_adapters() if m != "decoder")
    rows = []
    for method in methods:
        counts = []
        for name in encoders:
            with torch.device("meta"):
                counts.append(thousands(build_adapter(method, encoder(name)).num_trainable))
        rows.append([f"`{method}`", *counts])
    header = ["method", *(f"`{n}`" if n in list_students() else f"SAM `{n}`" for n in encoders)]
    return markdown(header, rows)


SA1B_IMAGES_PER_PERCENT = 112_000  # 10 SA-1B tars, the peers' "1%"
CACHE_SETTINGS = [(c, "none") for c in ("fp16", "bf16", "int8", "embed=fp16,blocks=int8")]
CACHE_SETTINGS += [("embed=fp16,blocks=int8", t) for t in ("tokens=256", "tokens=64")]
CACHE_SETTINGS += [("int8", "tokens=256"), ("fp16", "tokens=256")]


def cache_bytes_table() -> str:
    """Bytes per cached ViT-H sample (final embedding plus four tapped blocks) by codec and
    reduction (`teachers.reduction.sample_nbytes`)."""
    from teachers.codecs import parse_codecs
    from teachers.reduction import sample_nbytes

    fields, rows, fp16 = ["embed", "block7", "block15", "block23", "block31"], [], None
    for spec, reduction in CACHE_SETTINGS:
        widths, per_field = dict.fromkeys(fields[1:], 1280), parse_codecs(spec, fields)
        found = sample_nbytes(64, widths, per_field, reduction)
        embed, total = found["embed"], sum(found.values())
        fp16 = fp16 or total
        cells = [embed, total - embed, total]
        tb = f"{total * SA1B_IMAGES_PER_PERCENT / 1e12:.2f} TB"
        rows.append(
            [f"`{spec}`", f"`{reduction}`", *map(thousands, cells), f"{total / fp16:.3f}", tb]
        )
    header = ["codec", "reduction", "embed bytes", "taps bytes", "bytes / sample", "x fp16"]
    return markdown([*header, "1% of SA-1B (112,000 images)"], rows)


# --- measured tables: rendered from the results JSON of a benchmark run ----------------------


PEER_NAMES = {
    "mobilesam_vit_t": "MobileSAM's TinyViT",
    "efficientvit_sam_l0": "EfficientViT-SAM L0",
    "efficientvit_sam_xl0": "EfficientViT-SAM XL0",
    "vit_b": "SAM ViT-B",
    "vit_l": "SAM ViT-L",
    "vit_h": "SAM ViT-H",
}


Column = Callable[[dict], object]
MIB = 2**20


def columns(rows: list[dict], spec: dict[str, Column]) -> str:
    """A markdown table with one column per entry of `spec`: its header, and its cell of a row."""
    return markdown(list(spec), [[cell(r) for cell in spec.values()] for r in rows])


def num(key: str, spec: str, scale: int = 1) -> Column:
    """The cell `format(row[key] / scale, spec)`."""
    return lambda r: format(r[key] if scale == 1 else r[key] / scale, spec)


def code(key: str) -> Column:
    return lambda r: f"`{r[key]}`"


def speed_table() -> str:
    data = load_results("speed")
    base = data["config"]["baseline"]
    base_ms = next(r["latency_ms"] for r in data["models"] if r["model"] == base)
    spec = {
        "encoder": lambda r: PEER_NAMES.get(r["model"], f"`{r['model']}`"),
        "input": num("input", "d"),
        "params (M)": num("params_m", ".2f"),
        "GFLOPs": num("gflops", ".1f"),
        "latency (ms)": num("latency_ms", ".0f"),
        "peak memory (MB)": num("peak_mb", ".0f"),
        f"speed-up vs {PEER_NAMES[base]}": lambda r: f"{base_ms / r['latency_ms']:.1f}x",
    }
    return source_line("speed", data) + columns(data["models"], spec)


def speed_headline() -> str:
    """One sentence: dfa_s against the run's baseline, with machine and date."""
    data = load_results("speed")
    found = {r["model"]: r for r in data["models"]}
    base = data["config"]["baseline"]
    ratio = found[base]["latency_ms"] / found["dfa_s"]["latency_ms"]
    return (
        f"**`dfa_s` encodes a 1024-px image {ratio:.1f}x faster than {PEER_NAMES[base]}**, "
        f"with {found['dfa_s']['gflops'] / found[base]['gflops']:.2f}x its FLOPs "
        f"(batch 1, fp32, one run on {machine_line(data['machine'])}, "
        f"{data['date'].split(' ')[0]}; `launch/bench/results/speed.json`).\n"
    )


def attention_table() -> str:
    data = load_results("speed")
    first = data["attention"][0]
    spec = {
        "tokens": num("tokens", ",d"),
        "DFA (ms)": num("dfa_ms", ".1f"),
        "global (ms)": num("global_ms", ".1f"),
        "windowed 14 x 14 (ms)": num("windowed_ms", ".1f"),
        "DFA growth": lambda r: f"{r['dfa_ms'] / first['dfa_ms']:.2f}x",
        "global growth": lambda r: f"{r['global_ms'] / first['global_ms']:.2f}x",
    }
    return source_line("speed", data) + columns(data["attention"], spec)


def _sci(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def codecs_table() -> str:
    data = load_results("cache_codecs")
    spec = {
        "codec": code("codec"),
        "MB / sample": num("total MB", ".2f"),
        "rel. RMS error embed": lambda r: _sci(r["rel RMS embed"]),
        "rel. RMS error blocks": lambda r: _sci(r["rel RMS blocks"]),
        "max error / bound": lambda r: (
            "n/a" if r["max err/bound"] is None else f"{r['max err/bound']:.4f}"
        ),
        "encode x fp16": num("enc x fp16", ".2f"),
        "decode x fp16": num("dec x fp16", ".2f"),
    }
    return source_line("cache_codecs", data) + columns(data["rows"], spec)


DISTILL_SETUPS = {
    "loader": "cache loader alone (shards, features, image decode + preprocessing)",
    "step": "student step alone (batch in memory)",
    "from cache": "distillation from the cache (loader + step)",
    "online teacher": "distillation with the teacher run online",
}


def distill_throughput_table() -> str:
    data = load_results("distill_throughput")
    rates = data["images_per_s"]
    spec = {
        "set-up": lambda r: DISTILL_SETUPS.get(r[0], r[0]),
        "images/s": lambda r: f"{r[1]:.2f}",
        "vs online teacher": lambda r: f"{r[1] / rates['online teacher']:.2f}x",
    }
    cfg = data["config"]
    caption = (
        f"Teacher `{cfg['teacher']}` (random weights), student `{cfg['student']}`, batch "
        f"{cfg['batch_size']}. "
    )
    return caption + source_line("distill_throughput", data) + columns(list(rates.items()), spec)


def eval_runner_table() -> str:
    data = load_results("eval_runner")
    spec = {
        "model": lambda r: f"{r['model']} at {r['img_size']}",
        "instances / images": lambda r: f"{r['num_instances']} / {r['num_images']}",
        "runner (inst/s)": num("runner_instances_per_s", ".1f"),
        "plain loop (inst/s)": num("plain_instances_per_s", ".1f"),
        "speed-up": lambda r: f"{r['speedup']:.1f}x",
    }
    return source_line("eval_runner", data) + columns([data], spec)


def adapt_table() -> str:
    data = load_results("adapt")
    spec = {
        "encoder": code("encoder"),
        "method": code("method"),
        "trainable beside the decoder": num("num_trainable_encoder", ",d"),
        "saved MiB": num("saved_bytes", ",.1f", MIB),
        "in encoder": num("saved_bytes_encoder", ",.1f", MIB),
        "in side branch": num("saved_bytes_branch", ",.1f", MIB),
        "peak growth MiB": num("rss_growth_bytes", ",.0f", MIB),
        "train step s": num("train_step_s", ".1f"),
    }
    return source_line("adapt", data) + columns(data["rows"], spec)


def meta_table() -> str:
    data = load_results("meta")
    spec = {
        "block": code("block"),
        "batch": num("batch", "d"),
        "params": num("params", ",d"),
        "GFLOPs": num("gflops", ".1f"),
        "latency ms": num("latency_ms", ".0f"),
        "norm kernels": num("norm_kernels", "d"),
        "copy kernels": num("copy_kernels", "d"),
        "copy MiB": num("copy_bytes", ".1f", MIB),
    }
    verdict = "".join(f"\n{line[0].upper()}{line[1:]}.\n" for line in data["verdict"])
    return source_line("meta", data) + columns(data["rows"], spec) + verdict


# --- the reference teacher -------------------------------------------------------------------


def sam_mini_table() -> str:
    """The reference teacher's mIoU on held-out scenes by prompt and area bucket, from the
    `teachers/weights/sam_mini.json` that `launch/bench/reference_teacher.py` writes; empty
    while that file is absent."""
    if not SAM_MINI_RESULTS.is_file():
        return ""
    data = json.loads(SAM_MINI_RESULTS.read_text())
    prompts = {
        "box_miou": "GT box (best of 3 masks by predicted IoU)",
        "box_single_mask_miou": "GT box, single-mask output",
        "point_1click_miou": "1 click",
        "box_fill_miou": "box-fill baseline (the box itself as the mask)",
    }
    buckets = list(data["box_miou"])
    rows = [
        [label, *(f"{data[key][b]:.1f}" for b in buckets)]
        for key, label in prompts.items()
        if key in data
    ]
    caption = (
        f"{data['held_images']} held-out scenes, {thousands(data['num_instances'])} instances. "
        f"`{data['command']}`: {machine_line(data['machine'])}, {data['date'].split(' ')[0]} "
        "(`teachers/weights/sam_mini.json`).\n\n"
    )
    return caption + markdown(["prompt", *(f"mIoU {b}" for b in buckets)], rows)


# --- rendering -------------------------------------------------------------------------------


def stored_table(name: str, key: str) -> Callable[[], str]:
    """A table that benchmark `name` keeps in its results JSON under "tables": its caption,
    header and rows of formatted cells, beside the figures they come from."""

    def render() -> str:
        data = load_results(name)
        table = data["tables"][key]
        head = table["caption"] + " " + source_line(name, data)
        return head + markdown(table["header"], table["rows"]) + table.get("note", "")

    return render


def claims_headline() -> str:
    """The README's sentence on what the distilled student keeps, from the claims benchmark."""
    data = load_results("claims")
    text = data["tables"]["headline"]
    date = data["date"].split(" ")[0]
    return (
        f"**{text[0].upper()}{text[1:]}** ({machine_line(data['machine'])}, {date}; "
        "`launch/bench/results/claims.json`).\n"
    )


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
