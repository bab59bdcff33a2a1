"""Points from known poses: verify matches with the epipolar geometry of the reference poses,
triangulate with pycolmap, then keep only well-conditioned tracks.

This is hloc's "triangulation from a reference model": cameras and poses are trusted, so the
verification needs no RANSAC, and the output keeps the reference image and camera ids. Matching is
not guided by the epipolar geometry: on street facades, repeated texture along an epipolar line
then passes the ratio test, and on a synthetic street only half of such points lay on a surface
(against 83 % for plain matching followed by verification).
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import pycolmap
from tqdm import tqdm

from .database import write_database
from .sift import Features

logger = logging.getLogger(__name__)

default_conf = {
    "max_epipolar_error_px": 4.0,
    "max_reprojection_error_px": 2.0,
    "min_triangulation_angle_deg": 1.5,
    "min_track_length": 2,
}


def images_by_name(model: pycolmap.Reconstruction) -> dict[str, pycolmap.Image]:
    """The model's images by name: pycolmap's find_image_with_name walks every image."""
    return {image.name: image for image in model.images.values()}


def skeleton_from_reference(reference: pycolmap.Reconstruction, names: Collection[str],
                            reference_images: Mapping[str, pycolmap.Image] | None = None) -> pycolmap.Reconstruction:
    """The cameras, rigs and frames of `reference` and its posed images in `names` (in id order),
    without any 2D or 3D point. `reference_images`: its `images_by_name`, for a caller that cuts many
    skeletons from one model (each then costs its own images, not the model's)."""
    reference_images = images_by_name(reference) if reference_images is None else reference_images
    skeleton = pycolmap.Reconstruction()
    for camera in reference.cameras.values():
        skeleton.add_camera_with_trivial_rig(camera)
    chosen = [reference_images[name] for name in names if name in reference_images]
    for image in sorted(chosen, key=lambda image: image.image_id):
        if image.has_pose:
            skeleton.add_image_with_trivial_frame(
                pycolmap.Image(name=image.name, camera_id=image.camera_id, image_id=image.image_id),
                image.cam_from_world())
    return skeleton


def epipolar_inliers(image0: pycolmap.Image, image1: pycolmap.Image, xy0: np.ndarray, xy1: np.ndarray,
                     max_error_px: float) -> np.ndarray:
    """xy0, xy1: (K, 2) matched pixels. Returns (K,) bool: Sampson error under `max_error_px`,
    measured on the normalized image plane (lens distortion is the cameras' business) and scaled
    by the mean focal length of the pair."""
    cam1_from_cam0 = image1.cam_from_world() * image0.cam_from_world().inverse()
    t = cam1_from_cam0.translation
    skew = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    essential = skew @ cam1_from_cam0.rotation.matrix()  # x1^T E x0 = 0 on the normalized plane
    x0 = np.concatenate([image0.camera.cam_from_img(xy0), np.ones((len(xy0), 1))], axis=1)  # (K, 3)
    x1 = np.concatenate([image1.camera.cam_from_img(xy1), np.ones((len(xy1), 1))], axis=1)
    lines1, lines0 = x0 @ essential.T, x1 @ essential  # (K, 3) epipolar lines in image 1, in image 0
    numerator = np.sum(x1 * lines1, axis=1) ** 2
    denominator = (lines1[:, :2] ** 2).sum(1) + (lines0[:, :2] ** 2).sum(1)
    focal = np.mean([image0.camera.mean_focal_length(), image1.camera.mean_focal_length()])
    return np.sqrt(numerator / np.maximum(denominator, 1e-12)) * focal < max_error_px


def filter_tracks(reconstruction: pycolmap.Reconstruction, conf: dict) -> int:
    """Deletes points with a large reprojection error, a small triangulation angle or a short
    track. Returns the number of deleted points."""
    centers = {image_id: image.projection_center() for image_id, image in reconstruction.images.items()}
    min_cos = np.cos(np.radians(conf["min_triangulation_angle_deg"]))
    rejected = []
    for point_id, point in reconstruction.points3D.items():
        image_ids = {element.image_id for element in point.track.elements}
        if (point.track.length() < conf["min_track_length"]
                or point.error > conf["max_reprojection_error_px"]):
            rejected.append(point_id)
            continue
        rays = np.array([centers[i] for i in image_ids]) - point.xyz  # (T, 3)
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        # The best-conditioned pair of rays decides: their angle is the largest, its cosine the smallest.
        if len(rays) < 2 or (rays @ rays.T).min() > min_cos:
            rejected.append(point_id)
    for point_id in rejected:
        reconstruction.delete_point3D(point_id)
    return len(rejected)


def main(skeleton: pycolmap.Reconstruction, features: dict[str, Features],
         matches: dict[tuple[str, str], np.ndarray], image_dir: Path, work_dir: Path,
         conf: dict | None = None) -> pycolmap.Reconstruction:
    """Triangulates the matches between the posed images of `skeleton` (from
    `skeleton_from_reference`). Raises ValueError when no point survives."""
    conf = {**default_conf, **(conf or {})}
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    images = {image.name: image for image in skeleton.images.values()}

    verified = {}
    for (name0, name1), pair_matches in tqdm(matches.items(), desc="verification", unit="pair"):
        inliers = epipolar_inliers(images[name0], images[name1], features[name0].xy[pair_matches[:, 0]],
                                   features[name1].xy[pair_matches[:, 1]], conf["max_epipolar_error_px"])
        verified[(name0, name1)] = pair_matches[inliers]
    num_matches, num_verified = sum(map(len, matches.values())), sum(map(len, verified.values()))
    logger.info("%d of %d matches agree with the reference poses", num_verified, num_matches)

    database = work_dir / "database.db"
    write_database(database, skeleton, features, matches, verified)
    output_dir = work_dir / "triangulated"
    output_dir.mkdir(exist_ok=True)
    options = pycolmap.IncrementalPipelineOptions()
    # Known poses make a two-view track as trustworthy as its triangulation angle, which
    # filter_tracks checks; sparse reference walks have many points seen by two images only.
    options.triangulation.ignore_two_view_tracks = False
    reconstruction = pycolmap.triangulate_points(skeleton, database, image_dir, output_dir, options=options)
    num_rejected = filter_tracks(reconstruction, conf)
    logger.info("triangulated %d points, kept %d (mean track length %.2f, reprojection error %.2f px)",
                reconstruction.num_points3D() + num_rejected, reconstruction.num_points3D(),
                reconstruction.compute_mean_track_length(), reconstruction.compute_mean_reprojection_error())
    if reconstruction.num_points3D() == 0:
        raise ValueError(f"triangulation produced no 3D point from {num_verified} verified matches")
    return reconstruction
