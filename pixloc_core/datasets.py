"""Adapters from the real-image sets in ../shared/data to the project's inputs.

Each `prepare_*` writes into its own work directory (the shared data is read-only) a mapping
folder and a query folder of images, and whichever of these the set supports: a COLMAP reference
model with known poses, ground-truth query poses, a priors CSV and a query list with intrinsics.

* fountain-P11 (Strecha 2008): true cameras. A `.camera` file holds K, the camera-to-world
  rotation and the camera centre, so world-to-camera is (R^T, -R^T C). Images are downscaled for
  speed; COLMAP puts the pixel corner at 0, so the intrinsics scale exactly as c' = s c.
* Lund (OpenSfM): 29 street photos with EXIF GPS and focal length, no ground truth; copies keep
  their EXIF byte for byte. Pseudo ground truth comes once the map exists: the queries registered
  into it with its poses and cameras fixed (`register_pseudo_ground_truth`).
* Sacre-Coeur (hloc demo): 10 internet photos without EXIF and one night query.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
import torch
from PIL import Image

from .conf import merge_conf
from .exif import read_exif_focal_px, read_exif_prior
from .geometry import Pose
from .io import Prior, QueryIntrinsics, write_poses, write_priors, write_query_list
from .images import list_images
from .map_io import SceneMap, exif_camera_key
from .mapping import keypoints, matching, pairs, sfm, sift

logger = logging.getLogger(__name__)

FOUNTAIN = Path("strecha/fountain-P11")
LUND = Path("opensfm/lund")
SACRE_COEUR = Path("hloc_sacre_coeur")

default_conf = {
    "fountain-P11": {
        "max_image_size": 1024,  # 3x below the originals: SIFT still at mm level, CPU-friendly
        "query_max_image_size": None,  # None: as the mapping images
        "query_offset": 1,  # queries are names[offset::every]: 0001, 0004, 0007, 0010
        "query_every": 3,
        "prior_noise_m": 2.0,
        "seed": 0,
    },
    "lund": {
        "query_max_image_size": None,  # None: the original 1024 x 768
        "query_offset": 3,  # 04, 08, ..., 28
        "query_every": 4,
    },
    "sacre_coeur": {
        "query_max_image_size": 1024,  # the night query is 2816 x 2112; the mapping photos ~1000 px
    },
    "pseudo_ground_truth": {
        "sift": sift.default_conf,  # those of `pixloc map`: the map's 2D points must be reproduced
        "pairs": pairs.default_conf,
        "matching": matching.default_conf,
        "sfm": sfm.default_conf,
    },
}


@dataclass(frozen=True)
class PreparedSet:
    """Inputs of one set, as files the CLI reads; None where the set has no such data."""

    name: str
    mapping_dir: Path
    query_dir: Path
    mapping_names: list[str]
    query_names: list[str]
    reference_model: Path | None = None  # COLMAP model with known poses (`pixloc map --reference-model`)
    gt_poses: Path | None = None  # `name qw qx qy qz tx ty tz` of the queries
    priors: Path | None = None  # priors CSV of the queries
    query_list: Path | None = None  # `name MODEL WIDTH HEIGHT PARAMS...` of the queries


@dataclass(frozen=True)
class StrechaCamera:
    K: np.ndarray  # (3, 3) pixels
    R_c2w: np.ndarray  # (3, 3) camera-to-world: columns are the camera axes in world coordinates
    center: np.ndarray  # (3,) camera centre in world coordinates, metres
    width: int
    height: int

    def world_to_camera(self) -> Pose:
        R_w2c = torch.from_numpy(self.R_c2w.T.copy())
        return Pose.from_Rt(R_w2c, -R_w2c @ torch.from_numpy(self.center))


def read_strecha_camera(path: Path) -> StrechaCamera:
    """A Strecha `.camera` file: K (9), distortion (3), R camera-to-world (9), centre (3), w h (2)."""
    try:
        values = np.array(Path(path).read_text().split(), dtype=np.float64)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read Strecha camera ({error})") from None
    if values.size != 26:
        raise ValueError(f"{path}: expected 26 numbers (K, distortion, R, C, w h), got {values.size}")
    if np.any(values[9:12] != 0):
        raise ValueError(f"{path}: non-zero distortion {values[9:12]}, the images are expected undistorted")
    return StrechaCamera(values[:9].reshape(3, 3), values[12:21].reshape(3, 3), values[21:24],
                         int(values[24]), int(values[25]))


def copy_image(src: Path, dst: Path, max_size: int | None) -> tuple[float, float]:
    """Copies src to dst, downscaled (area-averaged) so that its longest side is at most max_size.

    A copy that needs no resizing is byte-identical; a resized one keeps the EXIF block (GPS,
    focal length in 35 mm, which does not depend on the resolution). Returns the (x, y) scale."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as image:
        width, height = image.size
        if max_size is None or max(width, height) <= max_size:
            shutil.copyfile(src, dst)
            return 1.0, 1.0
        scale = max_size / max(width, height)
        size = (round(width * scale), round(height * scale))
        exif = image.info.get("exif", b"")
        image.resize(size, Image.Resampling.LANCZOS).save(dst, quality=95, exif=exif)
    return size[0] / width, size[1] / height


def _held_out(names: list[str], offset: int, every: int) -> tuple[list[str], list[str]]:
    queries = names[offset::every]
    return [n for n in names if n not in queries], queries


def prepare_fountain(data_root: Path, out_dir: Path, conf: dict | None = None) -> PreparedSet:
    """fountain-P11: reference model of the mapping images with their true poses (PINHOLE from K),
    GT poses, priors (GT centre + a random offset of `prior_noise_m` metres, map frame) and a query
    list of the held-out images."""
    conf = merge_conf(default_conf["fountain-P11"], conf)
    root, out_dir = Path(data_root) / FOUNTAIN, Path(out_dir)
    names = list_images(root / "images")
    if not names:
        raise ValueError(f"{root / 'images'}: no images")
    cameras = {n: read_strecha_camera(root / "gt_dense_cameras" / f"{n}.camera") for n in names}
    mapping_names, query_names = _held_out(names, conf["query_offset"], conf["query_every"])
    query_size = conf["query_max_image_size"] or conf["max_image_size"]

    model = pycolmap.Reconstruction()
    query_intrinsics, gt_poses, priors = {}, {}, {}
    rng = np.random.default_rng(conf["seed"])
    for image_id, name in enumerate(names, start=1):
        is_query = name in query_names
        folder = out_dir / ("queries" if is_query else "mapping")
        sx, sy = copy_image(root / "images" / name, folder / name, query_size if is_query else conf["max_image_size"])
        camera = cameras[name]
        if abs(camera.K[0, 1]) > 1e-6 * camera.K[0, 0]:
            raise ValueError(f"{root}/gt_dense_cameras/{name}.camera: skewed K is not a COLMAP model")
        params = (camera.K[0, 0] * sx, camera.K[1, 1] * sy, camera.K[0, 2] * sx, camera.K[1, 2] * sy)
        width, height = round(camera.width * sx), round(camera.height * sy)
        pose = camera.world_to_camera()
        if is_query:
            query_intrinsics[name] = QueryIntrinsics("PINHOLE", width, height, params)
            gt_poses[name] = (pose.qvec().numpy(), pose.t.numpy())
            direction = rng.normal(size=3)
            offset = conf["prior_noise_m"] * direction / np.linalg.norm(direction)
            priors[name] = Prior(tuple(camera.center + offset), geodetic=False, sigma_m=conf["prior_noise_m"])
        else:
            model.add_camera_with_trivial_rig(
                pycolmap.Camera(camera_id=image_id, model="PINHOLE", width=width, height=height, params=params))
            model.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=image_id, image_id=image_id),
                                               pose.to_colmap())

    model_dir = out_dir / "reference_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.write_text(model_dir)
    prepared = PreparedSet("fountain-P11", out_dir / "mapping", out_dir / "queries", mapping_names, query_names,
                           reference_model=model_dir, gt_poses=out_dir / "gt_queries.txt",
                           priors=out_dir / "priors.csv", query_list=out_dir / "queries_with_intrinsics.txt")
    write_poses(prepared.gt_poses, gt_poses)
    write_priors(prepared.priors, priors)
    write_query_list(prepared.query_list, query_intrinsics)
    logger.info("fountain-P11: %d mapping, %d query images in %s", len(mapping_names), len(query_names), out_dir)
    return prepared


def prepare_lund(data_root: Path, out_dir: Path, conf: dict | None = None) -> PreparedSet:
    """Lund: mapping and query copies (EXIF kept) and the queries' own EXIF GPS as WGS84 priors.
    No ground truth here: see `register_pseudo_ground_truth`."""
    conf = merge_conf(default_conf["lund"], conf)
    root, out_dir = Path(data_root) / LUND / "images", Path(out_dir)
    names = list_images(root)
    if not names:
        raise ValueError(f"{root}: no images")
    mapping_names, query_names = _held_out(names, conf["query_offset"], conf["query_every"])
    for name in mapping_names:
        copy_image(root / name, out_dir / "mapping" / name, None)
    priors = {}
    for name in query_names:
        copy_image(root / name, out_dir / "queries" / name, conf["query_max_image_size"])
        priors[name] = read_exif_prior(root / name)
        if priors[name] is None:
            raise ValueError(f"{root / name}: no EXIF GPS, but every Lund query needs one as its prior")
    prepared = PreparedSet("lund", out_dir / "mapping", out_dir / "queries", mapping_names, query_names,
                           priors=out_dir / "priors.csv")
    write_priors(prepared.priors, priors)
    logger.info("lund: %d mapping, %d query images in %s", len(mapping_names), len(query_names), out_dir)
    return prepared


def prepare_sacre_coeur(data_root: Path, out_dir: Path, conf: dict | None = None) -> PreparedSet:
    """Sacre-Coeur: the 10 mapping photos as they are, the night query downscaled (EXIF kept: its
    focal length in 35 mm gives the intrinsics). No GPS and no ground truth."""
    conf = merge_conf(default_conf["sacre_coeur"], conf)
    root, out_dir = Path(data_root) / SACRE_COEUR, Path(out_dir)
    mapping_names, query_names = list_images(root / "mapping"), list_images(root / "query")
    if not mapping_names or not query_names:
        raise ValueError(f"{root}: expected images in mapping/ and query/")
    for name in mapping_names:
        copy_image(root / "mapping" / name, out_dir / "mapping" / name, None)
    for name in query_names:
        copy_image(root / "query" / name, out_dir / "queries" / name, conf["query_max_image_size"])
    return PreparedSet("sacre_coeur", out_dir / "mapping", out_dir / "queries", mapping_names, query_names)


PREPARERS = {
    "fountain-P11": prepare_fountain,
    "lund": prepare_lund,
    "sacre_coeur": prepare_sacre_coeur,
}


def register_pseudo_ground_truth(map_dir: Path, image_dir: Path, query_names: list[str], work_dir: Path,
                                 conf: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pseudo ground truth for queries without true poses, in the map's own frame: the queries
    are registered into the map by COLMAP's incremental mapper with the map's poses and cameras
    fixed (`sfm.register_into`), so that no similarity between two SfM models (each bent its own
    way by its self-calibration) enters the reference. It uses more evidence than `sparse`
    localization: every SIFT keypoint of each query matched to its nearest mapping images (not one
    mean descriptor per map point), new tracks triangulated through the queries, and a bundle
    adjustment of all query poses and points over all their observations.

    image_dir holds the mapping images and the queries (original resolution, EXIF focal length
    and GPS); a query gets the map camera of its EXIF (size and focal length): the same device.
    Returns the poses of the queries that register, world-to-camera (qvec, tvec)."""
    conf = merge_conf(default_conf["pseudo_ground_truth"], conf)
    scene = SceneMap.load(map_dir, with_descriptors=False)
    image_dir = Path(image_dir)
    centers = scene.image_centers()
    camera_ids, positions = {}, dict(centers)
    for name in query_names:
        with Image.open(image_dir / name) as image:
            width, height = image.size
        focal = read_exif_focal_px(image_dir / name, width, height)
        camera_id = scene.exif_cameras.get(exif_camera_key(width, height, focal)) if focal else None
        prior = read_exif_prior(image_dir / name)
        if camera_id is None or prior is None:
            raise ValueError(f"{image_dir / name}: needs EXIF GPS and the EXIF focal length of a map camera")
        camera_ids[name] = camera_id
        positions[name] = scene.prior_to_map(prior)
    names = sorted(positions)
    features, skipped = keypoints.main(image_dir, names, "sift", conf["sift"])
    if skipped:
        raise ValueError(f"{image_dir}: unreadable images {[entry['name'] for entry in skipped]}")
    image_pairs = [pair for pair in pairs.from_positions(names, np.stack([positions[n] for n in names]), conf["pairs"])
                   if pair[0] in camera_ids or pair[1] in camera_ids]
    matches = matching.main(features, image_pairs, conf["matching"])
    extended = sfm.register_into(scene.reconstruction, features, matches, camera_ids, image_dir, Path(work_dir),
                                 conf["sfm"])
    poses = {}
    for name in query_names:
        image = extended.find_image_with_name(name)
        if image is not None and image.has_pose:
            pose = Pose.from_colmap(image.cam_from_world())
            poses[name] = (pose.qvec().numpy(), pose.t.numpy())
    logger.info("pseudo GT: %d/%d queries registered into the map (poses and cameras fixed)",
                len(poses), len(query_names))
    return poses
