"""The deterministic tables, computed from the code: the students' sizes and FLOPs, the adapters'
trainable parameters, and the bytes of a cached sample."""

from __future__ import annotations

from functools import cache

from launch.bench._tables.cells import markdown, thousands


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
