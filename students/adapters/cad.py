"""CAD (Kim et al., arXiv 2409.15889): a convolutional adapter parallel to the frozen encoder.

The encoder runs under ``torch.no_grad()``, so it stores no activation for backward and its
embeddings could be cached; a separate CNN on the raw image and its high-pass component adds
``scale * tanh(CNN)`` to the final embedding. Architecture as the official
``code/segment_anything_cad/modeling/cad.py`` and ``utils/fft.py`` of
``Kyyle2114/Convolutional-Adapter-for-Segment-Anything`` (our own code):

* input: the RGB image at ``input_size`` (512) in 0..255, *not* normalised, concatenated with
  ``|IFFT|`` of its FFT with the central (low-frequency) square of side
  ``2 * int(sqrt(H W tau) / 2)``, tau = 0.25, zeroed; each sample and channel divided by its
  spatial max + 1e-5;
* ``conv_up`` 1x1, 6 -> width (256), then 3 x [3x3 conv dilation 2 -> BN -> LeakyReLU(0.1) ->
  + input -> AvgPool 2]: 512 -> 256 -> 128 -> 64;
* the three block outputs adaptive-average-pooled to the embedding grid (64 x 64 at 1024),
  summed, tanh; ``embedding + 0.1 * tanh(...)``. Kaiming-normal (fan_out) conv weights.

Our adaptations: the wrapper keeps the encoder's call signature, so it receives SAM-preprocessed
(normalised, zero-padded) images and un-normalises them with SAM's pixel mean/std (padding thus
becomes the mean colour, where the official code resizes the unpadded image). ``width`` and
``input_size`` are options because the 256-channel 512 px CNN stores more activations than an
in-encoder adapter on a small student (``launch/bench/adapt.py`` measures it); with ``width``
other than the embedding's 256 channels a 1x1 conv (with bias) projects to 256 before the tanh.
Parameters: ``7 W + 3 (9 W^2 + 3 W)`` (+ ``256 W + 256`` with the projection); 1,773,568 at the
official W = 256.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from students.adapters.base import AdaptedEncoder, register_adapter
from teachers.preprocess import PIXEL_MEAN, PIXEL_STD


def high_pass(x: Tensor, tau: float = 0.25) -> Tensor:
    """``|IFFT(FFT(x) with the central low-frequency square zeroed)|``, ``[B, C, H, W]``.

    SAM-Adapter's handcrafted high-frequency prompt, as CAD's ``utils/fft.py`` uses it.
    """
    h, w = x.shape[-2:]
    half = int(math.sqrt(h * w * tau) // 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    keep = torch.ones(h, w, device=x.device)
    keep[h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half] = 0
    spectrum = torch.fft.ifftshift(spectrum * keep, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").abs().to(x.dtype)


class ConvBlock(nn.Module):
    """``[B, W, H, W'] -> [B, W, H/2, W'/2]``: dilated 3x3 conv, BN, LeakyReLU, residual, pool."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, kernel_size=3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.leaky_relu(self.bn(self.conv(x)), 0.1) + x)


class ConvAdapter(nn.Module):
    """CAD's CNN: ``[B, 3, S, S]`` images in 0..255 -> ``tanh`` map ``[B, out_chans, h, w]``."""

    def __init__(self, width: int = 256, input_size: int = 512, out_chans: int = 256) -> None:
        super().__init__()
        if width < 1 or input_size < 8 or input_size % 8:
            raise ValueError(
                f"cad needs width >= 1 and input_size a positive multiple of 8 (three 2x "
                f"poolings), got width={width}, input_size={input_size}"
            )
        self.input_size = input_size
        self.conv_up = nn.Conv2d(6, width, kernel_size=1)
        self.blocks = nn.ModuleList(ConvBlock(width) for _ in range(3))
        self.proj = None if width == out_chans else nn.Conv2d(width, out_chans, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """``images [B, 3, S, S]`` (0..255) -> ``[B, out_chans, *grid]`` in (-1, 1)."""
        x = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear")
        x = torch.cat([x, high_pass(x)], dim=1)
        x = x / (x.amax(dim=(2, 3), keepdim=True) + 1e-5)
        x = self.conv_up(x)
        pooled = 0
        for block in self.blocks:
            x = block(x)
            pooled = pooled + F.adaptive_avg_pool2d(x, grid)
        if self.proj is not None:
            pooled = self.proj(pooled)
        return torch.tanh(pooled)


class CADEncoder(AdaptedEncoder):
    """Frozen encoder under ``no_grad`` plus ``scale * CAD(image)``: ``[B, 256, S/16, S/16]``."""

    def __init__(
        self, encoder: nn.Module, width: int = 256, input_size: int = 512, scale: float = 0.1
    ) -> None:
        super().__init__(encoder)
        self.scale = scale
        self.conv_adapter = ConvAdapter(width, input_size)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), False)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            embedding = self.encoder(x)
        images = x * self.pixel_std + self.pixel_mean  # back to 0..255, as CAD's input
        side = self.conv_adapter(images, tuple(embedding.shape[-2:]))
        return embedding + self.scale * side


@register_adapter
def cad(
    encoder: nn.Module, width: int = 256, input_size: int = 512, scale: float = 0.1
) -> CADEncoder:
    """CAD, official defaults: 256 channels at 512 px, added with scale 0.1."""
    return CADEncoder(encoder, width, input_size, scale)
