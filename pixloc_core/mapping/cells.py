"""One cell of a map built cell by cell: its posed images (core plus halo) triangulated alone.

    MAP/mapping/cells/<cell>/skeleton/   COLMAP model: the cell's cameras and posed images
    MAP/mapping/cells/<cell>/points.npz  its 3D points as `merge.CellPoints`: written last, it marks
                                         the cell done (a rerun skips it)
    MAP/mapping/cells/<cell>/failed.txt  one line: why the cell has no points (too few images, ...)

The cell reads only its own images' feature and match files (feature_files.py). MAP may be an
s3:// prefix: pycolmap's files are then written in a local folder and uploaded, and read back
through a temporary local folder.
"""
from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pycolmap

from .. import files, model_files
from ..files import Location
from . import triangulation
from .feature_files import FeatureFiles, MatchFiles
from .merge import CellPoints

logger = logging.getLogger(__name__)
T = TypeVar("T")

CELLS_DIR, SKELETON_DIR, POINTS_FILE, FAILED_FILE = "cells", "skeleton", "points.npz", "failed.txt"
# A step whose outcome per cell is a COLMAP model (submodels.py, cell_adjustment.py): the model,
# then its summary.json, written last: it marks the cell done.
MODEL_DIR, SUMMARY_FILE = "model", "summary.json"

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


def cell_dir(root: Location, cell: str) -> Location:
    return files.location(root) / CELLS_DIR / cell


def is_done(root: Location, cell: str) -> bool:
    return files.is_file(cell_dir(root, cell) / POINTS_FILE) or files.is_file(cell_dir(root, cell) / FAILED_FILE)


def write_model(model: pycolmap.Reconstruction, place: Location) -> None:
    """A COLMAP model into the folder `place`, local or remote."""
    local, publish = files.output_folder(place)
    local.mkdir(parents=True, exist_ok=True)
    model.write(local)
    publish()


def read_model(place: Location) -> pycolmap.Reconstruction:
    """The COLMAP model (binary or text) in the folder `place`: a user's imported model, a cell's or
    submodel's."""
    names = files.list_files(place)
    if not {"images.bin", "images.txt"} & set(names):
        raise FileNotFoundError(f"{place}: not a COLMAP model (no images.bin or images.txt)")
    return _read_model_folder(place, names, pycolmap.Reconstruction)


def read_reference(place: Location) -> pycolmap.Reconstruction:
    """The cameras and posed images of a user's reference model (binary or text) in the folder
    `place`, without 2D or 3D points (model_files.read_posed_images): a remote one fetches only
    its cameras and images files."""
    names = files.list_files(place)
    wanted = [name for name in ("cameras.bin", "images.bin") if name in names] or [
        name for name in ("cameras.txt", "images.txt") if name in names]
    if len(wanted) < 2:
        raise FileNotFoundError(f"{place}: not a COLMAP model (no cameras and images files)")
    return _read_model_folder(place, wanted, model_files.read_posed_images)


def _read_model_folder(place: Location, names: list[str], read: Callable[[Path], T]) -> T:
    """read(folder) of the model folder `place`, a remote one through a temporary folder holding
    its files `names`, not the cache of `files.local_copy`: caching every cell's model would fill
    the workers' disks."""
    if not files.is_remote(place):
        return read(Path(place))
    with tempfile.TemporaryDirectory(prefix="pixloc_model_") as local:
        return read(files.local_files(place, names, Path(local)))


def write_skeleton(root: Location, cell: str, reference: pycolmap.Reconstruction, image_names: list[str],
                   reference_images: Mapping[str, pycolmap.Image]) -> None:
    """The cell's input: the cameras and posed images of `reference` among `image_names`
    (`reference_images`: its triangulation.images_by_name)."""
    write_model(triangulation.skeleton_from_reference(reference, image_names, reference_images),
                cell_dir(root, cell) / SKELETON_DIR)


def read_failure(directory: Location, failed_file: str = FAILED_FILE) -> str | None:
    """The cell's one-line failure, None when it has none."""
    return files.read_text(directory / failed_file).strip() if files.is_file(directory / failed_file) else None


def read_result(root: Location, cell: str) -> CellResult:
    directory = cell_dir(root, cell)
    failure = read_failure(directory)
    if failure:
        return CellResult(cell, 0, failure=failure)
    return CellResult(cell, 0, load_points(root, cell).num_points)


def load_points(root: Location, cell: str) -> CellPoints:
    with io.BytesIO(files.read_bytes(cell_dir(root, cell) / POINTS_FILE)) as data:
        return CellPoints.load(data)


def model_done(directory: Location) -> bool:
    """Whether the cell's model step has an outcome in `directory`: its model or its failure."""
    return files.is_file(directory / MODEL_DIR / SUMMARY_FILE) or files.is_file(directory / FAILED_FILE)


def finish_with_model(directory: Location, model: pycolmap.Reconstruction, result: CellResult,
                      **summary) -> CellResult:
    """Writes the cell's model, then its summary (the result's images and points, and `summary`)."""
    write_model(model, directory / MODEL_DIR)
    files.write_text(directory / MODEL_DIR / SUMMARY_FILE,
                     json.dumps({"images": result.num_images, "points": result.num_points, **summary}))
    return result


def read_model_result(directory: Location, cell: str) -> CellResult:
    """The outcome a model step left in `directory` (finish_with_model, or its failure)."""
    failure = read_failure(directory)
    if failure:
        return CellResult(cell, 0, failure=failure)
    summary = json.loads(files.read_text(directory / MODEL_DIR / SUMMARY_FILE))
    return CellResult(cell, summary["images"], summary["points"])


def record_failure(directory: Location, failed_file: str, result: CellResult) -> CellResult:
    """Writes the cell's one-line failure, whole or not at all (files.write_text)."""
    files.write_text(directory / failed_file, result.failure + "\n")
    return result


def _finish(directory: Location, result: CellResult, points: CellPoints | None) -> CellResult:
    """Writes the cell's outcome, whole or not at all: done or not, never half."""
    if points is None:
        return record_failure(directory, FAILED_FILE, result)
    with io.BytesIO() as data:
        points.save(data)
        files.write_bytes(directory / POINTS_FILE, data.getvalue())
    return result


def main(root: Location, cell: str, image_dir: Location, conf: dict | None = None,
         features_root: Location | None = None) -> CellResult:
    """Triangulates the cell whose skeleton `write_skeleton` wrote under `root` (MAP/mapping, or
    the folder of an update), with the matches under `root` and the features under
    `features_root` (default: `root`)."""
    conf = {**default_conf, **(conf or {})}
    directory = cell_dir(root, cell)
    skeleton = read_model(directory / SKELETON_DIR)
    names = [image.name for image in skeleton.images.values()]
    found = FeatureFiles(features_root or root).subset(names)
    # Only this cell's images, read once: the steps below look each image up many times.
    features = {name: found[name] for name in names if name in found}
    present = sorted(features)
    if len(present) < conf["min_images"]:
        return _finish(directory, CellResult(cell, len(present), failure=(
            f"cell {cell}: {len(present)} image(s) with features, a cell needs {conf['min_images']}")), None)
    skeleton = triangulation.skeleton_from_reference(skeleton, set(present))
    matches = MatchFiles(root).among(present)
    try:
        with tempfile.TemporaryDirectory(prefix=f"pixloc_cell_{cell}_") as work_dir:
            # pycolmap reads the images from the disk, for the points' colours only
            images = files.local_files(image_dir, present, Path(work_dir) / "images")
            reconstruction = triangulation.main(skeleton, features, matches, images, Path(work_dir),
                                                conf["triangulation"])
    except ValueError as error:
        return _finish(directory, CellResult(cell, len(present), failure=f"cell {cell}: {error}"), None)
    points = CellPoints.from_reconstruction(reconstruction)
    return _finish(directory, CellResult(cell, len(present), points.num_points), points)
