"""The reference feature store: per 3D point and level, features sampled in the reference images.

Layout under the store URL (a local directory or `s3://bucket/prefix`):

    store.json                                   extractor id, map fingerprint, strides, channels
    cell=<cell>/level=<level>/part-<key>.parquet one file per written batch of images and partition,
                                                 until the partition is published; then one file,
                                                 part-merged-<key> (part-aggregated-<key>), holds them
    _commits/<key>.json                          the batch's images and files (rows, bytes, crc32, sha256)
                                                 and the map fingerprint it was extracted for
    cell=<cell>/level=<level>/_manifest.json     the partition's committed files and the fingerprint of
                                                 the cell's content they hold: makes it visible
    cell=<cell>/level=sparse/...                 the cell's sparse points, same commit protocol
    cell=<cell>/level=wide/...                   the coarsest level widened (store.json's wide_cells:
                                                 extractors.base.widened), rows as a dense level's

Writers (Ray workers) only create part files, each under a name no other batch uses. The driver
then records each returned batch in `_commits/` (one new object: no read-modify-write, atomic on
S3 and, by rename, on a local disk) and publishes a partition once every image of its cell is
committed: its parts merged into one file, named by a manifest, and then deleted. Readers read
only the files that a manifest lists, so the files of a killed job stay invisible, and a rerun
skips the images of committed batches.

A store follows its map through `pixloc map --update`: the map records the fingerprint it had
before each update, and a features job on the updated map reuses every partition whose cell
fingerprint is unchanged, recomputes the others (commits of the earlier map do not count), and
only then names the new map in store.json, so that a reader of the new map never sees a store
that is half of the old one.

Integrity: every load checks each file's size and CRC32 (cheap, recorded at write time) against
the manifest and refuses a damaged or missing file by name (`DamagedPartition`); `verify` also
checks the sha256 and the row count. `damaged_partitions` finds the partitions a features rerun
must recompute (sizes only, from listings; with checksums, reading every file).

Rows (zstd Parquet): point3D_id int64, image_id int32 (the observing reference image),
xyz (3 float64), feature (C float16, L2-normalised), confidence float32; vectors are fixed-size
binary values of little-endian numbers (`vector_field`: the field metadata names dtype and
width). An aggregated partition has one row per point (the confidence-weighted mean feature over
its observations, re-normalised) and num_observations int32 instead of image_id.

Sparse rows (level=sparse, when store.json names a keypoint type): per observation of a 3D point in
a reference image, point3D_id int64, image_id int32, xyz (3 float64) and descriptor (D float16:
the map's unit-norm descriptor of the point): what the shard actor of the cell matches query
keypoints against and solves PnP with, so that no query process needs the whole map's
descriptors.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pixloc_core.align import ReferenceLevel
from pixloc_core.columns import FEATURE_DTYPE, XYZ_DTYPE, column_numpy, column_vectors, vector_column, vector_field
from pixloc_core.sparse import SparsePoints

from .errors import DamagedPartition
from .filesystem import RetryPolicy, Storage

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: vectors as fixed-size binary, one merged file per partition
INFO_FILE = "store.json"
COMMITS_DIR = "_commits"
MANIFEST_FILE = "_manifest.json"
COMPRESSION = "zstd"
SPARSE_LEVEL = "sparse"  # the partition "level" of a cell's sparse points
WIDE_LEVEL = "wide"  # the partition "level" of the coarsest level widened (the alignment's wide start)


class StoreMismatchError(ValueError):
    """The store holds features of another extractor or map than the caller expects."""


class PartitionNotFound(KeyError):
    """No committed partition for this cell and level."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class StoreInfo:
    """The identity and shape of a store (store.json)."""

    extractor_id: str
    map_fingerprint: str
    strides: tuple[int, ...]  # coarse to fine, one per level
    channels: tuple[int, ...]  # feature channels per level
    aggregated: bool = False
    format_version: int = FORMAT_VERSION
    sparse_keypoints: str = ""  # keypoint type of the sparse partitions ("sift", "alike-n", ...); "": none
    sparse_dim: int = 0  # their descriptor size
    # The coarsest level averaged over (2 r + 1)^2 of its cells (extractors.base.widened) is stored
    # too, as level WIDE_LEVEL, when r = wide_cells > 0; 0: no wide level (stores made before it).
    wide_cells: int = 0

    @property
    def extractor_name(self) -> str:
        """The extractor's name, as `load_extractor` takes it: the id is name + "-" + a config hash."""
        return self.extractor_id.rsplit("-", 1)[0]

    def levels(self) -> list[int | str]:
        """Every partition level of a cell: the dense ones, the wide one, the sparse one (if any)."""
        return [*range(len(self.strides)), *([WIDE_LEVEL] if self.wide_cells else []),
                *([SPARSE_LEVEL] if self.sparse_keypoints else [])]

    def channels_of(self, level: int | str) -> int:
        """Feature channels of a dense level or the wide one (those of the coarsest level)."""
        return self.channels[0 if level == WIDE_LEVEL else level]

    @classmethod
    def from_json(cls, content: dict) -> StoreInfo:
        content = dict(content, strides=tuple(content["strides"]), channels=tuple(content["channels"]))
        return cls(**content)


@dataclass(frozen=True)
class PartFile:
    """A Parquet file written into a partition, with what the manifest records about it."""

    path: str  # relative to the store root
    cell: str
    level: int | str  # a dense level, or SPARSE_LEVEL
    rows: int
    bytes: int
    sha256: str
    crc32: str = ""  # zlib.crc32, 8 hex digits; empty in stores written before it was recorded


@dataclass
class Commit:
    """One batch of reference images whose part files are all written."""

    key: str
    image_ids: list[int]
    parts: list[PartFile] = field(default_factory=list)
    map_fingerprint: str = ""  # the map it was extracted for; "": the store's (commits before this was recorded)

    def to_json(self) -> dict:
        return {"key": self.key, "image_ids": self.image_ids, "parts": [asdict(part) for part in self.parts],
                "map_fingerprint": self.map_fingerprint}

    @classmethod
    def from_json(cls, content: dict) -> Commit:
        return cls(content["key"], content["image_ids"], [PartFile(**part) for part in content["parts"]],
                   content.get("map_fingerprint", ""))


def batch_key(image_ids: list[int]) -> str:
    """The same batch of images always writes the same file names, so a retried batch overwrites
    its own uncommitted files, and batches of disjoint image sets never collide."""
    return hashlib.sha1(",".join(map(str, sorted(image_ids))).encode()).hexdigest()[:16]


def partition_dir(cell: str, level: int | str) -> str:
    return f"cell={cell}/level={level}"


def parse_partition_dir(path: str) -> tuple[str, int | str]:
    """partition_dir's inverse: "cell=<cell>/level=<level>" -> (cell, level)."""
    cell, level = path.split("/")
    level = level.removeprefix("level=")
    return cell.removeprefix("cell="), level if level in (SPARSE_LEVEL, WIDE_LEVEL) else int(level)


def crc32_hex(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def observation_schema(channels: int) -> pa.Schema:
    return pa.schema([
        ("point3D_id", pa.int64()),
        ("image_id", pa.int32()),
        vector_field("xyz", XYZ_DTYPE, 3),
        vector_field("feature", FEATURE_DTYPE, channels),
        ("confidence", pa.float32()),
    ])


def aggregated_schema(channels: int) -> pa.Schema:
    return pa.schema([
        ("point3D_id", pa.int64()),
        ("num_observations", pa.int32()),
        vector_field("xyz", XYZ_DTYPE, 3),
        vector_field("feature", FEATURE_DTYPE, channels),
        ("confidence", pa.float32()),
    ])


def sparse_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("point3D_id", pa.int64()),
        ("image_id", pa.int32()),
        vector_field("xyz", XYZ_DTYPE, 3),
        vector_field("descriptor", FEATURE_DTYPE, dim),
    ])


def observation_table(point3D_ids: np.ndarray, image_ids: np.ndarray, xyz: np.ndarray,
                      features: np.ndarray, confidence: np.ndarray) -> pa.Table:
    """Rows of observations: ids (N,), xyz (N, 3), features (N, C) and confidence (N,)."""
    return pa.Table.from_arrays([
        pa.array(point3D_ids, pa.int64()),
        pa.array(image_ids, pa.int32()),
        vector_column(np.reshape(xyz, (-1, 3)), XYZ_DTYPE),
        vector_column(features, FEATURE_DTYPE),
        pa.array(np.asarray(confidence, np.float32), pa.float32()),
    ], schema=observation_schema(features.shape[1]))


def sparse_table(point3D_ids: np.ndarray, image_ids: np.ndarray, xyz: np.ndarray,
                 descriptors: np.ndarray) -> pa.Table:
    """Sparse rows: ids (N,), xyz (N, 3) and point descriptors (N, D)."""
    return pa.Table.from_arrays([
        pa.array(point3D_ids, pa.int64()),
        pa.array(image_ids, pa.int32()),
        vector_column(np.reshape(xyz, (-1, 3)), XYZ_DTYPE),
        vector_column(descriptors, FEATURE_DTYPE),
    ], schema=sparse_schema(descriptors.shape[1]))


def aggregate_observations(table: pa.Table) -> pa.Table:
    """One row per 3D point: the confidence-weighted mean of its observed features, re-normalised,
    and the mean confidence."""
    point3D_ids = column_numpy(table.column("point3D_id"))
    order = np.argsort(point3D_ids, kind="stable")
    sorted_ids = point3D_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    features = column_vectors(table.column("feature"), FEATURE_DTYPE)[order].astype(np.float32)  # (N, C)
    confidence = column_numpy(table.column("confidence"))[order]  # (N,)
    weight_sums = np.add.reduceat(confidence, starts)  # (P,)
    means = np.add.reduceat(features * confidence[:, None], starts) / np.maximum(weight_sums, 1e-12)[:, None]
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    counts = np.diff(np.r_[starts, len(order)])
    xyz = column_vectors(table.column("xyz"), XYZ_DTYPE)[order[starts]]
    return pa.Table.from_arrays([
        pa.array(sorted_ids[starts], pa.int64()),
        pa.array(counts, pa.int32()),
        vector_column(xyz, XYZ_DTYPE),
        vector_column(means, FEATURE_DTYPE),
        pa.array(weight_sums / counts, pa.float32()),
    ], schema=aggregated_schema(means.shape[1]))


REFERENCE_COLUMNS = ["xyz", "feature", "confidence"]


def _reference_level(table: pa.Table) -> ReferenceLevel:
    """Columns xyz, feature, confidence -> tensors sharing Arrow's memory where the types allow."""
    xyz = column_vectors(table.column("xyz"), XYZ_DTYPE)  # (N, 3) float64
    features = column_vectors(table.column("feature"), FEATURE_DTYPE)  # (N, C) float16
    confidence = column_numpy(table.column("confidence"))  # (N,) float32
    with warnings.catch_warnings():
        # Arrow buffers are read-only; the tensors share them and nothing here writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ReferenceLevel(points3D=torch.from_numpy(xyz), features=torch.from_numpy(features).float(),
                              confidence=torch.from_numpy(confidence))


class FeatureStore:
    """Reader and writer of one store; `create` for jobs, `open` for readers."""

    def __init__(self, storage: Storage, info: StoreInfo):
        self.storage = storage
        self.info = info

    @property
    def url(self) -> str:
        return self.storage.url

    @classmethod
    def open(cls, url: str, extractor_id: str | None = None, map_fingerprint: str | None = None,
             storage: Storage | None = None, retry: RetryPolicy = RetryPolicy()) -> FeatureStore:
        """An existing store; refuses one of another extractor or map than the given ones."""
        storage = storage or Storage(url, retry)
        try:
            info = StoreInfo.from_json(storage.read_json(INFO_FILE))
        except FileNotFoundError:
            raise FileNotFoundError(f"{storage.url}: no feature store here ({INFO_FILE} not found; "
                                    "run `pixloc features` first)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{storage.url}/{INFO_FILE}: not a valid store description ({error})") from None
        if info.format_version != FORMAT_VERSION:
            raise ValueError(f"{storage.url}: store format {info.format_version}, this code reads {FORMAT_VERSION} "
                             "(rerun `pixloc features` into a new store)")
        store = cls(storage, info)
        store.require(extractor_id, map_fingerprint)
        return store

    def require(self, extractor_id: str | None = None, map_fingerprint: str | None = None) -> None:
        """Refuses a store of another extractor or map than the given ones (None: any)."""
        for what, expected, found in (("extractor", extractor_id, self.info.extractor_id),
                                      ("map", map_fingerprint, self.info.map_fingerprint)):
            if expected is not None and expected != found:
                raise StoreMismatchError(f"{self.url}: store of another {what}: expected "
                                         f"{expected}, found {found}")

    @staticmethod
    def exists(url: str, retry: RetryPolicy = RetryPolicy()) -> bool:
        """Whether `url` holds a store (its store.json), whatever its extractor and map."""
        return Storage(url, retry).exists(INFO_FILE)

    @classmethod
    def create(cls, url: str, info: StoreInfo, storage: Storage | None = None, retry: RetryPolicy = RetryPolicy(),
               earlier_maps: Collection[str] = ()) -> FeatureStore:
        """A new store, or the existing one at `url` when it has the same identity (to resume) or
        differs only by being of one of `earlier_maps`, the fingerprints the map had before its
        updates (the store keeps that identity until `adopt_map`)."""
        storage = storage or Storage(url, retry)
        if storage.exists(INFO_FILE):
            store = cls.open(url, info.extractor_id, storage=storage)
            if store.info.map_fingerprint not in {info.map_fingerprint, *earlier_maps}:
                raise StoreMismatchError(f"{storage.url}: store of another map: expected "
                                         f"{info.map_fingerprint}, found {store.info.map_fingerprint}")
            if replace(store.info, map_fingerprint=info.map_fingerprint) != info:
                raise StoreMismatchError(f"{storage.url}: store written with other settings: "
                                         f"expected {info}, found {store.info}")
            return store
        storage.write_json(INFO_FILE, asdict(info))
        return cls(storage, info)

    def adopt_map(self, map_fingerprint: str) -> None:
        """Name `map_fingerprint` in store.json, once every cell of that map is current, and drop
        the commits of earlier maps (their partitions are either republished or current)."""
        if map_fingerprint == self.info.map_fingerprint:
            return
        obsolete = [commit.key for commit in self.commits() if commit.map_fingerprint != map_fingerprint]
        self.info = replace(self.info, map_fingerprint=map_fingerprint)
        self.storage.write_json(INFO_FILE, asdict(self.info))
        for key in obsolete:
            self.storage.delete(f"{COMMITS_DIR}/{key}.json")

    # Writing: workers write part files, the driver commits batches and publishes partitions.

    def write_part(self, cell: str, level: int | str, key: str, table: pa.Table) -> PartFile:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression=COMPRESSION)
        data = buffer.getvalue()
        path = f"{partition_dir(cell, level)}/part-{key}.parquet"
        self.storage.put_bytes(path, data)
        return PartFile(path, cell, level, table.num_rows, len(data), hashlib.sha256(data).hexdigest(),
                        crc32_hex(data))

    def commit(self, commit: Commit) -> None:
        self.storage.write_json(f"{COMMITS_DIR}/{commit.key}.json", commit.to_json())

    def commits(self, map_fingerprint: str | None = None) -> list[Commit]:
        """The recorded batches; with `map_fingerprint`, only those extracted for that map."""
        records = self.storage.get_many(self.storage.list_files(COMMITS_DIR))
        commits = []
        for content in records.values():
            commit = Commit.from_json(json.loads(content))
            commit.map_fingerprint = commit.map_fingerprint or self.info.map_fingerprint
            if map_fingerprint in (None, commit.map_fingerprint):
                commits.append(commit)
        return commits

    def publish(self, cell: str, level: int | str, parts: list[PartFile], cell_fingerprint: str) -> None:
        """Make a complete partition visible as one file: its batches' part files (checked against
        what their writers recorded) merged, per point in an aggregated store, so that a load parses
        one file instead of one per batch; the manifest names the cell content (`cell_fingerprint`,
        the map's) it was computed from. The part files, and the files of a partition published
        before, are deleted once the new manifest names the merged file."""
        parts = sorted(parts, key=lambda part: part.path)
        files = []
        if parts:
            table = self._read_parts([asdict(part) for part in parts])
            # Named after its inputs: a republished partition rewrites the same file.
            digest = hashlib.sha256("".join(part.sha256 for part in parts).encode()).hexdigest()[:16]
            if self.info.aggregated and level != SPARSE_LEVEL:
                files = [self.write_part(cell, level, f"aggregated-{digest}", aggregate_observations(table))]
            else:
                files = [self.write_part(cell, level, f"merged-{digest}", table)]
        replaced = self._published_files(cell, level)
        self.storage.write_json(f"{partition_dir(cell, level)}/{MANIFEST_FILE}", {
            "cell": cell, "level": level, "aggregated": self.info.aggregated,
            "rows": sum(part.rows for part in files),
            "files": [asdict(part) for part in files],
            "merged_parts": len(parts),
            "cell_fingerprint": cell_fingerprint,
        })
        for path in sorted({part.path for part in parts} | replaced - {part.path for part in files}):
            self.storage.delete(path)

    def _published_files(self, cell: str, level: int | str) -> set[str]:
        """The files the partition's current manifest names; none when it has no readable one."""
        try:
            return {part["path"] for part in self.manifest(cell, level)["files"]}
        except (PartitionNotFound, json.JSONDecodeError, KeyError, TypeError):
            return set()

    # Reading.

    def is_published(self, cell: str, level: int | str) -> bool:
        return self.storage.exists(f"{partition_dir(cell, level)}/{MANIFEST_FILE}")

    def is_current(self, cell: str, level: int | str, cell_fingerprint: str, map_fingerprint: str) -> bool:
        """Whether the partition is published from the cell content `cell_fingerprint` of map
        `map_fingerprint`. A partition published before manifests named their cell's content is
        current only in a store of that very map."""
        try:
            published = self.manifest(cell, level).get("cell_fingerprint")
        except (PartitionNotFound, json.JSONDecodeError, AttributeError):
            return False
        if published is None:
            return self.info.map_fingerprint == map_fingerprint
        return published == cell_fingerprint

    def manifest(self, cell: str, level: int | str) -> dict:
        path = f"{partition_dir(cell, level)}/{MANIFEST_FILE}"
        try:
            return self.storage.read_json(path)
        except FileNotFoundError:
            raise PartitionNotFound(f"{self.url}: no committed partition for cell {cell!r} level {level} "
                                    f"({path} not found)") from None

    def load_table(self, cell: str, level: int | str, columns: list[str] | None = None,
                   image_ids: list[int] | None = None) -> pa.Table:
        """The committed rows of a partition, each file checked against the manifest (size, CRC32)
        before it is parsed; optionally only the observations of some reference images."""
        parts = self.manifest(cell, level)["files"]
        aggregated = self.info.aggregated and level != SPARSE_LEVEL
        if not parts:
            if level == SPARSE_LEVEL:
                table = sparse_schema(self.info.sparse_dim).empty_table()
            else:
                table = (aggregated_schema if aggregated else observation_schema)(self.info.channels_of(level)).empty_table()
            return table.select(columns) if columns else table
        if image_ids is not None and aggregated:
            raise ValueError(f"{self.url}: an aggregated store has no per-image rows to select")
        return self._read_parts(parts, columns, image_ids)

    def _read_parts(self, parts: list[dict], columns: list[str] | None = None,
                    image_ids: list[int] | None = None) -> pa.Table:
        contents = self._checked_contents(parts)
        read = columns if columns is None or image_ids is None else [*dict.fromkeys([*columns, "image_id"])]
        # ParquetFile.read: pq.read_table imports pandas. One thread: an actor has one CPU, and
        # Arrow's pool costs more than it saves on files of a few MB.
        table = pa.concat_tables([pq.ParquetFile(pa.BufferReader(contents[part["path"]])).read(
            columns=read, use_threads=False) for part in parts])
        if image_ids is not None:
            table = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(image_ids, pa.int32())))
        return table.select(columns) if columns is not None else table

    def _checked_contents(self, parts: list[dict]) -> dict[str, bytes]:
        """The bytes of a partition's files (one concurrent read), refused unless each matches its
        manifest entry in size and CRC32."""
        paths = [part["path"] for part in parts]
        try:
            contents = self.storage.get_many(paths)
        except FileNotFoundError:
            missing = next(path for path in paths if not self.storage.exists(path))
            raise self._damaged(missing, "file missing") from None
        for part in parts:
            data = contents[part["path"]]
            if len(data) != part["bytes"]:
                raise self._damaged(part["path"], f"{len(data)} bytes, the manifest says {part['bytes']}")
            if part.get("crc32") and crc32_hex(data) != part["crc32"]:
                raise self._damaged(part["path"], "checksum differs from the manifest")
        return contents

    def _damaged(self, path: str, reason: str) -> DamagedPartition:
        return DamagedPartition(f"store damaged: {self.url}/{path}: {reason} (rerun `pixloc features` to repair)")

    def damaged_partitions(self, partitions: list[tuple[str, int | str]], checksums: bool = False
                           ) -> dict[tuple[str, int | str], str]:
        """(cell, level) -> why, for the published partitions among `partitions` whose manifest is
        unreadable or whose files are missing or of another size (one listing per partition);
        with `checksums`, also those whose files' CRC32 differs (every file read)."""
        damaged = {}
        for cell, level in partitions:
            if not self.is_published(cell, level):
                continue
            try:
                parts = self.manifest(cell, level)["files"]
                if checksums:
                    self._checked_contents(parts)
                    continue
                sizes = self.storage.file_sizes(partition_dir(cell, level))
                for part in parts:
                    if part["path"] not in sizes:
                        raise self._damaged(part["path"], "file missing")
                    if sizes[part["path"]] != part["bytes"]:
                        raise self._damaged(part["path"], f"{sizes[part['path']]} bytes, the manifest says {part['bytes']}")
            except (DamagedPartition, json.JSONDecodeError, KeyError, TypeError) as error:
                damaged[cell, level] = str(error)
        return damaged

    def load_cell(self, cell: str, level: int | str, image_ids: list[int] | None = None) -> ReferenceLevel:
        """Points (N, 3) float64, features (N, C) float32 and confidence (N,) of one partition;
        optionally only the observations of some reference images."""
        return _reference_level(self.load_table(cell, level, REFERENCE_COLUMNS, image_ids))

    def load_cell_with_image_ids(self, cell: str, level: int | str) -> tuple[ReferenceLevel, np.ndarray | None]:
        """`load_cell` and, in the same read, the observing reference image of each row (N,)
        int32; None for an aggregated store, whose rows merge several images."""
        if self.info.aggregated:
            return self.load_cell(cell, level), None
        table = self.load_table(cell, level, [*REFERENCE_COLUMNS, "image_id"])
        return _reference_level(table), column_numpy(table.column("image_id"))

    def load_sparse(self, cell: str) -> SparsePoints:
        """The sparse points of a cell, one entry per 3D point with its observing images."""
        if not self.info.sparse_keypoints:
            raise PartitionNotFound(f"{self.url}: the store has no sparse partitions (written before they "
                                    "existed: rerun `pixloc features` into a new store)")
        table = self.load_table(cell, SPARSE_LEVEL)
        return SparsePoints.from_observations(
            column_numpy(table.column("point3D_id")), column_numpy(table.column("image_id")),
            column_vectors(table.column("xyz"), XYZ_DTYPE), column_vectors(table.column("descriptor"), FEATURE_DTYPE))

    def verify(self, cell: str, level: int | str) -> None:
        """Check that a partition's files have the row counts and checksums its manifest records."""
        for part in self.manifest(cell, level)["files"]:
            data = self._checked_contents([part])[part["path"]]
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise self._damaged(part["path"], "checksum differs from the manifest")
            rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
            if rows != part["rows"]:
                raise ValueError(f"{self.url}/{part['path']}: {rows} rows, the manifest says {part['rows']}")


class PartitionPublisher:
    """Tracks which images of each cell are still missing and publishes a cell's partitions (every
    level, dense and sparse) once none is, each named after the cell's fingerprint in the map."""

    def __init__(self, store: FeatureStore, cells: dict[str, list[int]], fingerprints: dict[str, str],
                 map_fingerprint: str):
        self.store = store
        self.fingerprints = fingerprints
        self.map_fingerprint = map_fingerprint
        self.missing = {cell: set(image_ids) for cell, image_ids in cells.items()}
        self.parts: dict[tuple[str, int | str], list[PartFile]] = defaultdict(list)
        self.committed: set[int] = set()
        self.published = 0

    def record(self, commit: Commit) -> list[str]:
        """Note a committed batch; returns the cells that it completed."""
        for part in commit.parts:
            self.parts[part.cell, part.level].append(part)
        committed = set(commit.image_ids)
        self.committed |= committed
        completed = []
        for cell, missing in self.missing.items():
            if missing & committed:
                missing -= committed
                if not missing:
                    completed.append(cell)
        return completed

    def add(self, commit: Commit) -> None:
        """A batch just committed: publish the cells it completed."""
        for cell in self.record(commit):
            self.publish(cell)

    def publish(self, cell: str, levels: list[int | str] | None = None) -> None:
        for level in self.store.info.levels() if levels is None else levels:
            self.store.publish(cell, level, self.parts[cell, level], self.fingerprints[cell])
        self.published += 1

    def is_current(self, cell: str, level: int | str) -> bool:
        return self.store.is_current(cell, level, self.fingerprints[cell], self.map_fingerprint)

    def publish_unpublished(self) -> None:
        """Complete cells of an earlier run that was stopped before publishing all their levels
        (the part files of those it published are gone: they live on in the merged files)."""
        for cell, missing in self.missing.items():
            unpublished = [level for level in self.store.info.levels() if not self.is_current(cell, level)]
            if not missing and unpublished:
                self.publish(cell, unpublished)
