"""The PixLoc UNet: a VGG encoder, a BatchNorm decoder, 1x1 adaptation and uncertainty heads.

The module names and layer order follow PixLoc's `pixlib/models/unet.py` so that the
`extractor.*` entries of an official `checkpoint_best.tar` load one to one:

    encoder.{b}.{i}        VGG blocks; block b > 0 starts with its max-pool, then conv/ReLU pairs
    decoder.{d}.layers.*   upsample x2, concat the skip, conv3x3 (no bias) + BatchNorm + ReLU
    adaptation.{s}.0       1x1 conv to the output features of scale s (s = 0 is the finest)
    uncertainty.{s}.0      1x1 conv to one channel, confidence = sigmoid(-u)

The VGG encoder is written out here (torchvision is not available); `unet-small` is the same
network with narrow layers, small enough to train on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Extractor, FeatureLevel, Pyramid

# Convolution widths per encoder block; every block after the first halves the resolution.
ENCODERS = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
    "small": ((8, 8), (16, 16), (32, 32), (32, 32), (32, 32)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Encoder blocks whose (decoded) output each pyramid level reads, finest first as in PixLoc:
# 2**scale gives the strides 1, 4, 16 of the pyramid.
OUTPUT_SCALES = (0, 2, 4)

default_conf = {
    "encoder": "vgg16",  # a key of ENCODERS
    "decoder": (64, 64, 64, 32),  # widths, coarsest decoder block first
    "output_dim": (32, 128, 128),  # feature channels per output scale, finest first
    "max_size": 1024,  # longest image side fed to the network
}


def vgg_block(in_channels: int, widths: tuple[int, ...], downsample: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.MaxPool2d(kernel_size=2, stride=2)] if downsample else []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class DecoderBlock(nn.Module):
    def __init__(self, previous: int, skip: int, out: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(previous + skip, out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        )

    def forward(self, previous: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(previous, scale_factor=2, mode="bilinear", align_corners=False)
        return self.layers(torch.cat([upsampled, skip], dim=1))


def head(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 1x1 conv wrapped in a Sequential, which gives PixLoc's `.0.` in the state-dict keys."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1))


class UNetExtractor(Extractor):
    """images (B, 3, H, W) in [0, 1] -> pyramid at strides 16, 4, 1 with `output_dim` channels."""

    def __init__(self, name: str, conf: dict | None = None):
        super().__init__()
        self.name = name
        self.conf = {**default_conf, **(conf or {})}
        if self.conf["encoder"] not in ENCODERS:
            raise ValueError(f"{name}: unknown encoder {self.conf['encoder']!r}, expected one of {list(ENCODERS)}")
        self.max_size = self.conf["max_size"]
        blocks = ENCODERS[self.conf["encoder"]]
        decoder_widths, output_dims = tuple(self.conf["decoder"]), tuple(self.conf["output_dim"])
        if len(decoder_widths) != len(blocks) - 1 or len(output_dims) != len(OUTPUT_SCALES):
            raise ValueError(f"{name}: need {len(blocks) - 1} decoder widths and {len(OUTPUT_SCALES)} output dims")
        # Raw dampings (3, 6), finest level first as in PixLoc checkpoints, set when a checkpoint
        # provides them; not in the state dict: they belong to the alignment, not to the features.
        self.dampings: torch.Tensor | None = None

        skip_dims = [widths[-1] for widths in blocks]
        in_channels = [3] + skip_dims[:-1]
        self.encoder = nn.ModuleList(vgg_block(inp, widths, downsample=index > 0)
                                     for index, (inp, widths) in enumerate(zip(in_channels, blocks)))
        decoder, previous = [], skip_dims[-1]
        for out, skip in zip(decoder_widths, skip_dims[:-1][::-1]):
            decoder.append(DecoderBlock(previous, skip, out))
            previous = out
        self.decoder = nn.ModuleList(decoder)
        # The coarsest output reads the encoder directly, the others the decoder (as PixLoc).
        head_inputs = [skip_dims[-1] if scale == len(blocks) - 1 else decoder_widths[-1 - scale]
                       for scale in OUTPUT_SCALES]
        self.adaptation = nn.ModuleList(head(inp, dim) for inp, dim in zip(head_inputs, output_dims))
        self.uncertainty = nn.ModuleList(head(inp, 1) for inp in head_inputs)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> Pyramid:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        coarsest = 2 ** (len(self.encoder) - 1)
        # Padding to a multiple of the coarsest stride keeps every skip connection aligned.
        pad_y, pad_x = -height % coarsest, -width % coarsest
        x = F.pad((images - self.mean) / self.std, (0, pad_x, 0, pad_y), mode="replicate")

        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        decoded = [skips[-1]]
        for block, skip in zip(self.decoder, skips[:-1][::-1]):
            decoded.append(block(decoded[-1], skip))
        decoded = decoded[::-1]  # finest first, as the scales

        pyramid = []
        for index in reversed(range(len(OUTPUT_SCALES))):  # coarse to fine
            stride = 2 ** OUTPUT_SCALES[index]
            x = decoded[OUTPUT_SCALES[index]]
            # Same level size as the weight-free extractors; only the padding is cut off.
            h, w = max(1, round(height / stride)), max(1, round(width / stride))
            features = self.adaptation[index](x)[..., :h, :w]  # (B, C, h, w)
            uncertainty = self.uncertainty[index](x)[:, 0, :h, :w]  # (B, h, w)
            # The floor keeps confidences in (0, 1] where sigmoid underflows to 0 in float32.
            confidence = torch.sigmoid(-uncertainty).clamp(min=1e-6)
            pyramid.append(FeatureLevel(F.normalize(features, dim=1), confidence, stride))
        return pyramid
