"""COLMAP database I/O shared by triangulation (known poses) and incremental SfM.

pycolmap's mappers read everything from a database; we fill it from in-memory features and torch
matches, with the camera, rig, frame and image ids of a skeleton reconstruction so that the ids of
the output model equal those of the input.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap

from .sift import Features


def write_database(path: Path, skeleton: pycolmap.Reconstruction, features: dict[str, Features],
                   matches: dict[tuple[str, str], np.ndarray],
                   verified: dict[tuple[str, str], np.ndarray] | None = None) -> None:
    """skeleton: cameras, rigs, frames and images (poses optional, no points). `verified`: inlier
    matches per pair, written as calibrated two-view geometries so that no verification runs."""
    path = Path(path)
    path.unlink(missing_ok=True)
    image_ids = {image.name: image_id for image_id, image in skeleton.images.items()}
    with pycolmap.Database.open(path) as db:
        for camera in skeleton.cameras.values():
            db.write_camera(camera, use_camera_id=True)
        for rig in skeleton.rigs.values():
            db.write_rig(rig, use_rig_id=True)
        for frame in skeleton.frames.values():
            db.write_frame(frame, use_frame_id=True)
        for image_id, image in skeleton.images.items():
            db.write_image(pycolmap.Image(name=image.name, camera_id=image.camera_id, image_id=image_id,
                                          frame_id=image.frame_id), use_image_id=True)
            db.write_keypoints(image_id, features[image.name].keypoints)
        for (name0, name1), pair_matches in matches.items():
            db.write_matches(image_ids[name0], image_ids[name1], pair_matches.astype(np.uint32))
        for (name0, name1), inliers in (verified or {}).items():
            geometry = pycolmap.TwoViewGeometry()
            geometry.config = pycolmap.TwoViewGeometryConfiguration.CALIBRATED
            geometry.inlier_matches = inliers.astype(np.uint32)
            db.write_two_view_geometry(image_ids[name0], image_ids[name1], geometry)
