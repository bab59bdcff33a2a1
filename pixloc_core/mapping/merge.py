"""Merging the points of models built cell by cell (cells overlap by their halos) into one model.

Two cells that both see a physical point triangulate it twice, from overlapping sets of
observations (image, keypoint). Points that share an observation are one track: the tracks are the
connected components of the bipartite graph points <-> observations. A merged point is the mean of
its parts, weighted by their track lengths (the poses are known and fixed, so the parts differ
only by which observations each cell had); an observation that then reprojects farther than the
threshold is dropped, and where a track holds two keypoints of one image, the closer one is kept.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pycolmap

logger = logging.getLogger(__name__)

default_conf = {
    "max_reprojection_error_px": 2.0,
    "min_track_length": 2,
}


@dataclass
class CellPoints:
    """The 3D points of one cell's model, as flat arrays: compact to store and to merge."""

    xyz: np.ndarray  # (P, 3) float64
    color: np.ndarray  # (P, 3) uint8
    observation_point: np.ndarray  # (M,) int64 index into xyz
    observation_image: np.ndarray  # (M,) int64 image id
    observation_point2D: np.ndarray  # (M,) int64 index of the keypoint in its image

    @classmethod
    def from_reconstruction(cls, reconstruction: pycolmap.Reconstruction) -> CellPoints:
        point_ids = np.array(sorted(reconstruction.point3D_ids()), dtype=np.int64)  # (P,)
        points = [reconstruction.points3D[int(i)] for i in point_ids]
        images, points2D, point_of = [], [], []
        for image_id, image in reconstruction.images.items():
            indices = np.asarray(image.get_observation_point2D_idxs(), dtype=np.int64)
            images.append(np.full(len(indices), image_id, dtype=np.int64))
            points2D.append(indices)
            point_of.append(np.array([image.points2D[i].point3D_id for i in indices.tolist()], dtype=np.int64))
        point_of = np.concatenate(point_of or [np.empty(0, np.int64)])
        return cls(np.array([p.xyz for p in points], dtype=np.float64).reshape(-1, 3),
                   np.array([p.color for p in points], dtype=np.uint8).reshape(-1, 3),
                   np.searchsorted(point_ids, point_of),
                   np.concatenate(images or [np.empty(0, np.int64)]),
                   np.concatenate(points2D or [np.empty(0, np.int64)]))

    @property
    def num_points(self) -> int:
        return len(self.xyz)

    def take(self, points: np.ndarray) -> CellPoints:
        """The points of the (ascending) indices `points`, with their observations, renumbered."""
        observed = np.isin(self.observation_point, points)
        return CellPoints(self.xyz[points], self.color[points],
                          np.searchsorted(points, self.observation_point[observed]),
                          self.observation_image[observed], self.observation_point2D[observed])

    def save(self, path: Path | BinaryIO, **arrays: np.ndarray) -> None:
        """`arrays`: more arrays in the same file (cell_merge.py's labels), read back with np.load."""
        np.savez(path, xyz=self.xyz, color=self.color, observation_point=self.observation_point,
                 observation_image=self.observation_image, observation_point2D=self.observation_point2D, **arrays)

    @classmethod
    def load(cls, path: Path | BinaryIO) -> CellPoints:
        with np.load(path) as data:
            return cls.from_arrays(data)

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray]) -> CellPoints:
        return cls(data["xyz"], data["color"], data["observation_point"], data["observation_image"],
                   data["observation_point2D"])


def connected_tracks(observation_point: np.ndarray, observation_key: np.ndarray, num_points: int) -> np.ndarray:
    """Connected components of points linked by shared observation keys: (P,) the smallest point
    index of each point's component. Min-label propagation with pointer jumping, vectorised."""
    _, observation = np.unique(observation_key, return_inverse=True)  # (M,) dense observation index
    label = np.arange(num_points)
    while True:
        observation_label = np.full(observation.max(initial=-1) + 1, num_points)
        np.minimum.at(observation_label, observation, label[observation_point])
        new_label = label.copy()
        np.minimum.at(new_label, observation_point, observation_label[observation])
        new_label = new_label[new_label]  # pointer jumping: a label's own label is at most as large
        if np.array_equal(new_label, label):
            return label
        label = new_label


def reprojection_errors(skeleton: pycolmap.Reconstruction, image_ids: np.ndarray, xy: np.ndarray,
                        xyz: np.ndarray) -> np.ndarray:
    """(M,) pixel distance between keypoints xy (M, 2) and the projections of xyz (M, 3) in their
    images; infinite behind the camera."""
    errors = np.full(len(image_ids), np.inf)
    if len(image_ids) == 0:
        return errors
    order = np.argsort(image_ids, kind="stable")
    starts = np.flatnonzero(np.r_[True, image_ids[order][1:] != image_ids[order][:-1], True])
    for start, end in zip(starts[:-1], starts[1:]):
        rows = order[start:end]
        image = skeleton.images[int(image_ids[rows[0]])]
        cam_from_world = image.cam_from_world()
        in_camera = xyz[rows] @ cam_from_world.rotation.matrix().T + cam_from_world.translation  # (K, 3)
        in_front = in_camera[:, 2] > 1e-6
        projected = image.camera.img_from_cam(in_camera[in_front])
        errors[rows[in_front]] = np.linalg.norm(projected - xy[rows[in_front]], axis=1)
    return errors


@dataclass
class Tracks:
    """The cells' points joined into tracks, with one row per distinct (track, observation)."""

    xyz: np.ndarray  # (T, 3) mean of each track's parts, weighted by their track lengths
    color: np.ndarray  # (T, 3) uint8
    row_track: np.ndarray  # (K,) track index, ascending
    row_image: np.ndarray  # (K,) image id
    row_point2D: np.ndarray  # (K,) keypoint index

    @property
    def row_key(self) -> np.ndarray:
        return observation_keys(self.row_image, self.row_point2D)


def observation_keys(image_ids: np.ndarray, point2D_indices: np.ndarray) -> np.ndarray:
    """One int64 per observation (image, keypoint)."""
    return np.asarray(image_ids, np.int64) << 32 | np.asarray(point2D_indices, np.int64)


def join_tracks(cells: Iterable[CellPoints], labels: np.ndarray | None = None) -> Tracks:
    """cells: read one at a time (a generator keeps only one cell's arrays beside the joined ones).
    labels: one per point of the cells, in their order, equal within a track: the tracks found
    already (cell_merge.py); None: the connected components of the cells' points."""
    xyz, color = [np.empty((0, 3))], [np.empty((0, 3), np.uint8)]  # per cell, after an empty one
    point, key = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    num_points, num_cells = 0, 0
    for cell in cells:
        xyz.append(cell.xyz)
        color.append(cell.color)
        point.append(cell.observation_point + num_points)
        key.append(observation_keys(cell.observation_image, cell.observation_point2D))
        num_points, num_cells = num_points + cell.num_points, num_cells + 1
    xyz, color, point, key = (np.concatenate(parts) for parts in (xyz, color, point, key))  # (P, 3) (P, 3) (M,) (M,)
    track = connected_tracks(point, key, len(xyz)) if labels is None else labels  # (P,)
    track_ids, track = np.unique(track, return_inverse=True)  # dense track index per point
    length = np.bincount(point, minlength=len(xyz)).astype(np.float64)  # (P,) observations per part
    weight = np.zeros(len(track_ids))
    np.add.at(weight, track, length)
    merged_xyz = np.zeros((len(track_ids), 3))
    np.add.at(merged_xyz, track, xyz * length[:, None])
    merged_xyz /= np.maximum(weight, 1)[:, None]
    merged_color = np.zeros((len(track_ids), 3), dtype=np.uint8)
    merged_color[track] = color  # any part's colour
    # The parts of a track repeat their shared observations: one row each.
    rows = np.unique(np.stack([track[point], key], axis=1), axis=0)  # (K, 2)
    logger.info("joined %d cell points of %d cells into %d tracks", num_points, num_cells, len(track_ids))
    return Tracks(merged_xyz, merged_color, rows[:, 0], rows[:, 1] >> 32, rows[:, 1] & 0xFFFFFFFF)


def consistent_observations(skeleton: pycolmap.Reconstruction, tracks: Tracks, row_xyz: np.ndarray,
                            keypoints: dict[int, np.ndarray], candidate: np.ndarray, max_error_px: float
                            ) -> np.ndarray:
    """Indices of the candidate rows (bool (K,)) to keep, grouped by track: within a track one
    keypoint per image, the best-fitting one, and only those reprojecting within `max_error_px`
    of row_xyz (K, 3)."""
    rows = np.flatnonzero(candidate)
    xy = np.zeros((len(rows), 2))
    for image_id in np.unique(tracks.row_image[rows]).tolist():
        selected = tracks.row_image[rows] == image_id
        xy[selected] = keypoints[image_id][tracks.row_point2D[rows[selected]]]
    error = reprojection_errors(skeleton, tracks.row_image[rows], xy, row_xyz[rows])
    row_track, row_image = tracks.row_track[rows], tracks.row_image[rows]
    order = np.lexsort((error, row_image, row_track))
    first = np.r_[True, (np.diff(row_track[order]) != 0) | (np.diff(row_image[order]) != 0)]
    keep = order[first & (error[order] <= max_error_px)]
    return rows[keep[np.argsort(row_track[keep], kind="stable")]]


@dataclass
class MergedPoints:
    """Points ready to enter a model, with one row per observation, grouped by point."""

    xyz: np.ndarray  # (T, 3)
    color: np.ndarray  # (T, 3) uint8
    row_point: np.ndarray  # (K,) point index, ascending
    row_image: np.ndarray  # (K,) image id
    row_point2D: np.ndarray  # (K,) keypoint index

    @classmethod
    def from_tracks(cls, tracks: Tracks, rows: np.ndarray, min_track_length: int) -> MergedPoints:
        """The tracks of `rows` (sorted by track) that keep at least `min_track_length` of them."""
        track_ids, length = np.unique(tracks.row_track[rows], return_counts=True)
        long_enough = length >= min_track_length
        kept = rows[np.repeat(long_enough, length)]
        return cls(tracks.xyz[track_ids[long_enough]], tracks.color[track_ids[long_enough]],
                   np.repeat(np.arange(int(long_enough.sum())), length[long_enough]),
                   tracks.row_image[kept], tracks.row_point2D[kept])

    @property
    def num_points(self) -> int:
        return len(self.xyz)

    def add_to(self, reconstruction: pycolmap.Reconstruction, first_id: int) -> list[int]:
        """Each point into `reconstruction` under ids from `first_id` on; returns the ids."""
        starts = np.searchsorted(self.row_point, np.arange(self.num_points + 1))
        images, points2D = self.row_image.tolist(), self.row_point2D.tolist()
        for index in range(self.num_points):
            point = pycolmap.Point3D()
            point.track = pycolmap.Track([pycolmap.TrackElement(images[row], points2D[row])
                                          for row in range(starts[index], starts[index + 1])])
            point.xyz, point.color = self.xyz[index], self.color[index]
            reconstruction.add_point3D_with_id(first_id + index, point)
        return list(range(first_id, first_id + self.num_points))

    def save(self, path: Path | BinaryIO, **arrays: np.ndarray) -> None:
        np.savez(path, xyz=self.xyz, color=self.color, row_point=self.row_point, row_image=self.row_image,
                 row_point2D=self.row_point2D, **arrays)

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray]) -> MergedPoints:
        return cls(data["xyz"], data["color"], data["row_point"], data["row_image"], data["row_point2D"])


def main(skeleton: pycolmap.Reconstruction, cells: Iterable[CellPoints], keypoints: dict[int, np.ndarray],
         conf: dict | None = None) -> pycolmap.Reconstruction:
    """skeleton: the posed images of every cell (ids as in the cells), their keypoints as 2D
    points, no 3D point; cells: read once, one at a time; keypoints: image id -> (N, 2) keypoint
    positions. Adds the merged 3D points to the skeleton (in place: at city scale a copy of every
    image's 2D points is hundreds of megabytes) and returns it."""
    conf = {**default_conf, **(conf or {})}
    tracks = join_tracks(cells)
    rows = consistent_observations(skeleton, tracks, tracks.xyz[tracks.row_track], keypoints,
                                   np.ones(len(tracks.row_track), bool), conf["max_reprojection_error_px"])
    MergedPoints.from_tracks(tracks, rows, conf["min_track_length"]).add_to(skeleton, first_id=1)
    skeleton.update_point_3d_errors()
    logger.info("merged into %d points (%d tracks dropped: too few consistent observations)",
                skeleton.num_points3D(), len(tracks.xyz) - skeleton.num_points3D())
    return skeleton


@dataclass
class Extension:
    new_point_ids: list[int]
    extended_point_ids: list[int]  # existing points that new images now observe too
    changed_image_ids: set[int]  # images with a new observation


def extend(reconstruction: pycolmap.Reconstruction, cells: Iterable[CellPoints], keypoints: dict[int, np.ndarray],
           new_image_ids: set[int], first_point_id: int, conf: dict | None = None) -> Extension:
    """Adds to `reconstruction` (the map or a region of it, which already holds the new images,
    posed, with their keypoints) the points that cells triangulated around the new images. The
    map's points stay as they are, position and id: a track that shares an observation with one of
    them joins it with its observations in new images; the other tracks become new points, under
    ids from `first_point_id` on (above the map's). `keypoints`: every image of the cells."""
    conf = {**default_conf, **(conf or {})}
    tracks = join_tracks(cells)
    row_key = tracks.row_key
    existing_key, existing_point = [], []  # what the map's images of these cells observe already
    for image_id in np.unique(tracks.row_image).tolist():
        image = reconstruction.images[image_id]
        indices = np.asarray(image.get_observation_point2D_idxs(), dtype=np.int64)
        existing_key.append(observation_keys(np.full(len(indices), image_id), indices))
        existing_point.append(np.array([image.points2D[i].point3D_id for i in indices.tolist()], dtype=np.int64))
    existing_key = np.concatenate(existing_key or [np.empty(0, np.int64)])
    existing_point = np.concatenate(existing_point or [np.empty(0, np.int64)])
    order = np.argsort(existing_key)
    existing_key, existing_point = existing_key[order], existing_point[order]
    slot = np.clip(np.searchsorted(existing_key, row_key), 0, max(len(existing_key) - 1, 0))
    observed = existing_key[slot] == row_key if len(existing_key) else np.zeros(len(row_key), bool)

    # The map point a track joins: the smallest id among those its observations already see.
    target = np.full(len(tracks.xyz), -1, dtype=np.int64)
    for track, point_id in zip(tracks.row_track[observed].tolist(), existing_point[slot[observed]].tolist()):
        target[track] = point_id if target[track] < 0 else min(target[track], point_id)
    joins = target[tracks.row_track] >= 0  # (K,)
    track_xyz = tracks.xyz.copy()
    for track in np.flatnonzero(target >= 0).tolist():
        track_xyz[track] = reconstruction.points3D[int(target[track])].xyz
    row_xyz = track_xyz[tracks.row_track]
    in_new_image = np.isin(tracks.row_image, list(new_image_ids))
    rows = consistent_observations(reconstruction, tracks, row_xyz, keypoints,
                                   ~observed & (~joins | in_new_image), conf["max_reprojection_error_px"])
    joining = rows[joins[rows]]
    for row in joining.tolist():
        reconstruction.add_observation(int(target[tracks.row_track[row]]),
                                       pycolmap.TrackElement(int(tracks.row_image[row]), int(tracks.row_point2D[row])))
    new_rows = rows[~joins[rows]]
    new_ids = MergedPoints.from_tracks(tracks, new_rows, conf["min_track_length"]).add_to(reconstruction,
                                                                                          first_point_id)
    reconstruction.update_point_3d_errors()
    changed = set(tracks.row_image[joining].tolist())
    changed |= {element.image_id for point_id in new_ids for element in reconstruction.points3D[point_id].track.elements}
    extension = Extension(new_ids, sorted(set(target[tracks.row_track[joining]].tolist())), changed)
    logger.info("update: %d new points, %d map points observed by new images, %d images changed",
                len(new_ids), len(extension.extended_point_ids), len(changed))
    return extension


def skeleton_with_keypoints(reference: pycolmap.Reconstruction,
                            keypoints_of: Callable[[pycolmap.Image], np.ndarray | None]) -> pycolmap.Reconstruction:
    """The cameras and posed images of `reference` that have keypoints (keypoints_of(image): (N, 2),
    or None), each image with its keypoints as 2D points (ids kept), no 3D point. The keypoints
    are asked for one image at a time: the map builder reads each from its file."""
    skeleton = pycolmap.Reconstruction()
    for camera in reference.cameras.values():
        skeleton.add_camera_with_trivial_rig(camera)
    for image_id, image in reference.images.items():
        keypoints = keypoints_of(image) if image.has_pose else None
        if keypoints is not None:
            skeleton.add_image_with_trivial_frame(
                pycolmap.Image(name=image.name, keypoints=keypoints, camera_id=image.camera_id,
                               image_id=image_id), image.cam_from_world())
    return skeleton
