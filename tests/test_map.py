"""`pixloc map`: triangulation from a synthetic reference model (checked against the true scene
geometry), import of a COLMAP text model with corrupt and missing images, degenerate input, and
SfM + georegistration on the real Lund street sequence."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from jobs.cli import main as cli_main
from jobs.map import build_map
from pixloc_core import exif
from pixloc_core.io import read_poses, read_priors
from pixloc_core.map_io import SceneMap, model_fingerprint
from pixloc_core.images import list_images
from pixloc_core.mapping import keypoints, sfm
from pixloc_core.synthetic import PinholeIntrinsics, SceneConfig, build_scene, raycast
from pixloc_core.synthetic import dataset

pycolmap.logging.minloglevel = 2


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A 320x240 street walk with 30 references: sparse (about 12 m between stops), like a real one."""
    return dataset.main(tmp_path_factory.mktemp("map") / "scene",
                        {"num_refs": 30, "num_queries": 2, "width": 320, "height": 240})


@pytest.fixture(scope="module")
def triangulated(scene, tmp_path_factory) -> SceneMap:
    out = tmp_path_factory.mktemp("map") / "map"
    build_map(scene / "mapping", out, reference_model=scene / "reference_model",
              priors=read_priors(scene / "mapping_priors.csv"))
    return SceneMap.load(out)


def test_triangulated_points_lie_on_the_true_surfaces(scene, triangulated):
    reconstruction = triangulated.reconstruction
    assert reconstruction.num_reg_images() == 30
    assert reconstruction.num_points3D() > 300
    assert reconstruction.compute_mean_reprojection_error() < 1.0
    # The reference poses are kept as they are.
    gt = read_poses(scene / "gt_mapping.txt")
    image = reconstruction.find_image_with_name("ref_0000.jpg")
    np.testing.assert_allclose(image.cam_from_world().translation, gt["ref_0000.jpg"][1], atol=1e-6)

    summary = json.loads((scene / "scene.json").read_text())
    synthetic_scene = build_scene(SceneConfig(seed=summary["seed"]))  # the origin does not move the geometry
    camera = PinholeIntrinsics(320, 240, *summary["camera"]["params"])
    relative_errors = []
    for image in list(reconstruction.images.values())[::3]:
        cam_from_world = image.cam_from_world()
        rotation, translation = cam_from_world.rotation.matrix(), cam_from_world.translation
        true_depth = raycast(synthetic_scene, camera, rotation, translation).depth
        for point2D in image.points2D:
            if point2D.has_point3D():
                depth = (cam_from_world * reconstruction.points3D[point2D.point3D_id].xyz)[2]
                column, row = np.floor(point2D.xy).astype(int)
                # SIFT likes corners: compare with the 3x3 pixels around, in case of a depth edge.
                window = true_depth[max(row - 1, 0):row + 2, max(column - 1, 0):column + 2]
                with np.errstate(invalid="ignore"):  # sky pixels: infinite depth
                    relative_errors.append(np.min(np.abs(depth - window) / window))
    assert len(relative_errors) > 100
    assert np.mean(np.array(relative_errors) < 0.02) > 0.75


def test_map_directory_and_georegistration(scene, triangulated):
    manifest = triangulated.manifest
    assert manifest["source"] == "reference-model"
    assert manifest["num_points3D"] == triangulated.reconstruction.num_points3D()
    assert manifest["skipped"] == []
    # a query with the references' EXIF finds their (here: true) camera, not one made from its EXIF
    reconstruction = triangulated.reconstruction
    camera = reconstruction.cameras[reconstruction.find_image_with_name("ref_0000.jpg").camera_id]
    focal = exif.read_exif_focal_px(scene / "mapping" / "ref_0000.jpg", camera.width, camera.height)
    assert triangulated.camera_for_exif(camera.width, camera.height, focal) is not None
    assert triangulated.fingerprint == model_fingerprint(triangulated.path / "model")
    assert len(triangulated.point3D_ids) == triangulated.reconstruction.num_points3D()
    np.testing.assert_allclose(np.linalg.norm(triangulated.descriptors.astype(np.float32), axis=1), 1, atol=1e-2)

    # The synthetic map frame is ENU: the map->ENU similarity is a shift to the priors' mean.
    geo = triangulated.geo
    assert geo.registration["num_images"] == 30
    assert geo.registration["median_residual_m"] < 2.0  # mapping priors have 1 m noise per axis
    assert abs(geo.map_to_enu.scale - 1) < 0.01
    np.testing.assert_allclose(geo.map_to_enu.rotation, np.eye(3), atol=0.01)
    gt_centers = {name: -pycolmap.Rotation3d(np.roll(q, -1)).matrix().T @ t
                  for name, (q, t) in read_poses(scene / "gt_queries.txt").items()}
    for name, prior in read_priors(scene / "priors.csv").items():
        assert np.linalg.norm(triangulated.prior_to_map(prior)[:2] - gt_centers[name][:2]) < 5 * 10.0

    shards = triangulated.shards
    assert sorted(name for cell in shards.cell_ids for name in shards.cell_images[cell]) == \
        sorted(image.name for image in triangulated.reconstruction.images.values())


def test_import_text_model_with_corrupt_and_missing_images(scene, triangulated, tmp_path):
    model_text = tmp_path / "model_text"
    model_text.mkdir()
    triangulated.reconstruction.write_text(model_text)
    images = tmp_path / "images"
    shutil.copytree(scene / "mapping", images)
    (images / "ref_0003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    (images / "ref_0004.jpg").unlink()

    build_map(images, tmp_path / "imported", import_model=model_text,
              priors=read_priors(scene / "mapping_priors.csv"))
    imported = SceneMap.load(tmp_path / "imported")
    assert imported.manifest["source"] == "import"
    assert {entry["name"] for entry in imported.manifest["skipped"]} == {"ref_0003.jpg", "ref_0004.jpg"}
    assert any("cannot decode" in entry["reason"] for entry in imported.manifest["skipped"])
    assert any("not found" in entry["reason"] for entry in imported.manifest["skipped"])
    assert imported.reconstruction.num_points3D() == triangulated.reconstruction.num_points3D()
    # Descriptors are recovered through the keypoints at the imported 2D points.
    assert len(imported.point3D_ids) > 0.9 * len(triangulated.point3D_ids)
    common, rows_imported, rows_original = np.intersect1d(imported.point3D_ids, triangulated.point3D_ids,
                                                          return_indices=True)
    unaffected = [i for i, point_id in enumerate(common) if not any(
        imported.reconstruction.images[element.image_id].name in ("ref_0003.jpg", "ref_0004.jpg")
        for element in imported.reconstruction.points3D[point_id].track.elements)]
    cosines = np.sum(imported.descriptors[rows_imported[unaffected]].astype(np.float32)
                     * triangulated.descriptors[rows_original[unaffected]].astype(np.float32), axis=1)
    # Equal but where SIFT put several orientations on one location and the nearest keypoint is
    # another orientation than the one matched.
    assert np.mean(cosines > 0.999) > 0.6
    assert imported.geo.registration["median_residual_m"] < 2.0


def test_degenerate_input_is_a_clear_error(scene, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images to map"):
        cli_main(["map", "--images", str(empty), "--out", str(tmp_path / "map")])

    images = tmp_path / "two_images"
    images.mkdir()
    for name in ("ref_0000.jpg", "ref_0001.jpg"):
        shutil.copy(scene / "mapping" / name, images / name)
    (images / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="only 2 readable images"):
        cli_main(["map", "--images", str(images), "--out", str(tmp_path / "map")])

    # Three views of different streets: nothing to reconstruct, and no empty map written.
    far_apart = tmp_path / "far_apart"
    far_apart.mkdir()
    for name in ("ref_0000.jpg", "ref_0010.jpg", "ref_0020.jpg"):
        shutil.copy(scene / "mapping" / name, far_apart / name)
    with pytest.raises(ValueError, match="reconstructed nothing|degenerate map"):
        build_map(far_apart, tmp_path / "map")
    assert not (tmp_path / "map").exists()


@pytest.mark.slow
def test_sfm_and_georegistration_on_lund(shared_data, lund_map):
    images = shared_data / "opensfm" / "lund" / "images"
    scene_map = SceneMap.load(lund_map)
    assert scene_map.reconstruction.num_reg_images() >= 27
    registration = scene_map.geo.registration
    assert registration["median_residual_m"] < 6.0
    # The map frame is ENU (metric, z up): upright phone cameras have their image y axis down.
    assert scene_map.geo.map_to_enu.scale == 1.0
    image_down = np.array([image.cam_from_world().rotation.matrix()[1]
                           for image in scene_map.reconstruction.images.values()])  # (N, 3) in the world
    assert np.median(image_down[:, 2]) < -0.9
    # Queries from the same phone (same size and EXIF focal) get the map's self-calibrated camera.
    image = next(iter(scene_map.reconstruction.images.values()))
    exif_focal = exif.read_exif_focal_px(images / image.name, 1024, 768)
    camera = scene_map.camera_for_exif(1024, 768, exif_focal)
    assert camera is not None and camera.camera_id == image.camera_id
    assert scene_map.camera_for_exif(1024, 768, exif_focal + 50) is None


def test_register_into_needs_the_model_keypoints(triangulated, scene, tmp_path):
    features, _ = keypoints.main(scene / "mapping", list_images(scene / "mapping"), "sift", {"max_num_features": 100})
    with pytest.raises(ValueError, match="not those of the model"):
        sfm.register_into(triangulated.reconstruction, features, {}, {}, scene / "mapping", tmp_path)
