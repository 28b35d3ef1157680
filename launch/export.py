r"""Deployable files from a student.pt: the encoder ONNX (fp32, int8), SAM's decoder ONNX, and
structured pruning before a re-distillation.

    python launch/export.py --ckpt runs/dfa_s/student.pt --out deploy/dfa_s \
        [--int8 dynamic|static --calib-shards /data/cache/vit_h] [--batch-sizes 1,4] [--decoder]
    python launch/export.py --ckpt runs/dfa_s/student.pt --out pruned/ --prune heads|mlp \
        --ratio 0.5 [--criterion activation|weight] --calib-shards /data/cache/vit_h
    then: python launch/distill.py --init pruned/pruned.pt --shards /data/cache/vit_h --out runs/p

Export writes OUT/encoder_b{B}.onnx per batch size (shapes are static, see students/onnx.py),
OUT/encoder_int8_{mode}_b{B}.onnx, with --decoder OUT/decoder.onnx (segment_anything's
SamOnnxModel layout) and OUT/predict.py (box-prompted segmentation with onnxruntime alone,
students/ort_predict.py), and OUT/export.json (the files, their checks, the student's metadata).
Every fp32 file is checked against PyTorch on random images. --prune writes OUT/pruned.pt, a
student.pt that launch/distill.py --init re-distills from the same cache.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import json  # noqa: E402
import shutil  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

from students.prune import CRITERIA, TARGETS  # noqa: E402
from students.quant import INT8_MODES, KEEP_FP32  # noqa: E402
from teachers.cache_read import cache_images  # noqa: E402
from teachers.runtime.exits import exit_status  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

ONNX_TOLERANCE = 1e-4  # fp32 onnxruntime vs PyTorch, max absolute difference


@dataclass
class ExportConfig:
    """One export (or one pruning) of a student.pt."""

    ckpt: str = ""
    """The student.pt to export."""
    out: str = ""
    """Output folder."""
    int8: str | None = field(default=None, metadata={"choices": INT8_MODES})
    """Also write an int8 encoder: dynamic (no data) or static (calibrated on --calib-shards)."""
    calib_shards: str | None = None
    """Teacher cache (folder or shard glob) whose images calibrate --int8 static and score
    --prune --criterion activation."""
    num_calib: int = 8
    """Cached images read for calibration."""
    batch_sizes: tuple[int, ...] = (1,)
    """Encoder batch sizes, one ONNX file each."""
    decoder: bool = False
    """Also write the prompt encoder + mask decoder ONNX and predict.py."""
    keep_fp32: tuple[str, ...] = KEEP_FP32
    """int8: prefixes of ONNX node names left in fp32."""
    reduce_range: bool = False
    """int8: 7-bit weights, for x86 CPUs without VNNI, where 8-bit ones saturate
    (students/README.md#int8)."""
    prune: str | None = field(default=None, metadata={"choices": TARGETS})
    """heads or mlp: prune instead of exporting; writes OUT/pruned.pt."""
    ratio: float = 0.5
    """--prune: fraction of the heads (of every block's MLP hidden units) removed."""
    criterion: str = field(default="activation", metadata={"choices": CRITERIA})
    """--prune: activation (needs --calib-shards) or weight scores."""
    opset: int = 17
    """ONNX opset."""
    overwrite: bool = False
    """Replace an earlier export (or pruning) in OUT; without it such an OUT is refused."""

    def __post_init__(self) -> None:
        for flag, value in (("--ckpt", self.ckpt), ("--out", self.out)):
            if not value:
                raise ValueError(f"{flag} is required")
        if Path(self.ckpt).is_dir():
            raise ValueError(f"--ckpt {self.ckpt} is a folder: give the student.pt in it")
        if not Path(self.ckpt).is_file():
            raise ValueError(f"--ckpt {self.ckpt}: no such file")
        if self.int8 is not None and self.int8 not in INT8_MODES:
            raise ValueError(f"--int8 {self.int8!r}: choose one of {', '.join(INT8_MODES)}")
        if self.int8 == "static" and not self.calib_shards:
            raise ValueError("--int8 static calibrates on cached images: give --calib-shards CACHE")
        if self.prune is not None and self.prune not in TARGETS:
            raise ValueError(f"--prune {self.prune!r}: choose one of {', '.join(TARGETS)}")
        if self.prune and self.criterion not in CRITERIA:
            raise ValueError(f"--criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}")
        if self.prune and self.criterion == "activation" and not self.calib_shards:
            raise ValueError("--prune --criterion activation needs --calib-shards CACHE")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes {self.batch_sizes}: give positive sizes, e.g. 1,4")
        if self.num_calib < 1:
            raise ValueError(f"--num-calib must be at least 1, got {self.num_calib}")


def prune(cfg: ExportConfig) -> dict:
    """Write OUT/pruned.pt; the pruning report."""
    from students.export import read_export_meta, save_student
    from students.load import load_sam
    from students.prune import prune_student

    meta = read_export_meta(cfg.ckpt)
    sam = load_sam(cfg.ckpt)
    encoder = sam.image_encoder
    images = None
    if cfg.criterion == "activation":
        images = cache_images(cfg.calib_shards, cfg.num_calib, encoder.img_size)
    pruned, report = prune_student(encoder, cfg.prune, cfg.ratio, images, cfg.criterion)
    own_decoder = sam.mask_decoder if meta.get("mask_decoder") == "student" else None
    path = save_student(
        Path(cfg.out) / "pruned.pt",
        pruned,
        sam,
        teacher=meta["teacher"]["name"],
        teacher_sha256=meta["teacher"]["sha256"],
        step=meta["step"],
        mask_decoder=own_decoder,
    )
    return {"pruned": str(path), **report}


def export(cfg: ExportConfig) -> dict:
    """Write the ONNX files of the module docstring; their names and checks."""
    import torch

    from students import ort_predict
    from students.export import read_export_meta
    from students.load import load_sam
    from students.onnx import (
        check_onnx,
        export_decoder_onnx,
        export_onnx,
        write_xanylabeling_config,
    )
    from students.quant import int8_cpu_warning, quantize_onnx

    out = Path(cfg.out)
    warning = int8_cpu_warning(cfg.reduce_range) if cfg.int8 else None
    if warning:
        print(warning, file=sys.stderr)
    sam = load_sam(cfg.ckpt)
    encoder = sam.image_encoder
    calib = None
    if cfg.int8 == "static":
        calib = cache_images(cfg.calib_shards, cfg.num_calib, encoder.img_size)
    files: dict[str, dict] = {}
    for batch in cfg.batch_sizes:
        path = export_onnx(encoder, out / f"encoder_b{batch}.onnx", batch, cfg.opset)
        images = torch.randn(batch, 3, encoder.img_size, encoder.img_size)
        diff = check_onnx(encoder, path, images)
        if diff > ONNX_TOLERANCE:
            raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {diff:.2e}")
        files[path.name] = {"batch": batch, "max_abs_diff": diff}
        if cfg.int8:
            int8 = out / f"encoder_int8_{cfg.int8}_b{batch}.onnx"
            quantize_onnx(path, int8, cfg.int8, calib, cfg.keep_fp32, cfg.reduce_range)
            files[int8.name] = {"batch": batch, "int8": cfg.int8, "reduce_range": cfg.reduce_range}
    if cfg.decoder:
        path = export_decoder_onnx(sam, out / "decoder.onnx", cfg.opset)
        files[path.name] = {"layout": "segment_anything.utils.onnx.SamOnnxModel"}
        shutil.copyfile(ort_predict.__file__, out / "predict.py")
        # every encoder file takes any batch; the tools feed one image at a time
        encoder_file = f"encoder_b{min(cfg.batch_sizes)}.onnx"
        name = read_export_meta(cfg.ckpt)["student"]["name"]
        tool = write_xanylabeling_config(out, encoder_file, path.name, name, encoder.img_size)
        files[tool.name] = {"for": "X-AnyLabeling / AnyLabeling: Load Custom Model"}
    for name, entry in files.items():
        entry["bytes"] = (out / name).stat().st_size
    meta = read_export_meta(cfg.ckpt)
    return {
        "ckpt": cfg.ckpt,
        "student": meta["student"],
        "img_size": meta["img_size"],
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, __doc__)
    return exit_status(lambda: report(cfg))


def check_student(path: str) -> None:
    """Refuse, before any work, a --ckpt that is not a student.pt (an adapted.pt, e.g. CAD's, or
    an official SAM checkpoint): export and pruning read a student's metadata."""
    from students.adapters.export import FORMAT as ADAPTED
    from students.export import FORMAT as STUDENT
    from teachers.runtime.files import safe_load

    payload = safe_load(path, mmap=True)
    kind = payload.get("format") if isinstance(payload, dict) else None
    if kind == ADAPTED:
        raise ValueError(
            f"--ckpt {path} is an adapted.pt ({payload.get('method')} adapter): launch/export.py "
            "exports a student.pt; the adapted model runs in PyTorch (students.load_sam)"
        )
    if kind != STUDENT:
        raise ValueError(f"--ckpt {path} is not a student.pt (a sam-distill student export)")


def report(cfg: ExportConfig) -> None:
    """Prune or export, write OUT/prune.json or OUT/export.json, print what was written."""
    from teachers.runtime.files import check_out_dir, write_text_atomic

    name = "prune.json" if cfg.prune else "export.json"
    out = check_out_dir(cfg.out)
    if (out / name).is_file() and not cfg.overwrite:
        raise ValueError(
            f"--out {out} holds an earlier {'pruning' if cfg.prune else 'export'} ({name}): "
            "choose another --out, or pass --overwrite to replace it"
        )
    check_student(cfg.ckpt)
    result = prune(cfg) if cfg.prune else export(cfg)
    settings = asdict(cfg)
    write_text_atomic(out / name, json.dumps({"settings": settings, **result}, indent=1))
    for key, value in result.items():
        print(f"{key}: {value}")
    if cfg.prune:
        print(f"next: python launch/distill.py --init {result['pruned']} --shards CACHE --out RUN")


if __name__ == "__main__":
    sys.exit(main())
