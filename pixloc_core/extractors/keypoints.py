"""Keypoints from a dense score map: non-maximum suppression and soft-argmax refinement.

Shared by the learned extractors (`alike-*`, `xfeat`) for the sparse 2D-3D matching path. Pixel
coordinates follow COLMAP's convention, as everywhere in the project: the centre of the top-left
score-map pixel is (0.5, 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Extractor, Pyramid, sample_feature_map


@dataclass
class Keypoints:
    xy: torch.Tensor  # (N, 2) pixels of the image given to the extractor, COLMAP convention
    descriptors: torch.Tensor  # (N, D), unit length
    scores: torch.Tensor  # (N,) detection score at the peak, in [0, 1]


def detect_peaks(scores: torch.Tensor, radius: int, threshold: float, max_keypoints: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (H, W) -> integer peak positions (N, 2) as (x, y) map indices and their scores (N,).

    A peak is the maximum of its (2 radius + 1)^2 window, above `threshold`, at least `radius`
    pixels from the border (its refinement window must lie inside the map); the `max_keypoints`
    highest are kept, strongest first.
    """
    height, width = scores.shape
    pooled = F.max_pool2d(scores[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]
    peaks = (scores == pooled) & (scores > threshold)
    peaks[:radius], peaks[height - radius:], peaks[:, :radius], peaks[:, width - radius:] = False, False, False, False
    y, x = torch.nonzero(peaks, as_tuple=True)
    peak_scores = scores[y, x]
    order = peak_scores.argsort(descending=True)[:max_keypoints]
    return torch.stack([x[order], y[order]], -1), peak_scores[order]


def soft_argmax(scores: torch.Tensor, peaks: torch.Tensor, radius: int, temperature: float = 0.1) -> torch.Tensor:
    """Sub-pixel positions (N, 2), COLMAP convention in score-map pixels, of integer peaks (N, 2):
    the peak plus the softmax((s - s_max) / temperature)-weighted mean offset of its window (as
    ALIKE's differentiable keypoint detection)."""
    width = scores.shape[1]
    span = torch.arange(-radius, radius + 1, device=scores.device)
    offsets = torch.stack(torch.meshgrid(span, span, indexing="xy"), -1).reshape(-1, 2)  # (K, 2) as (dx, dy)
    positions = peaks[:, None, :] + offsets  # (N, K, 2)
    window = scores.reshape(-1)[positions[..., 1] * width + positions[..., 0]]  # (N, K)
    weights = torch.softmax((window - window.max(1, keepdim=True).values) / temperature, dim=1)
    return peaks.to(scores) + 0.5 + weights @ offsets.to(scores)


def extract_keypoints(scores: torch.Tensor, descriptor_map: torch.Tensor, stride: int, radius: int,
                      threshold: float, max_keypoints: int) -> Keypoints:
    """scores (H, W) at the image's resolution, descriptor_map (D, h, w) with h = ceil(H / stride)
    (a partial last cell) -> Keypoints."""
    peaks, peak_scores = detect_peaks(scores, radius, threshold, max_keypoints)
    xy = soft_argmax(scores, peaks, radius)  # (N, 2)
    descriptors = F.normalize(sample_feature_map(descriptor_map, xy / stride), dim=-1)  # (N, D)
    return Keypoints(xy, descriptors, peak_scores)


class DetectorExtractor(Extractor):
    """An extractor whose network also detects keypoints (ALIKE, XFeat): one pass of `dense` gives
    both the alignment pyramid and the keypoints, which the query workers send together so that
    an aligned pose can be checked against the query's own keypoints (pixloc_core.localize)."""

    def dense(self, images: torch.Tensor):
        """The network's outputs for images (B, 3, H, W)."""
        raise NotImplementedError

    def pyramid(self, output, image_size: tuple[int, int]) -> Pyramid:
        raise NotImplementedError

    def detections(self, output, image_size: tuple[int, int]) -> list[Keypoints]:
        """Keypoints per image, in pixels of images of `image_size` (H, W)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> Pyramid:
        return self.pyramid(self.dense(images), tuple(images.shape[-2:]))

    @torch.no_grad()
    def keypoints(self, images: torch.Tensor) -> list[Keypoints]:
        """Keypoints per image of the batch, at the resolution of `images`."""
        return self.detections(self.dense(images.to(self.luma.device)), tuple(images.shape[-2:]))

    @torch.no_grad()
    def extract_with_keypoints(self, images: torch.Tensor) -> tuple[Pyramid, list[Keypoints]]:
        """`extract` and `keypoints` from one pass of the network."""
        output = self.dense(images.to(self.luma.device))
        size = tuple(images.shape[-2:])
        return self.pyramid(output, size), self.detections(output, size)
