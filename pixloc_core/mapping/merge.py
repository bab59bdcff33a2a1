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
from dataclasses import dataclass
from pathlib import Path

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

    def save(self, path: Path) -> None:
        np.savez(path, xyz=self.xyz, color=self.color, observation_point=self.observation_point,
                 observation_image=self.observation_image, observation_point2D=self.observation_point2D)

    @classmethod
    def load(cls, path: Path) -> CellPoints:
        with np.load(path) as data:
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


def main(skeleton: pycolmap.Reconstruction, cells: list[CellPoints], keypoints: dict[int, np.ndarray],
         conf: dict | None = None) -> pycolmap.Reconstruction:
    """skeleton: the posed images of every cell (ids as in the cells), without points; keypoints:
    image id -> (N, 2) keypoint positions. Returns the skeleton with its keypoints as 2D points and
    the merged 3D points."""
    conf = {**default_conf, **(conf or {})}
    offsets = np.cumsum([0] + [cell.num_points for cell in cells])
    xyz = np.concatenate([cell.xyz for cell in cells] or [np.empty((0, 3))])  # (P, 3)
    color = np.concatenate([cell.color for cell in cells] or [np.empty((0, 3), np.uint8)])
    point = np.concatenate([cell.observation_point + offset for cell, offset in zip(cells, offsets)]
                           or [np.empty(0, np.int64)])  # (M,)
    image = np.concatenate([cell.observation_image for cell in cells] or [np.empty(0, np.int64)])
    point2D = np.concatenate([cell.observation_point2D for cell in cells] or [np.empty(0, np.int64)])
    key = image << 32 | point2D  # (M,) one integer per observation (image, keypoint)

    track = connected_tracks(point, key, len(xyz))  # (P,)
    track_ids, track = np.unique(track, return_inverse=True)  # dense track index per point
    length = np.bincount(point, minlength=len(xyz)).astype(np.float64)  # (P,) observations per part
    weight = np.zeros(len(track_ids))
    np.add.at(weight, track, length)
    merged_xyz = np.zeros((len(track_ids), 3))
    np.add.at(merged_xyz, track, xyz * length[:, None])
    merged_xyz /= np.maximum(weight, 1)[:, None]
    merged_color = np.zeros((len(track_ids), 3), dtype=np.uint8)
    merged_color[track] = color  # any part's colour

    # One row per distinct (track, observation); the parts of a track repeat their shared ones.
    rows = np.unique(np.stack([track[point], key], axis=1), axis=0)  # (K, 2)
    row_track, row_image, row_point2D = rows[:, 0], rows[:, 1] >> 32, rows[:, 1] & 0xFFFFFFFF
    xy = np.zeros((len(rows), 2))
    for image_id in np.unique(row_image).tolist():
        selected = row_image == image_id
        xy[selected] = keypoints[image_id][row_point2D[selected]]
    error = reprojection_errors(skeleton, row_image, xy, merged_xyz[row_track])
    # Within a track, one keypoint per image: the best-fitting one; then the error threshold.
    order = np.lexsort((error, row_image, row_track))
    first = np.r_[True, (np.diff(row_track[order]) != 0) | (np.diff(row_image[order]) != 0)]
    keep = order[first & (error[order] <= conf["max_reprojection_error_px"])]
    keep = keep[np.argsort(row_track[keep], kind="stable")]
    kept_track = row_track[keep]

    reconstruction = pycolmap.Reconstruction(skeleton)
    starts = np.flatnonzero(np.r_[True, kept_track[1:] != kept_track[:-1], True]) if len(keep) else np.array([0])
    for start, end in zip(starts[:-1], starts[1:]):
        if end - start < conf["min_track_length"]:
            continue
        elements = pycolmap.Track()
        for image_id, index in zip(row_image[keep[start:end]].tolist(), row_point2D[keep[start:end]].tolist()):
            elements.add_element(image_id, index)
        reconstruction.add_point3D(merged_xyz[kept_track[start]], elements, merged_color[kept_track[start]])
    reconstruction.update_point_3d_errors()
    logger.info("merged %d cell points of %d cells into %d tracks (%d dropped: too few consistent observations)",
                len(xyz), len(cells), reconstruction.num_points3D(), len(track_ids) - reconstruction.num_points3D())
    return reconstruction


def skeleton_with_keypoints(reference: pycolmap.Reconstruction, keypoints: dict[int, np.ndarray]
                            ) -> pycolmap.Reconstruction:
    """The cameras and posed images of `reference` that have keypoints, each image with its
    keypoints as 2D points (ids kept), no 3D point."""
    skeleton = pycolmap.Reconstruction()
    for camera in reference.cameras.values():
        skeleton.add_camera_with_trivial_rig(camera)
    for image_id, image in reference.images.items():
        if image.has_pose and image_id in keypoints:
            skeleton.add_image_with_trivial_frame(
                pycolmap.Image(name=image.name, keypoints=keypoints[image_id], camera_id=image.camera_id,
                               image_id=image_id), image.cam_from_world())
    return skeleton
