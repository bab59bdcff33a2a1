"""Analytic ray casting of a synthetic scene into a pinhole camera (COLMAP conventions).

Cameras: x right, y down, z forward; poses world-to-camera (x_cam = R @ x_world + t); the centre
of pixel (row i, column j) is at image coordinates (j + 0.5, i + 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import UP, Scene
from .textures import shade_facades, shade_ground

SKY = -1  # surface id of rays that hit nothing
NEAR = 0.05  # metres

_HORIZON = np.array([0.80, 0.85, 0.90])
_ZENITH = np.array([0.45, 0.60, 0.85])


@dataclass(frozen=True)
class PinholeIntrinsics:
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def centered(cls, width: int, height: int, focal: float) -> PinholeIntrinsics:
        return cls(width, height, focal, focal, width / 2, height / 2)

    def params(self) -> tuple[float, float, float, float]:
        """COLMAP PINHOLE parameter order."""
        return (self.fx, self.fy, self.cx, self.cy)


@dataclass
class RayHits:
    """Per pixel: which surface the ray hits first and where."""
    surface: np.ndarray  # (H, W) int: face index, len(faces) for the ground, SKY
    depth: np.ndarray  # (H, W) z in the camera frame (inf for the sky)
    directions: np.ndarray  # (H, W, 3) world ray directions with unit camera-z component
    center: np.ndarray  # (3,) camera centre in the world

    def points(self) -> np.ndarray:
        """World points (H, W, 3) hit by the pixel rays (inf or nan for the sky)."""
        with np.errstate(invalid="ignore"):
            return self.center + self.depth[..., None] * self.directions


def _pixel_rays(camera: PinholeIntrinsics, rotation: np.ndarray) -> np.ndarray:
    """World directions (H, W, 3) through pixel centres, scaled so that their camera z is 1."""
    cols = (np.arange(camera.width) + 0.5 - camera.cx) / camera.fx
    rows = (np.arange(camera.height) + 0.5 - camera.cy) / camera.fy
    # d_world = R^T d_cam, written as row vectors: d_cam @ R.
    return (cols[None, :, None] * rotation[0] + rows[:, None, None] * rotation[1]) + rotation[2]


def _screen_bbox(corners_world: np.ndarray, camera: PinholeIntrinsics, rotation, translation):
    """Pixel bounding box (row0, row1, col0, col1) of a planar polygon, clipped to the near plane."""
    points = corners_world @ rotation.T + translation  # (4, 3) in the camera frame
    clipped = []
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        if a[2] >= NEAR:
            clipped.append(a)
        if (a[2] >= NEAR) != (b[2] >= NEAR):
            clipped.append(a + (b - a) * (NEAR - a[2]) / (b[2] - a[2]))
    if not clipped:
        return None
    clipped = np.array(clipped)
    u = camera.fx * clipped[:, 0] / clipped[:, 2] + camera.cx
    v = camera.fy * clipped[:, 1] / clipped[:, 2] + camera.cy
    col0, col1 = max(int(np.floor(u.min())), 0), min(int(np.ceil(u.max())) + 1, camera.width)
    row0, row1 = max(int(np.floor(v.min())), 0), min(int(np.ceil(v.max())) + 1, camera.height)
    if col0 >= col1 or row0 >= row1:
        return None
    return row0, row1, col0, col1


def _visible_candidates(faces, camera: PinholeIntrinsics, rotation: np.ndarray,
                        translation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the faces not entirely outside one side of the view frustum, nearest first, and
    their nearest camera z (a city has thousands of faces and a view sees few of them)."""
    corners = faces.corner[:, None] + np.stack([
        np.zeros_like(faces.axis), faces.width[:, None] * faces.axis,
        faces.width[:, None] * faces.axis + faces.height[:, None] * UP, faces.height[:, None] * UP], axis=1)
    x, y, z = np.moveaxis(corners @ rotation.T + translation, -1, 0)  # (F, 4) each, camera frame
    outside = [
        z < NEAR,
        camera.fx * x + camera.cx * z < 0,  # left of column 0
        camera.fx * x + (camera.cx - camera.width) * z > 0,  # right of the last column
        camera.fy * y + camera.cy * z < 0,  # above row 0
        camera.fy * y + (camera.cy - camera.height) * z > 0,  # below the last row
    ]
    candidates = np.flatnonzero(~np.any([side.all(axis=1) for side in outside], axis=0))
    nearest_z = np.maximum(z[candidates].min(axis=1), NEAR)
    order = np.argsort(nearest_z, kind="stable")
    return candidates[order], nearest_z[order]


def raycast(scene: Scene, camera: PinholeIntrinsics, rotation: np.ndarray, translation: np.ndarray,
            cull: bool = True) -> RayHits:
    """First hits of the rays through all pixel centres. rotation (3, 3), translation (3,): world-to-camera.

    cull=False tests every face (the reference the culling is tested against)."""
    rotation, translation = np.asarray(rotation, float), np.asarray(translation, float)
    center = -rotation.T @ translation
    directions = _pixel_rays(camera, rotation)
    faces = scene.faces

    surface = np.full((camera.height, camera.width), SKY, dtype=np.int64)
    depth = np.full((camera.height, camera.width), np.inf)
    down = directions[..., 2] < 0
    if center[2] > 0:
        depth[down] = -center[2] / directions[..., 2][down]
        surface[down] = len(faces)

    # Only faces whose front side looks at the camera can be hit first (the boxes are closed).
    facing = np.einsum("fk,fk->f", center - faces.corner, faces.normal) > 0
    candidates = (_visible_candidates(faces, camera, rotation, translation) if cull
                  else (np.arange(len(faces)), np.full(len(faces), -np.inf)))
    for f, nearest_z in zip(*candidates):
        if not facing[f]:
            continue
        corner, axis, width, height = faces.corner[f], faces.axis[f], faces.width[f], faces.height[f]
        quad = np.array([corner, corner + width * axis, corner + width * axis + height * UP, corner + height * UP])
        bbox = _screen_bbox(quad, camera, rotation, translation)
        if bbox is None:
            continue
        row0, row1, col0, col1 = bbox
        if (depth[row0:row1, col0:col1] < nearest_z).all():
            continue  # hidden behind nearer faces (visited first)
        d = directions[row0:row1, col0:col1]
        normal = faces.normal[f]
        with np.errstate(divide="ignore"):
            t = (normal @ (corner - center)) / (d @ normal)
        hit = center + t[..., None] * d
        s = (hit - corner) @ axis
        r = hit[..., 2] - corner[2]
        closest = (t > NEAR) & (s >= 0) & (s <= width) & (r >= 0) & (r <= height) & (t < depth[row0:row1, col0:col1])
        depth[row0:row1, col0:col1][closest] = t[closest]
        surface[row0:row1, col0:col1][closest] = f
    return RayHits(surface, depth, directions, center)


def _surface_footprints(hits: RayHits, mask: np.ndarray, normals: np.ndarray, camera: PinholeIntrinsics,
                        rotation: np.ndarray, axes: list[np.ndarray]) -> list[np.ndarray]:
    """Metres covered by one pixel along each texture axis (N, 3), at the N hits selected by `mask`.

    A hit P(u, v) = C + t(u, v) d(u, v) on a plane with normal n moves, per pixel step, by
    dP = t (dd - d (n.dd) / (n.d)), with dd = R^T e_x / fx (or e_y / fy).
    """
    d, t = hits.directions[mask], hits.depth[mask]  # (N, 3), (N,)
    n_dot_d = np.einsum("nk,nk->n", d, normals)
    footprints = [np.zeros_like(t) for _ in axes]
    for step in (rotation[0] / camera.fx, rotation[1] / camera.fy):
        dp = t[:, None] * (step - d * ((normals @ step) / n_dot_d)[:, None])  # (N, 3)
        for footprint, axis in zip(footprints, axes):
            footprint += np.abs(np.einsum("nk,nk->n", dp, axis))
    return footprints


def render(scene: Scene, camera: PinholeIntrinsics, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """The RGB image (H, W, 3) uint8 seen by a camera with world-to-camera pose (rotation, translation)."""
    rotation = np.asarray(rotation, float)
    hits = raycast(scene, camera, rotation, translation)
    faces = scene.faces
    image = np.empty((camera.height, camera.width, 3))

    sky = hits.surface == SKY
    elevation = np.clip(hits.directions[sky][:, 2] / np.linalg.norm(hits.directions[sky], axis=-1), 0.0, 1.0)
    image[sky] = _HORIZON + (_ZENITH - _HORIZON) * np.sqrt(elevation)[:, None]

    ground = hits.surface == len(faces)
    if ground.any():
        points = hits.center + hits.depth[ground][:, None] * hits.directions[ground]
        east, north, up = (np.broadcast_to(axis, points.shape) for axis in np.eye(3))
        footprint_x, footprint_y = _surface_footprints(hits, ground, up, camera, rotation, [east, north])
        image[ground] = shade_ground(scene, points[:, 0], points[:, 1], footprint_x, footprint_y)

    facade = (hits.surface >= 0) & ~ground
    if facade.any():
        index = hits.surface[facade]
        points = hits.center + hits.depth[facade][:, None] * hits.directions[facade]
        s = np.einsum("nk,nk->n", points - faces.corner[index], faces.axis[index])
        r = points[:, 2] - faces.corner[index, 2]
        footprint_s, footprint_r = _surface_footprints(
            hits, facade, faces.normal[index], camera, rotation, [faces.axis[index], np.broadcast_to(UP, points.shape)])
        image[facade] = shade_facades(faces, index, s, r, footprint_s, footprint_r)

    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
