"""Bundle adjustment of a merged map cell by cell (pixloc_core/mapping/cell_adjustment.py), on a
synthetic street whose eastern cell was merged with wrong poses."""
from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from pixloc_core.mapping import cell_adjustment
from pixloc_core.shards import cell_coordinates, cell_id

pycolmap.logging.minloglevel = 2

FACING_NORTH = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # camera z along world +y
WEST, EAST = cell_id(0, 0), cell_id(1, 0)


def street(rng: np.random.Generator) -> tuple[pycolmap.Reconstruction, dict[str, np.ndarray], dict[int, str]]:
    """20 cameras every 2 m along x looking north at a facade 10 m away, its 600 points observed
    (with 0.3 px noise) by every camera that sees them; cell WEST below x = 20 m, EAST above.
    Returns the model, every image's keypoints and each image's cell."""
    camera = pycolmap.Camera.create_from_model_name(1, "SIMPLE_PINHOLE", 300, 320, 240)
    model = pycolmap.Reconstruction()
    model.add_camera_with_trivial_rig(camera)
    xyz = np.column_stack([rng.uniform(-8, 46, 600), rng.uniform(9, 11, 600), rng.uniform(0, 8, 600)])  # (P, 3)
    rotation = pycolmap.Rotation3d(FACING_NORTH)
    keypoints, image_cell, tracks = {}, {}, [pycolmap.Track() for _ in xyz]
    for index in range(20):
        center = np.array([2.0 * index, 0.0, 1.6])
        pose = pycolmap.Rigid3d(rotation, -(FACING_NORTH @ center))
        in_camera = (pose * xyz)  # (P, 3)
        xy = camera.img_from_cam(in_camera)  # (P, 2)
        seen = np.flatnonzero((in_camera[:, 2] > 0) & (xy[:, 0] >= 0) & (xy[:, 0] < 320) & (xy[:, 1] >= 0) & (xy[:, 1] < 240))
        name = f"{index:03d}.jpg"
        keypoints[name] = xy[seen] + rng.normal(0, 0.3, (len(seen), 2))
        image_id = index + 1
        model.add_image_with_trivial_frame(pycolmap.Image(name=name, keypoints=keypoints[name], camera_id=1,
                                                          image_id=image_id), pose)
        image_cell[image_id] = WEST if center[0] < 20 else EAST
        for point2D, row in enumerate(seen.tolist()):
            tracks[row].add_element(image_id, point2D)
    for row, track in enumerate(tracks):
        if track.length() >= 2:
            model.add_point3D_with_id(row + 1, pycolmap.Point3D(xyz=xyz[row], track=track))
    return model, keypoints, image_cell


def centres(model: pycolmap.Reconstruction) -> dict[int, np.ndarray]:
    return {image_id: image.projection_center() for image_id, image in model.images.items()}


@pytest.fixture
def merged_street():
    """The street, and a copy whose eastern cameras were merged 0.3 m and a degree off."""
    rng = np.random.default_rng(0)
    truth, keypoints, image_cell = street(rng)
    merged = pycolmap.Reconstruction(truth)
    for image_id, cell in image_cell.items():
        if cell == EAST:
            frame = merged.frame(merged.image(image_id).frame_id)
            error = pycolmap.Rigid3d(pycolmap.Rotation3d(rng.normal(0, 0.01, 3)), rng.normal(0, 0.3, 3))
            frame.rig_from_world = error * frame.rig_from_world
    return truth, merged, keypoints, image_cell


def test_points_belong_to_one_cell_each(merged_street):
    _, merged, _, image_cell = merged_street
    layout = cell_adjustment.Layout.of(merged, image_cell)
    points = layout.points
    owners = np.array([*sorted(layout.cell_index, key=layout.cell_index.get), ""], dtype=object)[layout.point_cell]
    assert set(owners.tolist()) == {WEST, EAST}
    west_images = [image_id for image_id, cell in image_cell.items() if cell == WEST]
    only_west = np.array([np.isin(points.observation_image[points.observation_point == row], west_images).all()
                          for row in range(points.num_points)])
    assert (owners[only_west] == WEST).all()


def test_groups_take_the_entries_of_a_few_keys_in_order():
    groups = cell_adjustment.Groups.of(np.array([5, 3, 5, 9, 3, 5]))
    entries, bounds = groups.entries(np.array([3, 4, 5]))
    # key 3 at 1 and 4, key 4 nowhere, key 5 at 0, 2 and 5: each key's entries in their order
    assert entries.tolist() == [1, 4, 0, 2, 5] and bounds.tolist() == [0, 2, 2, 5]
    entries, bounds = groups.entries(np.array([], dtype=np.int64))
    assert len(entries) == 0 and bounds.tolist() == [0]


def test_rounds_never_adjust_neighbours_together_and_go_outwards():
    cells = [cell_id(ix, iy) for ix in range(-2, 3) for iy in range(-1, 3)]
    rounds = cell_adjustment.rounds(cells, cell_id(0, 0))
    assert sorted(sum(rounds, [])) == sorted(set(cells) - {cell_id(0, 0)})
    ring = [max(abs(ix), abs(iy)) for ix, iy in (cell_coordinates(group[0]) for group in rounds)]
    assert ring == sorted(ring)
    for group in rounds:
        coordinates = [cell_coordinates(cell) for cell in group]
        assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2 for a in coordinates for b in coordinates if a != b)


def test_a_cell_adjusted_against_its_settled_neighbour_comes_back_and_resumes(merged_street, tmp_path):
    truth, merged, keypoints, image_cell = merged_street
    anchor = cell_adjustment.anchor_cell(image_cell)
    assert anchor == WEST and cell_adjustment.rounds(set(image_cell.values()), anchor) == [[EAST]]

    def errors(model: pycolmap.Reconstruction) -> dict[int, float]:
        return {image_id: float(np.linalg.norm(image.projection_center() - truth.image(image_id).projection_center()))
                for image_id, image in model.images.items()}

    before = errors(merged)
    cell_adjustment.write_parts(tmp_path, merged, cell_adjustment.Layout.of(merged, image_cell),
                                keypoints.__getitem__, [EAST], {WEST})
    own = cell_adjustment.read_own(tmp_path, EAST)
    assert own["images"] == [image_id for image_id, cell in image_cell.items() if cell == EAST]
    result = cell_adjustment.main(tmp_path, EAST)
    assert not result.failure and result.num_images == 10 and result.num_points == len(own["points"]) > 100
    original = pycolmap.Reconstruction(merged)
    cell_adjustment.apply(merged, tmp_path, [EAST])
    after = errors(merged)
    east = own["images"]
    assert np.median([before[i] for i in east]) > 0.2
    # the eastern poses come back to the truth, held by the settled western cell, which stays as it was
    assert np.median([after[i] for i in east]) < 0.08, after
    assert all(after[i] == before[i] == 0 for i in image_cell if i not in east)

    # The same part again (a rerun of the merge): the result is kept; a changed part is adjusted again.
    summary = tmp_path / "adjustment" / EAST / "model" / "summary.json"
    part_images = tmp_path / "adjustment" / EAST / "input" / "images.bin"
    adjusted, written = summary.stat().st_mtime_ns, part_images.stat().st_mtime_ns
    cell_adjustment.write_parts(tmp_path, original, cell_adjustment.Layout.of(original, image_cell),
                                keypoints.__getitem__, [EAST], {WEST})
    assert cell_adjustment.is_done(tmp_path, EAST) and summary.stat().st_mtime_ns == adjusted
    assert part_images.stat().st_mtime_ns == written  # not even written again
    frame = original.frame(original.image(20).frame_id)
    frame.rig_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(), np.array([0.0, 0.0, 0.05])) * frame.rig_from_world
    cell_adjustment.write_parts(tmp_path, original, cell_adjustment.Layout.of(original, image_cell),
                                keypoints.__getitem__, [EAST], {WEST})
    assert not cell_adjustment.is_done(tmp_path, EAST) and part_images.stat().st_mtime_ns != written
