"""One descriptor per 3D point: the unit-norm mean of the descriptors (SIFT or learned, see
keypoints.py) of its observations.

Sparse localization then matches a query against P point descriptors instead of every
observation (several times more), with no reference image read at query time.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pycolmap
import torch

from ..map_io import observations
from .matching import normalize_descriptors
from .sift import Features

logger = logging.getLogger(__name__)

default_conf = {
    # For imported models: an observation takes the descriptor of the nearest SIFT keypoint
    # within this distance (keypoints of COLMAP's own SIFT coincide to numerical precision).
    "max_keypoint_distance_px": 1.5,
}


def nearest_keypoints(points: np.ndarray, features: Features, max_distance_px: float,
                      chunk_size: int = 1024) -> np.ndarray:
    """points: (M, 2) pixels. Returns (M,) the index of the nearest keypoint of `features`, -1 if
    none is within `max_distance_px`."""
    if len(points) == 0 or len(features.keypoints) == 0:
        return np.full(len(points), -1)
    keypoints, nearest = torch.from_numpy(features.xy), []
    for start in range(0, len(points), chunk_size):
        distance, index = torch.cdist(torch.from_numpy(points[start:start + chunk_size]), keypoints).min(dim=1)  # (C,)
        nearest.append(torch.where(distance <= max_distance_px, index, -1))
    return torch.cat(nearest).numpy()


class DescriptorSums:
    """The unit-norm descriptors of each point's observations, summed, then their unit-norm mean."""

    def __init__(self, num_points: int):
        self.num_points = num_points
        self.sums = None  # (P, D) float32, D from the first descriptors added

    def add(self, points: np.ndarray, descriptors: np.ndarray) -> None:
        """points: (M,) indices in [0, P); descriptors: (M, D) of one observation each."""
        normalized = normalize_descriptors(descriptors)  # (M, D)
        if self.sums is None:
            self.sums = torch.zeros((self.num_points, normalized.shape[1]))
        self.sums.index_add_(0, torch.from_numpy(points), normalized)

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """(P,) bool: the points with a descriptor; (P', D) float16: theirs, unit norm."""
        if self.sums is None:
            return np.zeros(self.num_points, bool), np.zeros((0, 0), np.float16)
        norms = self.sums.norm(dim=1)  # (P,)
        described = norms > 0
        # In place, then one float16 copy: at city scale (P ~ 10^6) each (P, D) float32 copy is
        # gigabytes in the map builder.
        self.sums /= norms.clamp(min=1e-12)[:, None]
        mean = self.sums.to(torch.float16)
        return described.numpy(), (mean if described.all() else mean[described]).numpy()


def main(reconstruction: pycolmap.Reconstruction, features: Mapping[str, Features],
         keypoints_are_features: bool = True, conf: dict | None = None,
         point_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns point3D_ids (P,) int64 and descriptors (P, D) float16, unit norm. Points without
    any observation with a descriptor are left out. Only the images in `features` are read, and
    with `point_ids` only those points are described (the new points of a map update).

    keypoints_are_features: the 2D points of `reconstruction` are the keypoints of `features` (a
    map built here); otherwise they are associated by position (an imported model)."""
    conf = {**default_conf, **(conf or {})}
    point_ids = np.sort(np.array(list(reconstruction.point3D_ids()) if point_ids is None else point_ids,
                                 dtype=np.int64))  # (P,)
    sums = DescriptorSums(len(point_ids))
    for image in reconstruction.images.values():
        if not image.has_pose or image.name not in features:
            continue
        observed = observations(image)  # (M,) 2D points with a 3D point
        if keypoints_are_features:
            keypoint_index = observed.point2D_indices
        else:
            keypoint_index = nearest_keypoints(observed.xy, features[image.name], conf["max_keypoint_distance_px"])
        valid = (keypoint_index >= 0) & np.isin(observed.point3D_ids, point_ids)
        sums.add(np.searchsorted(point_ids, observed.point3D_ids[valid]),
                 features[image.name].descriptors[keypoint_index[valid]])
    described, mean = sums.means()
    if not described.all():
        logger.info("%d of %d points have a descriptor", int(described.sum()), len(point_ids))
    return point_ids[described], mean
