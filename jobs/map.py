"""`pixloc map`: build, import or triangulate a map, georegister it and shard it by location.

Three ways in, one map format out (pixloc_core/map_io.py):
  --reference-model DIR  known cameras and poses: SIFT, pairs by pose, torch matching, triangulation;
                         distributed on Ray (features per image, matches per chunk, one triangulation
                         per shard cell plus halo, merged by shared observations, the model and
                         tables written in pieces; resumable, see build_map_in_cells), or in one
                         process with --single-process
  (images only)          SIFT, pairs by GPS (else exhaustive), incremental SfM, georegistration;
                         the model is then transformed into the ENU frame of the priors. Above
                         submodels.single_sfm_max_images images with priors, distributed on Ray: one
                         SfM submodel per shard cell plus halo, aligned through shared images and
                         merged (build_sfm_in_cells); otherwise one SfM in this process
  --import-model DIR     an existing COLMAP model (text or binary), kept as is
With priors (--priors CSV or --gps-from-exif), the similarity map->ENU and its residuals go to geo.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pycolmap

from pixloc_core.shards import ShardIndex
from pixloc_core.shards import default_conf as shards_conf
from pixloc_core import exif, files
from pixloc_core.files import Location
from pixloc_core.geo import EnuOrigin
from pixloc_core.io import Prior, read_priors
from pixloc_core.images import list_images
from pixloc_core.map_io import GeoInfo, MapIndex, SceneMap, Similarity, exif_camera_key, load_map_index
from cluster import mapping as distributed
from cluster.runtime import init_ray
from pixloc_core.mapping import (cell_adjustment, cells, descriptors, georegister, keypoints, matching, merge,
                                  model_pieces, pairs, sfm, sift, submodels, triangulation)
from pixloc_core.mapping.feature_files import FeatureFiles, group_pairs

from .config import merge_conf

logger = logging.getLogger(__name__)

default_conf = {
    "keypoints": "sift",  # or a learned type (alike-n, xfeat, ...: mapping/keypoints.py)
    "sift": sift.default_conf,  # image size and keypoint count limits, of every keypoint type
    "pairs": pairs.default_conf,
    "matching": matching.default_conf,  # of SIFT
    "learned_matching": {**matching.default_conf, "ratio_threshold": 0.95},  # of the learned types
    "triangulation": triangulation.default_conf,
    "sfm": sfm.default_conf,
    "georegister": georegister.default_conf,
    "shards": shards_conf,
    "merge": merge.default_conf,
    "submodels": submodels.default_conf,
    "min_registered_images": 3,
}

WORK_DIR = "mapping"  # MAP/mapping: per-image features, matches and per-cell results of a distributed build
NO_KEYPOINTS = np.zeros((0, 2))


T = TypeVar("T")
EXIF_THREADS = 16  # EXIF reads wait on the network (one request each on S3), not on the CPU


def exif_values(image_dir: Location, names: Iterable[str], read: Callable[[Location, str], T | None]) -> dict[str, T]:
    """read(path, name) of every image, in threads; the images without a value (None, or an
    unreadable EXIF) are left out."""
    folder = files.location(image_dir)

    def value(name: str) -> tuple[str, T | None]:
        try:
            return name, read(folder / name, name)
        except (ValueError, OSError) as error:
            logger.debug("no EXIF value: %s", error)
            return name, None

    with ThreadPoolExecutor(EXIF_THREADS) as pool:
        return {name: found for name, found in pool.map(value, names) if found is not None}


def exif_priors(image_dir: Location, names: list[str]) -> dict[str, Prior]:
    """WGS84 priors from the EXIF GPS of the images that have one."""
    priors = exif_values(image_dir, names, lambda path, _: exif.read_exif_prior(path))
    logger.info("EXIF GPS found in %d of %d images", len(priors), len(names))
    return priors


def exif_focal_lengths(image_dir: Location, sizes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """EXIF focal lengths in pixels of the images of `sizes` (name -> width, height) that have one."""
    return exif_values(image_dir, sizes, lambda path, name: exif.read_exif_focal_px(path, *sizes[name]) or None)


def posed_image_names(model: pycolmap.Reconstruction) -> list[str]:
    return sorted(image.name for image in model.images.values() if image.has_pose)


def triangulate(reference: pycolmap.Reconstruction, features: dict[str, sift.Features], images: Path,
                work_dir: Path, conf: dict) -> pycolmap.Reconstruction:
    """Points for the known poses of `reference`: pairs by pose, matches verified by the poses."""
    skeleton = triangulation.skeleton_from_reference(reference, set(features))
    posed = list(skeleton.images.values())
    image_pairs = pairs.from_poses([image.name for image in posed],
                                   np.array([image.projection_center() for image in posed]),
                                   np.array([image.viewing_direction() for image in posed]), conf["pairs"])
    matches = matching.main(features, image_pairs, keypoints.matching_conf(conf["keypoints"], conf))
    return triangulation.main(skeleton, features, matches, images, work_dir, conf["triangulation"])


def reconstruct(features: dict[str, sift.Features], positions: dict[str, np.ndarray], images: Path,
                work_dir: Path, focal_px: dict[str, float], conf: dict) -> pycolmap.Reconstruction:
    """Incremental SfM: pairs by prior position (else exhaustive), EXIF focal lengths."""
    image_pairs = pairs.main(sorted(features), positions, conf["pairs"])
    matches = matching.main(features, image_pairs, keypoints.matching_conf(conf["keypoints"], conf))
    return sfm.main(features, matches, images, work_dir, focal_px, conf["sfm"])


def build_map(images: Location, out: Location, reference_model: Location | None = None,
              import_model: Location | None = None, priors: dict[str, Prior] | None = None,
              conf: dict | None = None) -> SceneMap:
    """Builds and writes the map directory `out`. Raises ValueError for a degenerate result.

    Remote inputs (s3://) are copied into the local cache first (SIFT and pycolmap read files), a
    remote `out` is written locally and uploaded, its manifest last."""
    conf = merge_conf(default_conf, conf)  # each step completes its own conf with its defaults
    images_location, images = images, files.local_copy(images)
    source_model = (cells.read_model(import_model) if import_model
                    else cells.read_reference(reference_model) if reference_model else None)
    names = posed_image_names(source_model) if source_model else list_images(images)
    if not names:
        raise ValueError(f"{images}: no images to map")
    features, skipped = keypoints.main(images, names, conf["keypoints"], conf["sift"])
    if len(features) < conf["min_registered_images"]:
        raise ValueError(f"{images}: only {len(features)} readable images, a map needs {conf['min_registered_images']}")
    positions, origin = georegister.priors_to_positions(
        {name: prior for name, prior in (priors or {}).items() if name in features})

    # EXIF focal lengths: SfM's initial cameras, and in every map the key by which a query with the
    # same EXIF finds the map's camera (calibrated or refined) instead of one made from its EXIF.
    sizes = {name: found.image_size for name, found in features.items()}
    focal_px = exif_focal_lengths(images, sizes)
    with tempfile.TemporaryDirectory(prefix="pixloc_map_") as work_dir:
        if import_model:
            source, reconstruction = "import", source_model
        elif reference_model:
            source = "reference-model"
            reconstruction = triangulate(source_model, features, images, Path(work_dir), conf)
        else:
            source, reconstruction = "sfm", reconstruct(features, positions, images, Path(work_dir), focal_px, conf)
    point_descriptors = descriptors.main(reconstruction, features, keypoints_are_features=source != "import")
    return finish_map(reconstruction, point_descriptors, sizes, positions, origin, source, images_location, out,
                      skipped, focal_px, conf)


def finish_map(reconstruction: pycolmap.Reconstruction, point_descriptors: tuple[np.ndarray, np.ndarray] | None,
               image_sizes: Mapping[str, tuple[int, int]], positions: dict[str, np.ndarray], origin: EnuOrigin | None,
               source: str, images: Location, out: Location, skipped: list[dict], focal_px: dict[str, float],
               conf: dict, manifest_extra: dict | None = None, pieces: model_pieces.Pieces | None = None) -> SceneMap:
    """Georegistration and shards; writes the map directory `out`. point_descriptors: (P,) point3D
    ids and (P, D) descriptors (descriptors.py). With `pieces` (the points, descriptors and tables
    written in pieces), `reconstruction` holds only the cameras and posed images, and
    point_descriptors is None."""
    point_ids, point_descriptors = point_descriptors or (None, None)
    check_not_degenerate(reconstruction, conf["min_registered_images"],
                         pieces.num_points if pieces else reconstruction.num_points3D())

    geo = GeoInfo()
    if positions:
        registration = georegister.main(reconstruction, positions, conf["georegister"])
        to_priors = Similarity.from_sim3d(registration.target_from_model)
        geo = GeoInfo(origin, Similarity.identity() if origin else None, registration.statistics())
        if source == "sfm":
            # An SfM frame has an arbitrary scale and orientation: make the map frame the metric
            # frame of the priors (ENU for GPS), so that priors are directly map positions.
            reconstruction.transform(registration.target_from_model)
            geo.source_to_map = to_priors
        elif origin:
            geo.map_to_enu = to_priors
    elif source == "sfm":
        logger.warning("no priors: the SfM map has an arbitrary frame and scale, and no geo-registration")

    exif_cameras = {exif_camera_key(*image_sizes[image.name], focal_px[image.name]): image.camera_id
                    for image in reconstruction.images.values() if image.name in focal_px}
    scene_map = SceneMap(reconstruction, geo, manifest={}, point3D_ids=point_ids, descriptors=point_descriptors,
                         keypoints=conf["keypoints"], exif_cameras=exif_cameras)
    scene_map.shards = ShardIndex.build(scene_map.image_centers(), conf["shards"])
    local_out, publish = files.output_folder(out)
    scene_map.save(local_out, source, images, skipped, manifest_extra, pieces=pieces)
    publish()
    logger.info("map %s: %d images, %d points, %d cells (%s)", out, scene_map.manifest["num_images"],
                scene_map.manifest["num_points3D"], len(scene_map.shards.cell_ids), source)
    return scene_map


def check_work_settings(root: Location, settings: dict) -> None:
    """MAP/mapping/settings.json: the work files of a rerun must come from the same settings."""
    path = files.location(root) / "settings.json"
    if files.is_file(path):
        found = json.loads(files.read_text(path))
        if found != settings:
            raise ValueError(f"{root}: work files of a run with other settings ({found} vs {settings}); "
                             "remove that folder to start over")
    else:
        files.write_text(path, json.dumps(settings, indent=2))


def distributed_features(images: Location, names: list[str], root: Location, settings: dict, conf: dict,
                         workers: int) -> tuple[FeatureFiles, list[str], list[dict]]:
    """Feature files of `names` under `root` (Ray Data; a rerun with the same `settings` resumes):
    the files, the names that have one, and the images skipped as unreadable."""
    check_work_settings(root, {**settings, "keypoints": conf["keypoints"], "sift": {**sift.default_conf, **conf["sift"]},
                               "matching": {**matching.default_conf,
                                            **keypoints.matching_conf(conf["keypoints"], conf)}})
    features = FeatureFiles(root)
    skipped = distributed.extract_features(images, names, root, conf["keypoints"], conf["sift"], workers)
    present = [name for name in names if features.has(name)]
    if len(present) < conf["min_registered_images"]:
        raise ValueError(f"{images}: only {len(present)} readable images, a map needs {conf['min_registered_images']}")
    return features, present, skipped


def failed_cells(results: list[cells.CellResult]) -> list[dict]:
    failed = [{"cell": result.cell, "reason": result.failure} for result in results if result.failure]
    for failure in failed:
        logger.warning("%s", failure["reason"])
    return failed


def build_map_in_cells(images: Location, out: Location, reference_model: Location,
                       priors: dict[str, Prior] | None = None, conf: dict | None = None, workers: int = 2,
                       address: str | None = None) -> MapIndex:
    """`build_map` with known poses, distributed: features per image, matches per chunk of pairs and
    one triangulation per shard cell (core plus halo) as Ray tasks, all written under MAP/mapping
    (a rerun resumes), then the cells' points merged by their shared observations and the model
    and tables written in pieces, all cell by cell (no process holds the whole model). Any of the
    locations may be an s3:// prefix: the tasks read and write the bucket, so that the nodes of a
    cluster share no disk. Returns the compact map (SceneMap.load reads the whole of it)."""
    conf = merge_conf(default_conf, conf)
    root = files.location(out) / WORK_DIR
    reference = cells.read_reference(reference_model)
    names = posed_image_names(reference)
    if not names:
        raise ValueError(f"{reference_model}: no posed images to map")
    with init_ray(address, num_cpus=None if address else workers):
        features, present, skipped = distributed_features(
            images, names, root, {"reference_model": files.absolute(reference_model)}, conf, workers)
        reference_images = triangulation.images_by_name(reference)
        posed = [reference_images[name] for name in present]
        image_pairs = pairs.from_poses(present, np.array([image.projection_center() for image in posed]),
                                       np.array([image.viewing_direction() for image in posed]), conf["pairs"])
        distributed.match_pairs(root, group_pairs(image_pairs), keypoints.matching_conf(conf["keypoints"], conf))

        cell_index = ShardIndex.build({image.name: image.projection_center() for image in posed}, conf["shards"])
        for cell in cell_index.cell_ids:
            if not cells.is_done(root, cell):
                cells.write_skeleton(root, cell, reference, cell_index.images_of(cell), reference_images)
        results = distributed.run_cells(cells, root, cell_index.cell_ids, images,
                                        {"triangulation": conf["triangulation"]})
        image_ids = {image.name: image.image_id for image in posed}
        owner_points = distributed.merge_cells(
            root, {result.cell: [image_ids[name] for name in cell_index.images_of(result.cell)]
                   for result in results if not result.failure},
            {image_ids[name]: cell for cell in cell_index.cell_ids
             for name in cell_index.images_of(cell, with_halo=False)}, root, conf["merge"])
        # The map's cameras and posed images; their 2D and 3D points go into the model in pieces.
        with_features = set(present)
        skeleton = merge.skeleton_with_keypoints(reference, lambda image: NO_KEYPOINTS if image.name in with_features
                                                 else None)
        pieces = distributed.write_pieces(root, owner_points, skeleton, root,
                                          features[present[0]].descriptors.shape[1])
    failed = failed_cells(results)
    positions, origin = georegister.priors_to_positions(
        {name: prior for name, prior in (priors or {}).items() if name in with_features})
    sizes = {name: features.image_size(name) for name in present}
    finish_map(skeleton, None, sizes, positions, origin, "reference-model", images, out, skipped,
               exif_focal_lengths(images, sizes), conf, {"failed_cells": failed}, pieces)
    pieces.delete()
    return load_map_index(out)


def build_sfm_in_cells(images: Location, out: Location, priors: dict[str, Prior], conf: dict | None = None,
                       workers: int = 2, address: str | None = None) -> SceneMap:
    """`build_map` from images and priors, distributed: features and matches as in
    `build_map_in_cells`, one SfM submodel per shard cell of the priors (core plus halo) as Ray
    tasks, each registered to its priors; then the submodels aligned through their shared images,
    merged and georegistered as one (submodels.py). Images without a prior cannot
    be placed in a cell: they are skipped with that reason. Locations as in `build_map_in_cells`."""
    conf = merge_conf(default_conf, conf)
    root = files.location(out) / WORK_DIR
    names = list_images(images)
    if not names:
        raise ValueError(f"{images}: no images to map")
    positions, origin = georegister.priors_to_positions({name: priors[name] for name in names if name in priors})
    without_prior = [{"name": name, "reason": "no position prior (EXIF GPS or --priors): not in any cell"}
                     for name in names if name not in positions]
    for entry in without_prior:
        logger.warning("skipping %s: %s", entry["name"], entry["reason"])
    # What the submodels on disk depend on; the merge settings are not among them: it reruns.
    work_settings = {"shards": conf["shards"], **{key: conf["submodels"][key] for key in submodels.WORK_SETTINGS}}
    with init_ray(address, num_cpus=None if address else workers):
        features, present, skipped = distributed_features(images, sorted(positions), root, work_settings, conf, workers)
        distributed.match_pairs(root, group_pairs(pairs.main(present, positions, conf["pairs"])),
                                keypoints.matching_conf(conf["keypoints"], conf))
        sizes = {name: features.image_size(name) for name in present}
        focal_px = exif_focal_lengths(images, sizes)
        cell_index = ShardIndex.build({name: positions[name] for name in present},
                                      {**conf["shards"], "halo_m": conf["submodels"]["halo_m"]})
        for cell in cell_index.cell_ids:
            if not submodels.is_done(root, cell):
                submodels.write_input(root, cell, cell_index.images_of(cell), positions, focal_px)
        results = distributed.run_cells(submodels, root, cell_index.cell_ids, images, conf["submodels"])
        failed = failed_cells(results)
        models = {result.cell: submodels.load(root, result.cell) for result in results if not result.failure}
        if not models:
            raise ValueError(f"no cell could be reconstructed: {failed[0]['reason'] if failed else 'no cells'}")
        owner = {name: cell for cell in cell_index.cell_ids for name in cell_index.images_of(cell, with_halo=False)}
        reconstruction, rejected = submodels.merge_submodels(models, owner, features, focal_px, conf["submodels"])
        failed += [{"cell": cell, "reason": reason} for cell, reason in rejected.items()]
        unadjusted = adjust_cells(reconstruction, owner, features, root, images, conf["submodels"])
    submodels.refit(reconstruction)
    return finish_map(reconstruction, descriptors.main(reconstruction, features), sizes, positions, origin, "sfm",
                      images, out, without_prior + skipped, focal_px, conf,
                      {"failed_cells": failed, "submodels": len(models) - len(rejected),
                       "unadjusted_cells": unadjusted})


def adjust_cells(reconstruction: pycolmap.Reconstruction, owner: dict[str, str], features: FeatureFiles,
                 root: Location, images: Location, conf: dict) -> list[dict]:
    """The merged poses and points refined cell by cell in Ray tasks (cell_adjustment.py), in
    place; returns the cells left as merged, with the reason."""
    if not conf["adjust_cells"]:
        return []
    image_cell = {image_id: owner[image.name] for image_id, image in reconstruction.images.items()
                  if image.name in owner}
    layout = cell_adjustment.Layout.of(reconstruction, image_cell)
    anchor = cell_adjustment.anchor_cell(image_cell)
    settled, results = {anchor}, []
    for cells_now in cell_adjustment.rounds(set(image_cell.values()), anchor):
        cell_adjustment.write_parts(root, reconstruction, layout, features.keypoints, cells_now, settled)
        results += distributed.run_cells(cell_adjustment, root, cells_now, images, conf["adjustment"])
        cell_adjustment.apply(reconstruction, root, cells_now)
        settled.update(cells_now)
    return failed_cells(results)


def check_not_degenerate(reconstruction: pycolmap.Reconstruction, min_images: int, num_points: int) -> None:
    if reconstruction.num_reg_images() < min_images:
        raise ValueError(f"degenerate map: {reconstruction.num_reg_images()} registered images, at least "
                         f"{min_images} are needed")
    if num_points == 0:
        raise ValueError("degenerate map: no 3D points")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=files.location, required=True,
                        help="folder of the mapping images (a local path or s3://bucket/prefix)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=files.location, help="map directory (or s3:// prefix) to write")
    target.add_argument("--update", type=Path, metavar="MAP",
                        help="add the photos of --images to this map in place (see jobs/map_update.py)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--reference-model", type=files.location,
                        help="COLMAP model with known poses: triangulate only")
    source.add_argument("--import-model", type=files.location, help="COLMAP model with points: import as is")
    prior = parser.add_mutually_exclusive_group()
    prior.add_argument("--priors", type=files.location, help="CSV name,lat,lon[,alt][,sigma_m] or name,x,y,z[,sigma_m]")
    prior.add_argument("--gps-from-exif", action="store_true", help="priors from the images' EXIF GPS")
    parser.add_argument("--cell-size", type=float, default=shards_conf["cell_size_m"], help="shard cell size (m)")
    parser.add_argument("--halo", type=float, default=shards_conf["halo_m"], help="shard halo (m)")
    parser.add_argument("--keypoints", choices=keypoints.KEYPOINT_TYPES, default=default_conf["keypoints"],
                        help="keypoint type of the map's points (learned ones: shipped weights)")
    parser.add_argument("--max-image-size", type=int, default=sift.default_conf["max_image_size"],
                        help="longest image side for the keypoints (px; a learned network may cap it lower)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers of a distributed build")
    parser.add_argument("--address", default=None, help="Ray cluster: 'auto' or ray://host:port (default: local)")
    parser.add_argument("--single-process", action="store_true",
                        help="triangulate (--reference-model) or reconstruct (images with priors) all images in "
                        "this process instead of cell by cell on Ray (for comparison)")


def run(args: argparse.Namespace) -> int:
    pycolmap.logging.minloglevel = 2
    if args.cell_size <= 0 or args.halo < 0 or args.max_image_size <= 0 or args.workers < 1:
        raise SystemExit("pixloc map: --cell-size, --max-image-size and --workers must be positive, "
                         "--halo non-negative")
    try:
        priors = None
        if args.priors:
            priors = read_priors(args.priors)
        elif args.gps_from_exif:
            priors = exif_priors(args.images, list_images(args.images))
        conf = merge_conf(default_conf, {"keypoints": args.keypoints, "sift": {"max_image_size": args.max_image_size},
                                         "shards": {"cell_size_m": args.cell_size, "halo_m": args.halo}}, args.conf)
        if args.update:
            from jobs import map_update  # it builds on this module

            if args.import_model:
                raise ValueError("--update takes --reference-model or GPS priors, not --import-model")
            map_update.main(args.update, args.images, args.reference_model, priors, conf, args.workers, args.address)
        elif not args.single_process and (args.reference_model or (
                priors and not args.import_model
                and len(list_images(args.images)) > conf["submodels"]["single_sfm_max_images"])):
            if args.reference_model:
                build_map_in_cells(args.images, args.out, args.reference_model, priors, conf, args.workers,
                                   args.address)
            else:
                build_sfm_in_cells(args.images, args.out, priors, conf, args.workers, args.address)
        else:
            build_map(args.images, args.out, args.reference_model, args.import_model, priors, conf)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"pixloc map: {error}") from None
    return 0
