"""Image pairs to match: from known poses, from GPS positions, or exhaustive for small sets."""
from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

default_conf = {
    "num_neighbors": 10,
    # Cameras looking more than this far apart see different things; only used with known poses.
    "max_view_angle_deg": 75.0,
    "max_exhaustive_images": 60,
}


def exhaustive(names: list[str]) -> list[tuple[str, str]]:
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


# The distances computed at once: (chunk, N) float64 matrices of at most this many entries (32 MB),
# whatever N (a chunk of 1,024 rows took 84 MB per matrix at 10,286 images, 3 of them at a time).
MAX_CHUNK_ENTRIES = 1 << 22


def _nearest_pairs(names: list[str], positions: np.ndarray, num_neighbors: int,
                   directions: np.ndarray | None = None, min_cos: float = -1.0) -> list[tuple[str, str]]:
    """positions: (N, 3); directions: (N, 3) unit viewing directions or None. Each image with its
    `num_neighbors` nearest images (among those looking within acos(min_cos) of its direction);
    symmetric pairs, each once. Chunked: memory is bounded by MAX_CHUNK_ENTRIES, not O(N^2)."""
    positions_t = torch.from_numpy(np.asarray(positions, dtype=np.float64))
    directions_t = None if directions is None else torch.from_numpy(np.asarray(directions, dtype=np.float64))
    k = min(num_neighbors, len(names) - 1)
    chunk_size = max(1, MAX_CHUNK_ENTRIES // len(names))
    pairs = set()
    for start in range(0, len(names), chunk_size):
        rows = torch.arange(start, min(start + chunk_size, len(names)))
        distances = torch.cdist(positions_t[rows], positions_t)  # (C, N)
        distances[torch.arange(len(rows)), rows] = torch.inf
        if directions_t is not None:
            distances[directions_t[rows] @ directions_t.T < min_cos] = torch.inf
        nearest_distances, nearest = distances.topk(k, dim=1, largest=False)  # (C, k)
        for i, j in zip(rows[:, None].expand(-1, k)[nearest_distances.isfinite()].tolist(),
                        nearest[nearest_distances.isfinite()].tolist()):
            pairs.add((min(i, j), max(i, j)))
    return [(names[i], names[j]) for i, j in sorted(pairs)]


def from_poses(names: list[str], centers: np.ndarray, viewing_directions: np.ndarray,
               conf: dict | None = None) -> list[tuple[str, str]]:
    """centers, viewing_directions: (N, 3). The nearest cameras whose optical axes are within
    `max_view_angle_deg`, so that pairs overlap in what they see and not only in where they are."""
    conf = {**default_conf, **(conf or {})}
    return _nearest_pairs(names, centers, conf["num_neighbors"], viewing_directions,
                          np.cos(np.radians(conf["max_view_angle_deg"])))


def from_positions(names: list[str], positions: np.ndarray, conf: dict | None = None) -> list[tuple[str, str]]:
    """positions: (N, 3) metric (e.g. GPS in ENU)."""
    conf = {**default_conf, **(conf or {})}
    return _nearest_pairs(names, positions, conf["num_neighbors"])


def main(names: list[str], positions: dict[str, np.ndarray] | None = None,
         conf: dict | None = None) -> list[tuple[str, str]]:
    """Pairs for images without known poses: by position where every image has one, else
    exhaustive, which is only tractable for small sets."""
    conf = {**default_conf, **(conf or {})}
    if positions and all(name in positions for name in names):
        return from_positions(names, np.stack([positions[n] for n in names]), conf)
    if len(names) > conf["max_exhaustive_images"]:
        raise ValueError(f"{len(names)} images without GPS for all of them: exhaustive matching is limited to "
                         f"{conf['max_exhaustive_images']} images; pass --priors or --gps-from-exif")
    if positions:
        logger.info("positions missing for some images: exhaustive pairs")
    return exhaustive(names)
