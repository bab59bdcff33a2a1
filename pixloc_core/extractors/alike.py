"""ALIKE (Zhao et al., "ALIKE: Accurate and Lightweight Keypoint Detection and Descriptor
Extraction", IEEE TMM 2022), written from the paper and the facts of the pretrained weights.

    image (B, 3, H, W) RGB in [0, 1], padded with zeros to multiples of 32
    block1: 2 x (conv3x3, BN, ReLU)                      (B, c1, H, W)
    block2: maxpool 2, residual block                    (B, c2, H/2, W/2)
    block3: maxpool 4, residual block                    (B, c3, H/8, W/8)
    block4: maxpool 4, residual block                    (B, c4, H/32, W/32)
    conv1..4: 1x1 to dim/4 each, ReLU, bilinear up (align_corners) and concatenated  (B, dim, H, W)
    [alike-l: convhead1 1x1 dim -> dim, ReLU]
    convhead2: 1x1 dim -> dim + 1: descriptors (L2-normalised) and one score logit (sigmoid)

A residual block is conv3x3, BN, ReLU, conv3x3, BN, plus a 1x1 projection (with bias) of its
input, then ReLU. Weights: the authors' state dicts (Shiaoming/ALIKE, BSD-3-Clause), shipped in
`pixloc_core/weights/alike/`; the module names below match their keys one to one.

The alignment pyramid (strides 16, 4, 1) comes from the stride-1 descriptor map, area-averaged to
the coarse strides (`coarse="pooled"`), or, for the coarsest level, from the encoder's stride-8 and
stride-32 features resampled to stride 16 (`coarse="encoder"`). The confidence is the score map
(a keypoint-ness likelihood) box-blurred over the NMS window and averaged to each level, with a
floor (`confidence="score"`), 1 everywhere (`confidence="uniform"`), or learned from poses
(`confidence="learned"`: per level a 1x1 conv over the level's descriptors and its score
confidence, then a sigmoid; `pixloc train --extractor alike-n` fits these heads and the dampings,
the authors' network frozen).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import STRIDES, FeatureLevel, Pyramid, pooled_confidence
from .checkpoint import load_extractor_state, read_state_dict
from .keypoints import DetectorExtractor, Keypoints, extract_keypoints


@dataclass(frozen=True)
class AlikeArchitecture:
    widths: tuple[int, int, int, int]  # c1..c4, the four blocks
    dim: int  # descriptor channels
    single_head: bool  # False: one more 1x1 conv + ReLU before the head (alike-l)


VARIANTS = {
    "alike-t": AlikeArchitecture((8, 16, 32, 64), 64, True),
    "alike-s": AlikeArchitecture((8, 16, 48, 96), 96, True),
    "alike-n": AlikeArchitecture((16, 32, 64, 128), 128, True),
    "alike-l": AlikeArchitecture((32, 64, 128, 128), 128, False),
}
COARSE_MODES = ("pooled", "encoder")
CONFIDENCE_MODES = ("score", "uniform", "learned")
PAD_MULTIPLE = 32  # the coarsest encoder stride


@dataclass(frozen=True)
class AlikeConf:
    coarse: str = "pooled"  # how the stride-16 level is made: a key of COARSE_MODES
    confidence: str = "score"  # a key of CONFIDENCE_MODES
    min_confidence: float = 0.05  # floor of the score-based confidence (flat regions still count)
    # Longest image side the caller resizes to: the stride-1 head is the cost (about 5x `classic`'s
    # time at the same size on the CPU), and 640 px at stride 1 is still finer than classic at 1024.
    max_size: int = 640
    nms_radius: int = 2  # keypoints: the NMS window and soft-argmax window radius (ALIKE's)
    score_threshold: float = 0.2  # keypoints: minimum score of a peak
    max_keypoints: int = 4096


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class ConvBlock(nn.Module):
    """block1: two (conv3x3, BN, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels)
        self.conv2, self.bn2 = conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class ResBlock(ConvBlock):
    """blocks 2-4: the two convs of ConvBlock as a residual branch over a 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.downsample = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(branch + self.downsample(x))


@dataclass
class AlikeOutput:
    descriptors: torch.Tensor  # (B, dim, H, W) unit length along dim
    scores: torch.Tensor  # (B, H, W) in (0, 1)
    stride8: torch.Tensor  # (B, dim/4, H/8, W/8) projected block3 features, cropped
    stride32: torch.Tensor  # (B, dim/4, H/32, W/32) projected block4 features, cropped


class AlikeExtractor(DetectorExtractor):
    """images (B, 3, H, W) in [0, 1] -> pyramid at strides 16, 4, 1 (dim channels; dim/2 at
    stride 16 with `coarse="encoder"`), and `keypoints(images)` for the sparse path."""

    def __init__(self, name: str, conf: AlikeConf | None = None):
        super().__init__()
        if name not in VARIANTS:
            raise ValueError(f"unknown ALIKE variant {name!r}, expected one of {sorted(VARIANTS)}")
        self.name, self.conf = name, conf or AlikeConf()
        if self.conf.coarse not in COARSE_MODES or self.conf.confidence not in CONFIDENCE_MODES:
            raise ValueError(f"{name}: coarse must be one of {COARSE_MODES} and confidence one of "
                             f"{CONFIDENCE_MODES}, got {self.conf.coarse!r}, {self.conf.confidence!r}")
        self.max_size = self.conf.max_size
        architecture = VARIANTS[name]
        c1, c2, c3, c4 = architecture.widths
        dim = architecture.dim
        self.block1, self.block2 = ConvBlock(3, c1), ResBlock(c1, c2)
        self.block3, self.block4 = ResBlock(c2, c3), ResBlock(c3, c4)
        self.conv1, self.conv2, self.conv3, self.conv4 = (nn.Conv2d(c, dim // 4, kernel_size=1, bias=False)
                                                          for c in architecture.widths)
        self.convhead1 = None if architecture.single_head else nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.convhead2 = nn.Conv2d(dim, dim + 1, kernel_size=1, bias=False)
        # Learned confidences start at 0.5 everywhere (zero weights): uniform, until trained.
        self.confidence_heads = None
        if self.conf.confidence == "learned":
            self.confidence_heads = nn.ModuleList(nn.Conv2d(channels + 1, 1, kernel_size=1)
                                                  for channels in self.level_channels(architecture))
            for head in self.confidence_heads:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def level_channels(self, architecture: AlikeArchitecture) -> list[int]:
        """Channels of the pyramid levels, coarse to fine."""
        coarsest = architecture.dim // 2 if self.conf.coarse == "encoder" else architecture.dim
        return [coarsest] + [architecture.dim] * (len(STRIDES) - 1)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The parameters that the authors' weights do not hold (the learned confidence heads)."""
        return {key: value for key, value in self.state_dict().items() if key.startswith("confidence_heads.")}

    def dense(self, images: torch.Tensor) -> AlikeOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        x = F.pad(images, (0, -width % PAD_MULTIPLE, 0, -height % PAD_MULTIPLE))  # zeros, as ALIKE
        x1 = self.block1(x)  # (B, c1, H, W)
        x2 = self.block2(F.max_pool2d(x1, 2))  # (B, c2, H/2, W/2)
        x3 = self.block3(F.max_pool2d(x2, 4))  # (B, c3, H/8, W/8)
        x4 = self.block4(F.max_pool2d(x3, 4))  # (B, c4, H/32, W/32)
        projected = [F.relu(conv(block)) for conv, block in
                     zip((self.conv1, self.conv2, self.conv3, self.conv4), (x1, x2, x3, x4))]
        full = x1.shape[-2:]
        stacked = torch.cat([projected[0]] + [F.interpolate(p, size=full, mode="bilinear", align_corners=True)
                                              for p in projected[1:]], 1)  # (B, dim, H, W)
        # In place and freed as soon as used: at stride 1 each of these maps is 157 MB of a 640x480 image.
        if self.convhead1 is not None:
            stacked = self.convhead1(stacked).relu_()
        head = self.convhead2(stacked)[..., :height, :width]  # (B, dim + 1, h, w)
        del stacked
        return AlikeOutput(F.normalize(head[:, :-1], dim=1), torch.sigmoid(head[:, -1]),
                           projected[2][..., :-(-height // 8), :-(-width // 8)],
                           projected[3][..., :-(-height // 32), :-(-width // 32)])

    def confidence(self, scores: torch.Tensor, features: torch.Tensor, level: int) -> torch.Tensor:
        """scores (B, H, W) and a level's features (B, C, h, w) -> its confidence (B, h, w) in (0, 1]."""
        size = features.shape[-2:]
        if self.conf.confidence == "uniform":
            return scores.new_ones(scores.shape[0], *size)
        score_confidence = pooled_confidence(scores, size, 2 * self.conf.nms_radius + 1, self.conf.min_confidence)
        if self.confidence_heads is None:
            return score_confidence
        head = self.confidence_heads[level]
        # The head's 1x1 conv over [features, score confidence], without concatenating (copying)
        # the full-resolution descriptor map.
        logit = (F.conv2d(features, head.weight[:, :-1], head.bias)[:, 0]
                 + head.weight[0, -1, 0, 0] * score_confidence)  # (B, h, w)
        return torch.sigmoid(logit)

    def pyramid(self, output: AlikeOutput, image_size: tuple[int, int]) -> Pyramid:
        height, width = image_size
        pyramid = []
        for level, stride in enumerate(STRIDES):
            size = (max(1, round(height / stride)), max(1, round(width / stride)))
            if stride == 1:
                features = output.descriptors  # unit vectors already
            elif stride == max(STRIDES) and self.conf.coarse == "encoder":
                features = F.normalize(torch.cat([
                    F.interpolate(output.stride8, size=size, mode="area"),
                    F.interpolate(output.stride32, size=size, mode="bilinear", align_corners=False)], 1),
                    dim=1)  # (B, dim/2, h, w)
            else:
                features = F.normalize(F.interpolate(output.descriptors, size=size, mode="area"), dim=1)  # (B, dim, h, w)
            pyramid.append(FeatureLevel(features, self.confidence(output.scores, features, level), stride))
        return pyramid

    def detections(self, output: AlikeOutput, image_size: tuple[int, int]) -> list[Keypoints]:
        return [extract_keypoints(scores, descriptors, 1, self.conf.nms_radius, self.conf.score_threshold,
                                  self.conf.max_keypoints)
                for scores, descriptors in zip(output.scores, output.descriptors)]


def load_alike(name: str, weights: Path, conf: AlikeConf) -> AlikeExtractor:
    """The variant `name` with the state dict in `weights` (a one-line CheckpointError if the file
    is missing, unreadable or of another variant); learned confidence heads, which the authors'
    weights do not hold, at their initial values."""
    extractor = AlikeExtractor(name, conf)
    load_extractor_state(extractor, {**extractor.head_state(), **read_state_dict(weights)}, weights, prefix="")
    return extractor
