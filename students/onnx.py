"""ONNX export of a student image encoder, checked against onnxruntime.

The fused attention kernels are PyTorch operators that ONNX does not have, so the export traces
the reference attention path (explicit matmul and softmax, the same math); onnxruntime then
fuses what it can. Input `image` [B, 3, S, S] float32 (preprocessed as `teachers.preprocess`
does), output `image_embeddings` [B, 256, S/16, S/16]. Shapes are static (the attention's
segment geometry is computed from them at export): export once per batch size, 1 for
`SamPredictor`-style use.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from students.dfa import DilatedFlashAttention


def export_onnx(encoder: nn.Module, path: str | Path, batch: int = 1, opset: int = 17) -> Path:
    """Write `encoder` (a student from the registry) to an ONNX file at its `img_size`."""
    path = Path(path)
    model = copy.deepcopy(encoder).float().eval()
    for module in model.modules():
        if isinstance(module, DilatedFlashAttention):
            module.backend = "reference"
    dummy = torch.zeros(batch, 3, model.img_size, model.img_size)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=["image_embeddings"],
        opset_version=opset,
        dynamo=False,
    )
    return path


def check_onnx(encoder: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Max absolute difference between onnxruntime and PyTorch on `images` [B, 3, S, S]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"image": images.numpy().astype(np.float32)})
    with torch.inference_mode():
        ref = encoder.eval()(images).numpy()
    return float(np.abs(ours - ref).max())
