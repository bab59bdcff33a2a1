"""Distributed mapping: a map triangulated cell by cell on Ray against the single-process map of
the same synthetic scene, the per-image work files, and resuming a job stopped half-way."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pycolmap
import pytest

from cluster.store import FeatureStore, StoreMismatchError
from jobs import features, map_update
from jobs.cli import main as cli_main
from jobs.map import WORK_DIR, build_map, build_map_in_cells
from pixloc_core.io import read_priors
from pixloc_core import model_files
from pixloc_core.map_io import (OBSERVATIONS_FILE, REFERENCES_FILE, ReferenceImages, SceneMap, cell_fingerprints,
                                load_map_index, write_derived_tables)
from pixloc_core.mapping import cell_merge, cells, descriptors, merge, model_pieces, triangulation
from pixloc_core.mapping.feature_files import FeatureFiles, MatchFiles
from pixloc_core.mapping.sift import Features
from pixloc_core.synthetic import dataset

pycolmap.logging.minloglevel = 2

# Small cells, so that the 30 references of the street spread over several cells and halos.
CELLS = {"shards": {"cell_size_m": 30.0, "halo_m": 15.0}}
# classic: the tests' cheap extractor; the default (alike-n) costs 7x on a CPU, test_demo and test_features_job run it
STORE_CONF = {"workers": 1, "batch_size": 2, "extractor": "classic"}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return dataset.main(tmp_path_factory.mktemp("cells") / "scene",
                        {"num_refs": 30, "num_queries": 0, "width": 320, "height": 240})


@pytest.fixture(scope="module")
def single(scene, tmp_path_factory) -> SceneMap:
    return build_map(scene / "mapping", tmp_path_factory.mktemp("cells") / "single",
                     reference_model=scene / "reference_model", priors=read_priors(scene / "mapping_priors.csv"),
                     conf=CELLS)


@pytest.fixture(scope="module")
def in_cells(scene, tmp_path_factory, ray_cluster) -> SceneMap:
    index = build_map_in_cells(scene / "mapping", tmp_path_factory.mktemp("cells") / "in_cells",
                               scene / "reference_model", read_priors(scene / "mapping_priors.csv"), CELLS)
    return SceneMap.load(index.path)


def observation_points(reconstruction: pycolmap.Reconstruction) -> dict[tuple[int, int], np.ndarray]:
    """(image id, keypoint index) -> xyz of the 3D point it observes."""
    return {(element.image_id, element.point2D_idx): point.xyz
            for point in reconstruction.points3D.values() for element in point.track.elements}


def test_map_built_in_cells_equals_the_single_process_map(single, in_cells):
    cell_map, one_map = in_cells.reconstruction, single.reconstruction
    assert len(in_cells.shards.cell_ids) > 4
    assert cell_map.num_reg_images() == one_map.num_reg_images() == 30
    assert 0.85 * one_map.num_points3D() <= cell_map.num_points3D() <= 1.1 * one_map.num_points3D()
    assert cell_map.compute_mean_reprojection_error() < 1.0
    # One 3D point per track: no keypoint observes two points (pycolmap would refuse), and the
    # points of the overlaps merged: tracks as long as those of one triangulation of everything.
    assert cell_map.compute_mean_track_length() >= 0.95 * one_map.compute_mean_track_length()
    cell_observations, one_observations = observation_points(cell_map), observation_points(one_map)
    common = sorted(set(cell_observations) & set(one_observations))
    assert len(common) > 0.8 * len(one_observations)
    distances = np.array([np.linalg.norm(cell_observations[key] - one_observations[key]) for key in common])
    assert np.median(distances) < 1e-3  # metres, in a street of 10 m depth
    assert np.mean(distances < 0.05) > 0.95

    # The same map format: descriptors, georegistration, shards, cell fingerprints.
    loaded = SceneMap.load(in_cells.path)
    assert loaded.manifest["source"] == "reference-model"
    assert len(loaded.point3D_ids) == cell_map.num_points3D()
    assert loaded.geo.registration["num_images"] == 30
    assert loaded.manifest["cell_fingerprints"] == fingerprints_from_model(loaded)
    assert set(loaded.manifest["cell_fingerprints"]) == set(loaded.shards.cell_ids)
    # The merged points were triangulated from the same keypoints as the single-process map.
    assert np.allclose(cell_map.images[1].points2D[0].xy, one_map.images[1].points2D[0].xy)


def test_work_files_per_image(scene, in_cells):
    root = in_cells.path / WORK_DIR
    features = FeatureFiles(root)
    assert len(features) == 30
    name = "ref_0005.jpg"
    stored = features[name]
    assert stored.image_size == (320, 240) and len(stored.keypoints) > 100
    assert stored.descriptors.dtype == np.uint8
    # The map's 2D points are the stored keypoints: the model was made from these files.
    image = in_cells.reconstruction.find_image_with_name(name)
    np.testing.assert_allclose(np.array([p.xy for p in image.points2D]), stored.xy, atol=1e-4)
    matches = MatchFiles(root).read("ref_0004.jpg")
    assert name in matches and matches[name].shape[1] == 2 and len(matches[name]) > 5
    assert not list((root / cell_merge.MERGE_DIR).rglob("*.npz"))  # the merge's files are intermediate


def test_feature_files_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    features = Features(rng.uniform(0, 300, (50, 4)).astype(np.float32),
                        rng.integers(0, 256, (50, 128)).astype(np.uint8), (320, 240))
    files = FeatureFiles(tmp_path)
    files.write("sub/a.jpg", features)
    loaded = files["sub/a.jpg"]
    np.testing.assert_array_equal(loaded.keypoints, features.keypoints)
    np.testing.assert_array_equal(loaded.descriptors, features.descriptors)  # exact through float16
    positions = files.keypoints("sub/a.jpg")  # what the map builder holds for every image
    np.testing.assert_array_equal(positions, features.keypoints[:, :2])
    assert positions.shape == (50, 2) and positions.base is None  # not a view that keeps the (N, 4) rows
    assert list(files) == ["sub/a.jpg"] and "b.jpg" not in files and files.image_size("sub/a.jpg") == (320, 240)
    assert not list(tmp_path.rglob("*.tmp"))


def test_merge_joins_points_that_share_an_observation():
    # Points 0 and 1 (two cells) share (image 1, keypoint 7); point 2 shares nothing; 3 links to 1.
    point = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    key = np.array([10, 17, 17, 21, 30, 31, 21, 40])
    label = merge.connected_tracks(point, key, 4)
    assert label[0] == label[1] == label[3] and label[2] != label[0]


def test_the_model_and_tables_written_in_pieces_are_those_of_the_whole_model(in_cells, tmp_path):
    """What the builder concatenated from its pieces against what pycolmap and SceneMap.save write
    from the same model held whole: the same records, point errors and table rows."""
    model = in_cells.path / "model"
    whole = tmp_path / "model"
    whole.mkdir()
    in_cells.reconstruction.write(whole)
    for name in (model_files.CAMERAS, model_files.RIGS, model_files.FRAMES, model_files.POINTS3D):
        assert (model / name).read_bytes() == (whole / name).read_bytes(), name
    ours = {record.id: record.data for record in model_files.records(model / model_files.IMAGES)}
    assert list(ours) == sorted(ours)  # ascending ids, as the chunks were concatenated
    assert ours == {record.id: record.data for record in model_files.records(whole / model_files.IMAGES)}
    # A point's error is COLMAP's: the mean reprojection error over its track.
    recomputed = pycolmap.Reconstruction(in_cells.reconstruction)
    recomputed.update_point_3d_errors()
    for point_id, point in in_cells.reconstruction.points3D.items():
        assert point.error == pytest.approx(recomputed.points3D[point_id].error, abs=1e-9)

    derived = tmp_path / "derived"
    shutil.copytree(in_cells.path, derived, ignore=shutil.ignore_patterns(WORK_DIR))
    scene = SceneMap.load(derived)
    write_derived_tables(scene, derived)
    ours, theirs = pq.read_table(in_cells.path / REFERENCES_FILE), pq.read_table(derived / REFERENCES_FILE)
    assert ours.drop(["median_depth"]).equals(theirs.drop(["median_depth"]), check_metadata=True)
    depths = ours.column("median_depth").to_numpy()
    assert np.array_equal(depths, theirs.column("median_depth").to_numpy(), equal_nan=True)
    assert np.isfinite(depths).sum() > 10  # images without points (NaN) beside images with
    ours, theirs = pq.ParquetFile(in_cells.path / OBSERVATIONS_FILE), pq.ParquetFile(derived / OBSERVATIONS_FILE)
    assert ours.schema_arrow.equals(theirs.schema_arrow, check_metadata=True)
    assert ours.num_row_groups == theirs.num_row_groups > 1
    for group in range(ours.num_row_groups):
        assert ours.read_row_group(group).equals(theirs.read_row_group(group))
    assert not (in_cells.path / WORK_DIR / model_pieces.WRITE_DIR).exists()


def test_cells_merged_cell_by_cell_equal_the_merge_of_every_cell_at_once(scene, in_cells):
    """The map's points, merged cell by cell on Ray (cell_merge.py), are those of merge.main over
    every cell's points in one process: the same tracks, positions and descriptors."""
    root = in_cells.path / WORK_DIR
    reference = cells.read_model(scene / "reference_model")
    work_files = FeatureFiles(root)
    keypoints = {image.image_id: work_files.keypoints(image.name) for image in reference.images.values()}
    built = [path.name for path in (root / cells.CELLS_DIR).iterdir() if (path / cells.POINTS_FILE).is_file()]
    whole = merge.main(merge.skeleton_with_keypoints(reference, lambda image: keypoints[image.image_id]),
                       (cells.load_points(root, cell) for cell in built), keypoints)

    def points_by_track(model: pycolmap.Reconstruction) -> dict[frozenset, int]:
        return {frozenset((element.image_id, element.point2D_idx) for element in point.track.elements): point_id
                for point_id, point in model.points3D.items()}

    merged, expected = points_by_track(in_cells.reconstruction), points_by_track(whole)
    assert len(merged) > 300 and merged.keys() == expected.keys()
    assert max(np.abs(in_cells.reconstruction.points3D[merged[track]].xyz - whole.points3D[expected[track]].xyz).max()
               for track in merged) < 1e-9
    whole_ids, whole_descriptors = descriptors.main(whole, work_files)
    tracks = sorted(merged)
    ours = in_cells.descriptors[np.searchsorted(in_cells.point3D_ids, [merged[track] for track in tracks])]
    theirs = whole_descriptors[np.searchsorted(whole_ids, [expected[track] for track in tracks])]
    np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), atol=2e-3)


def test_track_labels_cross_cells_that_are_not_neighbours(tmp_path):
    """A track seen by cells a, b and c, where a and c share no image: the rounds carry a's label
    through b to c, and the whole track goes to one owner; a point of c alone keeps its own."""
    key = merge.observation_keys
    observations = {"a": [[(1, 5), (2, 7)]], "b": [[(2, 7), (3, 9)]], "c": [[(3, 9), (4, 1)], [(4, 2), (3, 3)]]}
    for cell, points in observations.items():
        rows = [(index, image_id, point2D) for index, point in enumerate(points) for image_id, point2D in point]
        (cells.cell_dir(tmp_path, cell)).mkdir(parents=True)
        merge.CellPoints(np.zeros((len(points), 3)), np.zeros((len(points), 3), np.uint8),
                         *(np.array(column, dtype=np.int64) for column in zip(*rows))
                         ).save(cells.cell_dir(tmp_path, cell) / cells.POINTS_FILE)
    neighbourhoods = {"a": cell_merge.Neighbourhood(["b"], np.array([2])),
                      "b": cell_merge.Neighbourhood(["a", "c"], np.array([2, 3])),
                      "c": cell_merge.Neighbourhood(["b"], np.array([3]))}
    rounds = 0
    while any([cell_merge.label_round(tmp_path, cell, rounds, neighbourhood)
               for cell, neighbourhood in neighbourhoods.items()]):
        rounds += 1
    labels = {cell: np.load(cell_merge.labels_file(tmp_path, cell, rounds))["part_label"] for cell in neighbourhoods}
    assert rounds == 3  # round 0 starts, a's label reaches b in round 1 and c in round 2, round 3 changes nothing
    assert labels["a"][0] == labels["b"][0] == labels["c"][0] == key(1, 5)
    assert labels["c"][1] == key(3, 3)

    owners = cell_merge.Owners(np.array([1, 2, 3, 4]), np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert cell_merge.route(tmp_path, "c", rounds, owners) == ["a", "b"]
    routed = np.load(cell_merge.routed_file(tmp_path, "a", "c"))
    assert routed["label"].tolist() == [key(1, 5)] and routed["observation_image"].tolist() == [3, 4]


def test_track_labels_are_the_connected_components_of_every_cell_at_once(tmp_path):
    """Random cells along a street, each sharing images with the next two: the labels the rounds
    settle on name exactly the tracks that merge.connected_tracks finds over every cell at once,
    each by the smallest observation of its track."""
    rng = np.random.default_rng(7)
    cell_images = {f"c{index}": np.arange(4 * index, 4 * index + 12) for index in range(6)}  # 12 images, 8 shared
    parts, neighbourhoods = {}, {}
    for cell, image_ids in cell_images.items():
        keys = rng.permutation(np.stack(np.meshgrid(image_ids, np.arange(6)), -1).reshape(-1, 2))[:40]  # unique
        used, point = np.unique(np.sort(rng.integers(0, 15, len(keys))), return_inverse=True)  # <= 15 parts
        parts[cell] = merge.CellPoints(np.zeros((len(used), 3)), np.zeros((len(used), 3), np.uint8), point,
                                       keys[:, 0], keys[:, 1])
        cells.cell_dir(tmp_path, cell).mkdir(parents=True)
        parts[cell].save(cells.cell_dir(tmp_path, cell) / cells.POINTS_FILE)
    for cell, image_ids in cell_images.items():
        others = {other: np.intersect1d(image_ids, theirs) for other, theirs in cell_images.items() if other != cell}
        shared = sorted({int(image) for common in others.values() for image in common})
        neighbourhoods[cell] = cell_merge.Neighbourhood(sorted(o for o, common in others.items() if len(common)),
                                                        np.array(shared))
    rounds = 0
    while any([cell_merge.label_round(tmp_path, cell, rounds, neighbourhood)
               for cell, neighbourhood in neighbourhoods.items()]):
        rounds += 1
    labels = np.concatenate([np.load(cell_merge.labels_file(tmp_path, cell, rounds))["part_label"] for cell in parts])

    offsets = np.cumsum([0] + [part.num_points for part in parts.values()])
    point = np.concatenate([part.observation_point + offset for part, offset in zip(parts.values(), offsets)])
    key = np.concatenate([merge.observation_keys(part.observation_image, part.observation_point2D)
                          for part in parts.values()])
    component = merge.connected_tracks(point, key, offsets[-1])
    smallest_key = np.full(offsets[-1], np.iinfo(np.int64).max)
    np.minimum.at(smallest_key, component[point], key)
    cell_of_point = np.repeat(np.arange(len(parts)), np.diff(offsets))
    spans = [np.ptp(cell_of_point[component == track]) for track in np.unique(component)]
    assert rounds > 2 and max(spans) >= 3  # tracks across cells that share no image (c0 and c3)
    np.testing.assert_array_equal(labels, smallest_key[component])


def test_a_cell_of_one_photo_gets_its_reason_and_the_rest_is_built(scene, in_cells, tmp_path, ray_cluster):
    """A photo 500 m from the street is a cell of its own, which cannot be triangulated: the
    manifest says why in one line, and the street's cells are built and merged as without it."""
    reference = cells.read_model(scene / "reference_model")
    first = reference.images[min(reference.images)]
    pose = first.cam_from_world()
    away = pycolmap.Rigid3d(pose.rotation, pose.translation - pose.rotation.matrix() @ np.array([500.0, 0.0, 0.0]))
    reference.add_image_with_trivial_frame(
        pycolmap.Image(name="far_away.jpg", camera_id=first.camera_id, image_id=max(reference.images) + 1), away)
    (tmp_path / "reference").mkdir()
    reference.write(tmp_path / "reference")
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in (scene / "mapping").iterdir():
        (photos / photo.name).symlink_to(photo)
    shutil.copy(scene / "mapping" / first.name, photos / "far_away.jpg")

    built = SceneMap.load(build_map_in_cells(photos, tmp_path / "map", tmp_path / "reference", conf=CELLS).path)

    far_cell = next(cell for cell in built.shards.cell_ids if "far_away.jpg" in built.shards.images_of(cell))
    failures = {failure["cell"]: failure["reason"] for failure in built.manifest["failed_cells"]}
    assert failures.pop(far_cell) == f"cell {far_cell}: 1 image(s) with features, a cell needs 2"
    # The street's own cells, one of which has too few matches to triangulate, as without the photo.
    assert failures == {failure["cell"]: failure["reason"] for failure in in_cells.manifest["failed_cells"]}
    assert built.reconstruction.num_reg_images() == 31
    assert built.reconstruction.num_points3D() == in_cells.reconstruction.num_points3D()
    assert not built.reconstruction.find_image_with_name("far_away.jpg").num_points3D


def test_a_whole_sfm_model_as_the_reference_gives_the_same_map(scene, single, in_cells, tmp_path, ray_cluster):
    """A reference model with every 2D and 3D point (an SfM model, as hloc users have them): only
    its cameras and poses are read, and the map is the one its skeleton gives."""
    assert single.reconstruction.num_points3D() > 0
    built = build_map_in_cells(scene / "mapping", tmp_path / "map", single.path / "model",
                               read_priors(scene / "mapping_priors.csv"), CELLS)
    # The same observations of the same points (that model's poses differ from the reference's in
    # the last bit, so its digests differ).
    ours, theirs = observation_points(SceneMap.load(built.path).reconstruction), observation_points(
        in_cells.reconstruction)
    assert ours.keys() == theirs.keys() and len(ours) > 500
    assert max(np.abs(ours[key] - theirs[key]).max() for key in ours) < 1e-9


def test_resume_skips_finished_cells(scene, in_cells, tmp_path, ray_cluster):
    """A job stopped during triangulation: the rerun redoes only the cells and files missing."""
    out = tmp_path / "map"
    shutil.copytree(in_cells.path / WORK_DIR, out / WORK_DIR)
    root = out / WORK_DIR
    cell_ids = sorted(path.name for path in (root / cells.CELLS_DIR).iterdir())
    unfinished = cell_ids[:2]
    for cell in unfinished:
        (cells.cell_dir(root, cell) / cells.POINTS_FILE).unlink(missing_ok=True)
        (cells.cell_dir(root, cell) / cells.FAILED_FILE).unlink(missing_ok=True)
    (root / "matches" / "ref_0010.jpg.parquet").unlink()
    (root / "features" / "ref_0020.jpg.parquet").unlink()
    before = {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}

    resumed = SceneMap.load(build_map_in_cells(scene / "mapping", out, scene / "reference_model",
                                               read_priors(scene / "mapping_priors.csv"), CELLS).path)
    after = {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}
    rewritten = {path for path in before if after[path] != before[path]
                 and cell_merge.MERGE_DIR not in path.relative_to(root).parts}  # each run merges anew
    # Nothing finished was redone; only the unfinished cells' inputs were written again.
    assert all(path.parent.parent.name in unfinished and path.parent.name == cells.SKELETON_DIR
               for path in rewritten)
    for cell in unfinished:
        assert cells.is_done(root, cell)
    assert (root / "matches" / "ref_0010.jpg.parquet").is_file()
    assert (root / "features" / "ref_0020.jpg.parquet").is_file()
    assert resumed.reconstruction.num_points3D() == in_cells.reconstruction.num_points3D()
    assert resumed.manifest["cell_fingerprints"] == in_cells.manifest["cell_fingerprints"]


def test_a_map_written_before_cell_fingerprints_gets_them_computed(in_cells, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(in_cells.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["cell_fingerprints"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert SceneMap.load(old).cell_fingerprints == in_cells.manifest["cell_fingerprints"]


def fingerprints_from_model(scene_map: SceneMap) -> dict[str, str]:
    return cell_fingerprints(ReferenceImages.from_scene(scene_map).digests_by_name(), scene_map.shards)


def test_update_adds_photos_and_keeps_the_other_cells_and_their_store_partitions(scene, tmp_path, ray_cluster,
                                                                                   monkeypatch, caplog):
    """A map of the western part of the street, updated in place with the eastern photos from a
    folder of their own; its feature store follows it, recomputing only the changed cells, and
    reads each photo from the folder the map took it from."""
    reference = cells.read_model(scene / "reference_model")
    centers = {image.name: image.projection_center() for image in reference.images.values()}
    west = {name for name, center in centers.items() if center[0] < np.quantile([c[0] for c in centers.values()], 0.65)}
    (tmp_path / "west").mkdir()
    triangulation.skeleton_from_reference(reference, west).write(tmp_path / "west")
    west_photos, east_photos = tmp_path / "west_photos", tmp_path / "east_photos"
    for folder, names in ((west_photos, west), (east_photos, set(centers) - west)):
        folder.mkdir()
        for name in names:
            shutil.copy(scene / "mapping" / name, folder / name)
    map_dir = tmp_path / "map"
    build_map_in_cells(west_photos, map_dir, tmp_path / "west", read_priors(scene / "mapping_priors.csv"), CELLS)
    before = SceneMap.load(map_dir)
    store_url = str(tmp_path / "store")
    features.main(map_dir, None, store_url, STORE_CONF)  # from the folder the map was built from
    store_files = {path: path.read_bytes() for path in (tmp_path / "store").glob("cell=*/**/*") if path.is_file()}
    update = ["map", "--update", str(map_dir), "--images", str(east_photos), "--reference-model",
              str(scene / "reference_model")]
    # Stopped after two of the updated map's files replaced the map's: the map still names its old
    # self, and the rerun finishes the replacement without doing the update again.
    replace, replaced = os.replace, []

    def stopped_midway(source, target):
        if map_update.STAGED_DIR in Path(source).parts and map_update.STAGED_DIR not in Path(target).parts:
            if len(replaced) == 2:
                raise OSError(28, "No space left on device")
            replaced.append(target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", stopped_midway)
    assert cli_main(update) == 1
    monkeypatch.undo()
    assert len(replaced) == 2 and json.loads((map_dir / "manifest.json").read_text()) == before.manifest
    with caplog.at_level(logging.INFO, logger="jobs.map_update"):
        assert cli_main(update) == 0
    assert "an earlier run wrote this update whole" in caplog.text

    after = SceneMap.load(map_dir)
    assert after.reconstruction.num_reg_images() == 30
    for name in set(centers) - west:  # new photos keep their reference poses
        np.testing.assert_allclose(after.reconstruction.find_image_with_name(name).projection_center(),
                                   centers[name], atol=1e-6)
    assert after.reconstruction.num_points3D() > before.reconstruction.num_points3D()
    assert set(before.point3D_ids) <= set(after.point3D_ids)  # map points keep their ids
    assert len(after.point3D_ids) == after.reconstruction.num_points3D()
    assert (np.diff(after.point3D_ids) > 0).all()  # ascending, as the descriptors' lookups need
    # The model was patched record by record: its tracks and its images' 2D points agree.
    observed = {(image_id, index): point.point3D_id for image_id, image in after.reconstruction.images.items()
                for index, point in enumerate(image.points2D) if point.has_point3D()}
    assert observed == {(element.image_id, element.point2D_idx): point_id
                        for point_id, point in after.reconstruction.points3D.items() for element in point.track.elements}
    (entry,) = after.manifest["updates"]
    assert entry["new_images"] == entry["registered"] == 30 - len(west)
    assert after.manifest["cell_fingerprints"] == fingerprints_from_model(after)
    # The map's tables, written from the images the update changed, are those of its model.
    fresh = tmp_path / "fresh"
    shutil.copytree(map_dir, fresh, ignore=shutil.ignore_patterns(WORK_DIR, OBSERVATIONS_FILE, REFERENCES_FILE))
    load_map_index(fresh, with_observations=True)  # derives them from the model
    for name in (OBSERVATIONS_FILE, REFERENCES_FILE):
        assert (map_dir / name).read_bytes() == (fresh / name).read_bytes(), name
    # Cells that no new photo reaches (core or halo) keep their fingerprints; the others change.
    old, new = before.manifest["cell_fingerprints"], after.manifest["cell_fingerprints"]
    untouched = [cell for cell in after.shards.cell_ids if not set(after.shards.images_of(cell)) - west]
    assert untouched and all(new[cell] == old[cell] for cell in untouched)
    assert set(entry["changed_cells"]) == {cell for cell in new if new[cell] != old.get(cell)}
    assert set(entry["changed_cells"]).isdisjoint(untouched)
    with pytest.raises(SystemExit, match="no image that"):
        cli_main(["map", "--update", str(map_dir), "--images", str(east_photos),
                  "--reference-model", str(scene / "reference_model")])
    assert after.image_folders == [str(west_photos), str(east_photos)]

    # The store: the build's folder alone lacks the new photos; an unreadable new photo stops its
    # cells, and the store still names the old map, so no reader of the new map sees it half updated.
    with pytest.raises(FileNotFoundError, match=f"{west_photos}: {30 - len(west)} reference images of .* not found"):
        features.main(map_dir, west_photos, store_url, STORE_CONF)
    broken = sorted(set(centers) - west)[0]
    (east_photos / broken).write_bytes(b"not a png")
    with pytest.raises(features.ReferenceImageError, match=f"{broken}: cannot decode"):
        features.main(map_dir, None, store_url, STORE_CONF)
    with pytest.raises(StoreMismatchError):
        FeatureStore.open(store_url, map_fingerprint=after.fingerprint)
    (east_photos / broken).write_bytes((scene / "mapping" / broken).read_bytes())
    resumed = features.main(map_dir, None, store_url, STORE_CONF)

    # The failed run published the changed cells without the broken photo and committed the rest.
    assert resumed["extracted"] == 1
    with_broken = [cell for cell in after.shards.cell_ids if broken in after.shards.images_of(cell)]
    assert resumed["cells_published"] == len(with_broken)
    assert resumed["cells_reused"] == len(after.shards.cell_ids) - len(with_broken)
    store = FeatureStore.open(store_url, map_fingerprint=after.fingerprint)
    for path, content in store_files.items():  # the unchanged cells' files, untouched
        cell = path.relative_to(tmp_path / "store").parts[0].removeprefix("cell=")
        assert (cell in untouched) == (path.exists() and path.read_bytes() == content), path
    ids = {image.name: image_id for image_id, image in after.reconstruction.images.items()}
    for cell in after.shards.cell_ids:
        assert store.manifest(cell, 0)["cell_fingerprint"] == new[cell]
        rows = set(store.load_table(cell, 0, ["image_id"]).column("image_id").to_pylist())
        assert rows <= {ids[name] for name in after.shards.images_of(cell)}
    assert features.main(map_dir, [west_photos, east_photos], store_url, STORE_CONF)["extracted"] == 0
    assert cli_main(["features", "--map", str(map_dir), "--images", str(west_photos), str(east_photos),
                     "--store", store_url, "--extractor", "classic"]) == 0
