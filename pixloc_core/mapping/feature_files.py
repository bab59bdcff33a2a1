"""Per-image feature and match files of a map being built, so that no process holds them all.

    MAP/mapping/features/<image name>.parquet   keypoints (N, 4) float32, descriptors (N, D) float16,
                                                the image size and the descriptors' own dtype (uint8
                                                for SIFT) in the file's metadata
    MAP/mapping/matches/<image name>.parquet    one row per pair (this image, name1 > this image):
                                                name1, idx0 (K,) int32, idx1 (K,) int32

MAP is a local folder or an s3:// prefix (`pixloc_core.files`): on a cluster without a shared
disk the work files live in the bucket, where every node's tasks read and write them. Each file is
complete or absent (a local file is written under a temporary name, then renamed; an S3 object
appears once its PUT completes), so a killed job leaves nothing half-written and a rerun skips the
images whose files exist. `FeatureFiles` and `MatchFiles` read lazily, one image at a time: the
mapping steps take them where they took the in-memory dicts.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import files
from ..files import Location
from .sift import Features

FEATURES_DIR, MATCHES_DIR = "features", "matches"


def _fixed_size_list(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    """(N, K) -> a fixed-size list column of K values per row."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type),
                                             values.shape[1])


def _to_numpy(column: pa.ChunkedArray, width: int, dtype: type) -> np.ndarray:
    """Fixed-size list column -> (N, width) array."""
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False) if len(column) else np.empty(0)
    return flat.astype(dtype, copy=False).reshape(-1, width)


def _write(table: pa.Table, place: Location) -> None:
    """The file appears complete or not at all (files.write_bytes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    files.write_bytes(place, sink.getvalue().to_pybytes())


def _read(place: Location, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(files.read_arrow_buffer(place)), columns=columns)


class FeatureFiles(Mapping):
    """image name -> Features, read from its file on access."""

    def __init__(self, root: Location, names: Iterable[str] | None = None):
        self.root = files.location(root) / FEATURES_DIR
        # None: every image that has a file (listed on demand); otherwise the images of one subset.
        self._names = None if names is None else sorted(names)

    def path(self, name: str) -> Location:
        return self.root / f"{name}.parquet"

    def has(self, name: str) -> bool:
        return files.is_file(self.path(name))

    def write(self, name: str, features: Features) -> None:
        descriptors = np.asarray(features.descriptors, dtype=np.float16)
        table = pa.Table.from_arrays(
            [_fixed_size_list(np.asarray(features.keypoints, np.float32), pa.float32()),
             _fixed_size_list(descriptors, pa.float16())],
            names=["keypoints", "descriptors"])
        width, height = features.image_size
        table = table.replace_schema_metadata({"width": str(width), "height": str(height),
                                               "descriptor_dim": str(descriptors.shape[1]),
                                               "descriptor_dtype": np.dtype(features.descriptors.dtype).name})
        _write(table, self.path(name))

    def image_size(self, name: str) -> tuple[int, int]:
        """(width, height) from the file's metadata, without reading its columns."""
        metadata = pq.read_schema(pa.BufferReader(files.read_arrow_buffer(self.path(name)))).metadata
        return int(metadata[b"width"]), int(metadata[b"height"])

    def keypoints(self, name: str) -> np.ndarray:
        """(N, 2) float64 keypoint positions only, without reading the descriptors."""
        # A copy, not a view of the (N, 4) rows: a map builder holds every image's keypoints.
        return np.ascontiguousarray(_to_numpy(_read(self.path(name), columns=["keypoints"]).column("keypoints"), 4,
                                              np.float64)[:, :2])

    def __getitem__(self, name: str) -> Features:
        if self._names is not None and name not in self._names:
            raise KeyError(name)
        try:
            table = _read(self.path(name))
        except FileNotFoundError:
            raise KeyError(name) from None
        metadata = table.schema.metadata
        descriptors = _to_numpy(table.column("descriptors"), int(metadata[b"descriptor_dim"]), np.float32)
        if metadata.get(b"descriptor_dtype", b"uint8") == b"uint8":
            descriptors = np.rint(descriptors).astype(np.uint8)  # SIFT's integers in [0, 255]: float16 holds them exactly
        else:
            descriptors = descriptors.astype(np.float16)
        return Features(_to_numpy(table.column("keypoints"), 4, np.float32), descriptors,
                        (int(metadata[b"width"]), int(metadata[b"height"])))

    def _all_names(self) -> list[str]:
        if self._names is not None:
            return [name for name in self._names if self.has(name)]
        try:
            stored = files.list_files(self.root)
        except FileNotFoundError:
            return []
        return [name[:-len(".parquet")] for name in stored if name.endswith(".parquet")]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all_names())

    def __len__(self) -> int:
        return len(self._all_names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (self._names is None or name in self._names) and self.has(name)

    def subset(self, names: Iterable[str]) -> FeatureFiles:
        return FeatureFiles(self.root.parent, names)


class MatchFiles:
    """Matches of the pairs (name0, name1), name0 < name1, stored in name0's file."""

    def __init__(self, root: Location):
        self.root = files.location(root) / MATCHES_DIR

    def path(self, name0: str) -> Location:
        return self.root / f"{name0}.parquet"

    def has(self, name0: str) -> bool:
        return files.is_file(self.path(name0))

    def write(self, name0: str, matches: dict[str, np.ndarray]) -> None:
        """matches: name1 -> (K, 2) keypoint index pairs; every pair of name0, even without matches."""
        names1 = sorted(matches)
        table = pa.table({
            "name1": pa.array(names1, pa.string()),
            "idx0": pa.array([matches[name][:, 0].astype(np.int32) for name in names1], pa.list_(pa.int32())),
            "idx1": pa.array([matches[name][:, 1].astype(np.int32) for name in names1], pa.list_(pa.int32())),
        })
        _write(table, self.path(name0))

    def read(self, name0: str) -> dict[str, np.ndarray]:
        table = _read(self.path(name0))
        return {name1: np.stack([np.asarray(idx0, np.int64), np.asarray(idx1, np.int64)], axis=1).reshape(-1, 2)
                for name1, idx0, idx1 in zip(table.column("name1").to_pylist(), table.column("idx0").to_pylist(),
                                             table.column("idx1").to_pylist())}

    def among(self, names: Iterable[str]) -> dict[tuple[str, str], np.ndarray]:
        """The matches of every stored pair with both images in `names`: reads only their files."""
        names = set(names)
        matches = {}
        for name0 in sorted(names):
            if self.has(name0):
                matches.update({(name0, name1): pair for name1, pair in self.read(name0).items() if name1 in names})
        return matches


def group_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """name0 -> its partners name1 (pairs ordered so that name0 < name1, the file that holds them)."""
    grouped: dict[str, list[str]] = {}
    for name0, name1 in pairs:
        first, second = sorted((name0, name1))
        grouped.setdefault(first, []).append(second)
    return {name0: sorted(set(partners)) for name0, partners in sorted(grouped.items())}
