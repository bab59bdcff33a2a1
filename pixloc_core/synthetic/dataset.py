"""Render a geotagged synthetic localization dataset: mapping images with a posed COLMAP model,
queries with ground truth, GPS priors (CSV and EXIF), intrinsics.

    OUT/mapping/ref_0000.jpg ...      OUT/queries/q_0000.jpg ...
    OUT/reference_model/              COLMAP binary model, true poses, no points
    OUT/gt_mapping.txt, gt_queries.txt              poses (world-to-camera, map = ENU frame)
    OUT/queries_with_intrinsics.txt   OUT/priors.csv, mapping_priors.csv (WGS84)
    OUT/scene.json
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import piexif
import pycolmap
from PIL import Image
from tqdm import tqdm

from ..exif import camera_exif, focal_px_from_35mm, gps_ifd
from ..geo import enu_to_wgs84
from ..io import Prior, QueryIntrinsics, write_poses, write_priors, write_query_list
from .cameras import WalkConfig, query_arc_lengths, reference_arc_lengths, sample_walk_poses, street_length
from .render import PinholeIntrinsics, render
from .scene import Scene, SceneConfig, build_scene

logger = logging.getLogger(__name__)

EXIF_MAKE_MODEL = "pixloc-synth"

default_conf = {
    "seed": 0,
    "origin": SceneConfig.origin,
    "blocks": (2, 1),  # city blocks east-west, north-south; streets around and between them
    # None: one reference per ref_spacing_m of street (constant density whatever the city's size;
    # 150 on the default 2x1 blocks, 378 m of street).
    "num_refs": None,
    "ref_spacing_m": 2.52,
    "num_queries": 40,
    "gps_noise_m": 10.0,  # std dev of the query priors, per horizontal axis
    "mapping_gps_noise_m": 1.0,  # std dev of the mapping priors, per horizontal axis
    "width": 640,
    "height": 480,
    "focal_35mm": 30,  # integer, as stored in EXIF: 554.7 px at 640x480
    "jpeg_quality": 95,
    "workers": 2,
}


def quaternion_wxyz(rotation: np.ndarray) -> np.ndarray:
    x, y, z, w = pycolmap.Rotation3d(rotation).quat
    return np.array([w, x, y, z])


def noisy_priors(names: list[str], centers: np.ndarray, sigma: float, scene: Scene,
                 rng: np.random.Generator) -> dict[str, Prior]:
    """WGS84 priors: true centres (N, 3) plus Gaussian noise of std dev sigma on east and north."""
    noisy = centers.copy()
    noisy[:, :2] += rng.normal(0.0, sigma, (len(centers), 2))
    geodetic = enu_to_wgs84(noisy, scene.origin)
    return {name: Prior(tuple(float(v) for v in lla), geodetic=True, sigma_m=sigma)
            for name, lla in zip(names, geodetic)}


@dataclass
class ImageSet:
    folder: str  # "mapping" or "queries"
    names: list[str]
    rotations: np.ndarray  # (N, 3, 3) world-to-camera
    translations: np.ndarray  # (N, 3)
    priors: dict[str, Prior]

    def poses(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {name: (quaternion_wxyz(R), t) for name, R, t in zip(self.names, self.rotations, self.translations)}


def sample_image_set(scene: Scene, folder: str, prefix: str, arc_lengths: np.ndarray, gps_sigma: float,
                     rng: np.random.Generator, walk: WalkConfig) -> ImageSet:
    names = [f"{prefix}_{i:04d}.jpg" for i in range(len(arc_lengths))]
    rotations, translations = sample_walk_poses(scene, arc_lengths, rng, walk)
    centers = -np.einsum("nji,nj->ni", rotations, translations)
    return ImageSet(folder, names, rotations, translations, noisy_priors(names, centers, gps_sigma, scene, rng))


_worker_scene: Scene | None = None


def _init_worker(scene: Scene) -> None:
    global _worker_scene
    _worker_scene = scene


def _render_to_jpeg(task: tuple) -> None:
    path, camera, rotation, translation, exif, quality = task
    Image.fromarray(render(_worker_scene, camera, rotation, translation)).save(
        path, format="JPEG", quality=quality, exif=exif)


def render_image_sets(out_dir: Path, scene: Scene, camera: PinholeIntrinsics, image_sets: list[ImageSet],
                      jpeg_quality: int, workers: int) -> None:
    """JPEGs with EXIF (GPS prior, focal length) in out_dir/<folder>/<name>; output independent of workers."""
    exif_camera = camera_exif(camera.fx, camera.width, camera.height, EXIF_MAKE_MODEL, EXIF_MAKE_MODEL)
    tasks = []
    for image_set in image_sets:
        (out_dir / image_set.folder).mkdir(parents=True, exist_ok=True)
        for name, rotation, translation in zip(image_set.names, image_set.rotations, image_set.translations):
            prior = image_set.priors[name]
            exif = piexif.dump({**exif_camera, "GPS": gps_ifd(*prior.position, accuracy_m=prior.sigma_m)})
            tasks.append((out_dir / image_set.folder / name, camera, rotation, translation, exif, jpeg_quality))

    logger.info("Rendering %d images of %dx%d with %d workers.", len(tasks), camera.width, camera.height, workers)
    if workers == 1:
        _init_worker(scene)
        for task in tqdm(tasks, desc="synth"):
            _render_to_jpeg(task)
        return
    with get_context("fork").Pool(workers, initializer=_init_worker, initargs=(scene,)) as pool:
        for _ in tqdm(pool.imap_unordered(_render_to_jpeg, tasks), total=len(tasks), desc="synth"):
            pass
        # Leaving the block would SIGTERM the workers, which pycolmap's signal handler reports
        # with a stack trace: close them cleanly instead.
        pool.close()
        pool.join()


def write_reference_model(path: Path, camera: PinholeIntrinsics, image_set: ImageSet) -> pycolmap.Reconstruction:
    """A COLMAP model with one shared PINHOLE camera, posed images and no 3D points."""
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
        camera_id=1, model="PINHOLE", width=camera.width, height=camera.height, params=list(camera.params())))
    for image_id, (name, rotation, translation) in enumerate(
            zip(image_set.names, image_set.rotations, image_set.translations), 1):
        cam_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(rotation), translation)
        reconstruction.add_image_with_trivial_frame(
            pycolmap.Image(name=name, camera_id=1, image_id=image_id), cam_from_world)
    path.mkdir(parents=True, exist_ok=True)
    reconstruction.write(path)
    return reconstruction


def main(out_dir: Path, conf: dict | None = None) -> Path:
    conf = {**default_conf, **(conf or {})}
    out_dir = Path(out_dir)
    blocks_x, blocks_y = conf["blocks"]
    scene = build_scene(SceneConfig(seed=conf["seed"], origin=tuple(conf["origin"]),
                                    blocks_x=blocks_x, blocks_y=blocks_y))
    num_refs = conf["num_refs"] or max(1, round(street_length(scene) / conf["ref_spacing_m"]))
    focal = focal_px_from_35mm(conf["focal_35mm"], conf["width"], conf["height"])
    camera = PinholeIntrinsics.centered(conf["width"], conf["height"], focal)

    rng = np.random.default_rng([conf["seed"], 1])
    walk = WalkConfig()
    refs = sample_image_set(scene, "mapping", "ref", reference_arc_lengths(scene, num_refs, rng),
                            conf["mapping_gps_noise_m"], rng, walk)
    queries = sample_image_set(scene, "queries", "q", query_arc_lengths(scene, conf["num_queries"], rng),
                               conf["gps_noise_m"], rng, walk)
    render_image_sets(out_dir, scene, camera, [refs, queries], conf["jpeg_quality"], conf["workers"])

    write_reference_model(out_dir / "reference_model", camera, refs)
    write_poses(out_dir / "gt_mapping.txt", refs.poses())
    write_poses(out_dir / "gt_queries.txt", queries.poses())
    intrinsics = QueryIntrinsics("PINHOLE", camera.width, camera.height, camera.params())
    write_query_list(out_dir / "queries_with_intrinsics.txt", {name: intrinsics for name in queries.names})
    write_priors(out_dir / "priors.csv", queries.priors)
    write_priors(out_dir / "mapping_priors.csv", refs.priors)

    lo, hi = scene.extent
    summary = {
        "origin": {"lat": scene.origin.lat, "lon": scene.origin.lon, "alt": scene.origin.alt},
        "map_frame": "ENU (x east, y north, z up, metres) at origin",
        "seed": conf["seed"],
        "num_refs": len(refs.names),
        "num_queries": len(queries.names),
        "gps_noise_m": conf["gps_noise_m"],
        "gps_noise": "std dev per horizontal axis (east, north); altitude exact",
        "mapping_gps_noise_m": conf["mapping_gps_noise_m"],
        "extent_m": {"min": lo.tolist(), "max": hi.tolist()},
        "streets": scene.streets.tolist(),
        "camera": {"model": "PINHOLE", "width": camera.width, "height": camera.height,
                   "params": list(camera.params()), "focal_35mm": conf["focal_35mm"]},
        "scene_config": asdict(scene.config),
        "walk_config": asdict(walk),
        # Everything that determines the output bytes (the worker count does not).
        "conf": {**{key: value for key, value in conf.items() if key not in ("origin", "workers")},
                 "blocks": [blocks_x, blocks_y], "num_refs": num_refs},
    }
    (out_dir / "scene.json").write_text(json.dumps(summary, indent=2))
    logger.info("Wrote the synthetic dataset to %s (%d refs, %d queries, focal %.2f px, horizontal fov %.1f deg).",
                out_dir, len(refs.names), len(queries.names), focal,
                math.degrees(2 * math.atan(camera.width / 2 / focal)))
    return out_dir
