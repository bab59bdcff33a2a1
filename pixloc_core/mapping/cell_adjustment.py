"""Bundle adjustment of a merged map, cell by cell: the poses and points of each shard cell are
refined in a task of their own, against the cells around it that are already settled.

A point belongs to the cell that owns most of the images observing it (ties: the first cell in
name order). A cell's part of the model holds its own images and points, which the adjustment
refines, and, held constant, the images of settled cells that observe its points and the points
of settled cells its images observe. Every pose and every point is refined in one part at most,
so the parts' results combine without conflict, and a task holds one cell and its border whatever
the size of the map. The cameras stay as they are: they are shared between cells (one per device)
and are calibrated afterwards on the whole map, the poses fixed (submodels.py).

Which cells are settled: a cell adjusted against a border that is itself wrong bends to fit it (on
a test street, a right cell moved 0.4-1 m to fit a neighbour whose poses were 0.3 m off). The
cell with the most images (the frame the others were aligned to, in effect) is settled as merged:
its submodel was bundle adjusted when it was reconstructed. The others are adjusted in rounds
(`rounds`), ring by ring around it, each ring in four groups by the parity of the grid
coordinates, so that no two cells of a round touch: each adjusts against the settled cells of the
inner rings and of the earlier groups, and ignores those not yet adjusted.

    MAP/mapping/adjustment/<cell>/input/      the cell's part of the merged model, and part.json:
                                              the ids of its own images and points, the part's digest
    MAP/mapping/adjustment/<cell>/model/      the adjusted part, and summary.json, written last: it
                                              marks the cell done
    MAP/mapping/adjustment/<cell>/failed.txt  one line: why the part was not adjusted (kept as merged)

A rerun keeps a cell's part and result when its part is the same as before (the merge is
deterministic: the same submodels give the same parts), without writing it again; a changed part
is written again and adjusted again.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap

from .. import files
from ..files import Location
from ..map_io import model_fingerprint
from ..shards import cell_coordinates
from .cells import (FAILED_FILE, MODEL_DIR, SUMMARY_FILE, CellResult, finish_with_model, model_done, read_model,
                    read_model_result, record_failure)
from .merge import CellPoints

logger = logging.getLogger(__name__)

ADJUSTMENT_DIR, INPUT_DIR, PART_FILE = "adjustment", "input", "part.json"

default_conf = {
    # A track joined across submodels may still hold an observation that fits badly.
    "loss": "SOFT_L1",
}


def cell_dir(root: Location, cell: str) -> Location:
    return files.location(root) / ADJUSTMENT_DIR / cell


def is_done(root: Location, cell: str) -> bool:
    return model_done(cell_dir(root, cell))


def read_result(root: Location, cell: str) -> CellResult:
    return read_model_result(cell_dir(root, cell), cell)


def read_own(root: Location, cell: str) -> dict:
    """The ids of the cell's own images and points ("images", "points") in its part."""
    return json.loads(files.read_text(cell_dir(root, cell) / PART_FILE))


def observation_cells(points: CellPoints, image_cell: dict[int, str]) -> tuple[list[str], np.ndarray]:
    """The cells in name order, and (M,) the index in them of each observation's image's cell (-1: none)."""
    cells = sorted(set(image_cell.values()))
    column = {cell: index for index, cell in enumerate(cells)}
    image_column = {image_id: column[cell] for image_id, cell in image_cell.items()}
    return cells, np.array([image_column.get(image_id, -1) for image_id in points.observation_image.tolist()],
                           dtype=np.int64)


def owner_indices(points: CellPoints, observation_cell: np.ndarray, num_cells: int) -> np.ndarray:
    """(P,) the index of each point's cell, the cell owning most of its observing images (ties: the
    first in name order), given its observations' (M,) cell indices (observation_cells); -1 for a
    point no owned image observes."""
    owned = observation_cell >= 0
    votes, count = np.unique(points.observation_point[owned] * num_cells + observation_cell[owned], return_counts=True)
    point, cell = votes // max(num_cells, 1), votes % max(num_cells, 1)  # (V,) each (point, cell) voted
    order = np.lexsort((cell, -count, point))  # per point, the most votes first, then name order
    first = order[np.r_[True, point[order][1:] != point[order][:-1]]] if len(order) else order
    owners = np.full(points.num_points, -1, dtype=np.int64)
    owners[point[first]] = cell[first]
    return owners


@dataclass
class Groups:
    """The indices of an array's entries grouped by their key, to take the entries of a few keys
    without scanning the whole array."""

    order: np.ndarray  # (M,) entry indices, keys ascending (stable)
    sorted_keys: np.ndarray  # (M,) keys[order]

    @classmethod
    def of(cls, keys: np.ndarray) -> Groups:
        order = np.argsort(keys, kind="stable")
        return cls(order, keys[order])

    def entries(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The entries of `keys` (K,), key by key, and (K + 1,) where each key's entries start in them."""
        starts = np.searchsorted(self.sorted_keys, keys)
        ends = np.searchsorted(self.sorted_keys, keys, side="right")
        bounds = np.concatenate([[0], np.cumsum(ends - starts)])
        if not len(keys):
            return np.empty(0, np.int64), bounds
        return np.concatenate([self.order[start:end] for start, end in zip(starts.tolist(), ends.tolist())]), bounds


@dataclass
class Layout:
    """Which cell owns each image and point of the merged model, and the points' observations as
    flat arrays grouped by point and by image: computed once, they hold for every round
    (adjustments move poses and points, never observations), and a cell's part then costs the
    size of the cell, not of the map."""

    points: CellPoints  # the observations (xyz as merged: current positions are the model's)
    point_ids: np.ndarray  # (P,) the ids of the rows of `points`
    cell_index: dict[str, int]  # cell -> its index in name order (the cell indices below)
    cell_images: dict[str, list[int]]  # cell -> the ids of the images it owns, ascending
    point_cell: np.ndarray  # (P,) each point's cell index (owner_indices; -1: none)
    observation_cell: np.ndarray  # (M,) the cell index of each observation's image (-1: none)
    points_by_cell: Groups  # point rows by cell index
    by_point: Groups  # observations by point row
    by_image: Groups  # observations by image id

    @classmethod
    def of(cls, reconstruction: pycolmap.Reconstruction, image_cell: dict[int, str]) -> Layout:
        points = CellPoints.from_reconstruction(reconstruction)
        cells, observation_cell = observation_cells(points, image_cell)
        point_cell = owner_indices(points, observation_cell, len(cells))
        cell_images: dict[str, list[int]] = {cell: [] for cell in cells}
        for image_id in sorted(image_cell):
            cell_images[image_cell[image_id]].append(image_id)
        return cls(points, np.array(sorted(reconstruction.point3D_ids()), dtype=np.int64),
                   {cell: index for index, cell in enumerate(cells)}, cell_images,
                   point_cell, observation_cell, Groups.of(point_cell), Groups.of(points.observation_point),
                   Groups.of(points.observation_image))

    def cell_indices(self, cells: Iterable[str]) -> np.ndarray:
        return np.array([self.cell_index[cell] for cell in cells if cell in self.cell_index], dtype=np.int64)


def anchor_cell(image_cell: dict[int, str]) -> str:
    """The cell settled as merged: the one owning the most images (ties: name order)."""
    counts: dict[str, int] = {}
    for cell in image_cell.values():
        counts[cell] = counts.get(cell, 0) + 1
    return min(counts, key=lambda cell: (-counts[cell], cell))


def rounds(cells: Iterable[str], anchor: str) -> list[list[str]]:
    """The cells other than `anchor` in groups adjusted one after the other (module docstring):
    by ring around the anchor, then by the parity of the grid coordinates."""
    ax, ay = cell_coordinates(anchor)
    groups: dict[tuple[int, int, int], list[str]] = {}
    for cell in sorted(set(cells) - {anchor}):
        ix, iy = cell_coordinates(cell)
        groups.setdefault((max(abs(ix - ax), abs(iy - ay)), ix % 2, iy % 2), []).append(cell)
    return [groups[key] for key in sorted(groups)]


def cell_part(reconstruction: pycolmap.Reconstruction, layout: Layout, cell: str, settled_cells: np.ndarray,
              keypoints: Callable[[str], np.ndarray]) -> tuple[pycolmap.Reconstruction, list[int], list[int]]:
    """The cell's part of the merged model (module docstring), the ids of its own images and of
    its own points in it. settled_cells: the indices (Layout.cell_indices) of the settled cells;
    keypoints: image name -> (N, 2) its 2D points."""
    points = layout.points
    own_images = layout.cell_images.get(cell, [])
    own_rows = layout.points_by_cell.entries(layout.cell_indices([cell]))[0]  # ascending: the grouping is stable
    # The points of settled cells the cell's images see hold its poses.
    held_rows = np.unique(points.observation_point[layout.by_image.entries(np.array(own_images, np.int64))[0]])
    held_rows = held_rows[np.isin(layout.point_cell[held_rows], settled_cells)]
    rows = np.union1d(own_rows, held_rows)
    observations, bounds = layout.by_point.entries(rows)  # the rows' observations, row by row
    by_settled = np.isin(layout.observation_cell[observations], settled_cells)
    image_ids = sorted(set(own_images) | set(points.observation_image[observations[by_settled]].tolist()))
    in_part = np.isin(points.observation_image[observations], image_ids)
    # A point takes part with two views in the part at least (one does not place it).
    row_of = np.repeat(np.arange(len(rows)), np.diff(bounds))  # (observations,) index into rows
    kept = np.bincount(row_of[in_part], minlength=len(rows)) >= 2

    part = pycolmap.Reconstruction()
    for camera_id in sorted({reconstruction.image(image_id).camera_id for image_id in image_ids}):
        part.add_camera_with_trivial_rig(reconstruction.camera(camera_id))
    for image_id in image_ids:
        image = reconstruction.image(image_id)
        part.add_image_with_trivial_frame(
            pycolmap.Image(name=image.name, keypoints=keypoints(image.name), camera_id=image.camera_id,
                           image_id=image_id), image.cam_from_world())
    for index in np.flatnonzero(kept).tolist():
        track, span = pycolmap.Track(), slice(bounds[index], bounds[index + 1])
        for observation in observations[span][in_part[span]].tolist():
            track.add_element(int(points.observation_image[observation]), int(points.observation_point2D[observation]))
        point_id = int(layout.point_ids[rows[index]])
        merged = reconstruction.point3D(point_id)  # where earlier rounds left it
        part.add_point3D_with_id(point_id, pycolmap.Point3D(xyz=merged.xyz, track=track, color=merged.color))
    own_kept = rows[kept][np.isin(rows[kept], own_rows)]
    return part, own_images, layout.point_ids[own_kept].tolist()


def write_parts(root: Location, reconstruction: pycolmap.Reconstruction, layout: Layout,
                keypoints: Callable[[str], np.ndarray], cells: list[str], settled: set[str]) -> None:
    """The part of each of `cells` under `root` (`settled`: the cells they are adjusted against),
    where it differs from the one already there (whose result is then dropped); each is written to
    a local folder first, for its digest, and copied there only when it differs."""
    kept, settled_cells = 0, layout.cell_indices(settled)
    for cell in cells:
        part, own_images, own_points = cell_part(reconstruction, layout, cell, settled_cells, keypoints)
        directory = cell_dir(root, cell)
        before = read_own(root, cell)["digest"] if files.is_file(directory / PART_FILE) else None
        with tempfile.TemporaryDirectory(prefix="pixloc_part_") as staging:  # pycolmap writes only to a folder
            part.write(staging)
            digest = model_fingerprint(Path(staging))
            if digest == before:
                kept += 1
                continue
            files.copy_folder(Path(staging), directory / INPUT_DIR)
        if files.exists(directory / MODEL_DIR):
            files.delete_folder(directory / MODEL_DIR)
        if files.is_file(directory / FAILED_FILE):
            files.delete(directory / FAILED_FILE)
        files.write_text(directory / PART_FILE, json.dumps({"images": own_images, "points": own_points,
                                                           "digest": digest}))
    logger.info("cell adjustment: %d parts written, %d unchanged since the last run", len(cells) - kept, kept)


def bundle_adjustment_options(conf: dict = default_conf) -> pycolmap.BundleAdjustmentOptions:
    """Quiet, with conf's robust loss (also submodels.refit's)."""
    options = pycolmap.BundleAdjustmentOptions()
    options.print_summary = False
    options.ceres.loss_function_type = getattr(pycolmap.LossFunctionType, conf["loss"])
    return options


def adjustment_config(part: pycolmap.Reconstruction, own_images: Iterable[int], own_points: Iterable[int]
                      ) -> pycolmap.BundleAdjustmentConfig:
    """The part's own poses and points free; the settled images and points, and every camera, constant."""
    own_images, own_points = set(own_images), set(own_points)
    config = pycolmap.BundleAdjustmentConfig()
    border = 0
    for image_id in part.reg_image_ids():
        config.add_image(image_id)
        if image_id not in own_images:
            config.set_constant_rig_from_world_pose(part.image(image_id).frame_id)
            border += 1
    for camera_id in part.cameras:
        config.set_constant_cam_intrinsics(camera_id)
    held = 0
    for point_id in part.point3D_ids():
        if point_id not in own_points:
            config.add_constant_point(point_id)
            held += 1
    if not border and not held:  # nothing settled around it fixes the frame
        config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    return config


def main(root: Location, cell: str, image_dir: Location | None = None, conf: dict | None = None,
         features_root: Location | None = None) -> CellResult:
    """Adjusts the cell's part (write_parts) and writes it; the part of a cell whose adjustment
    fails is kept as merged, with the reason."""
    conf = {**default_conf, **(conf or {})}
    directory = cell_dir(root, cell)
    own = read_own(root, cell)
    part = read_model(directory / INPUT_DIR)
    part.update_point_3d_errors()
    before = part.compute_mean_reprojection_error()
    try:
        summary = pycolmap.create_default_bundle_adjuster(
            bundle_adjustment_options(conf), adjustment_config(part, own["images"], own["points"]), part).solve()
        problem = "" if summary.is_solution_usable() else str(summary.termination_type)
    except (ValueError, RuntimeError) as error:  # pycolmap's checks of the problem
        problem = str(error)
    if problem:
        return record_failure(directory, FAILED_FILE, CellResult(cell, len(own["images"]), failure=(
            f"cell {cell}: bundle adjustment failed ({problem}); its poses are kept as merged")))
    part.update_point_3d_errors()
    return finish_with_model(directory, part, CellResult(cell, len(own["images"]), len(own["points"])),
                             reprojection_error_px=[before, part.compute_mean_reprojection_error()])


def apply(reconstruction: pycolmap.Reconstruction, root: Location, cells: list[str]) -> None:
    """The adjusted poses and points of every adjusted cell into `reconstruction`, in place."""
    for cell in cells:
        directory = cell_dir(root, cell)
        if not files.is_file(directory / MODEL_DIR / SUMMARY_FILE):
            continue
        own = read_own(root, cell)
        part = read_model(directory / MODEL_DIR)
        for image_id in own["images"]:
            reconstruction.frame(reconstruction.image(image_id).frame_id).rig_from_world = part.image(image_id).cam_from_world()
        for point_id in own["points"]:
            reconstruction.point3D(point_id).xyz = part.point3D(point_id).xyz
