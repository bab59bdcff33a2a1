"""One cell of a map built cell by cell: its posed images (core plus halo) triangulated alone.

    MAP/mapping/cells/<cell>/skeleton/   COLMAP model: the cell's cameras and posed images
    MAP/mapping/cells/<cell>/points.npz  its 3D points as `merge.CellPoints`: written last, it marks
                                         the cell done (a rerun skips it)
    MAP/mapping/cells/<cell>/failed.txt  one line: why the cell has no points (too few images, ...)

The cell reads only its own images' feature and match files (feature_files.py).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pycolmap

from . import triangulation
from .feature_files import FeatureFiles, MatchFiles
from .merge import CellPoints

logger = logging.getLogger(__name__)

CELLS_DIR, SKELETON_DIR, POINTS_FILE, FAILED_FILE = "cells", "skeleton", "points.npz", "failed.txt"

default_conf = {
    "min_images": 2,
    "triangulation": triangulation.default_conf,
}


@dataclass
class CellResult:
    cell: str
    num_images: int
    num_points: int = 0
    failure: str | None = None  # one line: why the cell has no points


def cell_dir(root: Path, cell: str) -> Path:
    return Path(root) / CELLS_DIR / cell


def is_done(root: Path, cell: str) -> bool:
    return (cell_dir(root, cell) / POINTS_FILE).is_file() or (cell_dir(root, cell) / FAILED_FILE).is_file()


def write_skeleton(root: Path, cell: str, reference: pycolmap.Reconstruction, image_names: list[str]) -> None:
    """The cell's input: the cameras and posed images of `reference` among `image_names`."""
    skeleton = triangulation.skeleton_from_reference(reference, set(image_names))
    path = cell_dir(root, cell) / SKELETON_DIR
    path.mkdir(parents=True, exist_ok=True)
    skeleton.write(path)


def read_result(root: Path, cell: str) -> CellResult:
    directory = cell_dir(root, cell)
    if (directory / FAILED_FILE).is_file():
        return CellResult(cell, 0, failure=(directory / FAILED_FILE).read_text().strip())
    return CellResult(cell, 0, CellPoints.load(directory / POINTS_FILE).num_points)


def record_failure(directory: Path, failed_file: str, result: CellResult) -> CellResult:
    """Writes the cell's one-line failure under a temporary name, then renames it: never half."""
    temporary = directory / f".{failed_file}.tmp"
    temporary.write_text(result.failure + "\n")
    os.replace(temporary, directory / failed_file)
    return result


def _finish(directory: Path, result: CellResult, points: CellPoints | None) -> CellResult:
    """Writes the cell's outcome under a temporary name, then renames it: done or not, never half."""
    if points is None:
        return record_failure(directory, FAILED_FILE, result)
    temporary = directory / f".{POINTS_FILE}.tmp.npz"
    points.save(temporary)
    os.replace(temporary, directory / POINTS_FILE)
    return result


def main(root: Path, cell: str, image_dir: Path, conf: dict | None = None,
         features_root: Path | None = None) -> CellResult:
    """Triangulates the cell whose skeleton `write_skeleton` wrote under `root` (MAP/mapping, or
    the folder of an update), with the matches under `root` and the features under
    `features_root` (default: `root`)."""
    conf = {**default_conf, **(conf or {})}
    directory = cell_dir(root, cell)
    skeleton = pycolmap.Reconstruction()
    skeleton.read(directory / SKELETON_DIR)
    names = [image.name for image in skeleton.images.values()]
    files = FeatureFiles(features_root or root).subset(names)
    # Only this cell's images, read once: the steps below look each image up many times.
    features = {name: files[name] for name in names if name in files}
    present = sorted(features)
    if len(present) < conf["min_images"]:
        return _finish(directory, CellResult(cell, len(present), failure=(
            f"cell {cell}: {len(present)} image(s) with features, a cell needs {conf['min_images']}")), None)
    skeleton = triangulation.skeleton_from_reference(skeleton, set(present))
    matches = MatchFiles(root).among(present)
    try:
        with tempfile.TemporaryDirectory(prefix=f"pixloc_cell_{cell}_") as work_dir:
            reconstruction = triangulation.main(skeleton, features, matches, image_dir, Path(work_dir),
                                                conf["triangulation"])
    except ValueError as error:
        return _finish(directory, CellResult(cell, len(present), failure=f"cell {cell}: {error}"), None)
    points = CellPoints.from_reconstruction(reconstruction)
    return _finish(directory, CellResult(cell, len(present), points.num_points), points)
