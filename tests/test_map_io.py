"""SceneMap's camera lookup for query photos by EXIF: the map's calibrated camera, also for
resized copies of mapping-device photos; the tables a map is written with, and derived for a map
written before them."""
from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pycolmap
import pytest

from pixloc_core import exif, files, model_files
from pixloc_core.datasets import copy_image
from pixloc_core.map_io import (IMAGES_PER_ROW_GROUP, OBSERVATIONS_FILE, MapEdit, ReferenceImages, SceneMap,
                                append_descriptors, exif_camera_key, load_map_index, observation_table_info,
                                observations, read_descriptors, read_observations)

FOCAL_35MM = 35.0


def _scene_with_phone_camera() -> SceneMap:
    """A map whose one camera is a self-calibrated 1024 x 768 phone camera (EXIF 35 mm focal 35)."""
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
        camera_id=3, model="SIMPLE_RADIAL", width=1024, height=768, params=[890.0, 510.0, 380.0, -0.03]))
    key = exif_camera_key(1024, 768, exif.focal_px_from_35mm(FOCAL_35MM, 1024, 768))
    return SceneMap(reconstruction, exif_cameras={key: 3})


def test_same_size_gets_the_map_camera():
    scene = _scene_with_phone_camera()
    camera = scene.camera_for_exif(1024, 768, exif.focal_px_from_35mm(FOCAL_35MM, 1024, 768))
    assert camera is not None and camera.camera_id == 3
    np.testing.assert_allclose(camera.params, [890.0, 510.0, 380.0, -0.03])


def test_resized_copy_gets_the_map_camera_rescaled():
    scene = _scene_with_phone_camera()
    camera = scene.camera_for_exif(480, 360, exif.focal_px_from_35mm(FOCAL_35MM, 480, 360))
    assert camera is not None and (camera.width, camera.height) == (480, 360)
    scale = 480 / 1024
    np.testing.assert_allclose(camera.params, [890.0 * scale, 510.0 * scale, 380.0 * scale, -0.03])
    # The map's own camera is left as it was.
    np.testing.assert_allclose(scene.reconstruction.cameras[3].params, [890.0, 510.0, 380.0, -0.03])


@pytest.mark.parametrize("width, height, focal_35mm", [
    (480, 320, FOCAL_35MM),  # another aspect ratio: a crop, not a resize
    (480, 360, 28.0),  # another lens
    (1024, 768, 36.0),
])
def test_other_devices_get_no_map_camera(width, height, focal_35mm):
    scene = _scene_with_phone_camera()
    assert scene.camera_for_exif(width, height, exif.focal_px_from_35mm(focal_35mm, width, height)) is None


def test_resized_lund_photo_reads_back_as_the_map_device(shared_data, tmp_path):
    """A downscaled copy keeps its EXIF block: its EXIF focal, read at its new size, finds the
    camera of the original size."""
    source = shared_data / "opensfm" / "lund" / "images" / "04.jpg"
    scene = SceneMap(pycolmap.Reconstruction(), exif_cameras={
        exif_camera_key(1024, 768, exif.read_exif_focal_px(source, 1024, 768)): 1})
    scene.reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
        camera_id=1, model="SIMPLE_RADIAL", width=1024, height=768, params=[890.0, 512.0, 384.0, 0.0]))
    scale_x, scale_y = copy_image(source, tmp_path / "04.jpg", 480)
    width, height = round(1024 * scale_x), round(768 * scale_y)
    camera = scene.camera_for_exif(width, height, exif.read_exif_focal_px(tmp_path / "04.jpg", width, height))
    assert camera is not None
    assert camera.params[0] == pytest.approx(890.0 * width / 1024)


# ----- the tables a map is written with: what planning and the feature workers read

def _posed_scene(num_images: int) -> SceneMap:
    """Cameras 1 m apart along x, looking at random points 4-6 m ahead (each seen by every camera
    it projects into); a descriptor for the points of even id only, like an imported model whose
    points are not all matched to a keypoint."""
    rng = np.random.default_rng(0)
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
        camera_id=1, model="PINHOLE", width=160, height=120, params=[100.0, 100.0, 80.0, 60.0]))
    points = rng.uniform([-2.0, -2.0, 4.0], [num_images + 2.0, 2.0, 6.0], (20 * num_images, 3))
    tracks = [pycolmap.Track() for _ in points]
    for image_id in range(1, num_images + 1):
        center = np.array([image_id, 0.0, 0.0])
        p_cam = points - center
        xy = 100.0 * p_cam[:, :2] / p_cam[:, 2:] + [80.0, 60.0]
        visible = np.flatnonzero((xy >= 0).all(1) & (xy < [160, 120]).all(1))
        reconstruction.add_image_with_trivial_frame(
            pycolmap.Image(name=f"{image_id:03d}.jpg", camera_id=1, image_id=image_id,
                           points2D=[pycolmap.Point2D(xy[i]) for i in visible]),
            pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), -center))
        for point2D_index, point_index in enumerate(visible):
            tracks[point_index].add_element(image_id, point2D_index)
    for xyz, track in zip(points, tracks):
        if track.length() >= 2:
            reconstruction.add_point3D(xyz, track)
    described = np.array([i for i in sorted(reconstruction.point3D_ids()) if i % 2 == 0], np.int64)
    descriptors = rng.normal(size=(len(described), 8)).astype(np.float16)
    return SceneMap(reconstruction, point3D_ids=described, descriptors=descriptors)


@pytest.fixture(scope="module")
def saved_scene(tmp_path_factory) -> tuple[SceneMap, Path]:
    scene = _posed_scene(2 * IMAGES_PER_ROW_GROUP + 5)
    path = tmp_path_factory.mktemp("map") / "map"
    scene.save(path, "test", path.parent / "images", skipped=[])
    return scene, path


def test_a_worker_reads_the_observations_of_its_images_and_no_others(saved_scene, monkeypatch):
    scene, path = saved_scene
    rows_read = []
    read_parquet = files.read_parquet
    monkeypatch.setattr(files, "read_parquet", lambda *args: rows_read.append(read_parquet(*args).num_rows) or
                        read_parquet(*args))
    wanted = [IMAGES_PER_ROW_GROUP + 2, IMAGES_PER_ROW_GROUP + 3]  # both in the second row group
    observed = read_observations(path, wanted)

    assert sorted(observed) == wanted
    group = range(IMAGES_PER_ROW_GROUP + 1, 2 * IMAGES_PER_ROW_GROUP + 1)
    assert rows_read == [sum(len(observations(scene.reconstruction.images[i]).point3D_ids) for i in group)]
    descriptor_of = dict(zip(scene.point3D_ids.tolist(), scene.descriptors))
    for image_id in wanted:
        expected = observations(scene.reconstruction.images[image_id])
        got = observed[image_id]
        np.testing.assert_array_equal(got.point3D_ids, expected.point3D_ids)
        np.testing.assert_array_equal(got.xy, expected.xy)
        np.testing.assert_array_equal(got.xyz, [scene.reconstruction.points3D[i].xyz for i in expected.point3D_ids])
        np.testing.assert_array_equal(got.described, expected.point3D_ids % 2 == 0)
        np.testing.assert_array_equal(got.descriptors, [descriptor_of[i] for i in expected.point3D_ids[got.described]])
    assert observation_table_info(path) == (scene.fingerprint, 8)


def test_a_read_leaves_no_reference_cycle(saved_scene):
    """A worker reads a footer per batch: held in a cycle, each would live until the garbage
    collector's rare full pass (a worker grew to 1.1 GB at 10,286 references)."""
    _, path = saved_scene
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept in gc.garbage
    try:
        read_observations(path, [1, IMAGES_PER_ROW_GROUP + 1])
        observation_table_info(path)
        gc.collect()
        # Only Arrow's: the session's other threads (Ray's, the S3 server's) make garbage of their own.
        cycles = [type(thing).__name__ for thing in gc.garbage if type(thing).__module__.startswith("pyarrow")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not cycles


@pytest.mark.parametrize("previous_fingerprint", ["of the model", "another model"])
def test_an_edited_map_copies_the_rows_of_the_images_it_did_not_change(saved_scene, tmp_path, previous_fingerprint):
    """The edit names the images it changed: theirs are derived from the model, the others copied
    from the map's tables, unless those belong to another model. Here every point moves, so that
    copied rows show."""
    scene, path = saved_scene
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    scene = SceneMap.load(edited)
    for point in scene.reconstruction.points3D.values():
        point.xyz += 1.0
    changed = IMAGES_PER_ROW_GROUP + 3  # its row group's other images are copied
    fingerprint = scene.fingerprint if previous_fingerprint == "of the model" else "another"
    scene.save(edited, "test", edited.parent / "images", skipped=[],
               edit=MapEdit(edited, fingerprint, frozenset({changed})))

    image_ids = sorted(scene.reconstruction.images)
    before, after = read_observations(path, image_ids), read_observations(edited, image_ids)
    old_digests, new_digests = (ReferenceImages.load(map_dir / "references.parquet").digests_by_name()
                                for map_dir in (path, edited))
    copied = previous_fingerprint == "of the model"
    for image_id in image_ids:
        derived = not copied or image_id == changed
        np.testing.assert_array_equal(after[image_id].xyz, before[image_id].xyz + (1.0 if derived else 0.0))
        np.testing.assert_array_equal(after[image_id].point3D_ids, before[image_id].point3D_ids)
        name = scene.reconstruction.images[image_id].name
        assert (new_digests[name] == old_digests[name]) == (copied and image_id != changed)
    assert observation_table_info(edited) == (scene.fingerprint, 8)


def test_an_image_without_observations_reads_as_empty(saved_scene):
    _, path = saved_scene
    observed = read_observations(path, [10_000])[10_000]
    assert observed.xy.shape == (0, 2) and observed.point3D_ids.shape == (0,) and not observed.described.any()


def test_a_map_written_before_its_tables_gets_them_derived_once(saved_scene, tmp_path, monkeypatch):
    scene, path = saved_scene
    old = tmp_path / "old"
    shutil.copytree(path, old)
    for name in (OBSERVATIONS_FILE, "references.parquet"):
        (old / name).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["cell_fingerprints"]
    (old / "manifest.json").write_text(json.dumps(manifest))

    assert load_map_index(old).references.names == load_map_index(path).references.names
    assert not (old / OBSERVATIONS_FILE).exists()  # planning alone does not need it
    derived = load_map_index(old, with_observations=True)
    assert (old / OBSERVATIONS_FILE).read_bytes() == (path / OBSERVATIONS_FILE).read_bytes()
    assert derived.manifest["cell_fingerprints"] == json.loads((old / "manifest.json").read_text())["cell_fingerprints"]

    # then never again: the model is not read
    monkeypatch.setattr(SceneMap, "load", lambda *args, **kwargs: pytest.fail("the model was read"))
    assert load_map_index(old, with_observations=True).fingerprint == scene.fingerprint


def test_a_table_of_another_model_is_derived_again(saved_scene, tmp_path):
    scene, path = saved_scene
    stale = tmp_path / "stale"
    shutil.copytree(path, stale)
    table = pq.read_table(stale / OBSERVATIONS_FILE)
    pq.write_table(table.slice(0, 10).replace_schema_metadata({"fingerprint": "another model"}), stale / OBSERVATIONS_FILE)
    load_map_index(stale, with_observations=True)
    assert observation_table_info(stale) == (scene.fingerprint, 8)
    assert (stale / OBSERVATIONS_FILE).read_bytes() == (path / OBSERVATIONS_FILE).read_bytes()


@pytest.mark.parametrize("name", [OBSERVATIONS_FILE, "references.parquet"])
def test_a_damaged_table_is_derived_again(saved_scene, tmp_path, name, caplog):
    _, path = saved_scene
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    (damaged / name).write_bytes((damaged / name).read_bytes()[:100])  # a truncated copy
    with caplog.at_level(logging.WARNING, logger="pixloc_core.map_io"):
        load_map_index(damaged, with_observations=True)
    assert f"{damaged / name}: damaged" in caplog.text
    assert (damaged / name).read_bytes() == (path / name).read_bytes()


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 100])  # 100: a few rows per read
def test_descriptors_are_read_and_appended_a_chunk_of_rows_at_a_time(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(model_files, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10_000, 500, replace=False)).astype(np.int64)
    descriptors = rng.normal(size=(500, 16)).astype(np.float16)
    np.savez(tmp_path / "descriptors.npz", point3D_ids=ids, descriptors=descriptors)
    wanted = [int(ids[3]), int(ids[250]), int(ids[499]), 10_001]  # the last: not described
    found_ids, found = read_descriptors(tmp_path / "descriptors.npz", wanted)
    np.testing.assert_array_equal(found_ids, ids[[3, 250, 499]])
    np.testing.assert_array_equal(found, descriptors[[3, 250, 499]])

    new_ids, new = np.array([10_001, 10_007], np.int64), rng.normal(size=(2, 16)).astype(np.float16)
    append_descriptors(tmp_path / "descriptors.npz", tmp_path / "appended.npz", new_ids, new)
    with np.load(tmp_path / "appended.npz") as data:
        np.testing.assert_array_equal(data["point3D_ids"], np.concatenate([ids, new_ids]))
        np.testing.assert_array_equal(data["descriptors"], np.concatenate([descriptors, new]))
