"""Int8 students: onnxruntime quantization of the encoder ONNX, and PyTorch dynamic quantization.

Two paths, both CPU:

* ONNX (``onnxruntime.quantization``): ``dynamic`` quantizes the weights of every MatMul/Gemm
  to int8 per channel and the activations at run time, per tensor; the convolutions stay fp32
  (onnxruntime runs a dynamically quantized Conv as ``ConvInteger``, which made a 1024-px dfa_t
  slower than fp32 on a 2-core AMD EPYC). ``static`` quantizes the convolutions too and fixes
  the activation scales from calibration images (a few cached images, ``teachers.preprocess``d),
  writing QDQ nodes that onnxruntime fuses into int8 kernels (``QLinearConv``, int8 MatMul). Only products with a stored
  weight are quantized; nodes whose names start with a prefix in ``keep_fp32`` stay fp32: by
  default the patch embedding, whose input is the raw normalised image (quantized statically,
  it alone cut the embedding cosine of a distilled dfa_t from 0.99999 to 0.996).
* PyTorch (``torch.ao.quantization.quantize_dynamic``): every ``nn.Linear`` (qkv, proj, the MLPs)
  gets int8 weights and dynamically quantized activations; the attention kernels, the patch
  embedding and the neck convolutions stay fp32.
"""

from __future__ import annotations

import copy
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

INT8_MODES = ("dynamic", "static")
# Ops whose weights carry the student's compute; everything else stays fp32. Dynamic
# quantization leaves Conv out (module docstring).
QUANT_OPS = ("MatMul", "Gemm", "Conv")
DYNAMIC_OPS = ("MatMul", "Gemm")
# The first layer: its input, the normalised image with its zero padding, quantizes badly.
KEEP_FP32 = ("/patch_embed/",)


def weight_nodes(path: str | Path, ops: Sequence[str] = QUANT_OPS) -> list[str]:
    """Names of the graph's `ops` nodes (MatMul/Gemm/Conv) that multiply by a stored weight: the
    attention's activation-by-activation products (q k^T, p v) are left out, so they and the
    softmax between them stay fp32."""
    import onnx

    graph = onnx.load(str(path)).graph
    stored = {t.name for t in graph.initializer}
    stored |= {out for n in graph.node if n.op_type == "Constant" for out in n.output}
    return [
        n.name for n in graph.node if n.op_type in ops and any(name in stored for name in n.input)
    ]


def _calibration_reader(images: Tensor, batch: int):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``[N, 3, S, S]`` images, one
    batch of the graph's static batch size at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    data = images.numpy().astype(np.float32)
    usable = len(data) - len(data) % batch
    if usable == 0:
        raise ValueError(
            f"{len(data)} calibration images cannot fill one batch of {batch}: give more "
            "images (--num-calib) or calibrate the batch-1 graph"
        )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(data[i : i + batch] for i in range(0, usable, batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._batches, None)
            return None if chunk is None else {"image": chunk}

    return Reader()


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    mode: str,
    images: Tensor | None = None,
    keep_fp32: Sequence[str] = KEEP_FP32,
    reduce_range: bool = False,
) -> Path:
    """Write an int8 copy of the encoder ONNX at ``src`` to ``dst``.

    mode: ``dynamic`` or ``static`` (needs ``images`` ``[N, 3, S, S]``, preprocessed);
    keep_fp32: prefixes of node names left in fp32 (ONNX names follow the module path,
    ``/blocks.5/mlp/lin2/MatMul``);
    reduce_range: 7-bit weights, onnxruntime's remedy for x86 CPUs without VNNI (AVX2, or
    AVX-512 without VNNI), whose u8s8 kernels (``vpmaddubsw``) saturate at 8 bits. On such a
    2-core AMD EPYC a briefly distilled dfa_t's dynamic int8 embedding had 1 - cosine 2.3e-4
    without it and 2.6e-6 with it; on a CPU with VNNI, 8-bit weights are the more accurate.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_MODES:
        raise ValueError(f"--int8 {mode!r}: choose one of {', '.join(INT8_MODES)}")
    if mode == "static" and images is None:
        raise ValueError("--int8 static calibrates on cached images: give --calib-shards CACHE")
    dst = Path(dst)
    ops = QUANT_OPS if mode == "static" else DYNAMIC_OPS
    common = dict(
        op_types_to_quantize=list(ops),
        nodes_to_quantize=[n for n in weight_nodes(src, ops) if not n.startswith(tuple(keep_fp32))],
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
    )
    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst), **common)
        return dst
    import onnx

    batch = onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[0].dim_value or 1
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference only: its graph optimizer would fold the attention's index tensors into
        # constants several times the size of the weights.
        quant_pre_process(str(src), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            _calibration_reader(images, batch),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            **common,
        )
    return dst


def cpu_has_vnni() -> bool:
    """Whether this CPU reports VNNI (``avx512_vnni`` or ``avx_vnni`` in /proc/cpuinfo), the
    instructions onnxruntime's int8 kernels need for full 8-bit accuracy on x86 (see
    ``quantize_onnx``'s ``reduce_range``). False where /proc/cpuinfo is missing."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def int8_cpu_warning(reduce_range: bool, machine: str | None = None) -> str | None:
    """The warning for writing 8-bit int8 weights on an x86 CPU without VNNI, whose onnxruntime
    kernels saturate them; None elsewhere, or with ``reduce_range``. The deploy machine may not
    be this one, so it warns rather than choosing."""
    machine = (machine or platform.machine()).lower()
    if reduce_range or machine not in ("x86_64", "amd64") or cpu_has_vnni():
        return None
    return (
        "WARNING: this x86 CPU has no VNNI: onnxruntime's int8 kernels saturate 8-bit weights "
        "here (up to 30x the embedding error of a VNNI CPU); if the model runs on a CPU like "
        "this one, export with --reduce-range (students/README.md#onnx-int8-and-a-torch-free-"
        "predictor)"
    )


def quantize_torch(encoder: nn.Module) -> nn.Module:
    """An int8 copy of ``encoder`` for CPU: ``nn.Linear`` layers dynamically quantized."""
    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(encoder).float().cpu().eval()
    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def embedding_agreement(ref: np.ndarray | Tensor, other: np.ndarray | Tensor) -> dict[str, float]:
    """Per-image cosine (mean and min) and relative L2 error (mean) of ``other`` to ``ref``,
    both ``[B, C, h, w]`` embeddings."""
    a = torch.as_tensor(np.asarray(ref), dtype=torch.float64).flatten(1)
    b = torch.as_tensor(np.asarray(other), dtype=torch.float64).flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    rel = (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
    return {
        "cosine": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "rel_error": float(rel.mean()),
    }
