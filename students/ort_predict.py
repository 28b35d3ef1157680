"""Box-prompted SAM segmentation with onnxruntime alone (numpy, Pillow, onnxruntime; no torch).

    python predict.py --encoder encoder_int8_b1.onnx --decoder decoder.onnx --image photo.jpg \\
        --box 40,30,200,180 [--box ...] --out masks.png

`launch/export.py` copies this file beside the ONNX files it writes, so that folder runs on a
machine without PyTorch. `OrtPredictor` repeats `SamPredictor`'s steps: the preprocessing of
`segment_anything.utils.transforms.ResizeLongestSide` and `Sam.preprocess` (bilinear PIL resize of
the longest side to the encoder's input side, SAM's pixel mean and std, zero padding to a square),
the encoder once per image, and per box the decoder exported from `SamOnnxModel`
(`students.onnx.export_decoder_onnx`) with the box's two corners as prompts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def resized_shape(h: int, w: int, side: int) -> tuple[int, int]:
    """`ResizeLongestSide.get_preprocess_shape`: the longest side becomes `side`."""
    scale = side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def preprocess(image: np.ndarray, side: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [1, 3, side, side] float32, as `teachers.preprocess` does."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image.dtype} {image.shape}")
    h, w = resized_shape(*image.shape[:2], side)
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), dtype=np.float32)
    x = (resized - PIXEL_MEAN) / PIXEL_STD
    out = np.zeros((1, 3, side, side), dtype=np.float32)
    out[0, :, :h, :w] = x.transpose(2, 0, 1)
    return out


class OrtPredictor:
    """`SamPredictor`'s `set_image` / box `predict` on an encoder and a decoder ONNX file."""

    def __init__(self, encoder: str | Path, decoder: str | Path, threads: int = 0) -> None:
        for flag, path in (("--encoder", encoder), ("--decoder", decoder)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(encoder), options, providers=providers)
        self.decoder = ort.InferenceSession(str(decoder), options, providers=providers)
        shape = self.encoder.get_inputs()[0].shape  # [B, 3, S, S]
        if isinstance(shape[0], int) and shape[0] != 1:  # a named dimension is a dynamic batch
            raise ValueError(f"--encoder {encoder} has batch {shape[0]}: use the batch-1 file")
        self.img_size = int(shape[-1])
        self.embedding: np.ndarray | None = None
        self.orig_hw = (0, 0)

    def set_image(self, image: np.ndarray) -> None:
        """Encode one [H, W, 3] uint8 RGB image."""
        (self.embedding,) = self.encoder.run(None, {"image": preprocess(image, self.img_size)})
        self.orig_hw = (int(image.shape[0]), int(image.shape[1]))

    def set_embedding(self, embedding: np.ndarray, orig_hw: tuple[int, int]) -> None:
        """Use an embedding [1, 256, h, w] computed elsewhere for an image of size `orig_hw`."""
        self.embedding, self.orig_hw = embedding.astype(np.float32), tuple(orig_hw)

    def predict_box(self, box: Sequence[float]) -> tuple[np.ndarray, float, np.ndarray]:
        """Mask logits [H, W] (threshold at 0), predicted IoU and low-res logits for one xyxy box
        in original pixels."""
        if self.embedding is None:
            raise RuntimeError("call set_image before predict_box")
        h, w = self.orig_hw
        new_h, new_w = resized_shape(h, w, self.img_size)
        coords = np.asarray(box, dtype=np.float64).reshape(2, 2) * [new_w / w, new_h / h]
        grid = self.embedding.shape[-1]
        masks, iou, low_res = self.decoder.run(
            None,
            {
                "image_embeddings": self.embedding,
                "point_coords": coords[None].astype(np.float32),
                "point_labels": np.array([[2, 3]], dtype=np.float32),
                "mask_input": np.zeros((1, 1, 4 * grid, 4 * grid), dtype=np.float32),
                "has_mask_input": np.zeros(1, dtype=np.float32),
                "orig_im_size": np.array([h, w], dtype=np.float32),
            },
        )
        return masks[0, 0], float(iou[0, 0]), low_res[0, 0]


def _box(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--box {text!r}: give x0,y0,x1,y1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="encoder ONNX (batch 1)")
    parser.add_argument("--decoder", required=True, help="decoder ONNX (SamOnnxModel layout)")
    parser.add_argument("--image", required=True, help="an RGB image file")
    parser.add_argument("--box", type=_box, action="append", required=True, help="x0,y0,x1,y1")
    parser.add_argument("--out", required=True, help="PNG: box k's mask has value k (1..255)")
    args = parser.parse_args(argv)
    predictor = OrtPredictor(args.encoder, args.decoder)
    with Image.open(args.image) as img:
        predictor.set_image(np.asarray(img.convert("RGB")))
    labels = np.zeros(predictor.orig_hw, dtype=np.uint8)
    for k, box in enumerate(args.box, start=1):
        logits, iou, _ = predictor.predict_box(box)
        labels[logits > 0] = k
        print(f"box {k} {box}: predicted IoU {iou:.3f}, {(logits > 0).sum()} pixels")
    Image.fromarray(labels).save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
