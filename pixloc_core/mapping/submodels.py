"""SfM submodels of a map built from images only: each shard cell (core plus halo, by GPS) is
reconstructed alone and registered to its priors, then the submodels are aligned to each other
through the images they share and merged into one model.

    MAP/mapping/submodels/<cell>/input.json  the cell's image names, prior positions, EXIF focal lengths
    MAP/mapping/submodels/<cell>/model/      its COLMAP model in the frame of the priors, and
                                             summary.json (images, points), written last: it marks
                                             the cell done
    MAP/mapping/submodels/<cell>/failed.txt  one line: why the cell has no model

Why the submodels are aligned to each other and not each to the GPS alone: phone GPS is good to
metres, while the poses of the images two neighbouring submodels share fix their relative
similarity to centimetres. The GPS registration of each submodel only gives the merge a first
frame; the merged model is registered to the priors once, over all its images (jobs/map.py).
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap

from .. import files
from ..files import Location
from . import cell_adjustment, georegister, merge, sfm
from .cells import (FAILED_FILE, MODEL_DIR, CellResult, finish_with_model, model_done, read_model,
                    read_model_result, record_failure)
from .feature_files import FeatureFiles, MatchFiles

logger = logging.getLogger(__name__)

SUBMODELS_DIR, INPUT_FILE = "submodels", "input.json"

default_conf = {
    # `pixloc map` splits a set of images into submodels only above this size: one SfM holds longer
    # tracks than any submodel (Lund at 1,024 px: 28 of 29 photos registered in one SfM, 25 in 5
    # submodels, and geotagging through the submodel map lost photo 27), and a few hundred
    # images fit one process. 0 always splits.
    "single_sfm_max_images": 300,
    # A submodel is a shard cell (the map's --cell-size) with a wider halo than a query needs: the
    # images near a cell border register only with enough of their neighbours in the same SfM.
    "halo_m": 40.0,
    "min_images": 3,
    "sfm": sfm.default_conf,
    "georegister": georegister.default_conf,
    "min_shared_images": 2,  # to align two submodels: rotations from one, the scale needs two centres
    # Shared camera centres farther apart than this after alignment are outliers. Two submodels of
    # one street differ smoothly by decimetres (each bends a little); a wrongly registered image by metres.
    "max_alignment_error_m": 2.0,
    # The parts of a track come from submodels that each bent a little: a looser reprojection bound
    # than the known-pose merge; the merged points are then re-fitted to the merged poses.
    "merge": {**merge.default_conf, "max_reprojection_error_px": 4.0},
    # The points and cameras of the merged model are re-fitted to the merged poses (`refit`).
    # With adjust_cells, the poses are refined first, cell by cell against the cells already
    # settled (cell_adjustment.py). Off by default: on Lund at 640 px it moved the merged cameras
    # away from the single-process SfM (0.058 -> 0.087 m median, 0.13 -> 0.39 m max distance after
    # a similarity), as refining every pose at once did (one global bundle adjustment: 0.22 -> 0.79 m
    # median, 0.51 -> 6.7 m max, before the merge kept one camera per device): each submodel was
    # adjusted when it was reconstructed, and few points hold a street's poses. It repairs a cell
    # whose merged poses are off (tests/test_cell_adjustment.py: 0.3 m -> under 0.08 m).
    "adjust_cells": False,
    "adjustment": cell_adjustment.default_conf,
}
WORK_SETTINGS = ("halo_m", "min_images", "sfm", "georegister")  # those the files of `main` depend on


def cell_dir(root: Location, cell: str) -> Location:
    return files.location(root) / SUBMODELS_DIR / cell


def is_done(root: Location, cell: str) -> bool:
    return model_done(cell_dir(root, cell))


def write_input(root: Location, cell: str, names: list[str], positions: dict[str, np.ndarray],
                focal_px: dict[str, float]) -> None:
    """The cell's input: its images (core plus halo), their prior positions and EXIF focal lengths."""
    files.write_text(cell_dir(root, cell) / INPUT_FILE, json.dumps({
        "names": sorted(names),
        "positions": {name: np.asarray(positions[name]).tolist() for name in names if name in positions},
        "focal_px": {name: focal_px[name] for name in names if name in focal_px}}))


def read_result(root: Location, cell: str) -> CellResult:
    return read_model_result(cell_dir(root, cell), cell)


def main(root: Location, cell: str, image_dir: Location, conf: dict | None = None,
         features_root: Location | None = None) -> CellResult:
    """SfM on the cell's images alone (the input of `write_input`, features and matches under
    `root`), registered to their priors; the model is written in the frame of the priors."""
    conf = {**default_conf, **(conf or {})}
    directory = cell_dir(root, cell)
    given = json.loads(files.read_text(directory / INPUT_FILE))
    found = FeatureFiles(features_root or root).subset(given["names"])
    features = {name: found[name] for name in given["names"] if name in found}
    if len(features) < conf["min_images"]:
        return record_failure(directory, FAILED_FILE, CellResult(cell, len(features), failure=(
            f"cell {cell}: {len(features)} image(s) with features, a submodel needs {conf['min_images']}")))
    matches = MatchFiles(root).among(sorted(features))
    positions = {name: np.array(position) for name, position in given["positions"].items()}
    try:
        with tempfile.TemporaryDirectory(prefix=f"pixloc_submodel_{cell}_") as work_dir:
            images = files.local_files(image_dir, sorted(features), Path(work_dir) / "images")  # for colours
            model = sfm.main(features, matches, images, Path(work_dir), given["focal_px"], conf["sfm"])
        registration = georegister.main(model, positions, conf["georegister"])
    except ValueError as error:
        return record_failure(directory, FAILED_FILE, CellResult(cell, len(features), failure=f"cell {cell}: {error}"))
    model.transform(registration.target_from_model)
    return finish_with_model(directory, model, CellResult(cell, model.num_reg_images(), model.num_points3D()))


def load(root: Location, cell: str) -> pycolmap.Reconstruction:
    return read_model(cell_dir(root, cell) / MODEL_DIR)


def posed_images(model: pycolmap.Reconstruction) -> dict[str, pycolmap.Image]:
    return {image.name: image for image in model.images.values() if image.has_pose}


def rotation_mean(rotations: np.ndarray) -> np.ndarray:
    """Chordal L2 mean of (K, 3, 3) rotation matrices: the rotation nearest to their sum."""
    u, _, vt = np.linalg.svd(rotations.sum(axis=0))
    return u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt


def relative_similarity(source: dict[str, pycolmap.Image], target: dict[str, pycolmap.Rigid3d], conf: dict
                        ) -> tuple[pycolmap.Sim3d, int] | None:
    """target_from_source from the images both hold (`target`: name -> cam_from_world in the target
    frame), and the number of shared images that agree with it; None with too few.

    Rotation from the camera orientations (R = R_target^T R_source per image, averaged), so that it
    is determined even when the shared centres lie on a line, as along a street; then scale and
    translation from the centres, least squares, refitted once without the outliers."""
    shared = sorted(name for name in source if name in target)  # `target` grows to the whole map: no set of it
    if len(shared) < conf["min_shared_images"]:
        return None
    rotation = rotation_mean(np.stack([target[name].rotation.matrix().T @ source[name].cam_from_world().rotation.matrix()
                                       for name in shared]))  # (3, 3)
    source_centers = np.stack([source[name].projection_center() for name in shared])  # (K, 3)
    target_centers = np.stack([target[name].inverse().translation for name in shared])  # (K, 3)
    inliers = np.ones(len(shared), bool)
    for _ in range(2):
        rotated = source_centers[inliers] @ rotation.T
        source_offset = rotated - rotated.mean(axis=0)
        target_offset = target_centers[inliers] - target_centers[inliers].mean(axis=0)
        spread = (source_offset ** 2).sum()
        if spread < 1e-12:
            return None
        scale = float((source_offset * target_offset).sum() / spread)
        translation = target_centers[inliers].mean(axis=0) - scale * rotated.mean(axis=0)
        target_from_source = pycolmap.Sim3d(scale, pycolmap.Rotation3d(rotation), translation)
        residuals = np.linalg.norm(target_from_source * source_centers - target_centers, axis=1)
        inliers = residuals <= conf["max_alignment_error_m"]
        if inliers.sum() < conf["min_shared_images"] or scale <= 0:
            return None
    return target_from_source, int(inliers.sum())


@dataclass
class Alignment:
    transforms: dict[str, pycolmap.Sim3d]  # per submodel: frame of the largest from its own
    rejected: dict[str, str]  # submodels whose shared images contradict the others: one line why


def align(models: dict[str, pycolmap.Reconstruction], conf: dict | None = None) -> Alignment:
    """A similarity per submodel into the frame of the largest one, grown as a maximum spanning
    tree: each step aligns the unaligned submodel with the most agreeing shared images to the poses
    of those already aligned. A submodel that shares no image with the others keeps its GPS frame
    (logged); one whose shared images disagree with the others is rejected: its poses would
    contradict theirs."""
    conf = {**default_conf, **(conf or {})}
    posed = {cell: posed_images(model) for cell, model in models.items()}
    alignment = Alignment({}, {})
    if not posed:
        return alignment
    anchor = max(posed, key=lambda cell: (len(posed[cell]), cell))
    alignment.transforms[anchor] = pycolmap.Sim3d()
    aligned_poses = {name: image.cam_from_world() for name, image in posed[anchor].items()}
    # Each unaligned submodel's fit to the aligned poses; it changes only when a newly aligned
    # submodel shares one of its images, so only those fits are recomputed.
    fits = {cell: relative_similarity(posed[cell], aligned_poses, conf) for cell in sorted(posed) if cell != anchor}
    while found := {cell: fit for cell, fit in fits.items() if fit is not None}:
        cell = max(sorted(found), key=lambda candidate: found[candidate][1])
        target_from_source = found[cell][0]
        alignment.transforms[cell] = target_from_source
        del fits[cell]
        for name, image in posed[cell].items():
            aligned_poses.setdefault(name, target_from_source.transform_camera_world(image.cam_from_world()))
        for other in fits:
            if any(name in posed[cell] for name in posed[other]):
                fits[other] = relative_similarity(posed[other], aligned_poses, conf)
    for cell in sorted(set(posed) - set(alignment.transforms)):
        shared = sum(name in aligned_poses for name in posed[cell])
        if shared:
            alignment.rejected[cell] = (f"cell {cell}: its {shared} images shared with the other submodels do not fit "
                                        f"them within {conf['max_alignment_error_m']} m")
            logger.warning("%s", alignment.rejected[cell])
        else:
            logger.warning("submodel %s shares no image with the others: kept in its GPS frame", cell)
            alignment.transforms[cell] = pycolmap.Sim3d()
    return alignment


def pose_sources(models: dict[str, pycolmap.Reconstruction], owner: dict[str, str]) -> dict[str, str]:
    """The submodel each image's pose is taken from: its owner cell's (the cell its prior falls in,
    where it is farthest from a submodel border), else the largest submodel that registered it."""
    by_size = sorted(models, key=lambda cell: -models[cell].num_reg_images())
    chosen = {}
    for cell in by_size:
        for name in posed_images(models[cell]):
            if name not in chosen or owner.get(name) == cell:
                chosen[name] = cell
    return chosen


def device_cameras(models: dict[str, pycolmap.Reconstruction], source: dict[str, str],
                   focal_px: dict[str, float]) -> dict[str, pycolmap.Camera]:
    """Image name -> its camera in the merged model: one per device (size and EXIF focal), as one
    SfM has (sfm.make_skeleton), with the median of the calibrations of the submodels' images of it.
    Each submodel calibrated its own (Lund's phone: focal 703-773 px in three), and a query of that
    device gets one camera: it would not fit the points the others made."""
    calibrations: dict[tuple, list[pycolmap.Camera]] = defaultdict(list)
    device = {}
    for name, cell in sorted(source.items()):
        camera = models[cell].cameras[models[cell].find_image_with_name(name).camera_id]
        device[name] = (camera.model, camera.width, camera.height, round(focal_px.get(name, 0.0), 1))
        calibrations[device[name]].append(camera)
    cameras = {}
    for camera_id, (key, calibrated) in enumerate(sorted(calibrations.items(), key=str), start=1):
        camera = copy.copy(calibrated[0])
        camera.camera_id = camera_id
        camera.params = np.median(np.stack([c.params for c in calibrated]), axis=0)
        cameras[key] = camera
    return {name: cameras[key] for name, key in device.items()}


def refit(reconstruction: pycolmap.Reconstruction) -> None:
    """The points and the cameras of the merged model fitted to its poses, in place: the shared
    cameras calibrated again to all their images, with the robust loss of the per-cell adjustment."""
    if not reconstruction.num_points3D():
        return
    options = cell_adjustment.bundle_adjustment_options()
    options.refine_rig_from_world = False
    before = reconstruction.compute_mean_reprojection_error()
    pycolmap.bundle_adjustment(reconstruction, options)
    logger.info("points and cameras re-fitted to the merged poses: mean reprojection error %.2f -> %.2f px",
                before, reconstruction.compute_mean_reprojection_error())


def merge_submodels(models: dict[str, pycolmap.Reconstruction], owner: dict[str, str], features: FeatureFiles,
                    focal_px: dict[str, float], conf: dict | None = None) -> tuple[pycolmap.Reconstruction, dict[str, str]]:
    """One model from the submodels: each image posed once (`pose_sources`), with one camera per
    device (`device_cameras`; `focal_px`: the images' EXIF focal); the submodels' points joined into tracks by their shared
    observations (merge.py; image ids renumbered over all submodels). Returns the model, to be
    adjusted (cell_adjustment.py, `refit`), and the rejected submodels (`align`). Transforms the
    models in place."""
    conf = {**default_conf, **(conf or {})}
    alignment = align(models, conf)
    models = {cell: model for cell, model in models.items() if cell in alignment.transforms}
    for cell, model in models.items():
        model.transform(alignment.transforms[cell])
    source = pose_sources(models, owner)
    image_ids = {name: image_id for image_id, name in enumerate(sorted(source), start=1)}
    cameras = device_cameras(models, source, focal_px)
    skeleton, keypoints = pycolmap.Reconstruction(), {}
    for camera in {camera.camera_id: camera for camera in cameras.values()}.values():
        skeleton.add_camera_with_trivial_rig(camera)
    for name, cell in sorted(source.items()):
        keypoints[image_ids[name]] = features.keypoints(name)
        skeleton.add_image_with_trivial_frame(
            pycolmap.Image(name=name, keypoints=keypoints[image_ids[name]], camera_id=cameras[name].camera_id,
                           image_id=image_ids[name]), models[cell].find_image_with_name(name).cam_from_world())
    parts = []
    for model in models.values():
        points = merge.CellPoints.from_reconstruction(model)
        local_to_global = {image_id: image_ids.get(image.name, -1) for image_id, image in model.images.items()}
        points.observation_image = np.array([local_to_global[i] for i in points.observation_image.tolist()],
                                            dtype=np.int64)
        kept = points.observation_image > 0
        parts.append(merge.CellPoints(points.xyz, points.color, points.observation_point[kept],
                                      points.observation_image[kept], points.observation_point2D[kept]))
    return merge.main(skeleton, parts, keypoints, conf["merge"]), alignment.rejected
