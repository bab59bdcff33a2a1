"""The shard index: halo membership at cell borders, vectorised range queries checked against
brute force on a million positions, nearest images, JSON round trip."""
from __future__ import annotations

import numpy as np
import pytest

from pixloc_core.shards import ShardIndex, cell_id


def brute_force_cells_within(index: ShardIndex, position: np.ndarray, radius: float) -> set[str]:
    cells = set()
    for cell in index.cell_ids:
        ix, iy = int(cell[1:6]), int(cell[8:13])
        lower = np.array([ix, iy]) * index.cell_size_m
        nearest = np.clip(position[:2], lower, lower + index.cell_size_m)
        if np.linalg.norm(nearest - position[:2]) <= radius:
            cells.add(cell)
    return cells


@pytest.fixture(scope="module")
def random_index() -> ShardIndex:
    rng = np.random.default_rng(0)
    return ShardIndex.build({f"img{i:04d}": rng.uniform(-300, 300, 3) for i in range(2000)},
                            {"cell_size_m": 50.0, "halo_m": 25.0})


def test_cell_ids_are_stable_strings():
    assert cell_id(3, -1) == "x+0003_y-0001"
    index = ShardIndex.build({"a": np.array([175.0, -0.5, 2.0])}, {"cell_size_m": 50.0})
    assert index.cell_of(np.array([175.0, -0.5])) == "x+0003_y-0001"
    assert index.cell_ids == ["x+0003_y-0001"]


def test_halo_membership_at_cell_borders():
    index = ShardIndex.build({
        "inside": np.array([10.0, 10.0, 0.0]),  # x+0000_y+0000
        "near_border": np.array([60.0, 10.0, 0.0]),  # x+0001_y+0000, 10 m right of x+0000_y+0000
        "at_halo_limit": np.array([-25.0, 40.0, 0.0]),  # x-0001_y+0000, exactly 25 m left of it
        "beyond_halo": np.array([-25.1, 10.0, 0.0]),  # x-0001_y+0000, 25.1 m left of it
        "diagonal_near": np.array([-10.0, -10.0, 0.0]),  # x-0001_y-0001, 14.1 m from its corner
        "diagonal_far": np.array([-20.0, -20.0, 0.0]),  # 28.3 m from the corner, 20 m per axis
        "above": np.array([98.0, 52.0, 0.0]),  # x+0001_y+0001, 2 m above x+0001_y+0000
    }, {"cell_size_m": 50.0, "halo_m": 25.0})
    assert index.cell_images == {
        "x-0001_y-0001": ["diagonal_far", "diagonal_near"],
        "x-0001_y+0000": ["at_halo_limit", "beyond_halo"],
        "x+0000_y+0000": ["inside"],
        "x+0001_y+0000": ["near_border"],
        "x+0001_y+0001": ["above"],
    }
    halo = {cell: set(names) for cell, names in index.halo_images.items()}
    assert halo["x+0000_y+0000"] == {"near_border", "at_halo_limit", "diagonal_near"}
    assert halo["x+0001_y+0000"] == {"above"}
    assert halo["x+0001_y+0001"] == set()
    assert halo["x-0001_y+0000"] == {"inside", "diagonal_near", "diagonal_far"}
    assert halo["x-0001_y-0001"] == {"inside", "beyond_halo"}
    assert index.images_of("x+0001_y+0000") == ["near_border", "above"]


def test_cells_within_a_million_positions_matches_brute_force(random_index):
    rng = np.random.default_rng(1)
    positions = rng.uniform(-400, 400, (1_000_000, 2))
    position_index, cell_index = random_index.cells_within_batch(positions, 30.0)
    assert len(position_index) > 1_000_000
    assert np.all(np.diff(position_index) >= 0)  # grouped by position
    for i in rng.choice(len(positions), 300, replace=False):
        start, stop = np.searchsorted(position_index, [i, i + 1])
        found = {random_index.cell_ids[c] for c in cell_index[start:stop]}
        assert found == brute_force_cells_within(random_index, positions[i], 30.0)
    far = np.array([5000.0, 5000.0, 0.0])
    assert random_index.cells_within(far, 100.0) == []
    assert random_index.cells_within(np.array([10.0, 10.0]), 0.0) == [random_index.cell_of(np.array([10.0, 10.0]))]


def test_images_near_matches_brute_force(random_index):
    position = np.array([12.0, -40.0, 5.0])
    distances = np.linalg.norm(random_index.image_centers[:, :2] - position[:2], axis=1)
    expected = [random_index.image_names[i] for i in np.argsort(distances) if distances[i] <= 60.0]
    assert random_index.images_near(position, 60.0) == expected
    assert random_index.images_near(np.array([5000.0, 0.0]), 60.0) == []


def test_json_round_trip(random_index, tmp_path):
    random_index.save(tmp_path / "shards.json")
    loaded = ShardIndex.load(tmp_path / "shards.json")
    assert (loaded.cell_size_m, loaded.halo_m) == (50.0, 25.0)
    assert loaded.cell_ids == random_index.cell_ids
    assert loaded.cell_images == random_index.cell_images
    assert loaded.halo_images == random_index.halo_images
    np.testing.assert_array_equal(loaded.image_centers, random_index.image_centers)
