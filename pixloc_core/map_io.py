"""The map directory, one format for every way a map is made (see DESIGN.md):

    MAP/model/            COLMAP binary model with 3D points
    MAP/descriptors.npz   point3D_ids (P,) int64, descriptors (P, D) float16: one unit-norm mean
                          descriptor per 3D point, for sparse 2D-3D matching without the images; of
                          the keypoint type that the manifest's "keypoints" names (absent: "sift",
                          D = 128; see mapping/keypoints.py)
    MAP/geo.json          {"origin_wgs84": [lat, lon, alt] | null,
                           "map_to_enu": {"scale", "rotation" 3x3, "translation" 3} | null,
                           "registration": {"num_images", "num_inliers", "median_residual_m",
                                            "max_residual_m"} | null,
                           "source_to_map": similarity applied to the source model to make the map
                                            frame, or null (provenance only)}
    MAP/shards.json       the shard index (pixloc_core/shards.py)
    MAP/references.parquet  per registered image: id, name, pose, camera, median point depth, digest
                          (`image_digest`): what localization plans from (`ReferenceImages`)
    MAP/observations.parquet  per observation of a 3D point, by image: image_id, point3D_id, xy, xyz and
                          the point's descriptor: what the feature workers sample and store, read per
                          batch of images (`read_observations`)
    MAP/manifest.json     {"fingerprint", "source", "keypoints", "images_dir", "num_images", "num_points3D",
                           "skipped": [{"name", "reason"}], "exif_cameras": {"WxH@F": camera_id},
                           "cell_fingerprints": {cell: sha256 of what its store partitions hold},
                           "failed_cells": [{"cell", "reason"}], "updates": [{..., "previous_fingerprint"}], "created_utc"}

SfM maps are transformed into the ENU frame of their GPS priors (metric, z up), so for them
map_to_enu is the identity and GPS priors in ENU are map positions; imported and reference-model
maps keep the user's frame (their poses are the user's ground truth) and store map_to_enu.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import zipfile
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycolmap

from . import files, model_files
from .columns import FEATURE_DTYPE, XYZ_DTYPE, column_numpy, column_validity, column_vectors, vector_column, vector_field
from .files import Location
from .geo import EnuOrigin, wgs84_to_enu
from .io import Prior
from .shards import ShardIndex

logger = logging.getLogger(__name__)
if TYPE_CHECKING:
    from .mapping.model_pieces import Pieces

T = TypeVar("T")

MODEL_DIR, DESCRIPTORS_FILE, GEO_FILE, SHARDS_FILE, MANIFEST_FILE = (
    "model", "descriptors.npz", "geo.json", "shards.json", "manifest.json")


@dataclass(frozen=True)
class Similarity:
    """x_target = scale * rotation @ x_source + translation."""
    scale: float
    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)

    @classmethod
    def identity(cls) -> Similarity:
        return cls(1.0, np.eye(3), np.zeros(3))

    @classmethod
    def from_sim3d(cls, sim3d: pycolmap.Sim3d) -> Similarity:
        return cls(float(sim3d.scale), sim3d.rotation.matrix(), np.asarray(sim3d.translation, dtype=np.float64))

    def to_sim3d(self) -> pycolmap.Sim3d:
        return pycolmap.Sim3d(self.scale, pycolmap.Rotation3d(self.rotation), self.translation)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) -> (..., 3)."""
        return self.scale * np.asarray(points) @ self.rotation.T + self.translation

    def apply_inverse(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points) - self.translation) @ self.rotation / self.scale

    def to_dict(self) -> dict:
        return {"scale": self.scale, "rotation": np.asarray(self.rotation).tolist(),
                "translation": np.asarray(self.translation).tolist()}

    @classmethod
    def from_dict(cls, data: dict | None) -> Similarity | None:
        if data is None:
            return None
        return cls(float(data["scale"]), np.array(data["rotation"], dtype=np.float64),
                   np.array(data["translation"], dtype=np.float64))


@dataclass
class GeoInfo:
    origin_wgs84: EnuOrigin | None = None
    map_to_enu: Similarity | None = None
    registration: dict | None = None
    source_to_map: Similarity | None = None

    def to_dict(self) -> dict:
        return {
            "origin_wgs84": self.origin_wgs84.to_list() if self.origin_wgs84 else None,
            "map_to_enu": self.map_to_enu.to_dict() if self.map_to_enu else None,
            "registration": self.registration,
            "source_to_map": self.source_to_map.to_dict() if self.source_to_map else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> GeoInfo:
        origin = data.get("origin_wgs84")
        return cls(EnuOrigin(*origin) if origin else None, Similarity.from_dict(data.get("map_to_enu")),
                   data.get("registration"), Similarity.from_dict(data.get("source_to_map")))


@dataclass
class Observations:
    """The 2D points of one image that observe a 3D point."""

    point2D_indices: np.ndarray  # (N,) int64, indices into image.points2D (= keypoints for SfM maps)
    xy: np.ndarray  # (N, 2) float64 pixels, COLMAP convention
    point3D_ids: np.ndarray  # (N,) int64


def observations(image: pycolmap.Image) -> Observations:
    indices = np.asarray(image.get_observation_point2D_idxs(), dtype=np.int64)
    points2D = [image.points2D[index] for index in indices.tolist()]
    return Observations(indices, np.array([point.xy for point in points2D], dtype=np.float64).reshape(-1, 2),
                        np.array([point.point3D_id for point in points2D], dtype=np.int64))


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the names and bytes of the model files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as file:
                for chunk in iter(lambda: file.read(model_files.CHUNK_BYTES), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def point_positions(reconstruction: pycolmap.Reconstruction, point3D_ids: np.ndarray) -> np.ndarray:
    """(N, 3) float64 positions of these 3D points (N,), read one by one: the model has no array of them."""
    return np.array([reconstruction.points3D[i].xyz for i in point3D_ids.tolist()], np.float64).reshape(-1, 3)


def image_digest(name: str, image_id: int, camera: pycolmap.Camera, cam_from_world: pycolmap.Rigid3d,
                 observed: Observations, xyz: np.ndarray) -> str:
    """sha256 of what a feature store partition holds about a posed image: its id, camera and pose,
    and per observation (`observed`, with its points' positions `xyz` (N, 3)) the keypoint, the 3D
    point id and position."""
    digest = hashlib.sha256(f"{name}:{image_id}:{camera.model}".encode())
    for array in (camera.params, cam_from_world.matrix(), observed.xy, observed.point3D_ids, xyz):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


MAX_DEPTH_SAMPLES = 256  # the median depth of an image's points is estimated from at most this many


def median_depth(cam_from_world: pycolmap.Rigid3d, xyz: np.ndarray) -> float:
    """The median depth along the camera's axis of the points xyz (N, 3) it observes; NaN: none."""
    samples = np.linspace(0, len(xyz) - 1, min(len(xyz), MAX_DEPTH_SAMPLES)).round().astype(int)
    camera_xyz = xyz[samples] @ cam_from_world.rotation.matrix().T + cam_from_world.translation
    return float(np.median(camera_xyz[:, 2])) if len(camera_xyz) else math.nan


def cell_fingerprints(image_digests: Mapping[str, str], shards: ShardIndex) -> dict[str, str]:
    """Per cell: sha256 over its images' digests (core and halo; image name -> `image_digest`), so
    that a cell changes its fingerprint exactly when the content of its store partitions would change."""
    return {cell: hashlib.sha256(",".join(f"{name}={image_digests[name]}" for name in sorted(shards.images_of(cell))
                                          ).encode()).hexdigest() for cell in shards.cell_ids}


def exif_camera_key(width: int, height: int, exif_focal_px: float) -> str:
    """How SfM groups images into cameras: image size and EXIF focal length (0.1 px)."""
    return f"{width}x{height}@{exif_focal_px:.1f}"


def parse_exif_camera_key(key: str) -> tuple[int, int, float]:
    """Inverse of `exif_camera_key`: (width, height, EXIF focal px)."""
    size, focal = key.split("@")
    width, height = size.split("x")
    return int(width), int(height), float(focal)


class ManifestFacts:
    """What a map's manifest says, for the full map and the compact one alike."""

    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def keypoint_type(self) -> str:
        """The type of the map's 2D points and point descriptors (mapping/keypoints.py); a map
        written before there were others has SIFT's."""
        return self.manifest.get("keypoints", "sift")

    @property
    def exif_camera_ids(self) -> dict[str, int]:
        """exif_camera_key -> the id of the camera SfM calibrated for that device; empty for a map
        of known poses."""
        return self.manifest.get("exif_cameras", {})

    @property
    def earlier_fingerprints(self) -> list[str]:
        """The fingerprints the map had before each of its updates, oldest first."""
        return [entry["previous_fingerprint"] for entry in self.manifest.get("updates", [])
                if "previous_fingerprint" in entry]

    @property
    def image_folders(self) -> list[str]:
        """Where the map's photos were read from: the build's folder, then each update's, as given
        to `pixloc map` (a relative path is relative to where it ran)."""
        folders = [self.manifest["images_dir"], *(entry["images_dir"] for entry in self.manifest.get("updates", []))]
        return list(dict.fromkeys(folders))


@dataclass
class SceneMap(ManifestFacts):
    reconstruction: pycolmap.Reconstruction
    geo: GeoInfo = field(default_factory=GeoInfo)
    shards: ShardIndex | None = None
    manifest: dict = field(default_factory=dict)
    point3D_ids: np.ndarray | None = None  # (P,) int64
    descriptors: np.ndarray | None = None  # (P, D) float16, unit norm
    keypoints: str = "sift"  # the type of the 2D points and the descriptors (mapping/keypoints.py)
    exif_cameras: dict[str, int] = field(default_factory=dict)  # exif_camera_key -> camera_id (SfM maps)
    path: Path | None = None

    @property
    def cell_fingerprints(self) -> dict[str, str]:
        """Cell -> the fingerprint of its content (see `cell_fingerprints`), computed for a map
        whose manifest predates them."""
        if "cell_fingerprints" in self.manifest or self.shards is None:
            return self.manifest.get("cell_fingerprints", {})
        return cell_fingerprints(ReferenceImages.from_scene(self).digests_by_name(), self.shards)

    def descriptor_rows(self, point3D_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For point ids (N,): the row of each one's descriptor (N,) and whether it has one (N,)
        bool (a point without one gets some row: mask with the second)."""
        described_ids = self.point3D_ids if self.descriptors is not None else np.zeros(0, np.int64)  # (P,) ascending
        if not len(described_ids):
            return np.zeros(len(point3D_ids), np.int64), np.zeros(len(point3D_ids), bool)
        rows = np.searchsorted(described_ids, point3D_ids).clip(0, len(described_ids) - 1)
        return rows, described_ids[rows] == point3D_ids

    def save(self, path: Path, source: str, images_dir: Path, skipped: list[dict],
             manifest_extra: dict | None = None, edit: MapEdit | None = None,
             references: ReferenceImages | None = None, pieces: Pieces | None = None) -> None:
        """Writes every file of the map; the manifest last, with the fingerprint of the model and
        of each cell. `manifest_extra`: more manifest entries (failed cells, update history).
        `edit`: what changed since the map was last written there (the rest of its tables is kept;
        with a region, the scene holds only that region of the map, and the rest of the model and
        descriptors is copied too); `references`: the table of reference images, when the caller
        derived it already; `pieces`: the model, descriptors and tables written in pieces by the
        map builder (the scene's model then holds only its cameras and posed images)."""
        path = Path(path)
        (path / MODEL_DIR).mkdir(parents=True, exist_ok=True)
        if pieces is not None:
            pieces.write_model(path / MODEL_DIR)
            pieces.write_descriptors(path / DESCRIPTORS_FILE)
        elif edit is not None and edit.region is not None:
            model_files.write_patched(edit.region, edit.changed_image_ids, edit.extended_point_ids,
                                      edit.new_point_ids, path / MODEL_DIR)
            new = self.point3D_ids >= edit.region.next_point3D_id
            append_descriptors(edit.map_dir / DESCRIPTORS_FILE, path / DESCRIPTORS_FILE, self.point3D_ids[new],
                               self.descriptors[new])
        else:
            self.reconstruction.write(path / MODEL_DIR)
            if self.descriptors is not None:
                np.savez(path / DESCRIPTORS_FILE, point3D_ids=self.point3D_ids, descriptors=self.descriptors)
        (path / GEO_FILE).write_text(json.dumps(self.geo.to_dict(), indent=2))
        if self.shards is not None:
            self.shards.save(path / SHARDS_FILE)
        self.manifest = {
            "fingerprint": model_fingerprint(path / MODEL_DIR),
            "source": source,
            "keypoints": self.keypoints,
            "images_dir": str(images_dir),
            "num_images": model_files.count(path / MODEL_DIR / model_files.IMAGES),
            "num_points3D": model_files.count(path / MODEL_DIR / model_files.POINTS3D),
            "skipped": skipped,
            "exif_cameras": self.exif_cameras,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(manifest_extra or {}),
        }
        self.path = path
        if pieces is not None:
            references = pieces.references(self.fingerprint)
            references.save(path / REFERENCES_FILE)
            pieces.write_observations(path / OBSERVATIONS_FILE, self.fingerprint, self.keypoints)
        else:
            references = write_derived_tables(self, path, edit=edit, references=references)
        if "cell_fingerprints" not in self.manifest:
            self.manifest["cell_fingerprints"] = (cell_fingerprints(references.digests_by_name(), self.shards)
                                                  if self.shards else {})
        (path / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2))

    @classmethod
    def load(cls, path: Location, with_descriptors: bool = True) -> SceneMap:
        """A map directory, local or remote (copied into the local cache, as pycolmap reads files)."""
        path = files.local_copy(path, skip=lambda name: name == DESCRIPTORS_FILE and not with_descriptors)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{path}: not a map directory (no {MANIFEST_FILE}); build one with `pixloc map`")
        reconstruction = pycolmap.Reconstruction()
        reconstruction.read(path / MODEL_DIR)
        scene_map = cls(reconstruction, GeoInfo.from_dict(json.loads((path / GEO_FILE).read_text())),
                        ShardIndex.load(path / SHARDS_FILE) if (path / SHARDS_FILE).is_file() else None,
                        json.loads(manifest_path.read_text()), path=path)
        scene_map.exif_cameras = scene_map.exif_camera_ids
        scene_map.keypoints = scene_map.keypoint_type
        if with_descriptors and (path / DESCRIPTORS_FILE).is_file():
            with np.load(path / DESCRIPTORS_FILE) as data:
                scene_map.point3D_ids, scene_map.descriptors = data["point3D_ids"], data["descriptors"]
        return scene_map

    def camera_for_exif(self, width: int, height: int, exif_focal_px: float) -> pycolmap.Camera | None:
        """See `camera_for_exif`."""
        return camera_for_exif(self.reconstruction.cameras, self.exif_cameras, width, height, exif_focal_px)

    def image_centers(self) -> dict[str, np.ndarray]:
        return {image.name: image.projection_center() for image in self.reconstruction.images.values()
                if image.has_pose}

    def prior_to_map(self, prior: Prior) -> np.ndarray:
        """See `prior_to_map`."""
        return prior_to_map(self.geo, prior, lambda: np.median([c[2] for c in self.image_centers().values()]))


# ----- MAP/descriptors.npz a chunk of rows at a time (an npz is a zip of .npy files, stored uncompressed)

def _npy_header(file) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(file)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(file)
    return shape, dtype


def read_descriptors(path: Path, point3D_ids: Collection[int]) -> tuple[np.ndarray, np.ndarray]:
    """Of the points `point3D_ids`, those that MAP/descriptors.npz describes: their ids (M,)
    ascending and descriptors (M, D), found a chunk of rows at a time, never all rows at once."""
    wanted = np.unique(np.fromiter(point3D_ids, np.int64))
    with zipfile.ZipFile(path) as archive, archive.open("point3D_ids.npy") as ids, \
            archive.open("descriptors.npy") as rows:
        (count,), id_dtype = _npy_header(ids)
        (_, dim), dtype = _npy_header(rows)
        chunk = max(1, model_files.CHUNK_BYTES // (dim * dtype.itemsize + id_dtype.itemsize))
        found_ids, found = [np.zeros(0, np.int64)], [np.zeros((0, dim), dtype)]
        for start in range(0, count, chunk):
            size = min(chunk, count - start)
            chunk_ids = np.frombuffer(ids.read(size * id_dtype.itemsize), id_dtype)
            chunk_rows = np.frombuffer(rows.read(size * dim * dtype.itemsize), dtype).reshape(size, dim)
            keep = np.isin(chunk_ids, wanted)
            found_ids.append(chunk_ids[keep].astype(np.int64))
            found.append(chunk_rows[keep])
    return np.concatenate(found_ids), np.concatenate(found)


def append_descriptors(old: Path, out: Path, point3D_ids: np.ndarray, descriptors: np.ndarray) -> None:
    """out = the rows of MAP/descriptors.npz at `old`, then point3D_ids (N,) with descriptors (N, D),
    whose ids are above old's (the ids stay ascending); old's rows are copied in chunks."""
    with zipfile.ZipFile(old) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as target:
        for name, new in (("point3D_ids", point3D_ids), ("descriptors", descriptors)):
            with source.open(f"{name}.npy") as member, target.open(f"{name}.npy", "w", force_zip64=True) as written:
                shape, dtype = _npy_header(member)
                np.lib.format.write_array_header_1_0(written, {
                    "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": (shape[0] + len(new), *shape[1:])})
                shutil.copyfileobj(member, written, model_files.CHUNK_BYTES)
                written.write(np.ascontiguousarray(new, dtype).tobytes())


def camera_for_exif(cameras, exif_cameras: dict[str, int], width: int, height: int,
                    exif_focal_px: float) -> pycolmap.Camera | None:
    """The map's self-calibrated camera of the device that wrote this EXIF focal length at this
    image size: SfM gives all mapping images of one (size, EXIF focal) one shared camera, whose
    refined intrinsics fit the map better than the EXIF value does; a map triangulated from a
    reference model keeps the model's cameras, by the same keys. `cameras`: camera_id -> camera.

    A resized photo of that device (same aspect ratio up to the rounding of its size, same
    focal length per pixel of diagonal: a 35 mm equivalent keeps its value under resizing) gets
    that camera rescaled to its size (pixel corner at 0: focal and principal point times the
    scale, distortion unchanged)."""
    camera_id = exif_cameras.get(exif_camera_key(width, height, exif_focal_px))
    if camera_id is not None:
        return cameras[camera_id]
    diagonal = math.hypot(width, height)
    for key, camera_id in exif_cameras.items():
        map_width, map_height, map_focal_px = parse_exif_camera_key(key)
        map_diagonal = math.hypot(map_width, map_height)
        same_aspect = abs(height - map_height * width / map_width) <= 1.0  # sizes are rounded to pixels
        # The key keeps 0.1 px of the map's focal: allow that, scaled, and float noise.
        same_focal = abs(exif_focal_px / diagonal - map_focal_px / map_diagonal) <= 0.06 / map_diagonal
        if same_aspect and same_focal:
            camera = copy.copy(cameras[camera_id])
            camera.rescale(width, height)
            return camera
    return None


def prior_to_map(geo: GeoInfo, prior: Prior, reference_height) -> np.ndarray:
    """(3,) map-frame position of a WGS84 or map-frame prior. A WGS84 prior without altitude
    gets `reference_height()`, the median height of the reference cameras (photos are taken near
    the ground)."""
    return priors_to_map(geo, np.asarray([prior.position], np.float64), np.array([prior.geodetic]),
                         np.array([prior.has_altitude]), reference_height)[0]


def priors_to_map(geo: GeoInfo, positions: np.ndarray, geodetic: np.ndarray, has_altitude: np.ndarray,
                  reference_height) -> np.ndarray:
    """`prior_to_map` of many priors at once: positions (N, 3) (lat, lon, alt where geodetic (N,),
    else map frame), has_altitude (N,); returns (N, 3)."""
    result = np.array(positions, np.float64).reshape(-1, 3)
    if not geodetic.any():
        return result
    if geo.origin_wgs84 is None or geo.map_to_enu is None:
        raise ValueError("a WGS84 prior needs a georegistered map: rebuild it with --priors or --gps-from-exif")
    lat, lon, alt = result[geodetic].T
    converted = geo.map_to_enu.apply_inverse(wgs84_to_enu(lat, lon, alt, geo.origin_wgs84))
    missing = ~np.asarray(has_altitude)[geodetic]
    if missing.any():
        converted[missing, 2] = reference_height()
    result[geodetic] = converted
    return result


# ----- the compact map that localization plans from (no 3D points, no descriptors)

REFERENCES_FILE = "references.parquet"


@dataclass
class ReferenceImages:
    """One row per registered reference image: what planning needs of it, O(images) in size."""

    image_ids: np.ndarray  # (R,) int64
    names: list[str]
    qvecs: np.ndarray  # (R, 4) world-to-camera (w, x, y, z)
    tvecs: np.ndarray  # (R, 3)
    median_depths: np.ndarray  # (R,) median depth of the points it observes along its axis; NaN: none
    digests: list[str]  # (R,) image_digest: what a feature store partition holds about it
    camera_ids: np.ndarray  # (R,) int64, keys of `cameras`
    cameras: dict[int, pycolmap.Camera]  # camera_id -> camera, of the map
    fingerprint: str  # of the map model it was derived from

    @classmethod
    def from_scene(cls, scene: SceneMap, edit: MapEdit | None = None) -> ReferenceImages:
        """The table of the map's model. With `edit`, the images it did not change keep the median
        depth and digest of the table the map had (which need every observation of an image)."""
        reconstruction = scene.reconstruction
        previous = edit.previous_references() if edit else None
        if edit:
            edit.require_tables(previous)
        posed = {i for i, image in reconstruction.images.items() if image.has_pose}
        # A region's scene: the images it does not hold keep their rows whole.
        image_ids = sorted(posed | set(previous.image_ids.tolist() if previous is not None else []))
        cameras = {**(previous.cameras if previous is not None else {}), **reconstruction.cameras}
        names, qvecs, tvecs, depths, digests, camera_ids = [], [], [], [], [], []
        for image_id in image_ids:
            if image_id not in posed:
                row = previous.row(image_id)
                names.append(previous.names[row])
                for values, column in ((qvecs, previous.qvecs), (tvecs, previous.tvecs), (depths, previous.median_depths),
                                       (digests, previous.digests), (camera_ids, previous.camera_ids)):
                    values.append(column[row])
                continue
            image = reconstruction.images[image_id]
            camera_ids.append(image.camera_id)
            pose = image.cam_from_world()
            quaternion = pose.rotation.quat  # (x, y, z, w)
            names.append(image.name)
            qvecs.append([quaternion[3], quaternion[0], quaternion[1], quaternion[2]])
            tvecs.append(pose.translation)
            if previous is not None and image_id not in edit.changed_image_ids and previous.holds(image_id):
                row = previous.row(image_id)
                depths.append(previous.median_depths[row])
                digests.append(previous.digests[row])
                continue
            observed = observations(image)
            observed_xyz = point_positions(reconstruction, observed.point3D_ids)
            digests.append(image_digest(image.name, image_id, image.camera, pose, observed, observed_xyz))
            depths.append(median_depth(pose, observed_xyz))
        return cls(np.array(image_ids, np.int64), names, np.array(qvecs, np.float64).reshape(-1, 4),
                   np.array(tvecs, np.float64).reshape(-1, 3), np.array(depths, np.float64), digests,
                   np.array(camera_ids, np.int64), dict(sorted(cameras.items())), scene.fingerprint)

    def save(self, path: Path) -> None:
        cameras = {str(i): [camera.model.name, camera.width, camera.height, list(camera.params)]
                   for i, camera in self.cameras.items()}
        table = pa.table({"image_id": self.image_ids, "name": self.names, "qvec": list(self.qvecs),
                          "tvec": list(self.tvecs), "median_depth": self.median_depths,
                          "digest": self.digests, "camera_id": self.camera_ids})
        table = table.replace_schema_metadata({"fingerprint": self.fingerprint, "cameras": json.dumps(cameras)})
        temporary = Path(path).with_name(f".{Path(path).name}.tmp")
        pq.write_table(table, temporary)
        temporary.replace(path)

    @classmethod
    def load(cls, path: Location) -> ReferenceImages | None:
        """The table, or None when it was written before a column it needs existed (it is then
        derived again, like a table of another model)."""
        table = pq.read_table(pa.BufferReader(files.read_arrow_buffer(path)))
        if not {"camera_id", "digest"} <= set(table.column_names):
            return None
        metadata = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
        cameras = {int(i): pycolmap.Camera(camera_id=int(i), model=model, width=width, height=height, params=params)
                   for i, (model, width, height, params) in json.loads(metadata["cameras"]).items()}
        return cls(table.column("image_id").to_numpy(), table.column("name").to_pylist(),
                   np.array(table.column("qvec").to_pylist(), np.float64).reshape(-1, 4),
                   np.array(table.column("tvec").to_pylist(), np.float64).reshape(-1, 3),
                   table.column("median_depth").to_numpy(), table.column("digest").to_pylist(),
                   table.column("camera_id").to_numpy(), cameras, metadata["fingerprint"])

    def row(self, image_id: int) -> int:
        """The row of the image with this id."""
        return int(np.searchsorted(self.image_ids, image_id))  # ids are ascending

    def holds(self, image_id: int) -> bool:
        row = self.row(image_id)
        return row < len(self.image_ids) and self.image_ids[row] == image_id

    def digests_by_name(self) -> dict[str, str]:
        return dict(zip(self.names, self.digests))

    def name(self, image_id: int) -> str:
        return self.names[self.row(image_id)]

    def camera_size(self, image_id: int) -> np.ndarray:
        """(2,) width and height of the image's camera."""
        camera = self.cameras[int(self.camera_ids[self.row(image_id)])]
        return np.array([camera.width, camera.height], np.float64)

    def feature_focal_px(self, max_size: int) -> np.ndarray:
        """(R,) the mean focal length in pixels of each image's camera at the size its features
        were computed at: the image resized so that its longest side is at most max_size."""
        focal = {camera_id: camera.mean_focal_length() * min(1.0, max_size / max(camera.width, camera.height))
                 for camera_id, camera in self.cameras.items()}
        return np.array([focal[int(camera_id)] for camera_id in self.camera_ids], np.float64)

    def centers(self) -> np.ndarray:
        """(R, 3) camera centres, -R^T t."""
        w, x, y, z = self.qvecs.T
        R = np.stack([
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)
        return -np.einsum("rji,rj->ri", R, self.tvecs)


@dataclass
class MapIndex(ManifestFacts):
    """What localization plans from: the shard index, the georegistration and the reference images'
    table; unlike SceneMap, no 3D points and no descriptors (those are read per cell from the store)."""

    geo: GeoInfo
    shards: ShardIndex | None
    manifest: dict
    references: ReferenceImages
    path: Location | None = None  # the map folder it was read from (a local path or an s3:// URL)

    def camera_for_exif(self, width: int, height: int, exif_focal_px: float) -> pycolmap.Camera | None:
        return camera_for_exif(self.references.cameras, self.exif_camera_ids, width, height, exif_focal_px)

    def prior_to_map(self, prior: Prior) -> np.ndarray:
        return prior_to_map(self.geo, prior, self.reference_height)

    def priors_to_map(self, positions: np.ndarray, geodetic: np.ndarray, has_altitude: np.ndarray) -> np.ndarray:
        """See `priors_to_map`."""
        return priors_to_map(self.geo, positions, geodetic, has_altitude, self.reference_height)

    def reference_height(self) -> float:
        """The median height of the reference cameras: that of a WGS84 prior without altitude."""
        return float(np.median(self.references.centers()[:, 2]))


# ----- what the feature workers sample each reference image at (no 3D model needed)

OBSERVATIONS_FILE = "observations.parquet"
IMAGES_PER_ROW_GROUP = 16  # what one read fetches: a worker's batch of images reads a group or two


@dataclass
class ImageObservations:
    """A reference image's observations of 3D points: where its features are sampled, and what its
    store rows hold."""

    xy: np.ndarray  # (N, 2) float64 pixels of the model's camera, COLMAP convention
    point3D_ids: np.ndarray  # (N,) int64
    xyz: np.ndarray  # (N, 3) float64
    described: np.ndarray  # (N,) bool: the observations whose point has a map descriptor
    descriptors: np.ndarray  # (M, D) float16, the described observations' points', in order; D = 0: none


def observation_table_schema(descriptor_dim: int) -> pa.Schema:
    fields = [("image_id", pa.int64()), ("point3D_id", pa.int64()),
              vector_field("xy", XYZ_DTYPE, 2), vector_field("xyz", XYZ_DTYPE, 3)]
    if descriptor_dim:
        fields.append(vector_field("descriptor", FEATURE_DTYPE, descriptor_dim))
    return pa.schema(fields)


def write_observation_table(scene: SceneMap, path: Path, image_ids: np.ndarray, edit: MapEdit | None = None) -> None:
    """MAP/observations.parquet from the model: one row per observation of the images `image_ids`
    (ascending: the map's posed images), in row groups of a few images, so that a worker reads the
    observations of its images (ranged reads on S3) and no process but the map's writer holds those
    of the whole map. With `edit`, the rows of images it did not change are copied from the table
    the map had."""
    dim = scene.descriptors.shape[1] if scene.descriptors is not None else 0
    schema = observation_table_schema(dim).with_metadata({"fingerprint": scene.fingerprint, "keypoints": scene.keypoints})
    previous = edit.previous_observations(schema) if edit else None
    if edit:
        edit.require_tables(previous)
    image_ids = image_ids.tolist()
    temporary = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
        for start in range(0, len(image_ids), IMAGES_PER_ROW_GROUP):
            chunk = image_ids[start:start + IMAGES_PER_ROW_GROUP]
            if previous is None:
                rows = observation_rows(scene, chunk, schema)
            elif not edit.changed_image_ids.intersection(chunk):
                rows = previous.take(chunk[0], chunk[-1])
            else:
                rows = pa.concat_tables([observation_rows(scene, [i], schema) if i in edit.changed_image_ids
                                         else previous.take(i, i) for i in chunk]).combine_chunks()
            if len(rows):
                writer.write_table(rows, row_group_size=len(rows))
    temporary.replace(path)


def observation_rows(scene: SceneMap, image_ids: list[int], schema: pa.Schema) -> pa.Table:
    """The observation table's rows of these images, from the model."""
    reconstruction = scene.reconstruction
    columns = defaultdict(list)
    for image_id in image_ids:
        observed = observations(reconstruction.images[image_id])
        columns["image_id"].append(np.full(len(observed.point3D_ids), image_id, np.int64))
        columns["point3D_id"].append(observed.point3D_ids)
        columns["xy"].append(observed.xy)
        columns["xyz"].append(point_positions(reconstruction, observed.point3D_ids))
        if "descriptor" in schema.names:
            rows, described = scene.descriptor_rows(observed.point3D_ids)
            columns["described"].append(described)
            columns["descriptor"].append(scene.descriptors[rows])
    return observation_table({name: np.concatenate(values) for name, values in columns.items()}, schema)


def observation_table(rows: Mapping[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """The observation table's rows from their columns: image_id (N,), point3D_id (N,), xy (N, 2),
    xyz (N, 3), and with descriptors in the schema descriptor (N, D) and described (N,) bool."""
    arrays = [pa.array(rows["image_id"]), pa.array(rows["point3D_id"]),
              vector_column(rows["xy"], XYZ_DTYPE), vector_column(rows["xyz"], XYZ_DTYPE)]
    if "descriptor" in schema.names:
        arrays.append(vector_column(rows["descriptor"], FEATURE_DTYPE, valid=rows["described"]))
    return pa.Table.from_arrays(arrays, schema=schema)


class TableRowsByImage:
    """The rows of a table sorted by image id, handed out for ascending ranges of image ids, read a
    row group at a time: never the whole table at once."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.file = pq.ParquetFile(path)
        self.schema = schema  # of the table written: the rows are the same, the metadata is not
        self.next_group = 0
        self.pending = schema.empty_table()

    def take(self, first: int, last: int) -> pa.Table:
        """The rows of image ids first..last (both included), after those of earlier calls."""
        while self.next_group < self.file.num_row_groups and (
                not len(self.pending) or self.pending.column("image_id")[-1].as_py() <= last):
            group = self.file.read_row_group(self.next_group)
            self.pending = pa.concat_tables([self.pending, pa.Table.from_arrays(group.columns, schema=self.schema)])
            self.next_group += 1
        start, stop = np.searchsorted(column_numpy(self.pending.column("image_id")), [first, last + 1])
        rows, self.pending = self.pending.slice(start, stop - start), self.pending.slice(stop)
        return rows.combine_chunks()


@dataclass(frozen=True)
class MapEdit:
    """A map changed in place (`pixloc map --update`): every image but `changed_image_ids` keeps
    its pose, camera and observations, and their points keep position and descriptor, so that the
    rows of those images in the tables the map had (derived from the model of `fingerprint`) stay
    valid: writing the map copies them instead of deriving them again from every observation.

    With a `region` (model_files.read_region), the edited scene holds only that part of the map,
    changed: the model is patched (`extended_point_ids` grow their tracks, `new_point_ids` are
    added) and the tables must be those of `fingerprint`, since nothing else can derive them."""

    map_dir: Path
    fingerprint: str  # of the map's model before the change
    changed_image_ids: frozenset[int]
    region: model_files.Region | None = None
    extended_point_ids: frozenset[int] = frozenset()
    new_point_ids: frozenset[int] = frozenset()
    references: ReferenceImages | None = field(default=None, compare=False)  # the map's table, if read already

    def previous_references(self) -> ReferenceImages | None:
        """The map's table of reference images before the change; None if it is not that model's."""
        path = self.map_dir / REFERENCES_FILE
        references = (self.references if self.references is not None
                      else readable_table(path, lambda: ReferenceImages.load(path)))
        return references if references is not None and references.fingerprint == self.fingerprint else None

    def require_tables(self, found: object | None) -> None:
        if found is None and self.region is not None:
            raise ValueError(f"{self.map_dir}: its tables are not those of its model {self.fingerprint[:12]}, and an "
                             f"edit of a region cannot derive them: run `pixloc features` on the map first")

    def previous_observations(self, schema: pa.Schema) -> TableRowsByImage | None:
        """The map's observation table before the change, to be read along with the new one;
        None if it is not that model's, or differs from `schema` in more than its metadata."""
        path = self.map_dir / OBSERVATIONS_FILE
        previous = readable_table(path, lambda: pq.read_schema(path))
        if previous is None or (previous.metadata or {}).get(b"fingerprint") != self.fingerprint.encode():
            return None
        return TableRowsByImage(path, schema) if previous.equals(schema) else None


def read_observations(map_dir: Location, image_ids: Collection[int]) -> dict[int, ImageObservations]:
    """The observations of these reference images (an image without any: empty), from the row
    groups of MAP/observations.parquet that hold them."""
    wanted = np.unique(np.fromiter(image_ids, np.int64))

    def holding_wanted(metadata: pq.FileMetaData) -> list[int]:
        groups = []
        for group in range(metadata.num_row_groups):
            # Not metadata.schema: it and the metadata refer to each other, and a worker would hold
            # every footer it read (megabytes each, at city scale) until the garbage collector's
            # rare full pass.
            row_group = metadata.row_group(group)
            column = next(i for i in range(row_group.num_columns) if row_group.column(i).path_in_schema == "image_id")
            statistics = row_group.column(column).statistics
            first = np.searchsorted(wanted, statistics.min)
            if first < len(wanted) and wanted[first] <= statistics.max:
                groups.append(group)
        return groups

    table = files.read_parquet(files.location(map_dir) / OBSERVATIONS_FILE, holding_wanted)
    table_ids = column_numpy(table.column("image_id"))  # ascending
    xy, xyz = column_vectors(table.column("xy"), XYZ_DTYPE), column_vectors(table.column("xyz"), XYZ_DTYPE)
    point3D_ids = column_numpy(table.column("point3D_id"))
    has_descriptors = "descriptor" in table.column_names
    if has_descriptors:
        descriptors = column_vectors(table.column("descriptor"), FEATURE_DTYPE)
        described = column_validity(table.column("descriptor"))
    result = {}
    for image_id in wanted.tolist():
        rows = slice(*np.searchsorted(table_ids, [image_id, image_id + 1]))
        if has_descriptors:
            image_described = described[rows]
            image_descriptors = descriptors[rows][image_described]
        else:
            image_described, image_descriptors = np.zeros(rows.stop - rows.start, bool), np.zeros((0, 0), np.float16)
        result[image_id] = ImageObservations(xy[rows], point3D_ids[rows], xyz[rows], image_described, image_descriptors)
    return result


def observation_table_info(map_dir: Location) -> tuple[str, int] | None:
    """Of MAP/observations.parquet, from its footer: the fingerprint of the model it was derived
    from and the dimension of its descriptors (0: none); None when the map has no table, or a
    damaged one."""
    path = files.location(map_dir) / OBSERVATIONS_FILE
    schema = readable_table(path, lambda: files.read_parquet(path, lambda metadata: []).schema)
    if schema is None:
        return None
    fingerprint = (schema.metadata or {}).get(b"fingerprint", b"").decode()
    if "descriptor" not in schema.names:
        return fingerprint, 0
    return fingerprint, int(schema.field("descriptor").metadata[b"width"])


def readable_table(path: Location, read: Callable[[], T]) -> T | None:
    """read() of a table derived from the model; None when it is missing or damaged (it is then
    derived again). A storage failure is not damage: it is raised."""
    if not files.is_file(path):
        return None
    try:
        return read()
    except pa.ArrowInvalid as error:
        logger.warning("%s: damaged (%s), derived again from the model", path, " ".join(str(error).split()))
        return None


def write_derived_tables(scene: SceneMap, map_dir: Location, with_observations: bool = True,
                         edit: MapEdit | None = None, references: ReferenceImages | None = None) -> ReferenceImages:
    """MAP/references.parquet and (with the map's descriptors loaded) MAP/observations.parquet from
    the model, by whoever holds it (the map's writer, or once for a map written before them): beside
    the loaded model (the local copy of a remote map) and to a remote map as well. With `edit`,
    what it did not change is copied from the tables the map had; `references`: derived already
    (for this model, under whichever fingerprint it had then)."""
    references = replace(references or ReferenceImages.from_scene(scene, edit), fingerprint=scene.fingerprint)
    local = Path(scene.path or map_dir)
    references.save(local / REFERENCES_FILE)
    names = [REFERENCES_FILE]
    if with_observations:
        write_observation_table(scene, local / OBSERVATIONS_FILE, references.image_ids, edit)
        names.append(OBSERVATIONS_FILE)
    if files.is_remote(map_dir):
        for name in names:
            files.write_bytes(files.location(map_dir) / name, (local / name).read_bytes())
    return references


def load_map_index(map_dir: Location, with_observations: bool = False) -> MapIndex:
    """The compact map, read straight from its folder (local or remote: a few small files, not the
    model). Its tables are derived from the model, once, when they are missing, lack a column
    (written by an older version) or belong to another model (rebuilt since); with
    `with_observations`, MAP/observations.parquet too (for the feature workers), and a manifest
    without cell fingerprints gets them."""
    map_dir = files.location(map_dir)
    try:
        manifest = json.loads(files.read_text(map_dir / MANIFEST_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{map_dir}: not a map directory (no {MANIFEST_FILE}); build one with `pixloc map`") from None
    table_path = map_dir / REFERENCES_FILE
    references = readable_table(table_path, lambda: ReferenceImages.load(table_path))
    current = references is not None and references.fingerprint == manifest["fingerprint"]
    if with_observations:
        current = (current and "cell_fingerprints" in manifest
                   and (observation_table_info(map_dir) or ("", 0))[0] == manifest["fingerprint"])
    if not current:
        logger.info("%s: deriving the map's tables from its model (once)", map_dir)
        scene = SceneMap.load(map_dir, with_descriptors=with_observations)
        references = write_derived_tables(scene, map_dir, with_observations)
        if with_observations and "cell_fingerprints" not in manifest:
            manifest["cell_fingerprints"] = scene.cell_fingerprints
            files.write_text(map_dir / MANIFEST_FILE, json.dumps(manifest, indent=2))
    shards = json.loads(files.read_text(map_dir / SHARDS_FILE)) if files.is_file(map_dir / SHARDS_FILE) else None
    return MapIndex(GeoInfo.from_dict(json.loads(files.read_text(map_dir / GEO_FILE))),
                    ShardIndex.from_dict(shards) if shards is not None else None, manifest, references, map_dir)
