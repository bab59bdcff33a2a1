"""The sparse baseline localizer: query SIFT matched to the map's per-point descriptors, then
RANSAC PnP with pycolmap and a least-squares refinement, optionally pulled towards a GPS prior.

It gives a pose hypothesis for featuremetric refinement, or a result on its own (`--method sparse`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycolmap
import torch

from .map_io import SceneMap, observations
from .mapping import matching
from .mapping.sift import SiftExtractor

default_conf = {
    "sift": {"max_image_size": 1600, "max_num_features": 8192},
    # No mutual check: a query keypoint is compared with one descriptor per 3D point, and several
    # points may legitimately look alike (repeated facades); the ratio test does the pruning.
    "matching": {"ratio_threshold": 0.8, "mutual": False},
    # With a prior, only points seen by reference images within this distance are candidates.
    "search_radius_m": 150.0,
    "ransac_max_error_px": 12.0,
    "min_inliers": 15,
}


@dataclass
class SparseResult:
    success: bool
    cam_from_world: pycolmap.Rigid3d | None
    num_keypoints: int
    num_matches: int
    num_inliers: int
    message: str = ""
    position_std_m: float = float("nan")  # of the camera centre, from PnP's covariance (approximate)


class SparseLocalizer:
    def __init__(self, scene_map: SceneMap, conf: dict | None = None):
        self.conf = {**default_conf, **(conf or {})}
        if scene_map.descriptors is None or len(scene_map.descriptors) == 0:
            raise ValueError(f"{scene_map.path}: the map has no point descriptors; sparse localization needs them")
        self.scene_map = scene_map
        self.extractor = SiftExtractor(self.conf["sift"])
        self.point_ids = scene_map.point3D_ids  # (P,)
        points3D = scene_map.reconstruction.points3D
        self.point_xyz = np.array([points3D[i].xyz for i in self.point_ids.tolist()]).reshape(-1, 3)  # (P, 3)
        self.descriptors = torch.from_numpy(scene_map.descriptors.astype(np.float32))  # (P, 128)
        self._image_rows: dict[str, np.ndarray] = {}  # per reference image: rows of the points it observes

    def _rows_seen_from(self, names: list[str]) -> np.ndarray:
        for name in names:
            if name not in self._image_rows:
                image = self.scene_map.reconstruction.find_image_with_name(name)
                ids = observations(image).point3D_ids
                rows = np.searchsorted(self.point_ids, ids).clip(0, max(len(self.point_ids) - 1, 0))
                self._image_rows[name] = rows[self.point_ids[rows] == ids]
        return np.unique(np.concatenate([self._image_rows[name] for name in names] or [np.empty(0, np.int64)]))

    def candidate_rows(self, prior_position: np.ndarray | None) -> np.ndarray:
        """(C,) rows of the candidate points: near the prior when there is one and a shard index."""
        if prior_position is None or self.scene_map.shards is None:
            return np.arange(len(self.point_ids))
        return self._rows_seen_from(self.scene_map.shards.images_near(prior_position, self.conf["search_radius_m"]))

    def localize(self, image: np.ndarray, camera: pycolmap.Camera, prior_position: np.ndarray | None = None,
                 prior_sigma_m: float | None = None) -> SparseResult:
        """image: (H, W) uint8 grayscale at the resolution of `camera`. prior_position: (3,) map frame."""
        features = self.extractor(image)
        rows = self.candidate_rows(prior_position)
        if len(rows) < self.conf["min_inliers"]:
            return SparseResult(False, None, len(features.keypoints), 0, 0,
                                f"only {len(rows)} map points near the prior")
        query_descriptors = matching.normalize_descriptors(features.descriptors)  # (N, 128)
        matches = matching.match_descriptors(query_descriptors, self.descriptors[rows], **self.conf["matching"])
        if len(matches) < self.conf["min_inliers"]:
            return SparseResult(False, None, len(features.keypoints), len(matches), 0,
                                f"{len(matches)} 2D-3D matches, fewer than {self.conf['min_inliers']}")
        estimation = pycolmap.AbsolutePoseEstimationOptions()
        estimation.ransac.max_error = self.conf["ransac_max_error_px"]
        refinement = pycolmap.AbsolutePoseRefinementOptions()
        if prior_position is not None and prior_sigma_m:
            refinement.use_position_prior = True
            refinement.position_prior_in_world = np.asarray(prior_position, dtype=np.float64)
            refinement.position_prior_covariance = np.eye(3) * prior_sigma_m ** 2
        estimate = pycolmap.estimate_and_refine_absolute_pose(
            features.xy[matches[:, 0]], self.point_xyz[rows[matches[:, 1]]], camera, estimation, refinement,
            return_covariance=True)
        num_inliers = 0 if estimate is None else int(estimate["num_inliers"])
        if num_inliers < self.conf["min_inliers"]:
            return SparseResult(False, None, len(features.keypoints), len(matches), num_inliers,
                                f"PnP found {num_inliers} inliers, fewer than {self.conf['min_inliers']}")
        # The covariance is over (rotation, translation); the translation block's trace stands for
        # the centre's variance (equal up to the rotation's share, small next to the thresholds).
        position_std = float(np.sqrt(max(np.trace(estimate["covariance"][3:, 3:]), 0.0)))
        return SparseResult(True, estimate["cam_from_world"], len(features.keypoints), len(matches), num_inliers,
                            position_std_m=position_std)
