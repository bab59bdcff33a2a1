"""Camera poses of a walk along the streets of a synthetic scene (COLMAP world-to-camera)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import Scene


@dataclass(frozen=True)
class WalkConfig:
    eye_height: float = 1.6
    lateral_range: float = 3.0  # metres either side of the street centre line
    # Heading relative to the street direction: along it, or diagonally across it.
    view_offsets_deg: tuple[float, ...] = (0.0, 30.0, -30.0, 55.0, -55.0)
    heading_noise_deg: float = 5.0
    pitch_deg: float = 3.0  # slightly upwards, to see more facade than ground
    pitch_noise_deg: float = 2.0
    roll_noise_deg: float = 1.5


def rotation_from_angles(heading_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """World-to-camera rotation (3, 3) in the ENU map frame.

    heading: compass bearing of the optical axis (clockwise from north); pitch: up is positive;
    roll: clockwise about the optical axis, as seen from behind the camera.
    """
    heading, pitch, roll = np.radians([heading_deg, pitch_deg, roll_deg])
    forward = np.array([np.sin(heading) * np.cos(pitch), np.cos(heading) * np.cos(pitch), np.sin(pitch)])
    right = np.array([np.cos(heading), -np.sin(heading), 0.0])
    down = np.cross(forward, right)
    cos, sin = np.cos(roll), np.sin(roll)
    right, down = cos * right + sin * down, -sin * right + cos * down
    return np.stack([right, down, forward])  # rows: camera axes in world coordinates


def _street_frame(scene: Scene, arc_length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 2) and unit directions (N, 2) at arc lengths along the concatenated streets."""
    starts, ends = scene.streets[:, 0], scene.streets[:, 1]
    lengths = np.linalg.norm(ends - starts, axis=1)
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    street = np.clip(np.searchsorted(cumulative, arc_length, side="right") - 1, 0, len(lengths) - 1)
    direction = (ends - starts)[street] / lengths[street, None]
    return starts[street] + (arc_length - cumulative[street])[:, None] * direction, direction


def street_length(scene: Scene) -> float:
    return float(np.linalg.norm(scene.streets[:, 1] - scene.streets[:, 0], axis=1).sum())


def sample_walk_poses(scene: Scene, arc_length: np.ndarray, rng: np.random.Generator,
                      config: WalkConfig = WalkConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Poses at the given arc lengths along the streets: rotations (N, 3, 3), translations (N, 3)."""
    n = len(arc_length)
    points, direction = _street_frame(scene, np.asarray(arc_length, float))
    side = np.stack([-direction[:, 1], direction[:, 0]], axis=1)
    points = points + rng.uniform(-config.lateral_range, config.lateral_range, (n, 1)) * side
    street_heading = np.degrees(np.arctan2(direction[:, 0], direction[:, 1]))
    heading = (street_heading + 180.0 * rng.integers(0, 2, n) + rng.choice(config.view_offsets_deg, n)
               + rng.normal(0, config.heading_noise_deg, n))
    pitch = config.pitch_deg + rng.normal(0, config.pitch_noise_deg, n)
    roll = rng.normal(0, config.roll_noise_deg, n)
    centers = np.concatenate([points, np.full((n, 1), config.eye_height)], axis=1)
    rotations = np.array([rotation_from_angles(*angles) for angles in zip(heading, pitch, roll)]).reshape(n, 3, 3)
    translations = -np.einsum("nij,nj->ni", rotations, centers)
    return rotations, translations


def reference_arc_lengths(scene: Scene, num: int, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced stops of a mapping walk, with some jitter."""
    spacing = street_length(scene) / num
    return (np.arange(num) + 0.5 + rng.uniform(-0.3, 0.3, num)) * spacing


def query_arc_lengths(scene: Scene, num: int, rng: np.random.Generator) -> np.ndarray:
    """Independent random stops along the same streets."""
    return rng.uniform(0, street_length(scene), num)
