"""SfM submodels: aligning submodels through their shared images, merging them, and a Lund map
built from images and EXIF GPS cell by cell on Ray against the single-process SfM."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pycolmap
import pytest

from jobs import map_update
from jobs.map import WORK_DIR, build_sfm_in_cells, exif_priors
from pixloc_core.map_io import SceneMap
from pixloc_core.images import list_images
from pixloc_core.mapping import cell_adjustment, submodels

pycolmap.logging.minloglevel = 2


def street_model(centers: np.ndarray, transform: pycolmap.Sim3d | None = None,
                 indices: range | None = None) -> pycolmap.Reconstruction:
    """Cameras on a straight street (collinear centres) looking sideways at the facades, optionally
    moved into another frame by `transform`; image i (named i + 1) at centres[i], for i in `indices`."""
    model = pycolmap.Reconstruction()
    model.add_camera_with_trivial_rig(pycolmap.Camera.create_from_model_name(1, "SIMPLE_PINHOLE", 300, 320, 240))
    rotation = pycolmap.Rotation3d(np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]))  # camera z along world +y
    for index in indices or range(len(centers)):
        image_id, center = index + 1, centers[index]
        cam_from_world = pycolmap.Rigid3d(rotation, -(rotation.matrix() @ center))
        if transform is not None:
            cam_from_world = transform.transform_camera_world(cam_from_world)
        model.add_image_with_trivial_frame(pycolmap.Image(name=f"{image_id:03d}.jpg", camera_id=1, image_id=image_id),
                                           cam_from_world)
    return model


def test_relative_similarity_recovers_a_known_transform_from_collinear_cameras():
    centers = np.stack([np.linspace(0, 20, 8), np.zeros(8), np.full(8, 1.5)], axis=1)  # (8, 3) on a line
    truth = pycolmap.Sim3d(0.37, pycolmap.Rotation3d(np.array([0.3, -0.2, 0.9]) * 0.8), np.array([4.0, -7.0, 2.0]))
    target = {name: image.cam_from_world() for name, image in submodels.posed_images(street_model(centers)).items()}
    source = submodels.posed_images(street_model(centers, truth.inverse()))
    found, agreeing = submodels.relative_similarity(source, target, submodels.default_conf)
    assert agreeing == 8
    assert found.scale == pytest.approx(truth.scale, rel=1e-6)
    assert np.allclose(found.matrix(), truth.matrix(), atol=1e-6)
    # One wrong shared pose is outvoted; a single shared image cannot fix the scale.
    source["003.jpg"] = submodels.posed_images(street_model(centers[::-1], truth.inverse()))["003.jpg"]
    found, agreeing = submodels.relative_similarity(source, target, submodels.default_conf)
    assert agreeing == 7 and found.scale == pytest.approx(truth.scale, rel=1e-3)
    assert submodels.relative_similarity({"001.jpg": source["001.jpg"]}, target, submodels.default_conf) is None


def test_align_chains_submodels_into_the_frame_of_the_largest():
    centers = np.stack([np.linspace(0, 60, 24), np.zeros(24), np.full(24, 1.5)], axis=1)
    moved = [pycolmap.Sim3d(1.0 + 0.1 * k, pycolmap.Rotation3d(np.array([0.0, 0.0, 0.4 * k])), np.array([k, 2.0 * k, 0]))
             for k in range(3)]
    # Three overlapping submodels along the street, each in its own frame; the largest is the middle one.
    parts = {"west": (0, 9), "middle": (6, 18), "east": (15, 24)}
    models = {}
    for (cell, (start, end)), transform in zip(parts.items(), moved):
        models[cell] = street_model(centers, transform, range(start, end))
    alignment = submodels.align(models)
    assert not alignment.rejected
    # Every submodel is now in the middle one's frame, the east one too although it shares no
    # image with the west one: the chain runs through the middle.
    middle_from_true = moved[1]
    for cell, model in models.items():
        model.transform(alignment.transforms[cell])
        for name, image in submodels.posed_images(model).items():
            true_center = centers[int(name[:3]) - 1]
            assert np.allclose(image.projection_center(), middle_from_true * true_center, atol=1e-6), (cell, name)


def test_one_camera_per_device_in_the_merged_model():
    """Each submodel calibrates the phone on its own; the merged model has one camera per device
    (size and EXIF focal), the median of theirs, as one SfM would."""
    centers = np.stack([np.linspace(0, 20, 9), np.zeros(9), np.full(9, 1.5)], axis=1)
    models = {"a": street_model(centers, indices=range(0, 5)), "b": street_model(centers, indices=range(4, 9)),
              "c": street_model(centers, indices=range(6, 9))}
    for model, focal in zip(models.values(), (290.0, 310.0, 330.0)):
        model.cameras[1].params = [focal, 160, 120]
    other_phone = {"009.jpg"}  # another EXIF focal: its own camera, calibrated by the one submodel that holds it
    focal_px = {f"{i:03d}.jpg": 400.0 if f"{i:03d}.jpg" in other_phone else 300.0 for i in range(1, 10)}
    source = {**{f"{i:03d}.jpg": "a" for i in range(1, 6)}, **{f"{i:03d}.jpg": "b" for i in range(6, 8)},
              "008.jpg": "c", "009.jpg": "b"}
    cameras = submodels.device_cameras(models, source, focal_px)
    phone = {cameras[name].camera_id for name in source if name not in other_phone}
    assert len(phone) == 1 and cameras["009.jpg"].camera_id not in phone
    assert cameras["001.jpg"].params[0] == pytest.approx(290.0)  # median of 5 x 290, 2 x 310, 1 x 330
    assert cameras["009.jpg"].params[0] == pytest.approx(310.0)


LUND_CONF = {"sift": {"max_image_size": 640, "max_num_features": 2048}}


@pytest.fixture(scope="module")
def lund(shared_data, tmp_path_factory) -> tuple:
    """Lund's photos plus an unreadable one, with their EXIF GPS priors except for one photo."""
    images = tmp_path_factory.mktemp("lund") / "images"
    shutil.copytree(shared_data / "opensfm" / "lund" / "images", images)
    priors = exif_priors(images, list_images(images))
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    priors["broken.jpg"] = priors["05.jpg"]
    del priors["29.jpg"]  # taken where 27 and 28 were: the street stays connected without it
    return images, priors


@pytest.mark.slow
def test_lund_in_submodels_matches_one_sfm_and_resumes(lund, lund_map, tmp_path, ray_cluster):
    images, priors = lund
    out = tmp_path / "cells"
    scene_map = build_sfm_in_cells(images, out, priors, LUND_CONF)
    manifest = scene_map.manifest
    assert manifest["source"] == "sfm" and manifest["submodels"] >= 3
    skipped = {entry["name"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(skipped) == {"broken.jpg", "29.jpg"} and "no position prior" in skipped["29.jpg"]
    reconstruction = scene_map.reconstruction
    assert reconstruction.num_reg_images() >= 18
    assert reconstruction.find_image_with_name("29.jpg") is None
    assert scene_map.geo.registration["median_residual_m"] < 6.0  # phone GPS
    # Rejected submodels (shared images that contradict the others) are named with their reason.
    assert all("do not fit" in failure["reason"] for failure in manifest["failed_cells"])

    # The same photos in one SfM (the map of conftest.py): after the similarity that best aligns
    # the two, the cameras agree.
    single = SceneMap.load(lund_map).reconstruction
    merged = submodels.posed_images(reconstruction)
    one = {image.name: image.cam_from_world() for image in single.images.values() if image.has_pose}
    similarity, agreeing = submodels.relative_similarity(merged, one, {**submodels.default_conf,
                                                                       "max_alignment_error_m": 0.5})
    assert agreeing >= 0.9 * len(set(merged) & set(one)) >= 0.9 * 18

    # A rerun resumes: finished submodels are kept as they are, a removed one is rebuilt. This one
    # also adjusts the merged poses cell by cell (Ray tasks), every cell but the anchor.
    root = out / WORK_DIR / submodels.SUBMODELS_DIR
    kept = {cell.name: (cell / submodels.MODEL_DIR).stat().st_mtime_ns for cell in root.iterdir()
            if (cell / submodels.MODEL_DIR).is_dir()}
    removed = sorted(kept)[0]
    shutil.rmtree(root / removed / submodels.MODEL_DIR)
    again = build_sfm_in_cells(images, out, priors, {**LUND_CONF, "submodels": {"adjust_cells": True}})
    assert (root / removed / submodels.MODEL_DIR).is_dir()
    assert all((root / cell / submodels.MODEL_DIR).stat().st_mtime_ns == mtime
               for cell, mtime in kept.items() if cell != removed)
    assert again.reconstruction.num_reg_images() == reconstruction.num_reg_images()
    summaries = [json.loads(path.read_text()) for path in (out / WORK_DIR / cell_adjustment.ADJUSTMENT_DIR).glob(
        f"*/{cell_adjustment.MODEL_DIR}/{cell_adjustment.SUMMARY_FILE}")]
    assert len(summaries) >= 2 and again.manifest["unadjusted_cells"] == []
    assert all(after < before for before, after in (summary["reprojection_error_px"] for summary in summaries))

    # An update registers a new photo from its GPS into the map's region around it: a second shot
    # from where 10.jpg was taken (the same file), so it must land there.
    new_photos = tmp_path / "new"
    new_photos.mkdir()
    shutil.copy(images / "10.jpg", new_photos / "10-again.jpg")
    report = map_update.main(out, new_photos, priors=exif_priors(new_photos, ["10-again.jpg"]), conf=LUND_CONF)
    assert (report.new_images, report.registered, report.skipped) == (1, 1, [])
    updated = SceneMap.load(out)
    assert np.linalg.norm(updated.reconstruction.find_image_with_name("10-again.jpg").projection_center()
                          - updated.reconstruction.find_image_with_name("10.jpg").projection_center()) < 0.05
    for image_id, image in again.reconstruction.images.items():  # the map's poses stay as they were
        np.testing.assert_array_equal(updated.reconstruction.images[image_id].cam_from_world().matrix(),
                                      image.cam_from_world().matrix())
    observed = {(image_id, index): point.point3D_id for image_id, image in updated.reconstruction.images.items()
                for index, point in enumerate(image.points2D) if point.has_point3D()}
    assert observed == {(element.image_id, element.point2D_idx): point_id for point_id, point in
                        updated.reconstruction.points3D.items() for element in point.track.elements}
    recomputed = pycolmap.Reconstruction(updated.reconstruction)
    recomputed.update_point_3d_errors()  # the patched tracks' errors are their means over the whole track
    assert all(abs(recomputed.points3D[i].error - point.error) < 1e-9 for i, point in
               updated.reconstruction.points3D.items())
    assert updated.reconstruction.num_points3D() == again.reconstruction.num_points3D() + report.new_points


def test_a_submodel_with_too_few_images_gets_a_reason(tmp_path):
    submodels.write_input(tmp_path, "x+0000_y+0000", ["a.jpg", "b.jpg"], {}, {})
    result = submodels.main(tmp_path, "x+0000_y+0000", tmp_path)
    assert result.failure == "cell x+0000_y+0000: 0 image(s) with features, a submodel needs 3"
    assert submodels.is_done(tmp_path, "x+0000_y+0000")
    assert submodels.read_result(tmp_path, "x+0000_y+0000").failure == result.failure
