"""Keypoint types of a map and of the sparse localizer that matches queries to it.

    sift                              pycolmap's SIFT (128-d, uint8), the default
    alike-t/s/n/l, xfeat              a learned network's keypoints and descriptors (64-128-d,
                                      float16): pixloc_core.extractors, shipped weights

A map's 3D points carry one descriptor of its type (MAP/manifest.json names it), and a query
must be described the same way: the localizer takes the type from the feature store. Every
extractor is a callable (H, W, 3) uint8 RGB -> Features in the image's own pixels, limited by the
`sift` conf (max_image_size, max_num_features) whatever the type.

Learned descriptors are matched by mutual nearest neighbour with a loose ratio test
(`learned_matching`, 0.95). On the 60-reference synthetic street at 320x240 (ALIKE-N) it kept
about as many 2D-3D matches as a 0.9 ratio test alone, and the same queries localized; it is not
tuned beyond that.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..images import ImageReadError, read_image
from .sift import Features, SiftExtractor
from .sift import default_conf as sift_defaults

LEARNED_TYPES = ("alike-t", "alike-s", "alike-n", "alike-l", "xfeat")
KEYPOINT_TYPES = ("sift", *LEARNED_TYPES)

logger = logging.getLogger(__name__)

KeypointExtractor = Callable[[np.ndarray], Features]


class LearnedKeypoints:
    """A learned extractor's keypoints, on the image resized to the network's (or the conf's)
    longest side and mapped back to the image's pixels."""

    def __init__(self, kind: str, conf: dict):
        from ..extractors import load_extractor  # the networks load only for a learned type

        self.network = load_extractor(kind, max_keypoints=conf["max_num_features"]).eval()
        self.max_size = min(conf["max_image_size"], self.network.max_size)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Features:
        from ..extractors.base import resize_longest_side

        height, width = image.shape[:2]
        tensor, _ = resize_longest_side(image, self.max_size)  # (3, h, w)
        found = self.network.keypoints(tensor[None])[0]
        # COLMAP pixels have their corner at 0, so a pure scaling maps them back.
        xy = found.xy.cpu().double().numpy() * np.array([width / tensor.shape[2], height / tensor.shape[1]])
        keypoints = np.zeros((len(xy), 4), np.float32)  # x, y, scale 1, orientation 0: COLMAP's layout
        keypoints[:, :2], keypoints[:, 2] = xy, 1.0
        return Features(keypoints, found.descriptors.cpu().half().numpy(), (width, height))


def keypoint_extractor(kind: str, sift_conf: dict) -> KeypointExtractor:
    """The extractor of a keypoint type; `sift_conf` as `pixloc_core.mapping.sift.default_conf`."""
    if kind == "sift":
        return SiftExtractor(sift_conf)
    if kind in LEARNED_TYPES:
        return LearnedKeypoints(kind, {**sift_defaults, **sift_conf})
    raise ValueError(f"unknown keypoint type {kind!r}, expected one of {', '.join(KEYPOINT_TYPES)}")


def main(image_dir: Path, names: list[str], kind: str = "sift", sift_conf: dict | None = None
         ) -> tuple[dict[str, Features], list[dict[str, str]]]:
    """Keypoints of type `kind` for `names` under `image_dir`. Returns the features of the readable
    images and one {"name", "reason"} per skipped image (also logged, one line each)."""
    extractor = keypoint_extractor(kind, sift_conf or {})
    features, skipped = {}, []
    for name in tqdm(names, desc=f"keypoints ({kind})", unit="img"):
        try:
            features[name] = extractor(read_image(Path(image_dir) / name))
        except ImageReadError as error:
            logger.warning("skipping %s", error)
            skipped.append({"name": name, "reason": str(error).split(": ", 1)[-1]})
    return features, skipped


def matching_conf(kind: str, conf: dict) -> dict:
    """The descriptor matching conf of a keypoint type from a conf with `matching` (SIFT's) and
    `learned_matching` entries."""
    return conf["matching"] if kind == "sift" else conf["learned_matching"]
