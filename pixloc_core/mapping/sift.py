"""SIFT keypoints and descriptors with pycolmap, extracted from in-memory images (see keypoints.py
for reading the images of a map and the other keypoint types).

Images are downscaled to `max_image_size`, and the keypoints are scaled back to the original
resolution: everything downstream (cameras, reference models) lives in full-resolution pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycolmap
from PIL import Image

default_conf = {
    "max_image_size": 1600,
    "max_num_features": 8192,
    "num_threads": 2,
}


@dataclass
class Features:
    keypoints: np.ndarray  # (N, 4) float32: x, y, scale, orientation in original-resolution pixels
    # (N, 128) uint8 for SIFT (RootSIFT-normalised by pycolmap); (N, D) float16 unit vectors for a
    # learned type (see keypoints.py)
    descriptors: np.ndarray
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
        """image: (H, W, 3) uint8 RGB or (H, W) grayscale, at its original resolution."""
        if image.ndim == 3:
            image = np.asarray(Image.fromarray(image).convert("L"))
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

