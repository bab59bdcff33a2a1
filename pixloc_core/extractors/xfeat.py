"""XFeat (Potje et al., "XFeat: Accelerated Features for Lightweight Image Matching", CVPR 2024),
written from the paper and the layer graph of the authors' ONNX export (batch norm folded into the
convolutions, which therefore have biases).

    gray = mean over RGB, instance-normalised              (B, 1, H, W), H, W multiples of 32
    block1: conv3x3 4, 8 (s2), 8, 24 (s2), each + ReLU       (B, 24, H/4, W/4)
    skip1: avgpool 4 + conv1x1 24, added to block1
    block2: 2 x conv3x3 24                                   (B, 24, H/4, W/4)
    block3: conv3x3 64 (s2), conv3x3 64, conv1x1 64          (B, 64, H/8, W/8)     x3
    block4: conv3x3 64 (s2), 2 x conv3x3 64                  (B, 64, H/16, W/16)   x4
    block5: conv3x3 128 (s2), 2 x conv3x3 128, conv1x1 64    (B, 64, H/32, W/32)   x5
    block_fusion(x3 + up(x4) + up(x5)): 2 x conv3x3 64 + ReLU, conv1x1 64 -> descriptors (B, 64, H/8, W/8)
    heatmap_head: 2 x conv1x1 64 + ReLU, conv1x1 1, sigmoid -> reliability (B, 1, H/8, W/8)
    keypoint_head(pixel-unshuffle 8 of gray): 3 x conv1x1 64 + ReLU, conv1x1 65 -> logits (B, 65, H/8, W/8)

Keypoints: softmax over the 65 logits, the 64 cell channels pixel-shuffled to full resolution,
times the bilinearly upsampled reliability (as the export scores them), then NMS and soft-argmax.
Alignment pyramid (strides 16, 8, 4): the stride-8 descriptors, area-averaged to stride 16 and
bilinearly upsampled to stride 4 (finer lookups for the last level; no new information, but the
aligner's steps and stopping rule are in feature pixels); confidence from the reliability map.

Weights: `pixloc_core/weights/xfeat/xfeat.pt`, made from the ONNX file by
`python -m pixloc_core.extractors.convert_xfeat` (Apache-2.0, LICENSE beside it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeatureLevel, Pyramid, pooled_confidence
from .checkpoint import load_extractor_state, read_state_dict
from .keypoints import DetectorExtractor, Keypoints, extract_keypoints

XFEAT_STRIDES = (16, 8, 4)  # coarse to fine; the network's descriptors are at stride 8
DESCRIPTOR_STRIDE = 8
PAD_MULTIPLE = 32
CONFIDENCE_MODES = ("reliability", "uniform")


@dataclass(frozen=True)
class XFeatConf:
    confidence: str = "reliability"  # a key of CONFIDENCE_MODES
    min_confidence: float = 0.05  # floor of the reliability-based confidence
    max_size: int = 1024  # longest image side the caller resizes to
    nms_radius: int = 2  # keypoints: NMS and soft-argmax window radius (the export's 5 x 5 NMS)
    score_threshold: float = 0.05  # keypoints: minimum score (XFeat's detection threshold)
    max_keypoints: int = 4096


class BasicLayer(nn.Module):
    """conv (batch norm folded in, hence the bias) + ReLU; `layer.0` as in the export's names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.layer = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                             padding=kernel_size // 2), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def layers(*specs: tuple) -> nn.Sequential:
    return nn.Sequential(*(BasicLayer(*spec) for spec in specs))


@dataclass
class XFeatOutput:
    descriptors: torch.Tensor  # (B, 64, H/8, W/8) unit length
    reliability: torch.Tensor  # (B, H/8, W/8) in (0, 1)
    keypoint_logits: torch.Tensor  # (B, 65, H/8, W/8)


class XFeatExtractor(DetectorExtractor):
    """images (B, 3, H, W) in [0, 1] -> pyramid at strides 16, 8, 4 with 64 channels, and
    `keypoints(images)` for the sparse path."""

    name = "xfeat"

    def __init__(self, conf: XFeatConf | None = None):
        super().__init__()
        self.conf = conf or XFeatConf()
        if self.conf.confidence not in CONFIDENCE_MODES:
            raise ValueError(f"xfeat: confidence must be one of {CONFIDENCE_MODES}, got {self.conf.confidence!r}")
        self.max_size = self.conf.max_size
        self.skip1 = nn.Sequential(nn.AvgPool2d(4, stride=4), nn.Conv2d(1, 24, kernel_size=1))
        self.block1 = layers((1, 4), (4, 8, 3, 2), (8, 8), (8, 24, 3, 2))
        self.block2 = layers((24, 24), (24, 24))
        self.block3 = layers((24, 64, 3, 2), (64, 64), (64, 64, 1))
        self.block4 = layers((64, 64, 3, 2), (64, 64), (64, 64))
        self.block5 = layers((64, 128, 3, 2), (128, 128), (128, 128), (128, 64, 1))
        self.block_fusion = nn.Sequential(BasicLayer(64, 64), BasicLayer(64, 64), nn.Conv2d(64, 64, kernel_size=1))
        self.heatmap_head = nn.Sequential(BasicLayer(64, 64, 1), BasicLayer(64, 64, 1), nn.Conv2d(64, 1, kernel_size=1))
        self.keypoint_head = nn.Sequential(BasicLayer(64, 64, 1), BasicLayer(64, 64, 1), BasicLayer(64, 64, 1),
                                           nn.Conv2d(64, 65, kernel_size=1))

    def dense(self, images: torch.Tensor) -> XFeatOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"xfeat: expected images (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        gray = F.instance_norm(images.mean(1, keepdim=True), eps=1e-5)  # (B, 1, H, W)
        # Zero padding after the normalisation: the pad is the image's mean intensity.
        x = F.pad(gray, (0, -width % PAD_MULTIPLE, 0, -height % PAD_MULTIPLE))
        x2 = self.block2(self.block1(x) + self.skip1(x))  # (B, 24, H/4, W/4)
        x3 = self.block3(x2)  # (B, 64, H/8, W/8)
        x4 = self.block4(x3)  # (B, 64, H/16, W/16)
        x5 = self.block5(x4)  # (B, 64, H/32, W/32)
        size = x3.shape[-2:]
        fused = x3 + sum(F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (x4, x5))
        descriptors = self.block_fusion(fused)  # (B, 64, H/8, W/8)
        reliability = torch.sigmoid(self.heatmap_head(descriptors))[:, 0]  # (B, H/8, W/8)
        logits = self.keypoint_head(F.pixel_unshuffle(x, DESCRIPTOR_STRIDE))  # (B, 65, H/8, W/8)
        cells = (-(-height // DESCRIPTOR_STRIDE), -(-width // DESCRIPTOR_STRIDE))
        return XFeatOutput(F.normalize(descriptors, dim=1)[..., :cells[0], :cells[1]],
                           reliability[..., :cells[0], :cells[1]], logits[..., :cells[0], :cells[1]])

    def pyramid(self, output: XFeatOutput, image_size: tuple[int, int]) -> Pyramid:
        height, width = image_size
        pyramid = []
        for stride in XFEAT_STRIDES:
            size = (max(1, round(height / stride)), max(1, round(width / stride)))
            if stride == DESCRIPTOR_STRIDE and size == tuple(output.descriptors.shape[-2:]):
                features = output.descriptors
            elif stride > DESCRIPTOR_STRIDE:
                features = F.interpolate(output.descriptors, size=size, mode="area")
            else:
                features = F.interpolate(output.descriptors, size=size, mode="bilinear", align_corners=False)
            if self.conf.confidence == "uniform":
                confidence = features.new_ones(features.shape[0], *size)
            else:
                confidence = pooled_confidence(output.reliability, size, 3, self.conf.min_confidence)
            pyramid.append(FeatureLevel(F.normalize(features, dim=1), confidence, stride))
        return pyramid

    def score_map(self, output: XFeatOutput, size: tuple[int, int]) -> torch.Tensor:
        """Keypoint scores (B, H, W) at the image resolution: cell softmax x reliability."""
        cells = torch.softmax(output.keypoint_logits, dim=1)[:, :-1]  # (B, 64, H/8, W/8), dustbin dropped
        heatmap = F.pixel_shuffle(cells, DESCRIPTOR_STRIDE)[:, 0]  # (B, H/8*8, W/8*8)
        reliability = F.interpolate(output.reliability[:, None], size=heatmap.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
        return (heatmap * reliability)[..., :size[0], :size[1]]

    def detections(self, output: XFeatOutput, image_size: tuple[int, int]) -> list[Keypoints]:
        scores = self.score_map(output, image_size)
        return [extract_keypoints(score, descriptors, DESCRIPTOR_STRIDE, self.conf.nms_radius, self.conf.score_threshold,
                                  self.conf.max_keypoints)
                for score, descriptors in zip(scores, output.descriptors)]


def load_xfeat(name: str, weights: Path, conf: XFeatConf) -> XFeatExtractor:
    """XFeat with the converted state dict in `weights` (a one-line CheckpointError if the file is
    missing, unreadable or does not fit)."""
    extractor = XFeatExtractor(conf)
    load_extractor_state(extractor, read_state_dict(weights), weights, prefix="")
    return extractor
