"""Incremental SfM with pycolmap from in-memory SIFT features and torch matches.

The initialisation options are relaxed for forward-moving street sequences (a phone carried along
a street): COLMAP's defaults (init_max_forward_motion 0.95, init_min_tri_angle 16 deg) find no
initial pair there, while 1.0 and 4 deg register 27 of the 29 Lund images.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pycolmap

from .database import write_database
from .matching import write_pairs
from .sift import Features

logger = logging.getLogger(__name__)

default_conf = {
    "camera_model": "SIMPLE_RADIAL",
    # Focal length in pixels relative to the longest side when EXIF has none (COLMAP's default).
    "default_focal_factor": 1.2,
    "init_max_forward_motion": 1.0,
    "init_min_tri_angle": 4.0,
    "min_num_matches": 15,
    # One thread makes the map reproducible (seeded RANSAC alone is not: Ceres sums in thread order,
    # and Lund registered 13 to 16 of its 22 mapping images from run to run); it took the same time
    # on the 2-core machine. Raise it for large maps.
    "num_threads": 1,
    "random_seed": 0,  # COLMAP's default (-1) seeds RANSAC randomly: maps would differ between runs
}


def make_skeleton(features: dict[str, Features], focal_px: dict[str, float] | None = None,
                  conf: dict | None = None) -> pycolmap.Reconstruction:
    """One camera per distinct (width, height, focal), as COLMAP's CameraMode.AUTO: images from one
    device share intrinsics, which constrains self-calibration much better."""
    conf = {**default_conf, **(conf or {})}
    skeleton = pycolmap.Reconstruction()
    camera_ids: dict[tuple[int, int, float], int] = {}
    for image_id, (name, image_features) in enumerate(sorted(features.items()), start=1):
        width, height = image_features.image_size
        focal = (focal_px or {}).get(name) or conf["default_focal_factor"] * max(width, height)
        key = (width, height, round(focal, 1))
        if key not in camera_ids:
            camera_ids[key] = len(camera_ids) + 1
            skeleton.add_camera_with_trivial_rig(pycolmap.Camera.create_from_model_name(
                camera_ids[key], conf["camera_model"], focal, width, height))
        skeleton.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=camera_ids[key], image_id=image_id))
    return skeleton


def verification_options(conf: dict) -> pycolmap.TwoViewGeometryOptions:
    """Geometric verification with a seeded RANSAC: with COLMAP's default (-1, a random seed) the
    verified matches, and so the SfM result, change from run to run."""
    options = pycolmap.TwoViewGeometryOptions()
    options.ransac.random_seed = conf["random_seed"]
    return options


def mapper_options(conf: dict) -> pycolmap.IncrementalPipelineOptions:
    options = pycolmap.IncrementalPipelineOptions()
    options.min_num_matches = conf["min_num_matches"]
    options.num_threads = conf["num_threads"]
    options.random_seed = conf["random_seed"]
    options.mapper.init_max_forward_motion = conf["init_max_forward_motion"]
    options.mapper.init_min_tri_angle = conf["init_min_tri_angle"]
    return options


def verified_database(skeleton: pycolmap.Reconstruction, features: dict[str, Features],
                      matches: dict[tuple[str, str], np.ndarray], work_dir: Path, conf: dict) -> Path:
    """work_dir/database.db with the skeleton's cameras and images, their keypoints, and the matches
    after COLMAP's geometric verification: what the incremental mapper reads."""
    work_dir.mkdir(parents=True, exist_ok=True)
    database, pairs_path = work_dir / "database.db", work_dir / "pairs.txt"
    write_database(database, skeleton, features, matches)
    write_pairs(pairs_path, list(matches))
    logger.info("geometric verification of %d pairs", len(matches))
    pycolmap.verify_matches(database, pairs_path, verification_options(conf))
    return database


def check_keypoints_reproduce(reconstruction: pycolmap.Reconstruction, features: dict[str, Features],
                              max_distance_px: float = 1e-3) -> None:
    """Extending a model needs the keypoints its 2D points were made from: same count, same place."""
    for image in reconstruction.images.values():
        if image.name not in features:
            raise ValueError(f"{image.name}: no features for an image of the model to extend")
        model_xy = np.array([point.xy for point in image.points2D]).reshape(-1, 2)  # (N, 2)
        xy = features[image.name].xy
        if len(xy) != len(model_xy) or (len(xy) and np.abs(xy - model_xy).max() > max_distance_px):
            raise ValueError(f"{image.name}: its features ({len(xy)} keypoints) are not those of the model "
                             f"({len(model_xy)} 2D points): extract them with the model's SIFT settings")


def register_into(reconstruction: pycolmap.Reconstruction, features: dict[str, Features],
                  matches: dict[tuple[str, str], np.ndarray], camera_ids: dict[str, int], image_dir: Path,
                  work_dir: Path, conf: dict | None = None) -> pycolmap.Reconstruction:
    """Registers new images (`camera_ids`: name -> id of a camera of `reconstruction`) into a copy of
    `reconstruction`, whose frames and cameras stay fixed: COLMAP's incremental mapper continues the
    model (2D-3D registration, triangulation of new tracks, bundle adjustment of every new pose and
    of all points over all observations). `features` covers the model's images too, with the
    keypoints the model was made from; `matches` pair new images with model images or each other."""
    conf = {**default_conf, **(conf or {})}
    work_dir = Path(work_dir)
    (work_dir / "input").mkdir(parents=True, exist_ok=True)
    check_keypoints_reproduce(reconstruction, features)
    missing = set(camera_ids.values()) - set(reconstruction.cameras)
    if missing:
        raise ValueError(f"cameras {sorted(missing)} are not in the model to extend")
    skeleton = pycolmap.Reconstruction(reconstruction)
    next_id = max(reconstruction.images, default=0) + 1
    for image_id, (name, camera_id) in enumerate(sorted(camera_ids.items()), start=next_id):
        skeleton.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=camera_id, image_id=image_id))
    database = verified_database(skeleton, features, matches, work_dir, conf)
    reconstruction.write(work_dir / "input")
    options = mapper_options(conf)
    options.fix_existing_frames = True
    options.constant_cameras = set(reconstruction.cameras)
    options.multiple_models = False
    models = pycolmap.incremental_mapping(database, image_dir, work_dir / "models", options,
                                          input_path=work_dir / "input")
    if not models:
        raise ValueError(f"no model came back from extending {reconstruction.num_reg_images()} images")
    extended = max(models.values(), key=lambda model: model.num_reg_images())
    registered = sum((image := extended.find_image_with_name(name)) is not None and image.has_pose
                     for name in camera_ids)
    logger.info("registered %d/%d new images into a model of %d images", registered, len(camera_ids),
                reconstruction.num_reg_images())
    return extended


def main(features: dict[str, Features], matches: dict[tuple[str, str], np.ndarray], image_dir: Path,
         work_dir: Path, focal_px: dict[str, float] | None = None, conf: dict | None = None
         ) -> pycolmap.Reconstruction:
    """Returns the largest reconstructed model. Raises ValueError when nothing is reconstructed."""
    conf = {**default_conf, **(conf or {})}
    work_dir = Path(work_dir)
    database = verified_database(make_skeleton(features, focal_px, conf), features, matches, work_dir, conf)
    logger.info("incremental mapping of %d images", len(features))
    models = pycolmap.incremental_mapping(database, image_dir, work_dir / "models", mapper_options(conf))
    if not models:
        raise ValueError(f"incremental SfM reconstructed nothing from {len(features)} images "
                         f"(too few matches or no valid initial pair)")
    largest = max(models.values(), key=lambda model: model.num_reg_images())
    logger.info("SfM: %d models, the largest has %d/%d images and %d points",
                len(models), largest.num_reg_images(), len(features), largest.num_points3D())
    return largest
