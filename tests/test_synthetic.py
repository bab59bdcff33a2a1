"""The synthetic street scene: renderer geometry and conventions, determinism, dataset files."""
from __future__ import annotations

import json

import numpy as np
import pycolmap
import pytest

from jobs.cli import main as cli_main
from pixloc_core.exif import read_exif_focal_px, read_exif_gps
from pixloc_core.geo import wgs84_to_enu
from pixloc_core.io import read_poses, read_priors, read_query_list
from pixloc_core.synthetic import (PinholeIntrinsics, SceneConfig, build_scene, raycast, render,
                                   rotation_from_angles)
from pixloc_core.synthetic.dataset import noisy_priors
from pixloc_core.synthetic.render import SKY

pycolmap.logging.minloglevel = 2

TINY = ["--refs", "6", "--queries", "3", "--width", "160", "--height", "120"]


@pytest.fixture(scope="module")
def scene():
    return build_scene(SceneConfig(seed=0))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "seed3"
    assert cli_main(["synth", "--out", str(out), "--seed", "3", *TINY]) == 0
    return out


def _pose(heading, pitch, roll, center):
    rotation = rotation_from_angles(heading, pitch, roll)
    return rotation, -rotation @ np.asarray(center, float)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_rotation_convention():
    # Facing east with no tilt: camera x (right) is south, y (down) is down, z (forward) is east.
    np.testing.assert_allclose(rotation_from_angles(90, 0, 0), [[0, -1, 0], [0, 0, -1], [1, 0, 0]], atol=1e-12)


def test_raycast_matches_colmap_pixel_convention(scene):
    """A hit at pixel (row i, col j) projects back, through pycolmap's camera, to (j + 0.5, i + 0.5)."""
    camera = PinholeIntrinsics(96, 72, 80.0, 82.0, 47.3, 36.9)
    rotation, translation = _pose(80, 4, 2, (20, 1.5, 1.6))
    hits = raycast(scene, camera, rotation, translation)
    rows, cols = np.nonzero(hits.surface != SKY)
    assert len(rows) > 0.8 * camera.width * camera.height
    points = hits.points()[rows, cols]
    colmap_camera = pycolmap.Camera(model="PINHOLE", width=camera.width, height=camera.height,
                                    params=list(camera.params()))
    in_camera = points.reshape(-1, 3) @ rotation.T + translation
    projected = colmap_camera.img_from_cam(in_camera)
    np.testing.assert_allclose(projected, np.stack([cols + 0.5, rows + 0.5], -1), atol=1e-6)


def _bilinear(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Samples image at continuous image coordinates (u, v), COLMAP convention (pixel centres at +0.5)."""
    x, y = u - 0.5, v - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    wx, wy = x - x0, y - y0
    top = image[y0, x0] * (1 - wx) + image[y0, x0 + 1] * wx
    bottom = image[y0 + 1, x0] * (1 - wx) + image[y0 + 1, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def test_facade_points_look_alike_in_two_views(scene):
    """Patches of facade seen by camera a, warped through the ground-truth geometry into camera b,
    match what b rendered: the renderer's geometry and pixel convention are consistent."""
    camera = PinholeIntrinsics.centered(320, 240, 280.0)
    pose_a = _pose(75, 3, 0, (15, 1.0, 1.6))
    pose_b = _pose(95, 1, 2, (17, -1.0, 1.7))
    image_a = render(scene, camera, *pose_a).astype(float).mean(-1)
    image_b = render(scene, camera, *pose_b).astype(float).mean(-1)
    hits_a, hits_b = raycast(scene, camera, *pose_a), raycast(scene, camera, *pose_b)
    points_a = hits_a.points()

    rng = np.random.default_rng(0)
    half, scores = 5, []
    candidates = np.argwhere(hits_a.surface[half:-half, half:-half] < len(scene.faces)) + half
    for row, col in rng.permutation(candidates)[:400]:
        window = np.s_[row - half:row + half + 1, col - half:col + half + 1]
        if len(np.unique(hits_a.surface[window])) != 1 or hits_a.surface[row, col] == SKY:
            continue
        points = points_a[window]  # (P, P, 3)
        in_b = points @ pose_b[0].T + pose_b[1]
        u = camera.fx * in_b[..., 0] / in_b[..., 2] + camera.cx
        v = camera.fy * in_b[..., 1] / in_b[..., 2] + camera.cy
        if not (u.min() > 1 and v.min() > 1 and u.max() < camera.width - 1 and v.max() < camera.height - 1):
            continue
        center_b = int(v[half, half]), int(u[half, half])
        if abs(hits_b.depth[center_b] - in_b[half, half, 2]) > 0.02 * in_b[half, half, 2]:
            continue  # occluded in view b
        patch_a = image_a[window]
        if patch_a.std() > 3:
            scores.append(_ncc(patch_a, _bilinear(image_b, u, v)))
        if len(scores) == 40:
            break
    assert len(scores) >= 20
    assert np.median(scores) > 0.9, f"median NCC {np.median(scores):.2f}"


def test_textures_have_detail_and_no_sky_below_horizon(scene):
    camera = PinholeIntrinsics.centered(320, 240, 280.0)
    rotation, translation = _pose(0, 0, 0, (0, 20, 1.6))  # along a north-south street
    image = render(scene, camera, rotation, translation).astype(float).mean(-1)
    hits = raycast(scene, camera, rotation, translation)
    assert not (hits.surface[camera.height // 2 + 2:] == SKY).any()
    # Gradients at fine and coarse scales (featuremetric alignment works at strides 1 to 16).
    fine = np.abs(np.diff(image, axis=1)).mean()
    coarse = np.abs(np.diff(image[::8, ::8], axis=1)).mean()
    assert fine > 2 and coarse > 5, (fine, coarse)


def test_no_aliasing_when_minified(scene):
    """A low-resolution render matches a 4x supersampled one: textures are band-limited, so a
    surface looks the same from near and far (without filtering the NCC drops to ~0.92)."""
    rotation, translation = _pose(90, 2, 0, (0, 1, 1.6))  # down a long street
    low = render(scene, PinholeIntrinsics.centered(160, 120, 140.0), rotation, translation).astype(float)
    high = render(scene, PinholeIntrinsics.centered(640, 480, 560.0), rotation, translation).astype(float)
    assert _ncc(low, high.reshape(120, 4, 160, 4, 3).mean(axis=(1, 3))) > 0.975


def test_prior_noise_is_per_axis_std(scene):
    rng = np.random.default_rng(1)
    centers = np.column_stack([rng.uniform(0, 100, 4000), rng.uniform(0, 50, 4000), np.full(4000, 1.6)])
    names = [f"{i}.jpg" for i in range(len(centers))]
    priors = noisy_priors(names, centers, 10.0, scene, rng)
    lla = np.array([priors[name].position for name in names])
    offsets = wgs84_to_enu(lla[:, 0], lla[:, 1], lla[:, 2], scene.origin) - centers
    np.testing.assert_allclose(offsets[:, :2].std(axis=0), 10.0, rtol=0.05)
    np.testing.assert_allclose(offsets[:, :2].mean(axis=0), 0.0, atol=0.5)
    np.testing.assert_allclose(offsets[:, 2], 0.0, atol=1e-3)
    assert {p.sigma_m for p in priors.values()} == {10.0}


def test_dataset_files_are_consistent(tiny_dataset):
    out = tiny_dataset
    assert sorted(p.name for p in (out / "mapping").iterdir()) == [f"ref_{i:04d}.jpg" for i in range(6)]
    assert sorted(p.name for p in (out / "queries").iterdir()) == [f"q_{i:04d}.jpg" for i in range(3)]

    model = pycolmap.Reconstruction(out / "reference_model")
    assert model.num_points3D() == 0 and len(model.cameras) == 1
    camera = model.cameras[1]
    assert camera.model == pycolmap.CameraModelId.PINHOLE and (camera.width, camera.height) == (160, 120)
    gt_mapping = read_poses(out / "gt_mapping.txt")
    assert sorted(image.name for image in model.images.values()) == sorted(gt_mapping)
    for image in model.images.values():
        assert image.has_pose and image.camera_id == 1
        qvec, tvec = gt_mapping[image.name]
        expected = pycolmap.Rigid3d(pycolmap.Rotation3d(np.r_[qvec[1:], qvec[0]]), tvec)
        np.testing.assert_allclose(image.cam_from_world().matrix(), expected.matrix(), atol=1e-7)

    intrinsics = read_query_list(out / "queries_with_intrinsics.txt")
    assert sorted(intrinsics) == sorted(read_poses(out / "gt_queries.txt")) == [f"q_{i:04d}.jpg" for i in range(3)]
    for query in intrinsics.values():
        assert query.model == "PINHOLE" and (query.width, query.height) == (160, 120)
        np.testing.assert_allclose(query.params, camera.params, rtol=1e-9)

    for folder, priors_file in (("queries", "priors.csv"), ("mapping", "mapping_priors.csv")):
        for name, prior in read_priors(out / priors_file).items():
            path = out / folder / name
            lat, lon, alt = read_exif_gps(path)
            np.testing.assert_allclose([lat, lon], prior.position[:2], atol=1e-7)
            assert alt == pytest.approx(prior.position[2], abs=1e-3)
            assert read_exif_focal_px(path, 160, 120) == pytest.approx(camera.params[0], rel=1e-9)
            assert pycolmap.Bitmap.read(str(path), True).exif_focal_length() == pytest.approx(camera.params[0], rel=1e-6)


def test_same_seed_same_bytes(tiny_dataset, tmp_path):
    out = tmp_path / "again"
    assert cli_main(["synth", "--out", str(out), "--seed", "3", "--workers", "1", *TINY]) == 0
    files = sorted(p.relative_to(tiny_dataset) for p in tiny_dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for relative in files:
        assert (tiny_dataset / relative).read_bytes() == (out / relative).read_bytes(), relative
    other = tmp_path / "other_seed"
    assert cli_main(["synth", "--out", str(other), "--seed", "4", *TINY]) == 0
    assert (other / "mapping/ref_0000.jpg").read_bytes() != (out / "mapping/ref_0000.jpg").read_bytes()


def test_cli_rejects_bad_counts(tmp_path):
    with pytest.raises(SystemExit, match="--refs"):
        cli_main(["synth", "--out", str(tmp_path), "--refs", "0"])


def test_city_blocks_keep_the_reference_density(tmp_path):
    """--blocks WxH: a bigger street grid with as many references per metre of street as the default
    street, along the streets (within the lateral range of a centre line), deterministic per seed."""
    small, city = tmp_path / "street", tmp_path / "city"
    tiny = ["--queries", "2", "--width", "160", "--height", "120", "--seed", "5"]
    assert cli_main(["synth", "--out", str(small), "--blocks", "1x1", *tiny]) == 0
    assert cli_main(["synth", "--out", str(city), "--blocks", "2x1", *tiny]) == 0
    summaries = [json.loads((out / "scene.json").read_text()) for out in (small, city)]
    lengths = [np.linalg.norm(np.diff(np.array(s["streets"]), axis=1), axis=-1).sum() for s in summaries]
    assert summaries[1]["num_refs"] > summaries[0]["num_refs"]
    for summary, length in zip(summaries, lengths):
        assert summary["num_refs"] == round(length / summary["conf"]["ref_spacing_m"])
        assert summary["conf"]["blocks"] in ([1, 1], [2, 1])
    streets = np.array(summaries[1]["streets"])
    for gt_file in ("gt_mapping.txt", "gt_queries.txt"):
        poses = read_poses(city / gt_file)
        for qvec, tvec in poses.values():
            rotation = pycolmap.Rotation3d(np.r_[qvec[1:], qvec[0]]).matrix()
            center = -rotation.T @ tvec
            assert min(_distance_to_segment(center[:2], *street) for street in streets) <= 3.0 + 1e-9
    assert len(read_poses(city / "gt_mapping.txt")) == summaries[1]["num_refs"]
    again = tmp_path / "again"
    assert cli_main(["synth", "--out", str(again), "--blocks", "2x1", "--workers", "1", *tiny]) == 0
    for relative in ("mapping/ref_0003.jpg", "queries/q_0001.jpg", "gt_mapping.txt", "priors.csv"):
        assert (again / relative).read_bytes() == (city / relative).read_bytes(), relative


def _distance_to_segment(point: np.ndarray, start, end) -> float:
    start, end = np.asarray(start, float), np.asarray(end, float)
    along = np.clip((point - start) @ (end - start) / ((end - start) @ (end - start)), 0.0, 1.0)
    return float(np.linalg.norm(point - start - along * (end - start)))


def test_culled_render_equals_brute_force_raycast(scene):
    """Frustum and occlusion culling skip only faces that cannot be hit first: the same surfaces
    and depths as testing every facing face."""
    camera = PinholeIntrinsics.centered(160, 120, 140.0)
    rotation, translation = _pose(80, 4, 2, (20, 1.5, 1.6))  # down the first street, many faces hidden
    culled = raycast(scene, camera, rotation, translation)
    everything = raycast(scene, camera, rotation, translation, cull=False)
    np.testing.assert_array_equal(culled.surface, everything.surface)
    np.testing.assert_array_equal(culled.depth, everything.depth)


def test_cli_rejects_bad_blocks(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["synth", "--out", str(tmp_path), "--blocks", "0x3"])
