"""Pose and Camera against pycolmap, finite differences and closed-form identities."""
from __future__ import annotations

import math

import numpy as np
import pycolmap
import pytest
import torch

from pixloc_core.geometry import CAMERA_MODELS, Camera, Pose, UnsupportedCameraModel, so3_exp
from pixloc_core.io import QueryIntrinsics

WIDTH, HEIGHT = 640, 480


def random_params(model: str, generator: torch.Generator) -> torch.Tensor:
    """COLMAP-ordered parameters: focal 300-800 px, principal point near the centre, radial
    distortion up to |k1| = 0.3, |k2| = 0.05, tangential up to 1e-3."""
    def uniform(low, high, n=1):
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    num_focal, num_dist = CAMERA_MODELS[model]
    principal = torch.tensor([WIDTH / 2, HEIGHT / 2], dtype=torch.float64) + uniform(-20, 20, 2)
    dist = torch.cat([uniform(-0.3, 0.3), uniform(-0.05, 0.05), uniform(-1e-3, 1e-3, 2)])[:num_dist]
    return torch.cat([uniform(300, 800, num_focal), principal, dist])


def random_camera_points(n: int, generator: torch.Generator, max_tan: float = 0.6) -> torch.Tensor:
    """(n, 3) points in front of the camera within a field of view of +-atan(max_tan)."""
    uv = (2 * torch.rand(n, 2, generator=generator, dtype=torch.float64) - 1) * max_tan
    z = 0.5 + 20 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    return torch.cat([uv * z, z], -1)


def random_pose(generator: torch.Generator, batch_shape=()) -> Pose:
    aa = torch.randn(*batch_shape, 3, generator=generator, dtype=torch.float64)
    t = 5 * torch.randn(*batch_shape, 3, generator=generator, dtype=torch.float64)
    return Pose.from_aa(aa, t)


def numerical_jacobian(function, x: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    """Central differences of function: (..., D) -> (..., K), returned as (..., K, D)."""
    columns = []
    for i in range(x.shape[-1]):
        dx = torch.zeros_like(x)
        dx[..., i] = step
        columns.append((function(x + dx) - function(x - dx)) / (2 * step))
    return torch.stack(columns, -1)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- Camera

@pytest.mark.parametrize("model", list(CAMERA_MODELS))
def test_project_matches_pycolmap(model, generator):
    camera = Camera(model, WIDTH, HEIGHT, random_params(model, generator))
    p3d = random_camera_points(500, generator)
    p2d, valid = camera.project(p3d)
    expected = camera.to_colmap().img_from_cam(p3d.numpy())
    assert valid.all()
    np.testing.assert_allclose(p2d.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", list(CAMERA_MODELS))
def test_J_project_matches_finite_differences(model, generator):
    camera = Camera(model, WIDTH, HEIGHT, random_params(model, generator))
    p3d = random_camera_points(50, generator)
    expected = numerical_jacobian(lambda p: camera.project(p)[0], p3d)
    torch.testing.assert_close(camera.J_project(p3d), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", list(CAMERA_MODELS))
def test_unproject_inverts_project(model, generator):
    camera = Camera(model, WIDTH, HEIGHT, random_params(model, generator))
    p3d = random_camera_points(500, generator)
    p2d, valid = camera.project(p3d)
    assert valid.all()
    rays = camera.unproject(p2d)
    torch.testing.assert_close(rays, p3d / p3d[:, 2:], rtol=0, atol=1e-10)


@pytest.mark.parametrize("k1, k2", [(-0.5, 0.0), (-0.4, 0.05), (0.1, -0.02), (-0.2, -0.1), (0.2, 0.1), (0.3, 0.01)])
def test_distortion_validity_is_the_monotonic_range(k1, k2):
    """valid must hold exactly up to the first radius where r (1 + k1 r^2 + k2 r^4) stops
    increasing, whatever the signs of k1 and k2."""
    camera = Camera("RADIAL", WIDTH, HEIGHT, torch.tensor([500.0, 320, 240, k1, k2], dtype=torch.float64))
    radii = torch.linspace(1e-3, 5, 20001, dtype=torch.float64)
    increasing = 1 + 3 * k1 * radii**2 + 5 * k2 * radii**4 > 0
    expected = torch.cumprod(increasing.long(), 0).bool()
    p3d = torch.stack([radii, torch.zeros_like(radii), torch.ones_like(radii)], -1)
    _, valid = camera.project(p3d)
    # the grid step allows one sample of disagreement at the fold itself
    assert (valid != expected).sum() <= 1
    assert valid[0] and (k1 >= 0 and k2 >= 0) == bool(valid.all())


def test_points_beyond_the_fold_of_strong_negative_k1_are_invalid():
    camera = Camera("SIMPLE_RADIAL", WIDTH, HEIGHT, torch.tensor([500.0, 320, 240, -0.5], dtype=torch.float64))
    # r^2 = 1 / (3 * 0.5) is the fold; at r = 1.5 the distorted radius (-0.19) lands back inside the image
    p3d = torch.tensor([[0.8, 0.0, 1.0], [1.5, 0.0, 1.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    p2d, valid = camera.project(p3d)
    assert valid.tolist() == [True, False, False]
    assert camera.in_image(p2d)[1]


def test_opencv_validity_uses_the_radial_bound():
    params = torch.tensor([500.0, 500, 320, 240, -0.5, 0.0, 1e-3, 1e-3], dtype=torch.float64)
    camera = Camera("OPENCV", WIDTH, HEIGHT, params)
    r = math.sqrt(1 / 1.5)
    _, valid = camera.project(torch.tensor([[0.99 * r, 0, 1], [1.01 * r, 0, 1]], dtype=torch.float64))
    assert valid.tolist() == [True, False]


def test_points_behind_the_camera_are_invalid():
    camera = Camera("PINHOLE", WIDTH, HEIGHT, torch.tensor([500.0, 500, 320, 240]))
    p2d, valid = camera.project(torch.tensor([[0.0, 0, 1], [0, 0, 0], [0.1, 0.1, -2]]))
    assert valid.tolist() == [True, False, False]
    assert torch.isfinite(p2d).all()


@pytest.mark.parametrize("model", ["OPENCV_FISHEYE", "FULL_OPENCV", "FOV", "pinhole"])
def test_unsupported_model_raises_with_its_name(model):
    with pytest.raises(UnsupportedCameraModel, match=model) as error:
        Camera(model, WIDTH, HEIGHT, torch.zeros(4))
    assert all(name in str(error.value) for name in CAMERA_MODELS)
    assert isinstance(error.value, ValueError)


def test_unsupported_pycolmap_camera_raises():
    colmap_camera = pycolmap.Camera.create_from_model_name(1, "FULL_OPENCV", 500.0, WIDTH, HEIGHT)
    with pytest.raises(UnsupportedCameraModel, match="FULL_OPENCV"):
        Camera.from_colmap(colmap_camera)


def test_wrong_number_of_params_raises():
    with pytest.raises(ValueError, match="OPENCV takes 8 parameters"):
        Camera("OPENCV", WIDTH, HEIGHT, torch.zeros(4))


def test_is_valid_rejects_zero_focal_nan_and_empty_size():
    params = torch.tensor([[500.0, 320, 240], [0.0, 320, 240], [math.nan, 320, 240], [500.0, 320, 240]])
    camera = Camera("SIMPLE_PINHOLE", torch.tensor([640.0, 640, 640, 0]), 480, params)
    assert camera.is_valid().tolist() == [True, False, False, False]


@pytest.mark.parametrize("model", list(CAMERA_MODELS))
def test_colmap_round_trip_and_properties(model, generator):
    params = random_params(model, generator)
    camera = Camera.from_colmap(Camera(model, WIDTH, HEIGHT, params).to_colmap(camera_id=7))
    assert camera.model == model and camera.dtype == torch.float64
    torch.testing.assert_close(camera.params, params)
    assert camera.size.tolist() == [WIDTH, HEIGHT]
    num_focal, num_dist = CAMERA_MODELS[model]
    torch.testing.assert_close(camera.f, params[:num_focal].expand(2))
    torch.testing.assert_close(camera.c, params[num_focal:num_focal + 2])
    assert camera.dist.shape == (num_dist,)


def test_from_query_intrinsics_equals_from_colmap():
    intrinsics = QueryIntrinsics("SIMPLE_RADIAL", 1024, 768, (900.0, 512.0, 384.0, -0.05))
    colmap_camera = pycolmap.Camera(camera_id=1, model="SIMPLE_RADIAL", width=1024, height=768,
                                    params=list(intrinsics.params))
    torch.testing.assert_close(Camera.from_query_intrinsics(intrinsics)._data,
                               Camera.from_colmap(colmap_camera)._data)


@pytest.mark.parametrize("model", list(CAMERA_MODELS))
@pytest.mark.parametrize("scales, new_size", [(0.5, (320, 240)), ((0.5, 0.25), (320, 120))])
def test_scale_matches_pycolmap_rescale(model, scales, new_size, generator):
    camera = Camera(model, WIDTH, HEIGHT, random_params(model, generator))
    colmap_camera = camera.to_colmap()
    colmap_camera.rescale(*new_size)
    scaled = camera.scale(scales)
    assert scaled.size.tolist() == list(new_size)
    np.testing.assert_allclose(scaled.params.numpy(), colmap_camera.params, rtol=1e-12)


def test_scale_keeps_pixel_centres_consistent():
    """Under the corner-origin convention a 3D point lands on the same relative image position
    at every resolution."""
    camera = Camera("PINHOLE", WIDTH, HEIGHT, torch.tensor([500.0, 500, 320, 240], dtype=torch.float64))
    p3d = torch.tensor([[0.3, -0.2, 2.0]], dtype=torch.float64)
    p2d = camera.project(p3d)[0]
    p2d_small = camera.scale(0.25).project(p3d)[0]
    torch.testing.assert_close(p2d_small / camera.scale(0.25).size, p2d / camera.size)


def test_in_image_covers_corner_to_corner():
    camera = Camera("SIMPLE_PINHOLE", WIDTH, HEIGHT, torch.tensor([500.0, 320, 240]))
    p2d = torch.tensor([[0.0, 0.0], [640.0, 480.0], [-0.1, 10.0], [10.0, 480.1], [0.4, 0.4]])
    assert camera.in_image(p2d).tolist() == [True, True, False, False, True]
    assert camera.in_image(p2d, pad=0.5).tolist() == [False, False, False, False, False]


def test_float32_project_agrees_with_float64(generator):
    camera = Camera("OPENCV", WIDTH, HEIGHT, random_params("OPENCV", generator))
    p3d = random_camera_points(100, generator)
    p2d_32, valid_32 = camera.float().project(p3d.float())
    p2d_64, valid_64 = camera.project(p3d)
    assert p2d_32.dtype == torch.float32 and torch.equal(valid_32, valid_64)
    torch.testing.assert_close(p2d_32.double(), p2d_64, rtol=0, atol=1e-3)
    torch.testing.assert_close(camera.float().unproject(p2d_32).double(), p3d / p3d[:, 2:], rtol=0, atol=1e-5)


def test_batched_camera_broadcasts_over_points(generator):
    params = torch.stack([random_params("RADIAL", generator) for _ in range(4)])
    cameras = Camera("RADIAL", WIDTH, HEIGHT, params)
    p3d = torch.stack([random_camera_points(7, generator) for _ in range(4)])  # (4, 7, 3)
    p2d, valid = cameras.project(p3d)
    assert cameras.shape == (4,) and p2d.shape == (4, 7, 2) and valid.shape == (4, 7)
    assert cameras.J_project(p3d).shape == (4, 7, 2, 3)
    assert cameras.unproject(p2d).shape == (4, 7, 3)
    torch.testing.assert_close(p2d[2], cameras[2].project(p3d[2])[0])
    # one camera for a batch of point sets
    assert cameras[0].project(p3d)[0].shape == (4, 7, 2)


# ----------------------------------------------------------------------------- Pose

ANGLES = [0.0, 1e-20, 1e-12, 1e-6, 1e-2, 0.0115, 0.2, 1.0, 3.0, math.pi - 1e-6]


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float64, 1e-13, 1e-12), (torch.float32, 2e-6, 1e-6)])
def test_exp_log_round_trip(dtype, atol, rtol, generator):
    axes = torch.nn.functional.normalize(torch.randn(len(ANGLES), 3, generator=generator, dtype=torch.float64), dim=-1)
    w = axes * torch.tensor(ANGLES, dtype=torch.float64)[:, None]
    v = torch.randn(len(ANGLES), 3, generator=generator, dtype=torch.float64)
    xi = torch.cat([v, w], -1).to(dtype)
    log = Pose.exp(xi).log()
    assert torch.isfinite(log).all()
    torch.testing.assert_close(log, xi, rtol=0, atol=atol)
    # tiny rotations keep their relative precision
    torch.testing.assert_close(log[:, 3:], xi[:, 3:], rtol=rtol, atol=0)


def test_exp_matches_pycolmap_rotation_and_log_at_pi():
    aa = torch.tensor([[0.0, 0.0, math.pi], [math.pi, 0.0, 0.0], [0.3, -0.4, 0.5], [1e-9, 0, 0]], dtype=torch.float64)
    pose = Pose.exp(torch.cat([torch.zeros_like(aa), aa], -1))
    for R, aa_i in zip(pose.R, aa):
        np.testing.assert_allclose(R.numpy(), pycolmap.Rotation3d(aa_i.numpy()).matrix(), atol=1e-12)
    # at exactly pi the axis sign is arbitrary, the rotation is not
    log = pose.log()
    assert torch.isfinite(log).all()
    torch.testing.assert_close(Pose.exp(log).R, pose.R, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.norm(log[:2, 3:], dim=-1), torch.full((2,), math.pi, dtype=torch.float64))


def test_exp_translation_part_is_the_se3_exponential():
    """exp((v, w)) is the matrix exponential of the 4x4 twist."""
    xi = torch.tensor([0.5, -1.0, 2.0, 0.4, 0.9, -0.3], dtype=torch.float64)
    twist = torch.zeros(4, 4, dtype=torch.float64)
    twist[:3, :3] = torch.tensor([[0, 0.3, 0.9], [-0.3, 0, -0.4], [-0.9, 0.4, 0]], dtype=torch.float64)
    twist[:3, 3] = xi[:3]
    expected = torch.linalg.matrix_exp(twist)
    pose = Pose.exp(xi)
    torch.testing.assert_close(pose.R, expected[:3, :3])
    torch.testing.assert_close(pose.t, expected[:3, 3])


def test_J_transform_matches_finite_differences_of_exp(generator):
    pose = random_pose(generator)
    p3d = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    p3d_out = pose.transform(p3d)
    expected = numerical_jacobian(lambda delta: (Pose.exp(delta) @ pose).transform(p3d),
                                  torch.zeros(6, dtype=torch.float64))  # (20, 3, 6)
    torch.testing.assert_close(pose.J_transform(p3d_out), expected, rtol=1e-7, atol=1e-8)


def test_qvec_tvec_round_trip(generator):
    qvec = torch.nn.functional.normalize(torch.randn(100, 4, generator=generator, dtype=torch.float64), dim=-1)
    qvec = torch.where(qvec[:, :1] < 0, -qvec, qvec)
    tvec = torch.randn(100, 3, generator=generator, dtype=torch.float64)
    pose = Pose.from_qvec_tvec(qvec, tvec)
    torch.testing.assert_close(pose.qvec(), qvec)
    torch.testing.assert_close(pose.tvec, tvec)
    # q and -q are the same rotation; qvec() picks qw >= 0
    torch.testing.assert_close(Pose.from_qvec_tvec(-qvec, tvec).qvec(), qvec)


def test_qvec_near_pi_rotations():
    """Rotations by ~pi have qw ~ 0, where reading the quaternion off the trace alone fails."""
    aa = torch.tensor([[math.pi - 1e-9, 0, 0], [0, math.pi, 0], [0, 0, math.pi - 1e-4]], dtype=torch.float64)
    pose = Pose.from_aa(aa, torch.zeros(3, 3, dtype=torch.float64))
    for qvec, aa_i in zip(pose.qvec(), aa):
        x, y, z, w = pycolmap.Rotation3d(aa_i.numpy()).quat
        expected = np.sign(w) * np.array([w, x, y, z]) if w != 0 else np.array([w, x, y, z])
        np.testing.assert_allclose(qvec.numpy(), expected, atol=1e-12)


def test_colmap_rigid3d_round_trip(generator):
    for _ in range(10):
        aa = torch.randn(3, generator=generator, dtype=torch.float64).numpy()
        translation = torch.randn(3, generator=generator, dtype=torch.float64).numpy()
        rigid = pycolmap.Rigid3d(pycolmap.Rotation3d(aa), translation)
        pose = Pose.from_colmap(rigid)
        np.testing.assert_allclose(pose.R.numpy(), rigid.rotation.matrix(), atol=1e-12)
        np.testing.assert_allclose(pose.t.numpy(), translation, atol=1e-12)
        back = pose.to_colmap()
        np.testing.assert_allclose(back.matrix(), rigid.matrix(), atol=1e-12)
        points = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        np.testing.assert_allclose(pose.transform(points).numpy(), rigid * points.numpy(), atol=1e-12)
        np.testing.assert_allclose(pose.inv().to_colmap().matrix(), rigid.inverse().matrix(), atol=1e-12)


def test_composition_follows_pycolmap(generator):
    pose_a, pose_b = random_pose(generator), random_pose(generator)
    expected = pose_a.to_colmap() * pose_b.to_colmap()
    np.testing.assert_allclose((pose_a @ pose_b).to_colmap().matrix(), expected.matrix(), atol=1e-12)


def test_composition_and_inverse_identities(generator):
    pose_a, pose_b = random_pose(generator, (4,)), random_pose(generator, (4,))
    points = torch.randn(4, 10, 3, generator=generator, dtype=torch.float64)
    identity = Pose.identity((4,), dtype=torch.float64)
    torch.testing.assert_close((pose_a @ pose_a.inv())._data, identity._data)
    torch.testing.assert_close((pose_a.inv() @ pose_a)._data, identity._data)
    torch.testing.assert_close(pose_a.inv().inv()._data, pose_a._data)
    torch.testing.assert_close((pose_a @ pose_b).transform(points), pose_a.transform(pose_b.transform(points)))
    torch.testing.assert_close(pose_a * points, pose_a.transform(points))
    torch.testing.assert_close((pose_a @ pose_b).inv()._data, (pose_b.inv() @ pose_a.inv())._data)
    torch.testing.assert_close(pose_a.center(), pose_a.inv().t)
    torch.testing.assert_close(pose_a.transform(pose_a.center()[:, None]), torch.zeros(4, 1, 3, dtype=torch.float64))


def test_error_to_known_offsets(generator):
    pose = random_pose(generator)
    rotation_about_centre = Pose.from_aa(torch.tensor([0.0, math.radians(10), 0.0], dtype=torch.float64),
                                         torch.zeros(3, dtype=torch.float64))
    moved_centre = pose @ Pose.from_Rt(torch.eye(3, dtype=torch.float64),
                                       -torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64))
    both = rotation_about_centre @ moved_centre
    errors = [pose.error_to(other) for other in (pose, rotation_about_centre @ pose, moved_centre, both)]
    expected = [(0.0, 0.0), (10.0, 0.0), (0.0, 5.0), (10.0, 5.0)]
    for (dR, dt), (dR_expected, dt_expected) in zip(errors, expected):
        assert dR.item() == pytest.approx(dR_expected, abs=1e-9)
        assert dt.item() == pytest.approx(dt_expected, abs=1e-9)


def test_magnitude():
    pose = Pose.from_aa(torch.tensor([[0.0, 0.0, math.radians(30)], [math.pi, 0.0, 0.0]]),
                        torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))
    dR, dt = pose.magnitude()
    torch.testing.assert_close(dR, torch.tensor([30.0, 180.0]))
    torch.testing.assert_close(dt, torch.tensor([5.0, 0.0]))


def test_is_finite_flags_nan_and_inf():
    data = Pose.identity((3,))._data.clone()
    data[1, 0] = math.nan
    data[2, 10] = math.inf
    assert Pose(data).is_finite().tolist() == [True, False, False]


def test_batched_pose_helpers(generator):
    poses = random_pose(generator, (4,))
    points = torch.randn(4, 6, 3, generator=generator, dtype=torch.float64)
    assert poses.shape == (4,) and poses.transform(points).shape == (4, 6, 3)
    assert poses.J_transform(points).shape == (4, 6, 3, 6)
    assert poses.log().shape == (4, 6) and poses.qvec().shape == (4, 4)
    assert [x.shape for x in poses.error_to(poses[0])] == [(4,), (4,)]
    stacked = Pose.stack([poses[i] for i in range(4)])
    torch.testing.assert_close(stacked._data, poses._data)
    assert poses.float().dtype == torch.float32 and poses.float().double().dtype == torch.float64
    R, t = poses[1:3].numpy()
    assert R.shape == (2, 3, 3) and t.shape == (2, 3)
    # an unbatched pose applies to every point set of a batch
    torch.testing.assert_close(poses[0].transform(points)[2], poses[0].transform(points[2]))
    with pytest.raises(ValueError, match="unbatched"):
        poses.to_colmap()


def test_from_aa_equals_so3_exp_of_random_vectors(generator):
    aa = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    for R, aa_i in zip(so3_exp(aa), aa):
        np.testing.assert_allclose(R.numpy(), pycolmap.Rotation3d(aa_i.numpy()).matrix(), atol=1e-12)


def test_exp_log_gradients_are_finite_at_identity():
    """Training and the alignment differentiate through exp, log and error_to at delta = 0."""
    zero = torch.zeros(6, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda delta: Pose.exp(delta).log(), zero)
    torch.testing.assert_close(J, torch.eye(6, dtype=torch.float64))
    pose = Pose.from_aa(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, 2.0, 3.0]))
    J_error = torch.autograd.functional.jacobian(
        lambda delta: torch.stack((Pose.exp(delta) @ pose).error_to(pose)), zero.float())
    assert torch.isfinite(J_error).all()
