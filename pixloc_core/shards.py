"""Shard index: square grid cells in the map's metric frame, each with a halo of neighbours.

Why a metric grid rather than H3: it works for maps without georegistration (a reference model in
its own metric frame), halos are exact distances in metres rather than hexagon rings, and a cell
is two integer divisions away from any position, so that lookups for millions of positions are a
few vectorised numpy operations with no scan and no extra dependency. The map frame is assumed to
have z up (true for georegistered maps, whose frame is ENU): cells tile the x-y plane.

A cell owns the reference images whose centres fall inside it; its halo images are those of other
cells whose centres lie within `halo_m` of its bounds, so that a query near a border still sees
every reference it needs from one cell.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

default_conf = {
    "cell_size_m": 50.0,
    "halo_m": 25.0,
}

# Integer cell coordinates -> one non-negative int64 key: +-2^30 cells of 1 m still fit in 62 bits.
_KEY_OFFSET = 1 << 30


def cell_id(ix: int, iy: int) -> str:
    """A stable, sortable string: cell (3, -1) is 'x+0003_y-0001'."""
    return f"x{ix:+05d}_y{iy:+05d}"


def cell_coordinates(cell: str) -> tuple[int, int]:
    """The inverse of `cell_id`."""
    x, y = cell.split("_")
    return int(x[1:]), int(y[1:])


def _keys(cells: np.ndarray) -> np.ndarray:
    """(N, 2) int64 cell coordinates -> (N,) int64 keys."""
    return (cells[:, 0] + _KEY_OFFSET) * (1 << 31) + (cells[:, 1] + _KEY_OFFSET)


@dataclass
class ShardIndex:
    cell_size_m: float
    halo_m: float
    image_names: list[str]
    image_centers: np.ndarray  # (N, 3) map frame
    cell_ids: list[str] = field(init=False)  # cells that own at least one image, sorted by key
    cell_images: dict[str, list[str]] = field(init=False)  # owned images per cell
    halo_images: dict[str, list[str]] = field(init=False)  # neighbours within the halo per cell

    def __post_init__(self):
        self.image_centers = np.asarray(self.image_centers, dtype=np.float64).reshape(-1, 3)
        owner_cells = self.cell_coordinates(self.image_centers)  # (N, 2)
        self._cell_keys, first_image, self._owner_index = np.unique(
            _keys(owner_cells), return_index=True, return_inverse=True)  # (C,), (C,), (N,)
        self.cell_ids = [cell_id(*coordinates) for coordinates in owner_cells[first_image].tolist()]
        # Images grouped by owner cell: those of cell c are _images_by_cell[_cell_starts[c]:_cell_starts[c + 1]].
        self._images_by_cell = np.argsort(self._owner_index, kind="stable")
        self._cell_starts = np.searchsorted(self._owner_index[self._images_by_cell], np.arange(len(self.cell_ids) + 1))
        self.cell_images = {cell: [self.image_names[i] for i in self._owned(c).tolist()]
                            for c, cell in enumerate(self.cell_ids)}
        self.halo_images = {cell: [] for cell in self.cell_ids}
        image_index, cell_index = self.cells_within_batch(self.image_centers, self.halo_m)
        for i, c in zip(image_index.tolist(), cell_index.tolist()):
            if c != self._owner_index[i]:
                self.halo_images[self.cell_ids[c]].append(self.image_names[i])

    @classmethod
    def build(cls, image_centers: dict[str, np.ndarray], conf: dict | None = None) -> ShardIndex:
        conf = {**default_conf, **(conf or {})}
        names = sorted(image_centers)
        centers = np.array([image_centers[name] for name in names]).reshape(-1, 3)
        return cls(conf["cell_size_m"], conf["halo_m"], names, centers)

    def cell_coordinates(self, positions: np.ndarray) -> np.ndarray:
        """(N, 2|3) -> (N, 2) int64 integer cell coordinates."""
        return np.floor(np.asarray(positions, dtype=np.float64)[:, :2] / self.cell_size_m).astype(np.int64)

    def cell_of(self, position: np.ndarray) -> str:
        """The id of the grid cell containing `position` (2,) or (3,), whether it owns images or not."""
        return cell_id(*self.cell_coordinates(np.asarray(position)[None])[0].tolist())

    def cells_within_batch(self, positions: np.ndarray, radius_m: float, chunk_size: int = 1 << 16
                           ) -> tuple[np.ndarray, np.ndarray]:
        """positions: (N, 2|3). Every (position, cell) pair where a cell that owns images comes
        within `radius_m` of the position, as (K,) position indices (ascending) and (K,) indices
        into `cell_ids`. Chunks keep the temporaries small enough for the allocator to reuse them
        (fresh pages for 100 MB temporaries cost more than the arithmetic)."""
        positions = np.asarray(positions, dtype=np.float64)
        positions = positions.reshape(len(positions), -1)[:, :2] if len(positions) else np.zeros((0, 2))  # (N, 2)
        if len(positions) > chunk_size:
            chunks = [self.cells_within_batch(positions[start:start + chunk_size], radius_m, chunk_size)
                      for start in range(0, len(positions), chunk_size)]
            position_index = np.concatenate([index + start for (index, _), start
                                             in zip(chunks, range(0, len(positions), chunk_size))])
            return position_index, np.concatenate([cells for _, cells in chunks])
        reach = math.ceil(radius_m / self.cell_size_m)
        steps = np.arange(-reach, reach + 1)  # (K,) cell offsets along one axis
        scaled = positions / self.cell_size_m
        base = np.floor(scaled)
        local = scaled - base  # (N, 2) position inside its own cell, in [0, 1)
        # Per axis, the squared gap (in cells) between the position and the cell `base + step`.
        gap_x, gap_y = (np.maximum(np.maximum(steps - local[:, i:i + 1], local[:, i:i + 1] - steps - 1), 0) ** 2
                        for i in (0, 1))  # (N, K) each
        close = gap_x[:, :, None] + gap_y[:, None, :] <= (radius_m / self.cell_size_m) ** 2  # (N, K, K)
        position_index, step_x, step_y = np.nonzero(close)
        offsets = np.stack([steps[step_x], steps[step_y]], axis=1)  # (M, 2)
        keys = _keys(base.astype(np.int64)[position_index] + offsets)
        slots = np.clip(np.searchsorted(self._cell_keys, keys), 0, max(len(self._cell_keys) - 1, 0))
        exists = self._cell_keys[slots] == keys if len(self._cell_keys) else np.zeros(len(keys), bool)
        return position_index[exists], slots[exists]

    def cells_within(self, position: np.ndarray, radius_m: float) -> list[str]:
        """Ids of the cells owning images that come within `radius_m` of `position` (2,) or (3,)."""
        _, cell_index = self.cells_within_batch(np.asarray(position)[None], radius_m)
        return [self.cell_ids[i] for i in cell_index.tolist()]

    def images_near(self, position: np.ndarray, radius_m: float) -> list[str]:
        """Reference images whose centres are within `radius_m` of `position` in x-y, nearest first.
        Only the owned images of the cells in range are measured, so the cost is independent of
        the map size."""
        position = np.asarray(position, dtype=np.float64)
        _, cell_index = self.cells_within_batch(position[None], radius_m)
        image_index = np.concatenate([self._owned(c) for c in cell_index.tolist()] or [np.empty(0, np.int64)])
        distances = np.linalg.norm(self.image_centers[image_index, :2] - position[:2], axis=1)
        keep = distances <= radius_m
        order = np.argsort(distances[keep], kind="stable")
        return [self.image_names[i] for i in image_index[keep][order].tolist()]

    def _owned(self, cell_index: int) -> np.ndarray:
        """Indices of the images owned by the cell `cell_ids[cell_index]`."""
        return self._images_by_cell[self._cell_starts[cell_index]:self._cell_starts[cell_index + 1]]

    def images_of(self, cell: str, with_halo: bool = True) -> list[str]:
        return self.cell_images[cell] + (self.halo_images[cell] if with_halo else [])

    def to_dict(self) -> dict:
        return {
            "grid": "metric square cells in the map frame x-y plane",
            "cell_size_m": self.cell_size_m,
            "halo_m": self.halo_m,
            "images": {name: center.tolist() for name, center in zip(self.image_names, self.image_centers)},
            "cells": {cell: {"images": self.cell_images[cell], "halo_images": self.halo_images[cell]}
                      for cell in self.cell_ids},
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> ShardIndex:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict) -> ShardIndex:
        """The cells are recomputed from the image centres, so they always match the grid."""
        names = list(data["images"])
        centers = np.array([data["images"][name] for name in names]).reshape(-1, 3)
        return cls(data["cell_size_m"], data["halo_m"], names, centers)
