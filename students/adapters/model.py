"""SAM with an adapted encoder as one trainable module: images and boxes in, mask logits out.

``PromptedSam(sam)`` runs ``sam.image_encoder`` (an ``AdaptedEncoder`` or a plain encoder), the
frozen prompt encoder on one box per image, and the mask decoder with ``multimask_output=False``
(one mask token, the recipe of Conv-LoRA, arXiv 2401.17868, and CAD, arXiv 2409.15889). Inputs
are what ``teachers.preprocess.preprocess`` makes: ``[B, 3, S, S]`` normalised, padded images and
boxes ``[B, 4]`` (x0, y0, x1, y1) in that resized frame. The output is SAM's low-resolution
logits ``[B, 1, S/4, S/4]``; ``Sam.postprocess_masks`` takes them to an image's original size.

SAM's ``MaskDecoder`` pairs one image with many prompts (it repeats the embedding per prompt),
so a batch of images, one box each, is decoded image by image, as ``Sam.forward`` does.

``set_trainable(sam, train_decoder)`` freezes what no method trains: the prompt encoder always,
the mask decoder unless it trains (the default of every method).
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

from teachers.preprocess import preprocess


class PromptedSam(nn.Module):
    """``(images [B, 3, S, S], boxes [B, 4]) -> low-res mask logits [B, 1, S/4, S/4]``."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    @property
    def img_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    def forward(self, images: Tensor, boxes: Tensor) -> Tensor:
        embeddings = self.sam.image_encoder(images)
        prompt = self.sam.prompt_encoder
        with torch.no_grad():  # frozen: its outputs need no graph
            sparse, dense = prompt(points=None, boxes=boxes.to(embeddings.dtype), masks=None)
            dense_pe = prompt.get_dense_pe()
        logits = [
            self.sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse[i : i + 1],
                dense_prompt_embeddings=dense[i : i + 1],
                multimask_output=False,
            )[0]
            for i in range(embeddings.shape[0])
        ]
        return torch.cat(logits)

    def aux_loss(self) -> Tensor:
        """The adapter's auxiliary loss of the last forward (Conv-LoRA's balancing loss), else 0."""
        encoder = self.sam.image_encoder
        if hasattr(encoder, "aux_loss"):
            return encoder.aux_loss()
        return torch.zeros((), device=next(self.parameters()).device)


def set_trainable(sam: Sam, train_decoder: bool = True) -> None:
    """Freeze the prompt encoder and, unless ``train_decoder``, the mask decoder; the encoder's
    own weights were frozen by ``build_adapter``, its adapter parts are left as they are."""
    sam.prompt_encoder.requires_grad_(False)
    sam.mask_decoder.requires_grad_(train_decoder)


@torch.no_grad()
def predict_prob(
    model: PromptedSam, image: np.ndarray, box: list[float], dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """[H, W] foreground probability of one [H, W, 3] uint8 image under one box prompt given in
    the image's own pixel coordinates: SAM's preprocessing, the model, `Sam.postprocess_masks`
    to the original size, sigmoid. The model's train/eval mode is left as it is."""
    pre = preprocess(image, model.img_size)
    device = next(model.parameters()).device
    boxes = ResizeLongestSide(model.img_size).apply_boxes(np.asarray([box]), pre.orig_hw)
    logits = model(
        pre.image[None].to(device, dtype), torch.as_tensor(boxes, dtype=dtype, device=device)
    )
    full = model.sam.postprocess_masks(logits.float(), pre.input_hw, pre.orig_hw)
    return torch.sigmoid(full[0, 0]).cpu().numpy()
