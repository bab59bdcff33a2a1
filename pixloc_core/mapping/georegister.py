"""Georegistration: a robust similarity from the model frame to the frame of the position priors.

GPS priors are converted to a local ENU frame whose origin is their mean, so that the registered
map is metric with z up and x east; map-frame priors (x, y, z) are used as they are. Camera
centres are aligned to the priors with LO-RANSAC (pycolmap.estimate_sim3d_robust), so that a few
wrong GPS fixes (stale or multipath) do not bend the whole map.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pycolmap

from ..geo import EnuOrigin, wgs84_to_enu
from ..io import Prior

logger = logging.getLogger(__name__)

default_conf = {
    # Inlier threshold on the centre-to-prior distance; phone GPS is good to 5-10 m.
    "max_error_m": 12.0,
    "min_common_images": 3,
}


@dataclass
class Registration:
    target_from_model: pycolmap.Sim3d
    num_images: int  # registered images that have a prior
    num_inliers: int
    residuals_m: dict[str, float]  # per image: |target_from_model(centre) - prior|

    @property
    def median_residual_m(self) -> float:
        return float(np.median(list(self.residuals_m.values())))

    @property
    def max_residual_m(self) -> float:
        return float(np.max(list(self.residuals_m.values())))

    def statistics(self) -> dict:
        return {"num_images": self.num_images, "num_inliers": self.num_inliers,
                "median_residual_m": self.median_residual_m, "max_residual_m": self.max_residual_m}


def priors_to_positions(priors: dict[str, Prior]) -> tuple[dict[str, np.ndarray], EnuOrigin | None]:
    """Metric positions (3,) per image and the ENU origin (None for map-frame priors).

    GPS priors go to ENU around their mean; a prior without altitude gets the mean altitude of the
    others (0 when none has one), which keeps it out of the way of the vertical fit."""
    if not priors:
        return {}, None
    kinds = {prior.geodetic for prior in priors.values()}
    if len(kinds) > 1:
        raise ValueError("priors mix WGS84 and map-frame positions")
    names = list(priors)
    positions = np.array([priors[name].position for name in names], dtype=np.float64)  # (N, 3)
    if kinds == {False}:
        return dict(zip(names, positions)), None
    has_altitude = np.array([priors[name].has_altitude for name in names])
    mean_altitude = positions[has_altitude, 2].mean() if has_altitude.any() else 0.0
    positions[~has_altitude, 2] = mean_altitude
    origin = EnuOrigin(float(positions[:, 0].mean()), float(positions[:, 1].mean()), float(mean_altitude))
    enu = wgs84_to_enu(positions[:, 0], positions[:, 1], positions[:, 2], origin)
    return dict(zip(names, enu)), origin


def main(reconstruction: pycolmap.Reconstruction, positions: dict[str, np.ndarray],
         conf: dict | None = None) -> Registration:
    """positions: {image name: (3,) metric target position}. Raises ValueError when too few
    registered images have a prior or no consistent similarity exists."""
    conf = {**default_conf, **(conf or {})}
    names, centers, targets = [], [], []
    for image in reconstruction.images.values():
        if image.has_pose and image.name in positions:
            names.append(image.name)
            centers.append(image.projection_center())
            targets.append(positions[image.name])
    if len(names) < conf["min_common_images"]:
        raise ValueError(f"georegistration needs {conf['min_common_images']} registered images with a prior, "
                         f"got {len(names)}")
    centers, targets = np.array(centers), np.array(targets)  # (N, 3), (N, 3)
    ransac = pycolmap.RANSACOptions()
    ransac.max_error = conf["max_error_m"]
    estimate = pycolmap.estimate_sim3d_robust(centers, targets, ransac)
    if estimate is None:
        raise ValueError(f"georegistration failed: no similarity fits {len(names)} camera centres to their priors")
    target_from_model = estimate["tgt_from_src"]
    residuals = np.linalg.norm(target_from_model * centers - targets, axis=1)
    registration = Registration(target_from_model, len(names), int((residuals <= conf["max_error_m"]).sum()),
                                dict(zip(names, residuals.tolist())))
    logger.info("georegistration: %d images, %d inliers, residual median %.2f m, max %.2f m",
                registration.num_images, registration.num_inliers,
                registration.median_residual_m, registration.max_residual_m)
    return registration
