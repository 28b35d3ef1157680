r"""Deployment variants of one student against the fp32 student, in one run.

    python launch/bench/deploy.py --ckpt runs/dfa_s/student.pt \
        [--pruned a.pt,b.pt | --prune heads:0.5,mlp:0.5] [--calib-shards CACHE] [--num-images 8] \
        [--repeats 5] [--threads N] [--out runs/bench_deploy.json]

Variants of the encoder, each fed the same preprocessed generated images
(``eval.scenes.synthetic``):

* ``fp32_torch``: the student as ``load_sam`` builds it (the reference of every ratio);
* ``fp32_onnx``: its ONNX through onnxruntime (``students.onnx``);
* ``int8_onnx_dynamic`` / ``int8_onnx_static``: ``onnxruntime.quantization`` (``students.quant``),
  static calibrated on ``--calib-shards`` images or, without a cache, on generated images of
  another seed than the scored ones;
* ``int8_torch``: ``torch.ao`` dynamic quantization of the Linear layers;
* ``pruned:NAME``: each ``--pruned`` student.pt (re-distilled, fp32 PyTorch), or, with
  ``--prune target:ratio``, the student pruned here without re-distillation.

Per variant: median batch-1 latency over ``--repeats`` interleaved runs and its ratio to
``fp32_torch`` (onnxruntime gets as many threads as torch, not spinning between runs), model bytes (ONNX file; serialized
state dict for PyTorch), embedding cosine and relative L2 error to the fp32 student's embedding
(mean over images), and box agreement: GT boxes of the generated images decoded by the student's
SAM decoder from each variant's embedding (multimask, best predicted IoU kept, as in
``eval.runner``), mIoU x 100 against the fp32 student's masks.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import io  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from segment_anything import SamPredictor  # noqa: E402
from torch import nn  # noqa: E402

from eval.metrics import encode_masks, mask_iou  # noqa: E402
from eval.prompts import boxes_xyxy  # noqa: E402
from eval.runner import predict_masks  # noqa: E402
from eval.scenes.synthetic import make_coco  # noqa: E402
from launch.bench import common  # noqa: E402
from students.load import load_sam  # noqa: E402
from students.onnx import export_onnx  # noqa: E402
from students.prune import TARGETS, prune_student  # noqa: E402
from students.quant import embedding_agreement, quantize_onnx, quantize_torch  # noqa: E402
from teachers.cache_read import cache_images  # noqa: E402
from teachers.preprocess import Preprocessed, load_image, preprocess  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

Encode = Callable[[torch.Tensor], np.ndarray]  # [B, 3, S, S] -> [B, 256, h, w]


@dataclass
class DeployBenchConfig:
    """One run of the deployment benchmark."""

    ckpt: str = ""
    """The fp32 student.pt (required)."""
    pruned: tuple[str, ...] = ()
    """Re-distilled pruned student.pt files, comma-separated."""
    prune: tuple[str, ...] = ()
    """Prune here without re-distillation: target:ratio, comma-separated (heads:0.5,mlp:0.5)."""
    calib_shards: str | None = None
    """Teacher cache for static calibration (default: generated images)."""
    num_calib: int = 8
    """Calibration images."""
    num_images: int = 8
    """Generated images scored."""
    seed: int = 11
    """Seed of the scored images."""
    repeats: int = 5
    """Timed runs per variant (median)."""
    threads: int | None = None
    """Threads of torch and onnxruntime (default: torch's)."""
    out: str = "runs/bench_deploy.json"
    """Results JSON: every figure, the command, the machine and the date."""

    def __post_init__(self) -> None:
        if not self.ckpt:
            raise ValueError("--ckpt: give the fp32 student.pt to compare the variants with")
        for path in [self.ckpt, *self.pruned]:
            if not Path(path).is_file():
                raise ValueError(f"--ckpt/--pruned {path}: no such file")
        if self.repeats < 1 or self.num_images < 1:
            raise ValueError("--repeats and --num-images must be at least 1")
        self.prune_specs()  # refuses a bad --prune now

    def prune_specs(self) -> list[tuple[str, float]]:
        """--prune as (target, ratio) pairs."""
        specs = []
        for part in self.prune:
            target, _, ratio = part.partition(":")
            try:
                specs.append((target, float(ratio)))
            except ValueError:
                target = ""
            if target not in TARGETS:
                raise ValueError(
                    f"--prune {part!r}: give target:ratio with target {' or '.join(TARGETS)}, "
                    "e.g. heads:0.5"
                )
        return specs


def generated_images(root: Path, num: int, seed: int, img_size: int) -> list[tuple]:
    """(preprocessed image, [N, 4] xyxy GT boxes) of ``num`` generated COCO images."""
    ann = json.loads(make_coco(root, num_images=num, seed=seed).read_text())
    items = []
    for img in ann["images"]:
        boxes = [
            a["bbox"] for a in ann["annotations"] if a["image_id"] == img["id"] and a["area"] >= 1
        ]
        pre = preprocess(load_image(root / "val2017" / img["file_name"]), img_size)
        items.append((pre, boxes_xyxy(boxes)))
    return items


def torch_encode(encoder: nn.Module) -> Encode:
    def run(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return encoder.eval()(images).float().numpy()

    return run


def onnx_encode(path: Path) -> Encode:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Idle onnxruntime threads spin by default and would slow the interleaved PyTorch runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"image": images.numpy().astype(np.float32)})[0]


def state_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def box_masks(sam, embedding: np.ndarray, pre: Preprocessed, boxes: np.ndarray) -> list[dict]:
    """RLEs of the masks ``sam``'s decoder draws for ``boxes`` from ``embedding`` [1, 256, h, w]."""
    predictor = SamPredictor(sam)
    predictor.original_size, predictor.input_size = pre.orig_hw, pre.input_hw
    predictor.features = torch.as_tensor(embedding)
    predictor.is_image_set = True
    with torch.inference_mode():
        return encode_masks(predict_masks(predictor, multimask_output=True, boxes=boxes))


def latencies(encoders: dict[str, Encode], image: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms per call of each encoder on ``image``, runs interleaved (one warm-up each)."""
    calls = {name: partial(encode, image) for name, encode in encoders.items()}
    return {name: 1e3 * s for name, s in common.interleaved(calls, repeats, warmup=1).items()}


def build_variants(cfg: DeployBenchConfig, sam, work: Path, calib: torch.Tensor) -> tuple:
    """{name: encode}, {name: bytes}, {name: SAM whose decoder scores it}."""
    encoder = sam.image_encoder.eval()
    encoders, sizes, sams = {"fp32_torch": torch_encode(encoder)}, {}, {}
    sizes["fp32_torch"] = state_bytes(encoder)
    onnx = export_onnx(encoder, work / "encoder_b1.onnx", batch=1)
    encoders["fp32_onnx"], sizes["fp32_onnx"] = onnx_encode(onnx), onnx.stat().st_size
    for mode in ("dynamic", "static"):
        path = quantize_onnx(onnx, work / f"encoder_int8_{mode}.onnx", mode, calib)
        encoders[f"int8_onnx_{mode}"], sizes[f"int8_onnx_{mode}"] = (
            onnx_encode(path),
            path.stat().st_size,
        )
    quantized = quantize_torch(encoder)
    encoders["int8_torch"], sizes["int8_torch"] = torch_encode(quantized), state_bytes(quantized)
    for path in cfg.pruned:
        pruned_sam = load_sam(path)
        name = f"pruned:{Path(path).parent.name}/{Path(path).name}"
        encoders[name], sizes[name] = (
            torch_encode(pruned_sam.image_encoder),
            state_bytes(pruned_sam.image_encoder),
        )
        sams[name] = pruned_sam
    for target, ratio in cfg.prune_specs():
        pruned, _ = prune_student(encoder, target, ratio, calib)
        name = f"pruned:{target}{ratio:g} (not re-distilled)"
        encoders[name], sizes[name] = torch_encode(pruned), state_bytes(pruned)
    return encoders, sizes, sams


def score(encoders: dict[str, Encode], sams: dict, sam, items: list[tuple]) -> dict[str, dict]:
    """Embedding agreement and box-mask agreement of every variant with ``fp32_torch``."""
    images = torch.stack([pre.image for pre, _ in items])
    embeds = {
        name: np.concatenate([encode(images[i : i + 1]) for i in range(len(images))])
        for name, encode in encoders.items()
    }
    ref = embeds["fp32_torch"]
    ref_masks = [box_masks(sam, ref[i : i + 1], pre, boxes) for i, (pre, boxes) in enumerate(items)]
    rows = {}
    for name, emb in embeds.items():
        decoder_sam = sams.get(name, sam)
        ious = []
        for i, (pre, boxes) in enumerate(items):
            masks = box_masks(decoder_sam, emb[i : i + 1], pre, boxes)
            ious += [
                mask_iou(a, b, both_empty=1.0) for a, b in zip(ref_masks[i], masks, strict=True)
            ]
        rows[name] = {
            **embedding_agreement(ref, emb),
            "box_agreement_miou": 100 * float(np.mean(ious)),
            "num_boxes": len(ious),
        }
    return rows


def print_table(rows: list[dict]) -> None:
    header = ["variant", "latency ms", "latency ratio to fp32 torch", "model MB"]
    header += ["embedding cosine", "relative error", "box agreement mIoU"]
    latency = [(f"{r['latency_ms']:.1f}", f"{r['latency_ratio']:.2f}") for r in rows]
    agreement = [(f"{r['cosine']:.5f}", f"{r['rel_error']:.4f}") for r in rows]
    common.print_table(
        header,
        (
            [r["variant"], *t, f"{r['bytes'] / 1e6:.2f}", *a, f"{r['box_agreement_miou']:.1f}"]
            for r, t, a in zip(rows, latency, agreement, strict=True)
        ),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DeployBenchConfig, argv, __doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sam = load_sam(cfg.ckpt)
    size = sam.image_encoder.img_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        items = generated_images(work / "scored", cfg.num_images, cfg.seed, size)
        if cfg.calib_shards:
            calib = cache_images(cfg.calib_shards, cfg.num_calib, size)
        else:
            calib = torch.stack(
                [
                    pre.image
                    for pre, _ in generated_images(
                        work / "calib", cfg.num_calib, cfg.seed + 1, size
                    )
                ]
            )
        encoders, sizes, sams = build_variants(cfg, sam, work, calib)
        agreement = score(encoders, sams, sam, items)
        latency = latencies(encoders, items[0][0].image[None], cfg.repeats)
    base = latency["fp32_torch"]
    rows = [
        {
            "variant": name,
            "latency_ms": latency[name],
            "latency_ratio": latency[name] / base,
            "bytes": sizes[name],
            **agreement[name],
        }
        for name in encoders
    ]
    machine = common.machine_info("cpu")
    print(
        json.dumps(machine),
        f"\n{cfg.ckpt}: {size} px, batch 1, {cfg.num_images} generated images",
    )
    print_table(rows)
    int8 = {r["variant"]: r["latency_ms"] for r in rows if r["variant"].startswith("int8_")}
    print(f"\nfastest int8 path: {min(int8, key=int8.get)}")
    common.write_results(cfg.out, {"rows": rows}, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
