"""A weight-free extractor: normalised intensity patches at strides 16, 4 and 1.

Each level is the grayscale image averaged down to the level's stride, blurred by a Gaussian of
`sigma` feature pixels (so the blur in image pixels is proportional to the stride), and described
per pixel by its k x k neighbourhood with the patch mean removed. L2-normalising such a zero-mean
patch makes the residual between two features a monotone function of their normalised cross
correlation: the classic photometric cost of direct alignment, invariant to gain and offset.
Flat patches carry no signal, so the confidence grows with the local contrast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import STRIDES, Extractor, FeatureLevel, Pyramid

@dataclass(frozen=True)
class IntensityConf:
    sigma: float = 1.0  # Gaussian blur in feature pixels, applied after averaging down to the stride
    patch_size: int = 3  # k: features have k*k channels
    contrast_scale: float = 0.02  # patch standard deviation (intensity in [0, 1]) at which confidence is 1/2
    min_confidence: float = 1e-3  # keeps confidences in (0, 1] even on flat patches


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders. images (B, C, H, W) -> (B, C, H, W)."""
    channels, height, width = images.shape[1:]
    radius = max(1, round(3 * sigma))
    for dim, size in ((-1, width), (-2, height)):
        # Reflect padding needs the border to be narrower than the image (tiny coarse levels).
        pad = min(radius, size - 1)
        offsets = torch.arange(-pad, pad + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view((1, 1, 1, -1) if dim == -1 else (1, 1, -1, 1))
        padding = (pad, pad, 0, 0) if dim == -1 else (0, 0, pad, pad)
        images = F.conv2d(F.pad(images, padding, mode="reflect"), kernel.expand(channels, -1, -1, -1),
                          groups=channels)
    return images


class IntensityExtractor(Extractor):
    """images (B, 3, H, W) in [0, 1] -> pyramid of zero-mean, L2-normalised intensity patches."""

    name = "intensity"

    def __init__(self, conf: IntensityConf | None = None):
        super().__init__()
        self.conf = conf or IntensityConf()
        if self.conf.patch_size < 2 or self.conf.sigma <= 0:
            raise ValueError(f"intensity extractor: need patch_size >= 2 and sigma > 0, got {self.conf}")

    def level(self, gray: torch.Tensor, stride: int) -> FeatureLevel:
        """gray (B, 1, H, W) -> FeatureLevel with features (B, k*k, H/stride, W/stride)."""
        height, width = gray.shape[-2:]
        size = (max(1, round(height / stride)), max(1, round(width / stride)))
        blurred = gaussian_blur(F.interpolate(gray, size=size, mode="area"), self.conf.sigma)
        k = self.conf.patch_size
        padded = F.pad(blurred, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), mode="replicate")
        patches = F.unfold(padded, k).view(gray.shape[0], k * k, *size)  # (B, k*k, h, w)
        patches = patches - patches.mean(1, keepdim=True)
        contrast = patches.pow(2).mean(1).sqrt()  # (B, h, w)
        confidence = (contrast / (contrast + self.conf.contrast_scale)).clamp(min=self.conf.min_confidence)
        return FeatureLevel(F.normalize(patches, dim=1), confidence, stride)

    def forward(self, images: torch.Tensor) -> Pyramid:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"intensity extractor: expected images (B, 3, H, W), got {tuple(images.shape)}")
        gray = self.grayscale(images)
        return [self.level(gray, stride) for stride in STRIDES]
