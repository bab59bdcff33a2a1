"""`classic`: weight-free, deterministic, multi-scale patch descriptors, 7x cheaper than the default
`alike-n` on a CPU.

Each pyramid level (strides 16, 4, 1) describes every pixel by two zero-mean 3x3 intensity
patches of the grayscale image averaged down to the level's stride:

* a *precise* patch: Gaussian blur of `sigma` feature pixels, samples 1 pixel apart;
* a *context* patch: blur and sample spacing `context` times larger.

A zero-mean patch normalised to unit length compares by normalised cross-correlation (gain and
offset invariant). The context patch changes slowly with position, which widens the basin of
convergence of the alignment, while the precise patch keeps the minimum sharp; at stride 16 the
context patch samples +-32 image pixels of an image blurred by 32 pixels. Each patch gets an
extra constant "contrast floor" channel before normalisation: flat, noisy regions then map to
(almost) the same vector in every image instead of to amplified noise. The confidence grows with
the local contrast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import STRIDES, Extractor, FeatureLevel, Pyramid

PATCH = 3  # samples per side of each patch


@dataclass(frozen=True)
class ClassicConf:
    sigma: float = 1.0  # blur of the precise patch, in feature pixels
    context: int = 2  # the context patch's blur and sample spacing, relative to the precise one
    context_weight: float = 1.0  # weight of the context patch relative to the precise one
    contrast_floor: float = 0.004  # patch standard deviation (intensity in [0, 1]) under which a patch counts as flat
    contrast_scale: float = 0.02  # patch standard deviation at which the confidence is 1/2
    min_confidence: float = 1e-3  # keeps confidences in (0, 1] on flat regions
    max_size: int = 1024  # longest image side the caller resizes to


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, borders replicated: (B, C, H, W) -> (B, C, H, W).

    Channels are folded into the batch: single-channel dense convs are several times faster on
    the CPU than the grouped equivalent.
    """
    radius = max(1, round(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    batch, channels, height, width = images.shape
    x = images.reshape(batch * channels, 1, height, width)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.view(batch, channels, height, width)


def describe_patches(image: torch.Tensor, spacing: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, 1, h, w) -> unit descriptors (B, PATCH**2 + 1, h, w) and patch contrast (B, h, w).

    The descriptor is the zero-mean PATCH x PATCH neighbourhood (samples `spacing` apart) plus a
    constant channel worth a patch of standard deviation `floor`.
    """
    batch, _, height, width = image.shape
    extent = 2 * spacing * (PATCH // 2)
    padded = F.pad(image, (extent // 2,) * 4, mode="replicate")
    # Slicing beats F.unfold (im2col) by an order of magnitude on the CPU.
    patches = torch.cat([padded[..., dy:dy + height, dx:dx + width]
                         for dy in range(0, extent + 1, spacing) for dx in range(0, extent + 1, spacing)], 1)
    patches = patches - patches.mean(1, keepdim=True)  # (B, PATCH**2, h, w)
    squared_norm = patches.pow(2).sum(1, keepdim=True)  # (B, 1, h, w)
    # A constant channel whose value is the norm of a patch of standard deviation `floor`.
    floor_squared = floor**2 * PATCH**2
    features = torch.cat([patches, patches.new_full(squared_norm.shape, floor_squared**0.5)], 1)
    # Not F.normalize: torch's norm along dim 1 is ~10x slower than this sum of squares on the CPU.
    features = features / (squared_norm + floor_squared).sqrt()
    return features, (squared_norm[:, 0] / PATCH**2).sqrt()


class ClassicExtractor(Extractor):
    """images (B, 3, H, W) in [0, 1] -> pyramid with 2 * (PATCH**2 + 1) = 20 channels per level."""

    name = "classic"

    def __init__(self, conf: ClassicConf | None = None):
        super().__init__()
        self.conf = conf or ClassicConf()
        if self.conf.sigma <= 0 or self.conf.context < 1:
            raise ValueError(f"classic extractor: need sigma > 0 and context >= 1, got {self.conf}")
        self.max_size = self.conf.max_size

    def level(self, gray: torch.Tensor, stride: int) -> FeatureLevel:
        """gray (B, 1, H, W) -> FeatureLevel with features (B, 20, H/stride, W/stride)."""
        height, width = gray.shape[-2:]
        size = (max(1, round(height / stride)), max(1, round(width / stride)))
        resized = F.interpolate(gray, size=size, mode="area")
        conf = self.conf
        precise, contrast = describe_patches(gaussian_blur(resized, conf.sigma), 1, conf.contrast_floor)
        context, _ = describe_patches(gaussian_blur(resized, conf.sigma * conf.context), conf.context,
                                      conf.contrast_floor)
        # Both parts have unit norm, so dividing by a constant normalises the concatenation.
        features = torch.cat([precise, conf.context_weight * context], 1) / (1 + conf.context_weight**2) ** 0.5
        confidence = (contrast / (contrast + conf.contrast_scale)).clamp(min=conf.min_confidence)
        return FeatureLevel(features, confidence, stride)

    def forward(self, images: torch.Tensor) -> Pyramid:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"classic extractor: expected images (B, 3, H, W), got {tuple(images.shape)}")
        gray = self.grayscale(images)
        return [self.level(gray, stride) for stride in STRIDES]
