r"""Deployment forms of students against their fp32 PyTorch encoder, and peers' ONNX, in one run.

    python launch/bench/deploy.py [--ckpt runs/dfa_s/student.pt] [--students dfa_t,dfa_s] \
        [--peers mobilesam_vit_t,efficientvit_sam_l0] [--image-size 1024] \
        [--int8 onnx_dynamic,onnx_static,torch] [--coco-root HELD] \
        [--pruned a.pt,b.pt | --prune heads:0.5,mlp:0.5] [--calib-shards CACHE] [--num-images 8] \
        [--repeats 5] [--threads N] [--out runs/bench_deploy.json]

Models: ``--ckpt``, a distilled student.pt at its own input size, and ``--students``, registered
students with random weights at ``--image-size`` (latency does not depend on the weights). Forms
of each, fed the same preprocessed generated images (``eval.scenes.synthetic``):

* ``fp32_torch``: the encoder in PyTorch (the reference of every ratio and agreement);
* ``fp32_onnx``: its ONNX (``students.onnx``) through onnxruntime;
* ``int8_onnx_dynamic`` / ``int8_onnx_static``: ``onnxruntime.quantization`` (``students.quant``),
  static calibrated on ``--calib-shards`` images (``--ckpt``) or on generated images of
  another seed than the scored ones;
* ``int8_torch``: ``torch.ao`` dynamic quantization of the Linear layers;
* ``--ckpt`` only: ``pruned:NAME``, each ``--pruned`` student.pt (re-distilled, fp32 PyTorch), or,
  with ``--prune target:ratio``, the student pruned here without re-distillation.

``--peers`` (``launch.bench.common.PEERS``, random weights) are exported to ONNX and timed beside
them at their native input and at ``--image-size`` where they take it.

Per form: median batch-1 latency over ``--repeats`` runs, every form of every model interleaved
(onnxruntime gets as many threads as torch and does not spin between runs), and its ratio to
its model's ``fp32_torch``; model bytes (ONNX file; serialized state dict for PyTorch); embedding
cosine and relative L2 error to the ``fp32_torch`` embedding (mean over images); for ``--ckpt``,
box agreement: GT boxes of the generated images decoded by the student's SAM decoder from each
form's embedding (multimask, best predicted IoU kept, as in ``eval.runner``), mIoU x 100 against
the fp32 masks; with ``--coco-root``, GT mIoU x 100 on those scenes through eval's own loop and
protocol, paired per instance with ``fp32_torch`` (``common.paired``). The summary gives per
model the fp32 ONNX ratio, the fastest int8 form with its speed-up over fp32 PyTorch and cosine,
and each peer ONNX's latency over the model's fp32 ONNX.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import io  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from segment_anything import SamPredictor  # noqa: E402
from segment_anything.modeling import Sam  # noqa: E402
from torch import nn  # noqa: E402

from eval.metrics import encode_masks, mask_iou  # noqa: E402
from eval.prompts import boxes_xyxy  # noqa: E402
from eval.runner import predict_masks  # noqa: E402
from eval.scenes.synthetic import make_coco  # noqa: E402
from launch.bench import common  # noqa: E402
from students import build_student, list_students  # noqa: E402
from students.load import load_sam  # noqa: E402
from students.onnx import OrtEncoder, export_onnx  # noqa: E402
from students.prune import TARGETS, prune_student  # noqa: E402
from students.quant import embedding_agreement, quantize_onnx, quantize_torch  # noqa: E402
from teachers.cache_read import cache_images  # noqa: E402
from teachers.preprocess import Preprocessed, load_image, preprocess  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

INT8_FORMS = ("onnx_dynamic", "onnx_static", "torch")
Form = tuple[nn.Module, int]  # encoder (onnxruntime behind OrtEncoder), model bytes


@dataclass
class DeployBenchConfig:
    """One run of the deployment benchmark."""

    ckpt: str = ""
    """A distilled student.pt: its forms, box agreement and (--coco-root) GT mIoU."""
    students: tuple[str, ...] = ()
    """Registered students with random weights at --image-size (dfa_t,dfa_s)."""
    peers: tuple[str, ...] = ()
    """Peer encoders with random weights, as ONNX (mobilesam_vit_t,efficientvit_sam_l0)."""
    image_size: int = 1024
    """Input side of --students and of the peers' equal-input rows."""
    int8: tuple[str, ...] = INT8_FORMS
    """int8 forms built for every student: onnx_dynamic, onnx_static, torch."""
    coco_root: str | None = None
    """COCO-layout held-out scenes: GT mIoU of every form of --ckpt, paired with fp32."""
    pruned: tuple[str, ...] = ()
    """Re-distilled pruned student.pt files of --ckpt, comma-separated."""
    prune: tuple[str, ...] = ()
    """Prune --ckpt here without re-distillation: target:ratio, comma-separated (heads:0.5)."""
    calib_shards: str | None = None
    """Teacher cache calibrating --ckpt's static int8 (default, and for --students: generated
    images)."""
    num_calib: int = 8
    """Calibration images."""
    num_images: int = 8
    """Generated images scored."""
    seed: int = 11
    """Seed of the scored images."""
    repeats: int = 5
    """Timed runs per form (median)."""
    threads: int | None = None
    """Threads of torch and onnxruntime (default: torch's)."""
    out: str = "runs/bench_deploy.json"
    """Results JSON: every figure, the command, the machine and the date."""

    def __post_init__(self) -> None:
        if not self.ckpt and not self.students:
            raise ValueError("--ckpt/--students: give a student.pt, registered students, or both")
        if not self.ckpt and (self.pruned or self.prune or self.coco_root):
            raise ValueError("--pruned, --prune and --coco-root are forms of --ckpt: give --ckpt")
        for path in [self.ckpt, *self.pruned] if self.ckpt else []:
            if not Path(path).is_file():
                raise ValueError(f"--ckpt/--pruned {path}: no such file")
        if self.coco_root and not Path(self.coco_root).is_dir():
            raise ValueError(f"--coco-root {self.coco_root}: no such folder")
        common.check_names("--students", self.students, list_students())
        common.check_names("--peers", self.peers, list(common.PEERS))
        common.check_names("--int8", self.int8, list(INT8_FORMS))
        if self.repeats < 1 or self.num_images < 1:
            raise ValueError("--repeats and --num-images must be at least 1")
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"--image-size {self.image_size}: give a multiple of 16")
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


def encode(encoder: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return encoder.eval()(images).float().numpy()


def state_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def ort_form(path: Path) -> Form:
    return OrtEncoder(path, threads=torch.get_num_threads()), path.stat().st_size


def student_forms(encoder: nn.Module, work: Path, calib: torch.Tensor, int8: tuple) -> dict:
    """{form: (encoder, bytes)}: fp32 PyTorch and ONNX, and the ``int8`` forms; files in work."""
    work.mkdir(parents=True, exist_ok=True)
    encoder = encoder.eval()
    forms = {"fp32_torch": (encoder, state_bytes(encoder))}
    onnx = export_onnx(encoder, work / "encoder.onnx")
    forms["fp32_onnx"] = ort_form(onnx)
    for mode in ("dynamic", "static"):
        if f"onnx_{mode}" in int8:
            path = quantize_onnx(onnx, work / f"encoder_int8_{mode}.onnx", mode, calib)
            forms[f"int8_onnx_{mode}"] = ort_form(path)
    if "torch" in int8:
        quantized = quantize_torch(encoder)
        forms["int8_torch"] = (quantized, state_bytes(quantized))
    return forms


def pruned_forms(cfg: DeployBenchConfig, encoder: nn.Module, calib: torch.Tensor) -> tuple:
    """--pruned and --prune forms of --ckpt, and {form: SAM whose decoder scores it}."""
    forms, sams = {}, {}
    for path in cfg.pruned:
        pruned_sam = load_sam(path)
        name = f"pruned:{Path(path).parent.name}/{Path(path).name}"
        forms[name] = (pruned_sam.image_encoder, state_bytes(pruned_sam.image_encoder))
        sams[name] = pruned_sam
    for target, ratio in cfg.prune_specs():
        pruned, _ = prune_student(encoder, target, ratio, calib)
        forms[f"pruned:{target}{ratio:g} (not re-distilled)"] = (pruned, state_bytes(pruned))
    return forms, sams


def peer_forms(cfg: DeployBenchConfig, work: Path) -> dict[tuple[str, int], Form]:
    """{(peer, input side): its ONNX form} at its native side and at --image-size."""
    forms = {}
    for name in cfg.peers:
        encoder, native = common.build_encoder(name, cfg.image_size, "cpu")
        for side in sorted({native, cfg.image_size}):
            path = work / f"{name}_{side}.onnx"
            try:
                torch.onnx.export(
                    encoder,
                    (torch.zeros(1, 3, side, side),),
                    str(path),
                    input_names=["image"],
                    output_names=["image_embeddings"],
                    opset_version=17,
                    dynamo=False,
                )
            except Exception as err:  # noqa: BLE001 (a peer built for one input side only)
                print(f"{name} does not export at {side} px ({type(err).__name__}): no row")
                continue
            forms[name, side] = ort_form(path)
    return forms


def box_masks(sam, embedding: np.ndarray, pre: Preprocessed, boxes: np.ndarray) -> list[dict]:
    """RLEs of the masks ``sam``'s decoder draws for ``boxes`` from ``embedding`` [1, 256, h, w]."""
    predictor = SamPredictor(sam)
    predictor.original_size, predictor.input_size = pre.orig_hw, pre.input_hw
    predictor.features = torch.as_tensor(embedding)
    predictor.is_image_set = True
    with torch.inference_mode():
        return encode_masks(predict_masks(predictor, multimask_output=True, boxes=boxes))


def score(forms: dict[str, Form], items: list[tuple], sam=None, sams=None) -> dict[str, dict]:
    """Embedding agreement of every form with ``fp32_torch``; with ``sam``, box agreement too."""
    images = torch.stack([pre.image for pre, _ in items])
    embeds = {
        name: np.concatenate([encode(enc, images[i : i + 1]) for i in range(len(images))])
        for name, (enc, _) in forms.items()
    }
    ref = embeds["fp32_torch"]
    rows = {name: embedding_agreement(ref, emb) for name, emb in embeds.items()}
    if sam is None:
        return rows
    ref_masks = [box_masks(sam, ref[i : i + 1], pre, boxes) for i, (pre, boxes) in enumerate(items)]
    for name, emb in embeds.items():
        ious = []
        for i, (pre, boxes) in enumerate(items):
            masks = box_masks(sams.get(name, sam), emb[i : i + 1], pre, boxes)
            ious += [
                mask_iou(a, b, both_empty=1.0) for a, b in zip(ref_masks[i], masks, strict=True)
            ]
        rows[name] |= {"box_agreement_miou": 100 * float(np.mean(ious)), "num_boxes": len(ious)}
    return rows


def gt_scores(cfg: DeployBenchConfig, forms: dict[str, Form], sam, sams: dict, work: Path) -> dict:
    """GT IoU x 100 per --coco-root instance of every form (`common.memory_scores`: eval's loop
    and protocol), compared paired with ``fp32_torch`` (`common.compare`)."""
    ious = {}
    for i, (name, (encoder, _)) in enumerate(forms.items()):
        base = sams.get(name, sam)
        mean, std = (base.pixel_mean.flatten().tolist(), base.pixel_std.flatten().tolist())
        model = Sam(encoder, base.prompt_encoder, base.mask_decoder, mean, std)
        path = work / "gt" / f"{i}.json"
        ious[name] = common.memory_scores(path, name, model, cfg.ckpt, cfg.coco_root)
    return {name: common.compare(ious["fp32_torch"], v) for name, v in ious.items()}


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per student model: fp32 ONNX ratio, the fastest int8 form, and the peers against it."""
    peers = [r for r in rows if r["latency_ratio"] is None]
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows if r["latency_ratio"] is not None):
        forms = {r["variant"]: r for r in rows if r["model"] == model}
        onnx = forms["fp32_onnx"]
        entry = {"input": onnx["input"], "fp32_onnx_ratio": onnx["latency_ratio"]}
        int8 = {k: v for k, v in forms.items() if k.startswith("int8_")}
        if int8:
            best = min(int8, key=lambda k: int8[k]["latency_ms"])
            entry |= {"best_int8": best, "best_int8_speedup": 1 / int8[best]["latency_ratio"]}
            entry["best_int8_cosine"] = int8[best]["cosine"]
        entry["peer_onnx_over_fp32_onnx"] = {
            f"{p['model']}@{p['input']}": p["latency_ms"] / onnx["latency_ms"] for p in peers
        }
        out[model] = entry
    return out


def tables(cfg: DeployBenchConfig, rows: list[dict], summ: dict, gt: dict) -> dict:
    """The docs' tables (caption, header, rows of cells, note), kept in the results JSON and
    rendered by launch/bench/tables.py."""
    header = ["model", "input", "form", "latency ms", "ratio to fp32 torch", "model MB"]
    header += ["embedding cosine", "relative error", "box agreement mIoU"]

    def cells(r: dict) -> list:
        ratio, cos = r["latency_ratio"], r.get("cosine")
        return [
            f"`{r['model']}`" + (" (ONNX)" if ratio is None else ""),
            r["input"],
            r["variant"],
            f"{r['latency_ms']:.0f}",
            "" if ratio is None else f"{ratio:.2f}",
            f"{r['bytes'] / 1e6:.2f}",
            "" if cos is None else f"{cos:.5f}",
            "" if cos is None else f"{r['rel_error']:.4f}",
            f"{r['box_agreement_miou']:.1f}" if "box_agreement_miou" in r else "",
        ]

    notes = []
    for model, m in summ.items():
        best = ""
        if "best_int8" in m:
            best = (
                f"; the fastest int8 form, {m['best_int8']}, is {m['best_int8_speedup']:.2f}x "
                f"faster than fp32 PyTorch (embedding cosine {m['best_int8_cosine']:.4f})"
            )
        peers = ", ".join(f"{k} {v:.1f}x" for k, v in m["peer_onnx_over_fp32_onnx"].items())
        peers = f"; peer ONNX latency over ours in fp32 ONNX: {peers}" if peers else ""
        notes.append(
            f"`{model}` at {m['input']} px: fp32 ONNX takes {m['fp32_onnx_ratio']:.2f}x the "
            f"PyTorch encoder's time{best}{peers}."
        )
    caption = (
        f"Deployed encoder forms at batch 1, {cfg.repeats} interleaved runs of every form of "
        "every model (median); registered students and peers with random weights, a student.pt "
        "with its own; cosine and relative error of the embedding against its fp32 PyTorch "
        f"encoder on {cfg.num_images} generated images."
    )
    out = {
        "forms": {
            "caption": caption,
            "header": header,
            "rows": [cells(r) for r in rows],
            "note": "\n" + "\n".join(f"- {n}" for n in notes) + "\n",
        }
    }
    peers = list(dict.fromkeys(k for m in summ.values() for k in m["peer_onnx_over_fp32_onnx"]))
    out["summary"] = {
        "caption": caption.split(";")[0] + ".",
        "header": ["model", "input", "fp32 ONNX / PyTorch time", "fastest int8 form"]
        + ["its speed-up over fp32 PyTorch", "its embedding cosine"]
        + [f"`{p}` ONNX / our fp32 ONNX time" for p in peers],
        "rows": [
            [f"`{model}`", m["input"], f"{m['fp32_onnx_ratio']:.2f}", m.get("best_int8", "")]
            + [f"{m['best_int8_speedup']:.2f}x" if "best_int8" in m else ""]
            + [f"{m['best_int8_cosine']:.4f}" if "best_int8" in m else ""]
            + [f"{m['peer_onnx_over_fp32_onnx'][p]:.2f}x" for p in peers]
            for model, m in summ.items()
        ],
    }
    if gt:
        out["gt"] = {
            "caption": (
                f"GT mIoU of every form of `{cfg.ckpt}` on `{cfg.coco_root}` (GT box, multimask, "
                "best predicted IoU), paired per instance with fp32 PyTorch, +- one standard error."
            ),
            "header": ["form", "GT mIoU", "difference to fp32 torch", "instances", "improved"],
            "rows": [
                [k, f"{v['new_miou']:.2f}", f"{v['mean']:+.2f} +- {v['se']:.2f}", v["n"]]
                + [f"{100 * v['improved']:.0f}%"]
                for k, v in gt.items()
            ],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DeployBenchConfig, argv, __doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models = {}  # label -> ({form: Form}, input side, {form: agreement})
    sizes, images, gt = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def inputs(side: int, shards: str | None = None) -> tuple[list, torch.Tensor]:
            """Scored images and calibration images (``shards``, or generated) at ``side``."""
            if side not in sizes:
                more = generated_images(work / f"calib{side}", cfg.num_calib, cfg.seed + 1, side)
                sizes[side] = (
                    generated_images(work / f"scored{side}", cfg.num_images, cfg.seed, side),
                    torch.stack([pre.image for pre, _ in more]),
                )
            items, calib = sizes[side]
            return items, cache_images(shards, cfg.num_calib, side) if shards else calib

        if cfg.ckpt:
            sam = load_sam(cfg.ckpt)
            side = sam.image_encoder.img_size
            items, calib = inputs(side, cfg.calib_shards)
            forms = student_forms(sam.image_encoder, work / "ckpt", calib, cfg.int8)
            more, sams = pruned_forms(cfg, sam.image_encoder, calib)
            forms |= more
            label = f"{Path(cfg.ckpt).parent.name}/{Path(cfg.ckpt).name}"
            models[label] = (forms, side, score(forms, items, sam, sams))
            if cfg.coco_root:
                gt = gt_scores(cfg, forms, sam, sams, work)
        for name in cfg.students:
            torch.manual_seed(0)
            encoder = build_student(name, img_size=cfg.image_size)
            items, calib = inputs(cfg.image_size)
            forms = student_forms(encoder, work / name, calib, cfg.int8)
            models[name] = (forms, cfg.image_size, score(forms, items))
        for (name, side), form in peer_forms(cfg, work).items():
            models[f"{name}@{side}"] = ({"fp32_onnx": form}, side, {})
        calls = {}
        for model, (forms, side, _) in models.items():
            if side not in images:
                pre = generated_images(work / f"timed{side}", 1, cfg.seed, side)[0][0]
                images[side] = pre.image[None]
            for form, (encoder, _) in forms.items():
                calls[model, form] = partial(encode, encoder, images[side])
        latency = {k: 1e3 * s for k, s in common.interleaved(calls, cfg.repeats, warmup=1).items()}
    rows = []
    for model, (forms, side, agreement) in models.items():
        base = latency.get((model, "fp32_torch"))
        peer = "@" in model
        for form, (_, nbytes) in forms.items():
            ms = latency[model, form]
            rows.append(
                {
                    "model": model.split("@")[0] if peer else model,
                    "input": side,
                    "variant": form,
                    "latency_ms": ms,
                    "latency_ratio": None if peer else ms / base,
                    "bytes": nbytes,
                    **agreement.get(form, {}),
                }
            )
    summ = summary(rows)
    print(json.dumps(common.machine_info("cpu")), f"\nbatch 1, {cfg.num_images} generated images")
    made = tables(cfg, rows, summ, gt)
    for table in made.values():
        common.print_table(table["header"], table["rows"])
        print(table.get("note", ""))
    figures = {"rows": rows, "summary": summ, "gt": gt, "tables": made}
    common.write_results(cfg.out, figures, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
