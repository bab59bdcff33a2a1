"""`pixloc map --update MAP --images NEW_DIR`: add photos to a map in place, without rebuilding it.

The map's poses, cameras and 3D points stay as they are (ids included), so that the cells the new
photos do not reach keep their fingerprints and their feature-store partitions stay valid:

1. SIFT for the new photos into the map's feature files (Ray Data; old photos are not re-read).
2. Poses of the new photos: from `--reference-model`, or registered from their GPS
   (`--gps-from-exif`, `--priors`): COLMAP's mapper with the map frozen, on the part of the map
   within `region_radius_m` of the new photos only (sfm.register_into on a crop).
3. Pairs of every new photo with its neighbours (new or old), matched on Ray.
4. Triangulation per shard cell around the new photos (Ray tasks), then merge.extend: a track that
   shares an observation with a map point joins it, the others become new points.
5. The map written back: new points' descriptors appended, shards and cell fingerprints redone,
   one entry more in the manifest's "updates" history. It is written whole beside the map first
   (MAP/mapping/update-<k>/staged-map), then its files replace the map's, the manifest last.

No step holds the whole map: the job plans from the map's compact tables (references.parquet,
shards.json), reads the model's records of the photos within `region_radius_m` of the new ones and
of the points they see (model_files.read_region), and writes the model back patched, every other
record copied as bytes; its memory grows with the region and the number of photos, not with the
map's keypoints and points.

Work files go to MAP/mapping/update-<k>/ (k = the number of earlier updates): a killed update
resumes on rerun, and one killed while its files replaced the map's finishes replacing them.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pycolmap

from cluster import mapping as distributed
from cluster.runtime import init_ray
from pixloc_core import exif, files, model_files
from pixloc_core.images import list_images
from pixloc_core.io import Prior
from pixloc_core.map_io import (DESCRIPTORS_FILE, MANIFEST_FILE, MODEL_DIR, MapEdit, MapIndex, ReferenceImages, SceneMap,
                                cell_fingerprints, load_map_index, read_descriptors)
from pixloc_core.model_files import Region
from pixloc_core.mapping import cells, descriptors, merge, pairs, sfm, triangulation
from pixloc_core.mapping.feature_files import FeatureFiles, MatchFiles, group_pairs
from pixloc_core.mapping.keypoints import matching_conf
from pixloc_core.shards import ShardIndex

from .map import WORK_DIR, check_work_settings, default_conf as map_conf, posed_image_names

logger = logging.getLogger(__name__)

default_conf = {
    **map_conf,
    # Map photos within this distance of a new photo are matched with it and reach its cells.
    "region_radius_m": 30.0,
}
STAGED_DIR = "staged-map"  # in the update's work folder: the updated map, whole, before it replaces the map


@dataclass
class UpdateReport:
    new_images: int
    registered: int
    new_points: int
    changed_cells: list[str]
    reused_cells: list[str]
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def from_manifest(cls, manifest: dict) -> UpdateReport:
        """The report of the map's last update, from its history entry."""
        entry = manifest["updates"][-1]
        return cls(entry["new_images"], entry["registered"], entry["new_points"], entry["changed_cells"],
                   sorted(set(manifest["cell_fingerprints"]) - set(entry["changed_cells"])), entry["skipped"],
                   entry["seconds"])


def add_camera(reconstruction: pycolmap.Reconstruction, camera: pycolmap.Camera) -> int:
    """The id of an equal camera of `reconstruction`, else of `camera` added under a new id."""
    for camera_id, existing in reconstruction.cameras.items():
        if (existing.model == camera.model and (existing.width, existing.height) == (camera.width, camera.height)
                and np.allclose(existing.params, camera.params)):
            return camera_id
    camera = copy.copy(camera)
    camera.camera_id = max(reconstruction.cameras, default=0) + 1
    reconstruction.add_camera_with_trivial_rig(camera)
    return camera.camera_id


def add_posed_image(region: Region, name: str, camera_id: int, keypoints: np.ndarray,
                    cam_from_world: pycolmap.Rigid3d) -> int:
    """Adds the image to the region under the next id of the map; returns the id."""
    image_id = region.next_image_id
    region.next_image_id += 1
    region.reconstruction.add_image_with_trivial_frame(
        pycolmap.Image(name=name, keypoints=keypoints, camera_id=camera_id, image_id=image_id), cam_from_world)
    return image_id


def crop(reconstruction: pycolmap.Reconstruction, names: set[str]) -> pycolmap.Reconstruction:
    """The cameras and images of `names` with their 2D points, and the 3D points seen at least twice
    among them (tracks cut to those images): the part of a map that a registration needs."""
    keypoints = {image_id: np.array([point.xy for point in image.points2D]).reshape(-1, 2)
                 for image_id, image in reconstruction.images.items() if image.name in names}
    part = merge.skeleton_with_keypoints(reconstruction, lambda image: keypoints.get(image.image_id))
    point_ids = {image.points2D[i].point3D_id for image_id in keypoints
                 for image in [reconstruction.images[image_id]] for i in image.get_observation_point2D_idxs()}
    for point_id in point_ids:
        point = reconstruction.points3D[point_id]
        elements = [element for element in point.track.elements if element.image_id in keypoints]
        if len(elements) >= 2:
            part.add_point3D(point.xyz, pycolmap.Track(elements), point.color)
    return part


def new_camera(index: MapIndex, path: Path, size: tuple[int, int], conf: dict) -> pycolmap.Camera:
    """The map's calibrated camera of this device (EXIF focal and size); without an EXIF focal
    length, a map camera of the same image size (most likely the same device); else a camera
    from the EXIF focal length or COLMAP's default."""
    focal = exif.read_exif_focal_px(path, *size)
    if focal:
        camera = index.camera_for_exif(*size, focal)
        if camera is not None:
            return camera
    else:
        for camera in index.references.cameras.values():
            if (camera.width, camera.height) == tuple(size):
                return camera
    focal = focal or conf["default_focal_factor"] * max(size)
    return pycolmap.Camera.create_from_model_name(0, conf["camera_model"], focal, *size)


def main(map_dir: Path, images: Path, reference_model: Path | None = None, priors: dict[str, Prior] | None = None,
         conf: dict | None = None, workers: int = 2, address: str | None = None) -> UpdateReport:
    conf = {**default_conf, **(conf or {})}
    start = time.perf_counter()
    map_dir, images = Path(map_dir), Path(images)
    root = map_dir / WORK_DIR
    history = json.loads((map_dir / MANIFEST_FILE).read_text()).get("updates", []) \
        if (map_dir / MANIFEST_FILE).is_file() else []
    update_root = root / f"update-{len(history):03d}"
    staged = update_root / STAGED_DIR
    if (staged / MANIFEST_FILE).is_file():
        logger.info("%s: an earlier run wrote this update whole; replacing the map's files with it", staged)
        report = UpdateReport.from_manifest(json.loads((staged / MANIFEST_FILE).read_text()))
        replace_map_files(staged, map_dir)
        return report
    index = load_map_index(map_dir, with_observations=True)  # derives the tables once for a map older than them
    known = set(index.references.names)
    reference = cells.read_reference(reference_model) if reference_model else None
    candidates = posed_image_names(reference) if reference else list_images(images)
    new_names = [name for name in candidates if name not in known]
    if not new_names:
        raise ValueError(f"{images}: no image that {map_dir} does not hold already")
    if reference is None and not priors:
        raise ValueError("an update without --reference-model needs GPS priors (--gps-from-exif or --priors)")
    check_work_settings(update_root, {"images": str(images.resolve()), "new_images": new_names,
                                      "reference_model": str(Path(reference_model).resolve()) if reference_model
                                      else None})
    if (root / "settings.json").is_file():  # the map's own SIFT settings: the same keypoints for old photos
        conf["sift"] = json.loads((root / "settings.json").read_text())["sift"]
    features = FeatureFiles(root)
    old_index = index.shards
    old_centers = dict(zip(old_index.image_names, old_index.image_centers))
    shard_conf = {"cell_size_m": old_index.cell_size_m, "halo_m": old_index.halo_m}
    keypoint_type = index.keypoint_type

    with init_ray(address, num_cpus=None if address else workers):
        skipped = distributed.extract_features(images, new_names, root, keypoint_type, conf["sift"], workers)
        present = [name for name in new_names if features.has(name)]
        if reference is not None:
            positions = {name: reference.find_image_with_name(name).projection_center() for name in present}
        else:
            positions = {name: index.prior_to_map(priors[name]) for name in present if name in priors}
            skipped += [{"name": name, "reason": "no GPS prior to place it in the map"}
                        for name in present if name not in positions]
        nearby = sorted({old for position in positions.values()
                         for old in old_index.images_near(position, conf["region_radius_m"])})
        # A map built in one process has no feature files: its photos near the update get them now.
        distributed.extract_features(files.location(index.manifest["images_dir"]), nearby, root, keypoint_type,
                                     conf["sift"], workers)
        region = model_files.read_region(map_dir / MODEL_DIR, nearby)
        reconstruction = region.reconstruction
        logger.info("region: %d of the map's %d photos within %.0f m of the new ones, with %d points",
                    len(region.image_offsets), len(index.references.names), conf["region_radius_m"],
                    reconstruction.num_points3D())
        by_name = triangulation.images_by_name(reconstruction)
        names = sorted(set(nearby) | set(positions))
        if reference is not None:
            posed = {name: reference.find_image_with_name(name) for name in positions}
            everyone = {**{name: by_name[name] for name in nearby}, **posed}
            image_pairs = pairs.from_poses(names, np.array([everyone[n].projection_center() for n in names]),
                                           np.array([everyone[n].viewing_direction() for n in names]),
                                           conf["pairs"])
        else:
            centers = {**{name: old_centers[name] for name in nearby}, **positions}
            image_pairs = pairs.from_positions(names, np.array([centers[n] for n in names]), conf["pairs"])
        image_pairs = [pair for pair in image_pairs if pair[0] in positions or pair[1] in positions]
        distributed.match_pairs(update_root, group_pairs(image_pairs), matching_conf(keypoint_type, conf),
                                features_root=root)

        new_ids = {}
        if reference is not None:
            for name, image in posed.items():
                camera_id = add_camera(reconstruction, reference.cameras[image.camera_id])
                new_ids[name] = add_posed_image(region, name, camera_id, features.keypoints(name),
                                                image.cam_from_world())
        else:
            new_ids = register(index, region, names, positions, features, MatchFiles(update_root), images,
                               update_root, conf, skipped)

        new_centers = {name: reconstruction.images[image_id].projection_center() for name, image_id in new_ids.items()}
        cell_index = ShardIndex.build({**{name: old_centers[name] for name in nearby}, **new_centers}, shard_conf)
        touched = [cell for cell in cell_index.cell_ids if set(cell_index.images_of(cell)) & set(new_ids)]
        by_name.update({name: reconstruction.images[image_id] for name, image_id in new_ids.items()})
        for cell in touched:
            if not cells.is_done(update_root, cell):
                cells.write_skeleton(update_root, cell, reconstruction, cell_index.images_of(cell), by_name)
        results = distributed.run_cells(cells, update_root, touched, images, {"triangulation": conf["triangulation"]},
                                        features_root=root)

    keypoints = {by_name[name].image_id: features.keypoints(name) for name in sorted(set(nearby) | set(new_ids))}
    extension = merge.extend(reconstruction, [cells.load_points(update_root, r.cell) for r in results if not r.failure],
                             keypoints, set(new_ids.values()), region.next_point3D_id, conf["merge"])
    # Every observation of a new point is in a changed image: only their feature files are read.
    changed_ids = extension.changed_image_ids | set(new_ids.values())
    changed_names = {reconstruction.images[image_id].name for image_id in extension.changed_image_ids}
    new_point_ids, new_descriptors = descriptors.main(reconstruction, features.subset(changed_names),
                                                      point_ids=np.array(extension.new_point_ids, dtype=np.int64))
    # The descriptors of the points the changed images see, for their rows of the observation table.
    seen = {point.point3D_id for image_id in changed_ids for point in reconstruction.images[image_id].points2D
            if point.has_point3D() and point.point3D_id < region.next_point3D_id}
    seen_ids, seen_descriptors = read_descriptors(map_dir / DESCRIPTORS_FILE, seen)
    scene = SceneMap(reconstruction, index.geo, ShardIndex.build({**old_centers, **new_centers}, shard_conf),
                     index.manifest, np.concatenate([seen_ids, new_point_ids]),
                     np.concatenate([seen_descriptors, new_descriptors.reshape(-1, seen_descriptors.shape[1])]),
                     keypoint_type, index.exif_camera_ids)

    # Only the images with a new observation (the new ones among them) are derived again, not the map.
    edit = MapEdit(map_dir, index.fingerprint, frozenset(changed_ids), region,
                   frozenset(extension.extended_point_ids), frozenset(extension.new_point_ids), index.references)
    references = ReferenceImages.from_scene(scene, edit)
    old_fingerprints = index.manifest.get("cell_fingerprints", {})
    fingerprints = cell_fingerprints(references.digests_by_name(), scene.shards)
    report = UpdateReport(len(new_names), len(new_ids), len(extension.new_point_ids),
                          sorted(cell for cell in fingerprints if old_fingerprints.get(cell) != fingerprints[cell]),
                          sorted(cell for cell in fingerprints if old_fingerprints.get(cell) == fingerprints[cell]),
                          skipped, time.perf_counter() - start)
    entry = {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "images_dir": str(images),
             "source": "reference-model" if reference is not None else "gps",
             "previous_fingerprint": index.fingerprint,  # lets the store of the map before follow it
             **{key: value for key, value in asdict(report).items() if key != "reused_cells"},
             "failed_cells": [{"cell": r.cell, "reason": r.failure} for r in results if r.failure]}
    manifest = index.manifest
    shutil.rmtree(staged, ignore_errors=True)  # what a run stopped while writing it left
    scene.save(staged, manifest["source"], files.location(manifest["images_dir"]), manifest["skipped"],
               {"failed_cells": manifest.get("failed_cells", []), "created_utc": manifest["created_utc"],
                "updates": history + [entry], "cell_fingerprints": fingerprints}, edit, references)
    replace_map_files(staged, map_dir)
    logger.info("updated %s: %d of %d new images registered, %d new points, %d cells changed, %d unchanged (%.1f s)",
                map_dir, report.registered, report.new_images, report.new_points, len(report.changed_cells),
                len(report.reused_cells), report.seconds)
    return report


def replace_map_files(staged: Path, map_dir: Path) -> None:
    """Moves the files of the map written whole at `staged` over those of `map_dir`, one rename
    each, the manifest last: until then the map's manifest names the map before the update (and
    its tables, by fingerprint, are current only for that), and a rerun finishes the moves."""
    for path in sorted(staged.rglob("*")):
        if path.is_file() and path != staged / MANIFEST_FILE:
            target = map_dir / path.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    os.replace(staged / MANIFEST_FILE, map_dir / MANIFEST_FILE)
    shutil.rmtree(staged)


def register(index: MapIndex, region: Region, names: list[str], positions: dict[str, np.ndarray],
             features: FeatureFiles, matches: MatchFiles, images: Path, work_dir: Path, conf: dict,
             skipped: list[dict]) -> dict[str, int]:
    """Registers the new images of `positions` into the region of the map around them (`names`:
    its photos and the new ones; poses, points and cameras fixed) and adds those that register to
    the region; returns their ids. The others go to `skipped` with a reason."""
    reconstruction = region.reconstruction
    # The map's own matches connect its photos: COLMAP's mapper loads only photos with verified
    # matches, and the cropped model must hold no other.
    old_names = set(names) - set(positions)
    pair_matches = {**MatchFiles(work_dir.parent).among(old_names), **matches.among(names)}
    connected = {name for pair, found in pair_matches.items() if len(found) >= 2 * conf["sfm"]["min_num_matches"]
                 for name in pair}
    names = sorted(connected | set(positions))
    part = crop(reconstruction, connected & old_names)
    camera_ids = {}
    for name in positions:
        camera_id = add_camera(reconstruction, new_camera(index, images / name, features.image_size(name), conf["sfm"]))
        if camera_id not in part.cameras:
            part.add_camera_with_trivial_rig(reconstruction.cameras[camera_id])
        camera_ids[name] = camera_id
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="register-") as temporary:
        extended = sfm.register_into(part, {name: features[name] for name in names},
                                     {pair: found for pair, found in pair_matches.items() if set(pair) <= set(names)},
                                     camera_ids, images, Path(temporary), conf["sfm"])
    new_ids = {}
    for name, camera_id in camera_ids.items():
        image = extended.find_image_with_name(name)
        if image is None or not image.has_pose:
            skipped.append({"name": name, "reason": "not registered: too few matches with the map near its GPS"})
            continue
        new_ids[name] = add_posed_image(region, name, camera_id, features.keypoints(name), image.cam_from_world())
    return new_ids
