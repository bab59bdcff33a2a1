"""The results directory of `pixloc localize` / `pixloc refine`, written incrementally.

    OUT/parts/part-<n>.parquet   rows flushed while the job runs: every `flush_every` rows or
                                 `flush_interval_s`, and when the driver fails, so a failing driver
                                 loses only the queries in flight (a SIGKILL also the unflushed rows)
    OUT/results.parquet          all rows, one per query, written atomically when the job ends
    OUT/poses.txt                the successful poses, `name qw qx qy qz tx ty tz`

A rerun with `--resume` reads both (the parts of a crashed run, the table of a finished one) and
skips the queries already answered; when it ends the parts are folded into results.parquet.
Earlier results are never lost by accident: a folder that holds some is refused unless the job
resumes or overwrites them, and `--overwrite` moves them to OUT/.replaced/, deleted only once the
new results are written. Every file is written under a temporary name and renamed into place.
OUT is a local folder or an s3:// prefix (`pixloc_core.files`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixloc_core import files
from pixloc_core.files import Location
from pixloc_core.io import write_poses

RESULTS_FILE = "results.parquet"
POSES_FILE = "poses.txt"
PARTS_DIR = "parts"
REPLACED_DIR = ".replaced"
STAGES = ("read", "cnn", "sparse", "load", "align")  # timing columns `<stage>_ms`

SCHEMA = pa.schema([
    ("name", pa.string()),
    ("success", pa.bool_()),
    ("qvec", pa.list_(pa.float64(), 4)),  # world-to-camera (w, x, y, z); null without a pose
    ("tvec", pa.list_(pa.float64(), 3)),
    ("cost", pa.float64()),
    ("num_points", pa.int64()),
    ("method", pa.string()),  # dense, sparse, sparse+dense or refine
    ("hypothesis", pa.string()),  # the winning initial pose: sparse, ref:<image>, input
    ("cell", pa.string()),
    ("prior_xyz", pa.list_(pa.float64(), 3)),  # map frame; null without a prior
    ("position_std_m", pa.float64()),
    ("rotation_std_deg", pa.float64()),
    ("error", pa.string()),  # why it failed; empty on success
    ("retryable", pa.bool_()),  # failed because of the infrastructure: --resume retries it
    ("note", pa.string()),  # what planning adjusted, e.g. a rescaled camera
    # The values the pose was verified on (pixloc_core.localize.Checks; NaN/0 where not applicable).
    ("prior_distance_m", pa.float64()),  # horizontal, between the prior and the estimated camera centre
    ("prior_sigma_m", pa.float64()),
    ("inliers", pa.int64()),  # PnP inliers and 2D-3D matches, when the pose comes from PnP
    ("matches", pa.int64()),
    ("inlier_ratio", pa.float64()),
    ("pnp_position_std_m", pa.float64()),
    ("rival_inliers", pa.int64()),  # inliers of the best other PnP pose (ambiguity)
    ("pnp_split_shift_m", pa.float64()),  # between the PnP poses of the image's left and right halves
    ("pnp_leave_one_out_std_m", pa.float64()),  # the PnP std without the inlier it hinges on most
    ("refinement_shift_m", pa.float64()),  # how far the featuremetric refinement moved the PnP pose
    ("refinement_turn_deg", pa.float64()),
    # an aligned pose against the query's own keypoints (extractors that detect them)
    ("keypoint_matches", pa.int64()),
    ("keypoint_support", pa.int64()),
    ("keypoint_support_ratio", pa.float64()),
    *[(f"{stage}_ms", pa.float64()) for stage in STAGES],
    # measured peak resident memory (ru_maxrss) so far of the query worker that made the row and
    # of the shard actor that answered it, in MiB
    ("worker_peak_rss_mb", pa.float64()),
    ("shard_peak_rss_mb", pa.float64()),
])


class ExistingResults(ValueError):
    """The output folder holds results of an earlier run, and the job was not told what to do with them."""


def _write_atomically(table: pa.Table, path: Location) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    files.write_bytes(path, buffer.getvalue().to_pybytes())


def _read_table(path: Location, schema: pa.Schema | None = SCHEMA) -> pa.Table:
    return pq.read_table(pa.BufferReader(files.read_arrow_buffer(path)), schema=schema)


def _part_names(out_dir: Location) -> list[str]:
    """Names of the flushed part files, in order."""
    try:
        names = files.list_files(out_dir / PARTS_DIR)
    except FileNotFoundError:
        return []
    return [name for name in names if name.startswith("part-") and name.endswith(".parquet")]


def result_files(out_dir: Location) -> list[Location]:
    """The files of earlier results in a results folder (final files and flushed parts)."""
    out_dir = files.location(out_dir)
    return [place for place in (out_dir / RESULTS_FILE, out_dir / POSES_FILE) if files.is_file(place)] + \
        [out_dir / PARTS_DIR / name for name in _part_names(out_dir)]


def check_output(out_dir: Location, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to start a job into a folder with earlier results unless told to resume or overwrite."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if not resume and not overwrite and result_files(out_dir):
        raise ExistingResults(f"{out_dir}: holds results of an earlier run; pass --resume to continue them "
                              "or --overwrite to replace them")


def rows_to_table(rows: list[dict]) -> pa.Table:
    columns = {field.name: [row.get(field.name) for row in rows] for field in SCHEMA}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def read_results(path: Location) -> pa.Table:
    """All rows of a results directory (results.parquet and unfolded parts) or of one Parquet
    file; when a query appears more than once the last row counts."""
    path = files.location(path)
    if files.is_file(path):
        return _read_table(path, schema=None)
    if not files.exists(path):
        raise FileNotFoundError(f"{path}: no results (neither a results directory nor a Parquet file)")
    paths = [path / RESULTS_FILE] if files.is_file(path / RESULTS_FILE) else []
    paths += [path / PARTS_DIR / name for name in _part_names(path)]
    if not paths:
        return SCHEMA.empty_table()
    table = pa.concat_tables([_read_table(part) for part in paths])
    # keep the last row of each name
    names = table.column("name").to_pylist()
    last = {name: index for index, name in enumerate(names)}
    return table.take(pa.array(sorted(last.values()), pa.int64()))


def completed_names(out_dir: Location) -> pa.Array:
    """The queries a resumed job skips: those with a row in the results so far, except the ones
    that failed because of the infrastructure (retryable); as an Arrow column, for 10^6 of them."""
    table = read_results(out_dir).select(["name", "retryable"])
    return table.filter(pc.invert(pc.fill_null(table["retryable"], False)))["name"].combine_chunks()


def completed_queries(out_dir: Location) -> set[str]:
    """`completed_names` as a set."""
    return set(completed_names(out_dir).to_pylist())


def successful_poses(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (qvec, tvec) of the successful rows, as `io.read_poses` returns them."""
    table = table.filter(pc.field("success"))
    return {name: (np.array(qvec), np.array(tvec)) for name, qvec, tvec in zip(
        table.column("name").to_pylist(), table.column("qvec").to_pylist(), table.column("tvec").to_pylist())}


class ResultsWriter:
    """Collects rows and flushes them as part files; `close` folds everything into the final files.
    The job has called `check_output` before reading its inputs: a folder with earlier results is
    refused before any planning, and `overwrite` here only keeps them aside."""

    def __init__(self, out_dir: Location, flush_every: int = 8, resume: bool = False, flush_interval_s: float = 10.0,
                 overwrite: bool = False):
        self.out_dir = files.location(out_dir)
        self.parts_dir = self.out_dir / PARTS_DIR
        self.flush_every, self.flush_interval_s = flush_every, flush_interval_s
        self.last_flush = time.monotonic()
        if isinstance(self.out_dir, Path):
            self.parts_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            # Kept aside, not deleted, until the new results replace them (see close).
            for earlier in result_files(self.out_dir):
                files.move(earlier, self.out_dir / REPLACED_DIR / f"{earlier.parent.name}-{earlier.name}")
        parts = _part_names(self.out_dir)
        self.buffer: list[dict] = []
        # part numbers continue across resumed runs, so no file is ever overwritten
        self.next_part = 1 + max((int(name.removeprefix("part-").removesuffix(".parquet")) for name in parts),
                                 default=-1)

    def completed(self) -> set[str]:
        return completed_queries(self.out_dir)

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.flush_every or time.monotonic() - self.last_flush > self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        _write_atomically(rows_to_table(self.buffer), self.parts_dir / f"part-{self.next_part:06d}.parquet")
        self.next_part += 1
        self.buffer = []

    def close(self) -> pa.Table:
        """Write results.parquet and poses.txt from every row so far, then drop the parts."""
        self.flush()
        table = read_results(self.out_dir).sort_by("name")
        _write_atomically(table, self.out_dir / RESULTS_FILE)
        write_poses(self.out_dir / POSES_FILE, successful_poses(table))
        for name in _part_names(self.out_dir):
            files.delete(self.parts_dir / name)
        if isinstance(self.parts_dir, Path):
            self.parts_dir.rmdir()
        files.delete_folder(self.out_dir / REPLACED_DIR)
        return table
