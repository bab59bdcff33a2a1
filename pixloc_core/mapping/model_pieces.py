"""The model and tables of a map built cell by cell, written in pieces: no process holds the whole
model, its descriptors or its observations, as `SceneMap.save` does with the model it is given.

After the merge (cell_merge.py) each owner cell holds its points. The points get their ids in the
owners' order (ids 1, 2, ... as the map builder numbers them), and

1. each owner (`distribute`) writes its points3D.bin records and descriptor rows, and sends each
   observation (image, keypoint, point id, position, descriptor) to the chunk of images it is in:
   chunks of consecutive image ids, so that concatenated they keep the files' order (images and
   observation table by ascending image id);
2. each chunk (`write_chunk`) writes the images.bin records of its images with their keypoints
   (read one image at a time) and the 3D points they observe, the rows of MAP/observations.parquet
   (row groups of IMAGES_PER_ROW_GROUP images, as `write_observation_table` makes them) and each
   image's median depth and digest for MAP/references.parquet;
3. the map's writer (`Pieces`) concatenates them, reading a piece at a time.

    MAP/mapping/write/points/<owner>.bin          the owner's points3D.bin records
    MAP/mapping/write/descriptors/<owner>.npy     their descriptors, (P, D) float16 rows, no header
    MAP/mapping/write/routed/<chunk>/<owner>.npz  the owner's observations in the chunk's images
    MAP/mapping/write/images/<chunk>.bin          the chunk's images.bin records, ascending ids
    MAP/mapping/write/observations/<chunk>.parquet   its observation table rows
    MAP/mapping/write/references/<chunk>.npz      its images' median depths and digests

The pieces are rewritten by every run and deleted once the map holds them.
"""
from __future__ import annotations

import io
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycolmap

from .. import files, model_files
from ..files import Location
from ..map_io import (IMAGES_PER_ROW_GROUP, Observations, ReferenceImages, image_digest, median_depth,
                      observation_table, observation_table_schema)
from . import cell_merge
from .feature_files import FeatureFiles

logger = logging.getLogger(__name__)

WRITE_DIR = "write"
POINTS, DESCRIPTORS, ROUTED, IMAGES, OBSERVATIONS, REFERENCES = (
    "points", "descriptors", "routed", "images", "observations", "references")


def piece(root: Location, kind: str, name: str) -> Location:
    return files.location(root) / WRITE_DIR / kind / name


@dataclass(frozen=True)
class ImageChunks:
    """The map's images in chunks of consecutive ids."""

    image_ids: np.ndarray  # (R,) sorted
    size: int = 16 * IMAGES_PER_ROW_GROUP  # a multiple of the row group: the chunks' groups are the table's

    @property
    def count(self) -> int:
        return -(-len(self.image_ids) // self.size)

    def of(self, image_ids: np.ndarray) -> np.ndarray:
        """(N,) image ids of the map -> (N,) their chunks."""
        return np.searchsorted(self.image_ids, image_ids) // self.size

    def image_ids_of(self, chunk: int) -> np.ndarray:
        return self.image_ids[chunk * self.size:(chunk + 1) * self.size]


def distribute(root: Location, owner: str, first_id: int, chunks: ImageChunks) -> list[int]:
    """Writes the owner's merged points under ids from first_id on: their records, their
    descriptors, and their observations to the chunks of their images. Returns those chunks."""
    owned = cell_merge.load_merged(root, owner)
    points = owned.points
    point3D_ids = first_id + np.arange(points.num_points, dtype=np.int64)
    files.write_bytes(piece(root, POINTS, f"{owner}.bin"), model_files.point_records(
        point3D_ids, points.xyz, points.color, owned.error, points.row_point, points.row_image, points.row_point2D))
    files.write_bytes(piece(root, DESCRIPTORS, f"{owner}.npy"), np.ascontiguousarray(owned.descriptors).tobytes())
    row_chunk = chunks.of(points.row_image)
    written = np.unique(row_chunk).tolist()
    for chunk in written:
        rows = np.flatnonzero(row_chunk == chunk)
        with io.BytesIO() as data:
            np.savez(data, image_id=points.row_image[rows], point2D_idx=points.row_point2D[rows],
                     point3D_id=point3D_ids[points.row_point[rows]], xyz=points.xyz[points.row_point[rows]],
                     descriptor=owned.descriptors[points.row_point[rows]])
            files.write_bytes(piece(root, ROUTED, f"{chunk}/{owner}.npz"), data.getvalue())
    return written


@dataclass(frozen=True)
class ImageEntry:
    """What an images.bin record holds besides the 2D points."""

    image_id: int
    name: str
    camera_id: int
    rotation_xyzw: np.ndarray  # (4,) of cam_from_world
    translation: np.ndarray  # (3,)

    @classmethod
    def of(cls, image: pycolmap.Image) -> ImageEntry:
        pose = image.cam_from_world()
        return cls(image.image_id, image.name, image.camera_id, np.array(pose.rotation.quat),
                   np.array(pose.translation))

    @property
    def cam_from_world(self) -> pycolmap.Rigid3d:
        return pycolmap.Rigid3d(pycolmap.Rotation3d(self.rotation_xyzw), self.translation)


def _routed_rows(root: Location, chunk: int, owners: list[str], descriptor_dim: int) -> dict[str, np.ndarray]:
    """The observations `owners` sent to the chunk, sorted by image and keypoint."""
    rows = {"image_id": [np.zeros(0, np.int64)], "point2D_idx": [np.zeros(0, np.int64)],
            "point3D_id": [np.zeros(0, np.int64)], "xyz": [np.zeros((0, 3))],
            "descriptor": [np.zeros((0, descriptor_dim), np.float16)]}
    for owner in owners:
        with np.load(io.BytesIO(files.read_bytes(piece(root, ROUTED, f"{chunk}/{owner}.npz")))) as data:
            for name, values in rows.items():
                values.append(data[name])
    joined = {name: np.concatenate(values) for name, values in rows.items()}
    order = np.lexsort((joined["point2D_idx"], joined["image_id"]))
    return {name: values[order] for name, values in joined.items()}


def write_chunk(root: Location, chunk: int, images: list[ImageEntry], owners: list[str],
                cameras: dict[int, pycolmap.Camera], features_root: Location, descriptor_dim: int) -> None:
    """The chunk's pieces (`images` ascending by id) from what `owners` sent to it."""
    rows = _routed_rows(root, chunk, owners, descriptor_dim)
    bounds = np.searchsorted(rows["image_id"], [[entry.image_id, entry.image_id + 1] for entry in images])
    features = FeatureFiles(features_root)
    schema = observation_table_schema(descriptor_dim)
    records, depths, digests, groups = [], [], [], []
    for index, (entry, (start, stop)) in enumerate(zip(images, bounds.tolist())):
        keypoints = features.keypoints(entry.name)
        observed = Observations(rows["point2D_idx"][start:stop], keypoints[rows["point2D_idx"][start:stop]],
                                rows["point3D_id"][start:stop])
        xyz = rows["xyz"][start:stop]
        point3D_ids = np.full(len(keypoints), model_files.INVALID_POINT3D_ID, np.uint64)
        point3D_ids[observed.point2D_indices] = observed.point3D_ids
        pose = entry.cam_from_world
        records.append(model_files.image_record(entry.image_id, pose, entry.camera_id, entry.name, keypoints,
                                                point3D_ids))
        digests.append(image_digest(entry.name, entry.image_id, cameras[entry.camera_id], pose, observed, xyz))
        depths.append(median_depth(pose, xyz))
        if index % IMAGES_PER_ROW_GROUP == 0:
            groups.append([])
        groups[-1].append({"image_id": np.full(stop - start, entry.image_id, np.int64),
                           "point3D_id": observed.point3D_ids, "xy": observed.xy, "xyz": xyz,
                           "described": np.ones(stop - start, bool), "descriptor": rows["descriptor"][start:stop]})
    files.write_bytes(piece(root, IMAGES, f"{chunk}.bin"), b"".join(records))
    with io.BytesIO() as data:
        with pq.ParquetWriter(data, schema, compression="zstd") as writer:
            for group in groups:
                table = observation_table({name: np.concatenate([image[name] for image in group])
                                           for name in group[0]}, schema)
                if len(table):
                    writer.write_table(table, row_group_size=len(table))
        files.write_bytes(piece(root, OBSERVATIONS, f"{chunk}.parquet"), data.getvalue())
    with io.BytesIO() as data:
        np.savez(data, median_depth=np.array(depths, np.float64), digest=np.array(digests))
        files.write_bytes(piece(root, REFERENCES, f"{chunk}.npz"), data.getvalue())


@dataclass
class Pieces:
    """A map's model and tables as the tasks above wrote them, to be concatenated into the map."""

    root: Location
    skeleton: pycolmap.Reconstruction  # the map's cameras and posed images, no 2D or 3D point
    owner_points: dict[str, int]  # owner -> its number of points, in the order of their ids
    chunks: ImageChunks
    descriptor_dim: int

    @property
    def num_points(self) -> int:
        return sum(self.owner_points.values())

    def write_model(self, model_dir: Path) -> None:
        with tempfile.TemporaryDirectory(dir=model_dir, prefix=".skeleton-") as temporary:
            self.skeleton.write(temporary)  # cameras, rigs and frames as pycolmap writes them
            for name in (model_files.CAMERAS, model_files.RIGS, model_files.FRAMES):
                shutil.copyfile(Path(temporary) / name, model_dir / name)
        model_files.write_concatenated(model_dir / model_files.IMAGES, len(self.chunks.image_ids), (
            files.read_bytes(piece(self.root, IMAGES, f"{chunk}.bin")) for chunk in range(self.chunks.count)))
        model_files.write_concatenated(model_dir / model_files.POINTS3D, self.num_points, (
            files.read_bytes(piece(self.root, POINTS, f"{owner}.bin")) for owner, count in self.owner_points.items()
            if count))

    def write_descriptors(self, path: Path) -> None:
        """MAP/descriptors.npz as np.savez writes it (point3D_ids, descriptors), the rows an owner at a time."""
        ids = np.arange(1, self.num_points + 1, dtype=np.int64)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as target:
            with target.open("point3D_ids.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, ids)
            with target.open("descriptors.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                    "shape": (self.num_points, self.descriptor_dim)})
                for owner, count in self.owner_points.items():
                    if count:
                        member.write(files.read_bytes(piece(self.root, DESCRIPTORS, f"{owner}.npy")))

    def references(self, fingerprint: str) -> ReferenceImages:
        """The table of reference images (O(images), small), with the chunks' depths and digests."""
        depths, digests = [], []
        for chunk in range(self.chunks.count):
            with np.load(io.BytesIO(files.read_bytes(piece(self.root, REFERENCES, f"{chunk}.npz")))) as data:
                depths.append(data["median_depth"])
                digests += data["digest"].tolist()
        images = [self.skeleton.images[image_id] for image_id in self.chunks.image_ids.tolist()]
        entries = [ImageEntry.of(image) for image in images]
        return ReferenceImages(
            self.chunks.image_ids.astype(np.int64), [entry.name for entry in entries],
            np.array([np.roll(entry.rotation_xyzw, 1) for entry in entries], np.float64).reshape(-1, 4),
            np.array([entry.translation for entry in entries], np.float64).reshape(-1, 3),
            np.concatenate(depths) if depths else np.zeros(0), digests,
            np.array([entry.camera_id for entry in entries], np.int64), dict(sorted(self.skeleton.cameras.items())),
            fingerprint)

    def write_observations(self, path: Path, fingerprint: str, keypoints: str) -> None:
        """MAP/observations.parquet: the chunks' row groups, in order, read one at a time."""
        schema = observation_table_schema(self.descriptor_dim).with_metadata(
            {"fingerprint": fingerprint, "keypoints": keypoints})
        temporary = path.with_name(f".{path.name}.tmp")
        with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
            for chunk in range(self.chunks.count):
                table_file = pq.ParquetFile(pa.BufferReader(files.read_arrow_buffer(
                    piece(self.root, OBSERVATIONS, f"{chunk}.parquet"))))
                for group in range(table_file.num_row_groups):
                    rows = table_file.read_row_group(group)
                    writer.write_table(pa.Table.from_arrays(rows.columns, schema=schema), row_group_size=len(rows))
                    del rows
                    # Arrow's allocator keeps what a group freed for the next: at 643 groups that
                    # held ~100 MB more than the groups need, about half of it without this.
                    pa.default_memory_pool().release_unused()
        temporary.replace(path)

    def delete(self) -> None:
        files.delete_folder(files.location(self.root) / WRITE_DIR)
