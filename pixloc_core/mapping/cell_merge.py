"""The points of a map triangulated cell by cell (cells.py), merged cell by cell: no process holds
every cell's points, as merge.main does.

Two parts (points of two cells) are one track when they share an observation (image, keypoint);
the tracks are the connected components of the parts (merge.py). Each part starts with the
smallest observation key it has as its label; in rounds, each cell joins its parts with those of
its neighbours (cells that share images with it) through their observations on shared images, and
lowers its parts' labels to the smallest in their joined tracks, until no label changes anywhere.
A label then is the smallest key of its whole track, however many cells the track spans (a facade
seen from afar), so that the labels name the tracks exactly. Each part then goes to the cell whose
core holds the image of its label (the track's owner), which merges its tracks as merge.main does
(a weighted mean, observations checked by reprojection) and describes their points.

    MAP/mapping/merge/labels/<cell>-<round>.npz   the cell's labels after a round (per part), and
                                                  its observations on shared images (sorted keys,
                                                  with the part that has each)
    MAP/mapping/merge/routed/<owner>/<cell>.npz   the parts of <cell> whose tracks <owner> owns
    MAP/mapping/merge/merged/<owner>.npz          the owner's merged points, with their descriptors
                                                  and reprojection errors

Every run computes the merge again from the cells' points (the cells are the expensive part and
are kept). The files of the merge are intermediate: a cell keeps its labels of the last two rounds,
and the merged points go once model_pieces.py has sent them on to the map's files (at 10,286
references the labels of one round take 91 MB, the routed and merged parts 190 and 180 MB).
"""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pycolmap

from .. import files
from ..files import Location
from . import cells
from .descriptors import DescriptorSums
from .feature_files import FeatureFiles
from .merge import (CellPoints, MergedPoints, connected_tracks, consistent_observations, join_tracks,
                    observation_keys, reprojection_errors)

MERGE_DIR = "merge"
LABELS, ROUTED, MERGED = "labels", "routed", "merged"
NO_LABEL = np.iinfo(np.int64).max


def _save(place: Location, write: Callable[[BinaryIO], None]) -> None:
    with io.BytesIO() as data:
        write(data)
        files.write_bytes(place, data.getvalue())


def _load(place: Location) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(files.read_bytes(place))) as data:
        return dict(data)


def labels_file(root: Location, cell: str, round_index: int) -> Location:
    return files.location(root) / MERGE_DIR / LABELS / f"{cell}-{round_index}.npz"


def routed_file(root: Location, owner: str, cell: str) -> Location:
    return files.location(root) / MERGE_DIR / ROUTED / owner / f"{cell}.npz"


def merged_file(root: Location, owner: str) -> Location:
    return files.location(root) / MERGE_DIR / MERGED / f"{owner}.npz"


@dataclass
class Neighbourhood:
    """What one cell's rounds need of the others."""

    neighbours: list[str]  # the cells with points that share an image with this one
    shared_image_ids: np.ndarray  # (S,) sorted: this cell's images that a neighbour has too


def label_round(root: Location, cell: str, round_index: int, neighbourhood: Neighbourhood) -> bool:
    """One round for one cell (labels_file); returns whether any of its labels changed.

    The cell's parts and the neighbours' parts that show observations on shared images are joined
    into tracks as far as these observations reach (merge.connected_tracks), and each track takes
    the smallest label among its parts: a track that goes back and forth between two cells settles
    in one round, and the rounds count only the cells a label has to cross."""
    points = cells.load_points(root, cell)
    keys = observation_keys(points.observation_image, points.observation_point2D)  # (M,)
    if round_index == 0:
        label = np.full(points.num_points, NO_LABEL)
        np.minimum.at(label, points.observation_point, keys)
        changed = True
    else:
        previous = _load(labels_file(root, cell, round_index - 1))["part_label"]
        # Nodes: this cell's parts, then each neighbour's parts that show a boundary observation.
        node_label, observation_node, observation_key = [previous], [points.observation_point], [keys]
        num_nodes = points.num_points
        for neighbour in neighbourhood.neighbours:
            theirs = _load(labels_file(root, neighbour, round_index - 1))
            parts, node = np.unique(theirs["parts"], return_inverse=True)  # their parts -> nodes from num_nodes
            node_label.append(theirs["part_label"][parts])
            observation_node.append(node + num_nodes)
            observation_key.append(theirs["keys"])
            num_nodes += len(parts)
        track = connected_tracks(np.concatenate(observation_node), np.concatenate(observation_key), num_nodes)
        track_label = np.full(num_nodes, NO_LABEL)
        np.minimum.at(track_label, track, np.concatenate(node_label))
        label = track_label[track[:points.num_points]]  # never above `previous`: its parts are nodes too
        changed = not np.array_equal(label, previous)
    boundary = np.isin(points.observation_image, neighbourhood.shared_image_ids)
    order = np.argsort(keys[boundary])
    boundary_parts = points.observation_point[boundary][order]
    _save(labels_file(root, cell, round_index),
          lambda data: np.savez(data, part_label=label, keys=keys[boundary][order], parts=boundary_parts))
    if round_index >= 2:  # the neighbours read round_index - 1 next; round_index - 2 was read last round
        files.delete(labels_file(root, cell, round_index - 2))
    return changed


@dataclass
class Owners:
    """The cell whose core holds each image: it owns the tracks labelled with that image's keys."""

    image_ids: np.ndarray  # (R,) sorted
    cell_index: np.ndarray  # (R,) index into cell_ids
    cell_ids: list[str]

    def of_labels(self, labels: np.ndarray) -> np.ndarray:
        """(P,) labels -> (P,) index into cell_ids."""
        return self.cell_index[np.searchsorted(self.image_ids, labels >> 32)]


def route(root: Location, cell: str, final_round: int, owners: Owners) -> list[str]:
    """Writes the cell's parts to the owners of their tracks (routed_file); returns the owners."""
    points = cells.load_points(root, cell)
    label = _load(labels_file(root, cell, final_round))["part_label"]
    owner = owners.of_labels(label)
    written = []
    for index in np.unique(owner).tolist():
        parts = np.flatnonzero(owner == index)
        _save(routed_file(root, owners.cell_ids[index], cell),
              lambda data: points.take(parts).save(data, label=label[parts]))
        written.append(owners.cell_ids[index])
    return written


def merge_owned(root: Location, owner: str, sources: list[str], features_root: Location, conf: dict) -> int:
    """Merges the tracks `owner` owns from the parts `sources` routed to it (merged_file);
    conf: merge.default_conf. Returns the number of points."""
    routed = [_load(routed_file(root, owner, source)) for source in sources]
    tracks = join_tracks((CellPoints.from_arrays(data) for data in routed),
                         np.concatenate([data["label"] for data in routed]))
    del routed
    skeleton = _skeletons_together(root, sources)  # every image the tracks observe is in one of them
    features = FeatureFiles(features_root)
    observed = {image_id: features[skeleton.images[image_id].name] for image_id in np.unique(tracks.row_image).tolist()}
    rows = consistent_observations(skeleton, tracks, tracks.xyz[tracks.row_track],
                                   {image_id: found.xy for image_id, found in observed.items()},
                                   np.ones(len(tracks.row_track), bool), conf["max_reprojection_error_px"])
    merged = MergedPoints.from_tracks(tracks, rows, conf["min_track_length"])
    sums = DescriptorSums(merged.num_points)
    row_xy = np.zeros((len(merged.row_image), 2))
    for image_id, found in observed.items():
        selected = merged.row_image == image_id
        sums.add(merged.row_point[selected], found.descriptors[merged.row_point2D[selected]])
        row_xy[selected] = found.xy[merged.row_point2D[selected]]
    _, descriptors = sums.means()  # every observation has a descriptor: every point is described
    # A point's error, as COLMAP keeps it: the mean reprojection error over its track.
    row_error = reprojection_errors(skeleton, merged.row_image, row_xy, merged.xyz[merged.row_point])
    error = np.bincount(merged.row_point, row_error, merged.num_points) / np.bincount(merged.row_point,
                                                                                      minlength=merged.num_points)
    _save(merged_file(root, owner), lambda data: merged.save(data, descriptors=descriptors, error=error))
    return merged.num_points


def _skeletons_together(root: Location, cell_ids: list[str]) -> pycolmap.Reconstruction:
    """The cameras and posed images of the cells' skeletons, in one model."""
    together = pycolmap.Reconstruction()
    for cell in cell_ids:
        skeleton = cells.read_model(cells.cell_dir(root, cell) / cells.SKELETON_DIR)
        for camera_id, camera in skeleton.cameras.items():
            if camera_id not in together.cameras:
                together.add_camera_with_trivial_rig(camera)
        for image_id, image in skeleton.images.items():
            if image_id not in together.images:
                together.add_image_with_trivial_frame(
                    pycolmap.Image(name=image.name, camera_id=image.camera_id, image_id=image_id),
                    image.cam_from_world())
    return together


def delete_files(root: Location, *kinds: str) -> None:
    """The merge's files of these kinds (LABELS, ROUTED, MERGED), all cells'."""
    for kind in kinds:
        files.delete_folder(files.location(root) / MERGE_DIR / kind)


@dataclass
class OwnedPoints:
    """An owner's merged points, as merge_owned wrote them."""

    points: MergedPoints
    descriptors: np.ndarray  # (P, D) float16
    error: np.ndarray  # (P,) mean reprojection error over the track, pixels


def load_merged(root: Location, owner: str) -> OwnedPoints:
    data = _load(merged_file(root, owner))
    return OwnedPoints(MergedPoints.from_arrays(data), data["descriptors"], data["error"])
