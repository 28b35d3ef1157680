"""The measured tables, each rendered from the results JSON a benchmark wrote, with the command,
machine and date it records."""

from __future__ import annotations

import json

from launch.bench._tables.cells import (
    MIB,
    REPO,
    _sci,
    code,
    columns,
    load_results,
    machine_line,
    markdown,
    num,
    source_line,
    thousands,
)

SAM_MINI_RESULTS = REPO / "teachers" / "weights" / "sam_mini.json"


PEER_NAMES = {
    "mobilesam_vit_t": "MobileSAM's TinyViT",
    "efficientvit_sam_l0": "EfficientViT-SAM L0",
    "efficientvit_sam_xl0": "EfficientViT-SAM XL0",
    "vit_b": "SAM ViT-B",
    "vit_l": "SAM ViT-L",
    "vit_h": "SAM ViT-H",
}


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


def claims_headline() -> str:
    """The README's sentence on what the distilled student keeps, from the claims benchmark."""
    data = load_results("claims")
    text = data["tables"]["headline"]
    date = data["date"].split(" ")[0]
    return (
        f"**{text[0].upper()}{text[1:]}** ({machine_line(data['machine'])}, {date}; "
        "`launch/bench/results/claims.json`).\n"
    )
