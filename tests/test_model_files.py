"""A region of a COLMAP model read alone, changed, and patched back equals the whole model
changed the same way and written by pycolmap."""
from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from pixloc_core import model_files


def random_model(seed: int = 0, num_images: int = 8, num_points: int = 60) -> pycolmap.Reconstruction:
    rng = np.random.default_rng(seed)
    model = pycolmap.Reconstruction()
    model.add_camera_with_trivial_rig(pycolmap.Camera.create_from_model_name(1, "SIMPLE_RADIAL", 100.0, 64, 48))
    model.add_camera_with_trivial_rig(pycolmap.Camera.create_from_model_name(2, "PINHOLE", 90.0, 80, 60))
    for image_id in rng.permutation(np.arange(1, num_images + 1)).tolist():  # registered out of id order
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(rng.normal(size=3) * 0.1), rng.normal(size=3))
        model.add_image_with_trivial_frame(pycolmap.Image(
            name=f"photos/im_{image_id:03d}.jpg", keypoints=rng.uniform(0, 48, (30, 2)), camera_id=1 + image_id % 2,
            image_id=image_id), pose)
    free = {image_id: list(rng.permutation(30)) for image_id in model.images}
    for _ in range(num_points):
        seen_by = rng.choice(sorted(model.images), size=rng.integers(2, 5), replace=False)
        track = pycolmap.Track([pycolmap.TrackElement(int(i), int(free[int(i)].pop())) for i in seen_by])
        model.add_point3D(rng.normal(size=3) + [0, 0, 6], track, rng.integers(0, 255, 3).astype(np.uint8))
    model.update_point_3d_errors()
    return model


def change(model: pycolmap.Reconstruction, next_image_id: int, next_point_id: int) -> dict:
    """What an update does: a new image on a new camera, one of its keypoints joins a point that
    images 1 and 2 see, and a new point seen by it and image 3."""
    camera = pycolmap.Camera.create_from_model_name(next_image_id, "SIMPLE_PINHOLE", 70.0, 50, 40)
    model.add_camera_with_trivial_rig(camera)
    model.add_image_with_trivial_frame(pycolmap.Image(
        name="new/one.jpg", keypoints=np.arange(20.0).reshape(10, 2), camera_id=camera.camera_id,
        image_id=next_image_id), pycolmap.Rigid3d(pycolmap.Rotation3d(), np.array([0.1, 0.0, 0.2])))
    joined = min(point_id for point_id, point in model.points3D.items()
                 if {element.image_id for element in point.track.elements} & {1, 2})
    model.add_observation(joined, pycolmap.TrackElement(next_image_id, 4))
    image3 = model.images[3]
    free = next(i for i, point in enumerate(image3.points2D) if not point.has_point3D())
    point = pycolmap.Point3D()
    point.xyz, point.color = np.array([0.3, -0.2, 5.0]), np.array([9, 8, 7], np.uint8)
    point.track = pycolmap.Track([pycolmap.TrackElement(next_image_id, 7), pycolmap.TrackElement(3, free)])
    model.add_point3D_with_id(next_point_id, point)
    return {"changed_image_ids": {next_image_id, 3}, "extended_point_ids": {joined}, "new_point_ids": {next_point_id}}


def write(model: pycolmap.Reconstruction, path):
    path.mkdir(parents=True, exist_ok=True)
    model.write(path)


def read(path) -> pycolmap.Reconstruction:
    model = pycolmap.Reconstruction()
    model.read(path)
    return model


def assert_same_models(actual: pycolmap.Reconstruction, expected: pycolmap.Reconstruction) -> None:
    assert sorted(actual.cameras) == sorted(expected.cameras)
    for camera_id, camera in expected.cameras.items():
        assert actual.cameras[camera_id].model == camera.model
        np.testing.assert_array_equal(actual.cameras[camera_id].params, camera.params)
    assert sorted(actual.rigs) == sorted(expected.rigs) and sorted(actual.frames) == sorted(expected.frames)
    assert sorted(actual.images) == sorted(expected.images)
    for image_id, image in expected.images.items():
        other = actual.images[image_id]
        assert (other.name, other.camera_id) == (image.name, image.camera_id)
        np.testing.assert_array_equal(other.cam_from_world().matrix(), image.cam_from_world().matrix())
        assert [(p.xy.tolist(), p.point3D_id) for p in other.points2D] == [(p.xy.tolist(), p.point3D_id)
                                                                          for p in image.points2D]
    assert sorted(actual.points3D) == sorted(expected.points3D)
    for point_id, point in expected.points3D.items():
        other = actual.points3D[point_id]
        np.testing.assert_array_equal(other.xyz, point.xyz)
        np.testing.assert_array_equal(other.color, point.color)
        assert sorted((e.image_id, e.point2D_idx) for e in other.track.elements) == sorted(
            (e.image_id, e.point2D_idx) for e in point.track.elements)
        assert other.error == pytest.approx(point.error, rel=1e-9, abs=1e-12)


def test_region_holds_its_images_whole_and_their_points_cut_to_them(tmp_path):
    model = random_model()
    model.write(tmp_path)
    names = [model.images[i].name for i in (2, 5, 7)]
    region = model_files.read_region(tmp_path, [*names, "not/in/the/model.jpg"])
    part = region.reconstruction
    assert sorted(part.images) == sorted(region.image_offsets) == [2, 5, 7]
    assert sorted(part.cameras) == [1, 2]
    assert (region.next_image_id, region.next_point3D_id) == (max(model.images) + 1, max(model.points3D) + 1)
    seen = {point_id for i in (2, 5, 7) for point_id in
            (p.point3D_id for p in model.images[i].points2D if p.has_point3D())}
    assert sorted(part.points3D) == sorted(seen) == sorted(region.points)
    for image_id in (2, 5, 7):
        np.testing.assert_array_equal(part.images[image_id].cam_from_world().matrix(),
                                      model.images[image_id].cam_from_world().matrix())
        assert [p.point3D_id for p in part.images[image_id].points2D] == [p.point3D_id for p in
                                                                          model.images[image_id].points2D]
    for point_id in seen:
        whole = {(e.image_id, e.point2D_idx) for e in model.points3D[point_id].track.elements}
        cut = {(e.image_id, e.point2D_idx) for e in part.points3D[point_id].track.elements}
        assert cut == {element for element in whole if element[0] in (2, 5, 7)}


@pytest.mark.parametrize("chunk_bytes", [model_files.CHUNK_BYTES, 97])  # 97: records straddle every read
def test_patched_model_equals_the_whole_model_changed(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(model_files, "CHUNK_BYTES", chunk_bytes)
    model = random_model(seed=3)
    write(model, tmp_path / "map")
    region = model_files.read_region(tmp_path / "map", [model.images[i].name for i in (1, 2, 3)])
    changes = change(region.reconstruction, region.next_image_id, region.next_point3D_id)
    region.reconstruction.update_point_3d_errors()  # as merge.extend does: over the region's cut tracks
    model_files.write_patched(region, out_dir=tmp_path / "patched", **changes)

    change(model, max(model.images) + 1, max(model.points3D) + 1)
    model.update_point_3d_errors()  # over whole tracks: the grown point's error is its mean over all
    assert_same_models(read(tmp_path / "patched"), model)
    assert sorted(p.name for p in (tmp_path / "patched").iterdir()) == sorted(model_files.MODEL_FILES)


def test_unchanged_records_are_copied_byte_for_byte(tmp_path):
    model = random_model(seed=5)
    write(model, tmp_path / "map")
    region = model_files.read_region(tmp_path / "map", [model.images[4].name])
    model_files.write_patched(region, [], [], [], tmp_path / "patched")
    for name in model_files.MODEL_FILES:
        assert (tmp_path / "patched" / name).read_bytes() == (tmp_path / "map" / name).read_bytes()


def test_a_model_with_rigs_of_their_own_is_refused(tmp_path):
    """Camera 1 in rig 2: a new camera 2 would get rig 2 too, so the patch refuses."""
    model = pycolmap.Reconstruction()
    model.add_camera(pycolmap.Camera.create_from_model_name(1, "PINHOLE", 90.0, 80, 60))
    rig = pycolmap.Rig(rig_id=2)
    rig.add_ref_sensor(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, 1))
    model.add_rig(rig)
    for image_id in (1, 2):
        frame = pycolmap.Frame(frame_id=image_id, rig_id=2)
        frame.rig_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(), np.array([image_id, 0.0, 0.0]))
        frame.add_data_id(pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, 1), image_id))
        model.add_frame(frame)
        image = pycolmap.Image(name=f"{image_id}.jpg", camera_id=1, image_id=image_id, frame_id=image_id)
        image.points2D = pycolmap.Point2DList([pycolmap.Point2D(np.zeros(2)) for _ in range(3)])
        model.add_image(image)
        model.register_frame(image_id)
    write(model, tmp_path / "map")
    region = model_files.read_region(tmp_path / "map", ["1.jpg"])
    region.reconstruction.add_camera_with_trivial_rig(pycolmap.Camera.create_from_model_name(2, "PINHOLE", 70.0, 80, 60))
    with pytest.raises(ValueError, match="one rig per camera"):
        model_files.write_patched(region, [], [], [], tmp_path / "patched")


@pytest.mark.parametrize("text", [False, True])
def test_posed_images_read_without_their_points(tmp_path, text):
    """A whole SfM model as a reference: its cameras and poses, none of its 2D or 3D points."""
    model = random_model()
    model.deregister_frame(5)  # not written: a model holds only posed images
    tmp_path.mkdir(exist_ok=True)
    (model.write_text if text else model.write)(tmp_path)
    poses = model_files.read_posed_images(tmp_path)
    expected = read(tmp_path)
    assert poses.num_points3D() == 0 and sorted(poses.images) == sorted(expected.images) == [1, 2, 3, 4, 6, 7, 8]
    for image_id, image in expected.images.items():
        other = poses.images[image_id]
        assert (other.name, other.camera_id, other.num_points2D()) == (image.name, image.camera_id, 0)
        assert other.has_pose
        np.testing.assert_allclose(other.cam_from_world().matrix(), image.cam_from_world().matrix(), atol=1e-15)
    for camera_id, camera in expected.cameras.items():
        assert poses.cameras[camera_id].model == camera.model
        np.testing.assert_array_equal(poses.cameras[camera_id].params, camera.params)
