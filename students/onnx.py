"""ONNX export of a student image encoder and of SAM's prompt encoder + mask decoder, checked
against onnxruntime.

The fused attention kernels are PyTorch operators that ONNX does not have, so DFA exports in its
union form (`students.dfa_union`: every query has one softmax over the keys its patterns give
it, matrix products over contiguous blocks, the same values as the training path), and SAM's
`LayerNorm2d` in the neck as a `LayerNormalization` between transposes. Input `image`
[B, 3, S, S] float32 (preprocessed as `teachers.preprocess` does), output `image_embeddings`
[B, 256, S/16, S/16]. The batch is dynamic; the image side is fixed at export (the tiles are
computed from it).

The decoder file is SAM's own ONNX layout (`segment_anything.utils.onnx.SamOnnxModel`, as in
segment-anything's `scripts/export_onnx_model.py`): inputs `image_embeddings` [1, 256, h, w],
`point_coords` [1, N, 2] (in the resized input frame, `ResizeLongestSide.apply_coords`),
`point_labels` [1, N] (1 foreground, 0 background, 2 and 3 box corners, -1 padding),
`mask_input` [1, 1, 4h, 4w], `has_mask_input` [1], `orig_im_size` [2]; outputs `masks`
[1, 1, H, W] logits at the original size, `iou_predictions` [1, 1], `low_res_masks`
[1, 1, 4h, 4w]. N is dynamic. With `return_single_mask` the graph picks the mask the way
`SamPredictor` would: for one box alone (N = 2, no padding point) the best-scored of the three
multimask outputs, the evaluation protocol's choice; with more prompts the single-mask output.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from students.dfa import DilatedFlashAttention

DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def export_onnx(encoder: nn.Module, path: str | Path, batch: int = 1, opset: int = 17) -> Path:
    """Write `encoder` (a student from the registry) to an ONNX file at its `img_size`.

    DFA layers export in their union form (`students.dfa_union`: one softmax over every query's
    keys, which onnxruntime runs without gathers); then the batch is dynamic and `batch` only
    sizes the tracing input. A layer whose patterns have no union form exports the explicit
    reference math, which bakes the batch size in: the export says so.
    """
    path = Path(path)
    model = copy.deepcopy(encoder).float().eval()
    grid = model.img_size // 16
    attention = [m for m in model.modules() if isinstance(m, DilatedFlashAttention)]
    for module in attention:
        module.backend = "union"
    _channel_norms_as_layer_norms(model)
    fixed = [m for m in attention if not m.union_applies((grid, grid))]
    if fixed:
        print(
            f"export: {len(fixed)} of {len(attention)} attention layers have no union form at "
            f"grid {grid} (patterns {list(fixed[0].patterns)}): they export the explicit reference "
            f"math, and the file takes batch {batch} only",
            flush=True,
        )
    dynamic = None if fixed else {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}
    dummy = torch.zeros(batch, 3, model.img_size, model.img_size)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=["image_embeddings"],
        dynamic_axes=dynamic,
        opset_version=opset,
        dynamo=False,
    )
    return path


class OrtEncoder(nn.Module):
    """An encoder ONNX file (fp32 or int8) run by onnxruntime on CPU behind the interface
    `SamPredictor` and the evaluation use: `img_size` and `forward(images [B, 3, S, S]) ->
    embeddings [B, 256, S/16, S/16]`. Put in place of `sam.image_encoder`, it scores the file a
    user deploys with the project's own evaluation. `threads` 0: onnxruntime's default; idle
    threads do not spin (they would slow whatever runs between calls)."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.img_size = int(self.session.get_inputs()[0].shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {"image": x})[0]).to(images.device)


class _ChannelLayerNorm(nn.Module):
    """SAM's `LayerNorm2d` (over the channels of ``[B, C, H, W]``) as a layer norm over the last
    axis between two transposes: the same values, exported as one `LayerNormalization`, which
    onnxruntime runs several times faster than the mean, variance and divide over axis 1."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.shape = (norm.weight.numel(),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _channel_norms_as_layer_norms(model: nn.Module) -> None:
    """Swap every `LayerNorm2d` of `model` for `_ChannelLayerNorm` (in place)."""
    from segment_anything.modeling.common import LayerNorm2d

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LayerNorm2d):
                setattr(parent, name, _ChannelLayerNorm(child))


def check_onnx(encoder: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Max absolute difference between onnxruntime and PyTorch on `images` [B, 3, S, S]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"image": images.numpy().astype(np.float32)})
    with torch.inference_mode():
        ref = encoder.eval()(images).numpy()
    return float(np.abs(ours - ref).max())


def _decoder_model(sam: nn.Module) -> nn.Module:
    """`SamOnnxModel` whose crop to the resized image stays a graph computation.

    Upstream crops with `masks[..., : int(h), : int(w)]`; the tracer freezes those ints to the
    dummy input's image size, so every other image size would get a wrong crop. Here the crop
    indexes with `arange` of the computed size, which traces to a dynamic `Range` + `Gather`.
    """
    from segment_anything.utils.onnx import SamOnnxModel

    class DynamicCrop(SamOnnxModel):
        def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor):
            side = (self.img_size, self.img_size)
            masks = F.interpolate(masks, size=side, mode="bilinear", align_corners=False)
            h, w = self.resize_longest_image_size(orig_im_size, self.img_size)
            masks = masks.index_select(2, torch.arange(h)).index_select(3, torch.arange(w))
            size = orig_im_size.to(torch.int64)
            return F.interpolate(
                masks, size=(size[0], size[1]), mode="bilinear", align_corners=False
            )

    return DynamicCrop(copy.deepcopy(sam).float().cpu().eval(), return_single_mask=True)


def export_decoder_onnx(sam: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Write `sam`'s prompt encoder + mask decoder in SAM's ONNX layout (module docstring)."""
    path = Path(path)
    model = _decoder_model(sam)
    grid = sam.image_encoder.img_size // 16
    dummy = (
        torch.randn(1, sam.prompt_encoder.embed_dim, grid, grid),
        torch.randint(0, sam.image_encoder.img_size, (1, 3, 2), dtype=torch.float),
        torch.randint(0, 4, (1, 3), dtype=torch.float),
        torch.zeros(1, 1, 4 * grid, 4 * grid),
        torch.zeros(1),
        torch.tensor([sam.image_encoder.img_size] * 2, dtype=torch.float),
    )
    num_points = {1: "num_points"}
    torch.onnx.export(
        model,
        dummy,
        str(path),
        input_names=list(DECODER_INPUTS),
        output_names=list(DECODER_OUTPUTS),
        dynamic_axes={"point_coords": num_points, "point_labels": num_points},
        opset_version=opset,
        dynamo=False,
    )
    return path


def write_xanylabeling_config(
    out: str | Path, encoder: str, decoder: str, name: str, img_size: int
) -> Path:
    """OUT/xanylabeling.yaml: the model config that X-AnyLabeling's (and AnyLabeling's) "Load
    Custom Model" reads for a `segment_anything` ONNX pair, with the files named relative to it.

    Keys as in X-AnyLabeling's own `anylabeling/configs/auto_labeling/segment_anything_*.yaml`:
    `type`, `name`, `display_name`, `encoder_model_path`, `decoder_model_path`, `input_size` (the
    encoder's square input side) and `max_width` / `max_height` (the largest image the tool feeds
    at full size; larger ones are scaled down first).
    """
    import yaml

    config = {
        "type": "segment_anything",
        "name": f"sam_distill_{name}",
        "display_name": f"Segment Anything ({name}, sam-distill)",
        "encoder_model_path": encoder,
        "decoder_model_path": decoder,
        "input_size": int(img_size),
        "max_width": int(img_size),
        "max_height": int(img_size),
    }
    path = Path(out) / "xanylabeling.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
