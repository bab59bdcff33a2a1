"""The one interface every feature extractor implements.

    extractor(images) -> pyramid

A pyramid is a list of `FeatureLevel`s ordered coarse to fine (strides 16, 4, 1 relative to the
input image). Features are L2-normalised along channels; confidences lie in (0, 1].
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass

import numpy as np
import torch
import torch.nn.functional as F

STRIDES = (16, 4, 1)


@dataclass
class FeatureLevel:
    features: torch.Tensor  # (B, C, H, W) or (C, H, W), L2-normalised along C
    confidence: torch.Tensor  # (B, H, W) or (H, W), in (0, 1]
    stride: int

    def __getitem__(self, index: int) -> FeatureLevel:
        """One image of a batched level."""
        return FeatureLevel(self.features[index], self.confidence[index], self.stride)

    def to(self, *args, **kwargs) -> FeatureLevel:
        return FeatureLevel(self.features.to(*args, **kwargs), self.confidence.to(*args, **kwargs), self.stride)


Pyramid = list[FeatureLevel]


def widened(level: FeatureLevel, cells: int) -> FeatureLevel:
    """The level with its features and confidences averaged over (2 cells + 1)^2 of its cells
    (overlapping windows, as many cells as exist at the border), the features normalised again.

    The wide start of the coarse-to-fine alignment (pixloc_core.localize): learned descriptors
    tell neighbouring pixels apart, so even area-pooled to stride 16 their cost has a narrow
    basin; averaged over 7 x 7 cells (r = 3) `alike-n`'s mean success of `pixloc bench basin` on
    fountain-P11 rose from 50 to 79 %. On real streets the wide cost also has minima beside the
    true pose along the viewing direction, so it only ever adds a start (README).
    Works on batched (B, C, h, w) and single (C, h, w) levels."""
    window = 2 * cells + 1
    features = F.avg_pool2d(level.features.float(), window, stride=1, padding=cells, count_include_pad=False)
    confidence = F.avg_pool2d(level.confidence.float()[None], window, stride=1, padding=cells,
                              count_include_pad=False)[0]  # pooled per image: a (B, h, w) stack is (C, h, w) to it
    return FeatureLevel(F.normalize(features, dim=-3), confidence, level.stride)


def select(pyramid: Pyramid, index: int) -> Pyramid:
    """The pyramid of one image out of a batched pyramid."""
    return [level[index] for level in pyramid]


# ITU-R BT.601 luma weights.
LUMA = (0.299, 0.587, 0.114)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resize_longest_side(image: np.ndarray, max_size: int) -> tuple[torch.Tensor, float]:
    """HxWx3 uint8 RGB -> (3, H', W') float in [0, 1] with max(H', W') <= max_size, and the scale."""
    return resized(image, min(1.0, max_size / max(image.shape[:2])))


def resized(image: np.ndarray, scale: float) -> tuple[torch.Tensor, float]:
    """HxWx3 uint8 RGB -> (3, H', W') float in [0, 1], resized by about `scale` (area averaging
    down, bilinear up), and the scale it was resized by: that of the width, after rounding the size
    to whole pixels (1.0 when the size does not change), which is what `Camera.scale` expects of a
    COLMAP camera (pixel corner at 0) to match the resized image."""
    tensor = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)  # a copy: PIL arrays are read-only
    height, width = tensor.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size == (height, width):
        return tensor, 1.0
    mode = {"mode": "area"} if size[1] < width else {"mode": "bilinear", "align_corners": False}
    return F.interpolate(tensor[None], size=size, **mode)[0], size[1] / width


def config_hash(*parts) -> str:
    """A short stable hash of configs (dicts/dataclasses) and raw bytes (weights)."""
    digest = hashlib.sha256()
    for part in parts:
        if is_dataclass(part):
            part = asdict(part)
        if isinstance(part, (bytes, bytearray)):
            digest.update(part)
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


class Extractor(torch.nn.Module):
    """Base class: subclasses set `name`, `conf` and implement `forward(images) -> Pyramid`.

    `images` is a (B, 3, H, W) float RGB batch in [0, 1], already resized by the caller with
    `resize_longest_side(image, self.max_size)`.
    """

    name: str = "base"
    max_size: int = 1024
    # The alignment's learned dampings that came with the weights, (3, 6) raw, PixLoc order
    # (finest level first), for `FeaturemetricAligner.load_dampings`; None: the aligner's defaults.
    dampings: torch.Tensor | None = None

    def __init__(self):
        super().__init__()
        # A buffer, not a constant: `.to(device)` then moves weight-free extractors too, and
        # `extract` finds their device (without one, `classic` ran on the CPU of a GPU worker).
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    def grayscale(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB -> (B, 1, H, W) luma."""
        return (images * self.luma).sum(1, keepdim=True)

    def weights_digest(self) -> bytes:
        """Bytes that identify the weights; empty for weight-free extractors."""
        buffer = bytearray()
        for key, tensor in sorted(self.state_dict().items()):
            buffer += key.encode() + tensor.detach().cpu().contiguous().numpy().tobytes()
        return bytes(buffer)

    @property
    def extractor_id(self) -> str:
        """name + config + weights hash: the key under which the feature store files features."""
        return f"{self.name}-{config_hash(getattr(self, 'conf', {}), self.weights_digest())}"

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> Pyramid:
        """Inference entry point: no autograd, on the extractor's device."""
        return self(images.to(self.luma.device))


def sample_feature_map(feature_map: torch.Tensor, p2d: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of a (C, h, w) map at feature pixels p2d (..., 2), COLMAP convention
    (corner at 0, first pixel centre at 0.5) -> (..., C). Outside the map, the border is extended."""
    channels, height, width = feature_map.shape
    grid = 2 * p2d / p2d.new_tensor([width, height]) - 1
    sampled = F.grid_sample(feature_map[None], grid.reshape(1, 1, -1, 2), mode="bilinear",
                            padding_mode="border", align_corners=False)  # (1, C, 1, prod(...))
    return sampled.reshape(channels, -1).T.reshape(*p2d.shape[:-1], channels)


def sample_level(level: FeatureLevel, p2d: torch.Tensor, image_size: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and confidence of an unbatched level at pixels p2d (N, 2) of the full image whose
    size (w, h) is `image_size`: (N, C) re-normalised to unit length, and (N,).
    Points outside the map get the border's values; callers mask them with `Camera.in_image`."""
    _, height, width = level.features.shape
    p2d = p2d.to(level.features)
    scale = p2d.new_tensor([width, height]) / image_size.to(p2d)
    stacked = torch.cat([level.features, level.confidence[None]])  # (C+1, H, W)
    sampled = sample_feature_map(stacked, p2d * scale)  # (N, C+1)
    return F.normalize(sampled[..., :-1], dim=-1), sampled[..., -1]


def pooled_confidence(scores: torch.Tensor, size: tuple[int, int], window: int, floor: float) -> torch.Tensor:
    """A detector's score or reliability map (B, H, W) in [0, 1] as the confidence (B, h, w) of a
    level of another size: box-blurred over `window` pixels (a keypoint-ness peak is a few pixels
    wide, the points that are aligned are not exactly on it), area-averaged or bilinearly
    resampled to the level, floored so that weak texture still counts a little."""
    blurred = F.avg_pool2d(scores[:, None], window, stride=1, padding=window // 2, count_include_pad=False)
    mode = {"mode": "area"} if size[0] <= scores.shape[-2] else {"mode": "bilinear", "align_corners": False}
    return F.interpolate(blurred, size=size, **mode)[:, 0].clamp(min=floor, max=1.0)
