"""SIFT keypoints and descriptors with pycolmap, extracted from in-memory images.

Images are read with PIL (so that corrupt files give a per-image reason instead of aborting the
whole job), downscaled to `max_image_size`, and the keypoints are scaled back to the original
resolution: everything downstream (cameras, reference models) lives in full-resolution pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
from PIL import Image
from tqdm import tqdm

from ..images import ImageReadError, read_image

logger = logging.getLogger(__name__)

default_conf = {
    "max_image_size": 1600,
    "max_num_features": 8192,
    "num_threads": 2,
}


@dataclass
class Features:
    keypoints: np.ndarray  # (N, 4) float32: x, y, scale, orientation in original-resolution pixels
    descriptors: np.ndarray  # (N, 128) uint8, RootSIFT-normalised by pycolmap
    image_size: tuple[int, int]  # (width, height) of the original image

    @property
    def xy(self) -> np.ndarray:
        """(N, 2) float64 keypoint positions, COLMAP convention (pixel corner at 0)."""
        return self.keypoints[:, :2].astype(np.float64)


class SiftExtractor:
    def __init__(self, conf: dict | None = None):
        self.conf = {**default_conf, **(conf or {})}
        options = pycolmap.FeatureExtractionOptions()
        options.num_threads = self.conf["num_threads"]
        options.max_image_size = self.conf["max_image_size"]
        options.sift.max_num_features = self.conf["max_num_features"]
        self.extractor = pycolmap.FeatureExtractor.create(options, pycolmap.Device.cpu)

    def __call__(self, image: np.ndarray) -> Features:
        """image: (H, W) uint8 grayscale at its original resolution."""
        height, width = image.shape
        scale = min(1.0, self.conf["max_image_size"] / max(height, width))
        if scale < 1.0:
            size = (round(width * scale), round(height * scale))
            resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        else:
            resized = image
        keypoints, descriptors = self.extractor.extract_from_uint8_array(np.ascontiguousarray(resized))
        keypoints = pycolmap.keypoints_to_matrix(keypoints).astype(np.float32)
        # COLMAP keypoints have the pixel corner at 0, so a pure scaling maps them back.
        keypoints[:, 0] *= width / resized.shape[1]
        keypoints[:, 1] *= height / resized.shape[0]
        keypoints[:, 2] *= width / resized.shape[1]
        return Features(keypoints, np.asarray(descriptors.data, dtype=np.uint8), (width, height))


def main(image_dir: Path, names: list[str], conf: dict | None = None
         ) -> tuple[dict[str, Features], list[dict[str, str]]]:
    """Extract SIFT for `names` under `image_dir`. Returns the features of the readable images and
    one {"name", "reason"} per skipped image (also logged, one line each)."""
    extractor = SiftExtractor(conf)
    features, skipped = {}, []
    for name in tqdm(names, desc="SIFT", unit="img"):
        try:
            features[name] = extractor(read_image(Path(image_dir) / name, "L"))
        except ImageReadError as error:
            logger.warning("skipping %s", error)
            skipped.append({"name": name, "reason": str(error).split(": ", 1)[-1]})
    return features, skipped
