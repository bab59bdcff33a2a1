"""Batched 3D geometry in torch: rigid poses (SE(3)) and COLMAP camera models.

Both classes wrap one tensor whose leading dimensions are batch dimensions, in the style of
PixLoc's pixlib: `Pose` stores (..., 12) = flattened R (9) + t (3), `Camera` stores
(..., 2 + P) = image size (w, h) + COLMAP parameters. float32 and float64 both work.

Conventions:
* A pose used as `T_cam_world` maps world points into the camera frame: p_cam = R p_world + t,
  as COLMAP's `cam_from_world`. The tangent vector of `Pose.exp` / `Pose.log` is xi = (v, w),
  translation first, rotation (axis-angle) second, and the alignment updates poses on the left:
  T <- exp(delta) @ T.
* Pixel coordinates follow COLMAP: the image corner is at (0, 0) and the centre of the top-left
  pixel at (0.5, 0.5), so an image spans [0, w] x [0, h] and resizing by s scales f, c and the
  size alike (as `pycolmap.Camera.rescale`).
* Quaternions are Hamilton, ordered (w, x, y, z) as in COLMAP text files; pycolmap's
  `Rotation3d.quat` is (x, y, z, w).

pycolmap is imported only inside the COLMAP conversions, so this module needs torch alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

TensorLike = torch.Tensor | np.ndarray | Sequence[float]


def _small_angle_threshold(dtype: torch.dtype) -> float:
    """Below this angle the closed forms switch to Taylor series. The series truncated after
    theta^4 err by O(theta^6), the closed forms lose O(eps / theta^2) to cancellation (t - sin,
    1 - A / 2B): the two balance near eps^(1/8) (0.011 in float64, 0.14 in float32)."""
    return torch.finfo(dtype).eps ** 0.125


def skew(w: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix [w]x: (..., 3) -> (..., 3, 3)."""
    wx, wy, wz = w.unbind(-1)
    zero = torch.zeros_like(wx)
    return torch.stack([zero, -wz, wy, wz, zero, -wx, -wy, wx, zero], -1).unflatten(-1, (3, 3))


def _rotation_series(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = sin(t)/t, B = (1-cos(t))/t^2, C = (t-sin(t))/t^3, exact at t=0: (...,) each."""
    small = theta < _small_angle_threshold(theta.dtype)
    t = torch.where(small, torch.ones_like(theta), theta)  # keeps gradients of the unused branch finite
    t2 = theta**2
    a = torch.where(small, 1 - t2 / 6 + t2**2 / 120, torch.sin(t) / t)
    # 2 sin^2(t/2) avoids the cancellation of 1 - cos(t), which log() would amplify through 1/B
    b = torch.where(small, 0.5 - t2 / 24 + t2**2 / 720, 2 * torch.sin(t / 2) ** 2 / t**2)
    c = torch.where(small, 1 / 6 - t2 / 120 + t2**2 / 5040, (t - torch.sin(t)) / t**3)
    return a, b, c


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: axis-angle (..., 3) -> rotation matrix (..., 3, 3)."""
    a, b, _ = _rotation_series(torch.linalg.norm(w, dim=-1))
    W = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device)
    return eye + a[..., None, None] * W + b[..., None, None] * (W @ W)


def rotation_angle(R: torch.Tensor) -> torch.Tensor:
    """Angle in radians of rotations (..., 3, 3) -> (...,). atan2 of sine and cosine stays
    accurate near 0 and pi, where acos of the trace alone loses half the digits."""
    cos = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    antisym = R - R.transpose(-1, -2)
    sin = torch.linalg.norm(torch.stack([antisym[..., 2, 1], antisym[..., 0, 2], antisym[..., 1, 0]], -1), dim=-1) / 2
    return torch.atan2(sin, cos)


def quaternion_to_matrix(qvec: torch.Tensor) -> torch.Tensor:
    """Hamilton quaternion (w, x, y, z) (..., 4), normalised here -> rotation (..., 3, 3)."""
    w, x, y, z = F.normalize(qvec, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).unflatten(-1, (3, 3))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation (..., 3, 3) -> unit quaternion (w, x, y, z) (..., 4) with w >= 0.

    Shepperd's method: of the four ways to read the quaternion off the matrix, use the one
    dividing by the largest component, which is well conditioned for every rotation."""
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = R.flatten(-2).unbind(-1)
    # 4 * q_i^2 for i = w, x, y, z
    four_q_squared = torch.stack([
        1 + r00 + r11 + r22, 1 + r00 - r11 - r22, 1 - r00 + r11 - r22, 1 - r00 - r11 + r22], -1)
    # clamped above 0, not at 0, so that the gradient of sqrt stays finite on unused rows
    two_q_abs = torch.sqrt(four_q_squared.clamp(min=torch.finfo(R.dtype).tiny))
    # Row i holds 4 q_i * (w, x, y, z) written with the off-diagonal entries.
    candidates = torch.stack([
        torch.stack([four_q_squared[..., 0], r21 - r12, r02 - r20, r10 - r01], -1),
        torch.stack([r21 - r12, four_q_squared[..., 1], r01 + r10, r02 + r20], -1),
        torch.stack([r02 - r20, r01 + r10, four_q_squared[..., 2], r12 + r21], -1),
        torch.stack([r10 - r01, r02 + r20, r12 + r21, four_q_squared[..., 3]], -1),
    ], -2)
    candidates = candidates / (2 * two_q_abs[..., None].clamp(min=0.1))
    best = two_q_abs.argmax(-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Rotation (..., 3, 3) -> axis-angle (..., 3), angle in [0, pi].

    Goes through the quaternion, where angle = 2 atan2(|q_xyz|, q_w) is accurate over the whole
    range, including near pi where the antisymmetric part of R vanishes."""
    q = matrix_to_quaternion(R)
    qw, qxyz = q[..., 0], q[..., 1:]
    s = torch.linalg.norm(qxyz, dim=-1)
    # 2 atan2(s, qw) / s has no cancellation; only s = 0 needs its limit 2 / qw (qw = 1 there).
    small = s < torch.finfo(R.dtype).eps
    s_safe = torch.where(small, torch.ones_like(s), s)
    scale = torch.where(small, 2 / qw, 2 * torch.atan2(s, qw) / s_safe)
    return scale[..., None] * qxyz


def _promote(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Common floating dtype (the default float dtype for integer inputs)."""
    dtype = torch.result_type(*tensors) if len(tensors) > 1 else tensors[0].dtype
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return [x.to(dtype) for x in tensors]


class TensorWrapper:
    """A batch of objects stored as one tensor `_data` (..., D): leading dimensions are the batch.
    Subclasses say how to rebuild themselves from data with `_wrap`."""

    _data: torch.Tensor

    def _wrap(self, data: torch.Tensor):
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        return self._data.shape[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self._data.dtype

    @property
    def device(self) -> torch.device:
        return self._data.device

    def __getitem__(self, index):
        return self._wrap(self._data[index])

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, *args, **kwargs):
        return self._wrap(self._data.to(*args, **kwargs))

    def float(self):
        return self.to(torch.float32)

    def double(self):
        return self.to(torch.float64)

    def detach(self):
        return self._wrap(self._data.detach())


class Pose(TensorWrapper):
    """Rigid transforms, batched over leading dims; `_data` is (..., 12) = R.flatten() + t."""

    def __init__(self, data: torch.Tensor):
        if data.shape[-1] != 12:
            raise ValueError(f"Pose data must be (..., 12), got {tuple(data.shape)}")
        self._data = data

    # ----- constructors
    @classmethod
    def from_Rt(cls, R: TensorLike, t: TensorLike) -> Pose:
        R, t = torch.as_tensor(R), torch.as_tensor(t)
        R, t = _promote(R, t)
        batch = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
        return cls(torch.cat([R.expand(*batch, 3, 3).flatten(-2), t.expand(*batch, 3)], -1))

    @classmethod
    def from_aa(cls, aa: TensorLike, t: TensorLike) -> Pose:
        """Axis-angle rotation (..., 3) and translation (..., 3)."""
        return cls.from_Rt(so3_exp(torch.as_tensor(aa)), t)

    @classmethod
    def from_qvec_tvec(cls, qvec: TensorLike, tvec: TensorLike) -> Pose:
        """COLMAP's world-to-camera (qw, qx, qy, qz) (..., 4) and translation (..., 3)."""
        return cls.from_Rt(quaternion_to_matrix(torch.as_tensor(qvec)), tvec)

    @classmethod
    def identity(cls, batch_shape: Sequence[int] = (), dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Pose:
        R = torch.eye(3, dtype=dtype, device=device).expand(*batch_shape, 3, 3)
        return cls.from_Rt(R, torch.zeros(*batch_shape, 3, dtype=dtype, device=device))

    @classmethod
    def from_colmap(cls, rigid3d) -> Pose:
        """pycolmap.Rigid3d -> unbatched float64 Pose."""
        x, y, z, w = rigid3d.rotation.quat
        return cls.from_qvec_tvec(torch.tensor([w, x, y, z], dtype=torch.float64),
                                  torch.as_tensor(np.asarray(rigid3d.translation, dtype=np.float64)))

    @classmethod
    def stack(cls, poses: Sequence[Pose], dim: int = 0) -> Pose:
        return cls(torch.stack([p._data for p in poses], dim=dim))

    @classmethod
    def exp(cls, xi: torch.Tensor) -> Pose:
        """SE(3) exponential of xi = (v, w) (..., 6): R = exp([w]x), t = V(w) v."""
        v, w = xi[..., :3], xi[..., 3:]
        _, b, c = _rotation_series(torch.linalg.norm(w, dim=-1))
        W = skew(w)
        eye = torch.eye(3, dtype=xi.dtype, device=xi.device)
        V = eye + b[..., None, None] * W + c[..., None, None] * (W @ W)
        return cls.from_Rt(so3_exp(w), (V @ v[..., None])[..., 0])

    # ----- conversions
    def to_colmap(self):
        """Unbatched Pose -> pycolmap.Rigid3d."""
        import pycolmap

        if self.shape != ():
            raise ValueError(f"to_colmap needs an unbatched Pose, got shape {tuple(self.shape)}")
        qw, qx, qy, qz = self.qvec().detach().cpu().double().numpy()
        return pycolmap.Rigid3d(pycolmap.Rotation3d(np.array([qx, qy, qz, qw])),
                                self.t.detach().cpu().double().numpy())

    def qvec(self) -> torch.Tensor:
        """(..., 4) Hamilton quaternion (w, x, y, z), w >= 0."""
        return matrix_to_quaternion(self.R)

    def log(self) -> torch.Tensor:
        """SE(3) logarithm -> xi = (v, w) (..., 6), inverse of `exp` for angles in [0, pi]."""
        w = so3_log(self.R)
        theta = torch.linalg.norm(w, dim=-1)
        a, b, _ = _rotation_series(theta)
        small = theta < _small_angle_threshold(theta.dtype)
        theta_safe = torch.where(small, torch.ones_like(theta), theta)
        # V^-1 = I - W/2 + d W^2; B > 0 on [0, pi] so d has no singularity before 2 pi.
        d = torch.where(small, 1 / 12 + theta**2 / 720 + theta**4 / 30240,
                        (1 - a / (2 * b)) / theta_safe**2)
        W = skew(w)
        eye = torch.eye(3, dtype=w.dtype, device=w.device)
        V_inv = eye - W / 2 + d[..., None, None] * (W @ W)
        return torch.cat([(V_inv @ self.t[..., None])[..., 0], w], -1)

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        return self.R.detach().cpu().numpy(), self.t.detach().cpu().numpy()

    # ----- accessors
    @property
    def R(self) -> torch.Tensor:
        return self._data[..., :9].unflatten(-1, (3, 3))

    @property
    def t(self) -> torch.Tensor:
        return self._data[..., 9:]

    @property
    def tvec(self) -> torch.Tensor:
        return self.t

    def _wrap(self, data: torch.Tensor) -> Pose:
        return Pose(data)

    def is_finite(self) -> torch.Tensor:
        """(...,) bool: False where any entry is NaN or infinite."""
        return torch.isfinite(self._data).all(-1)

    # ----- group operations
    def inv(self) -> Pose:
        R_inv = self.R.transpose(-1, -2)
        return Pose.from_Rt(R_inv, -(R_inv @ self.t[..., None])[..., 0])

    def __matmul__(self, other: Pose) -> Pose:
        """Composition: (self @ other)(p) = self(other(p))."""
        return Pose.from_Rt(self.R @ other.R, (self.R @ other.t[..., None])[..., 0] + self.t)

    def transform(self, p3d: torch.Tensor) -> torch.Tensor:
        """Points (..., N, 3) -> R p + t (..., N, 3)."""
        return p3d @ self.R.transpose(-1, -2) + self.t[..., None, :]

    def __mul__(self, p3d: torch.Tensor) -> torch.Tensor:
        return self.transform(p3d)

    def J_transform(self, p3d_out: torch.Tensor) -> torch.Tensor:
        """Jacobian of exp(delta) * p at delta = 0 for transformed points p (..., N, 3):
        [I | -[p]x] (..., N, 3, 6), delta = (v, w) as in `exp`."""
        eye = torch.eye(3, dtype=p3d_out.dtype, device=p3d_out.device).expand(*p3d_out.shape[:-1], 3, 3)
        return torch.cat([eye, -skew(p3d_out)], -1)

    # ----- metrics
    def center(self) -> torch.Tensor:
        """Camera centre in the world frame, -R^T t (..., 3), for a world-to-camera pose."""
        return -(self.R.transpose(-1, -2) @ self.t[..., None])[..., 0]

    def magnitude(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rotation angle in degrees, translation norm) (...,) each."""
        return torch.rad2deg(rotation_angle(self.R)), torch.linalg.norm(self.t, dim=-1)

    def error_to(self, other: Pose) -> tuple[torch.Tensor, torch.Tensor]:
        """(angle of R1 R2^T in degrees, distance between camera centres) (...,) each: the
        numbers localization benchmarks report for world-to-camera poses."""
        dR = torch.rad2deg(rotation_angle(self.R @ other.R.transpose(-1, -2)))
        return dR, torch.linalg.norm(self.center() - other.center(), dim=-1)

    def __repr__(self) -> str:
        return f"Pose: {tuple(self.shape)} {self.dtype} {self.device}"


class UnsupportedCameraModel(ValueError):
    pass


# model -> (number of focal lengths, number of distortion coefficients); parameters are laid
# out as COLMAP does: focal(s), cx, cy, then distortion, a prefix of (k1, k2, p1, p2).
CAMERA_MODELS: dict[str, tuple[int, int]] = {
    "SIMPLE_PINHOLE": (1, 0),
    "PINHOLE": (2, 0),
    "SIMPLE_RADIAL": (1, 1),
    "RADIAL": (1, 2),
    "OPENCV": (2, 4),
}


def _check_model(model: str) -> tuple[int, int]:
    if model not in CAMERA_MODELS:
        raise UnsupportedCameraModel(
            f"unsupported camera model {model!r}; supported: {', '.join(CAMERA_MODELS)}")
    return CAMERA_MODELS[model]


class Camera(TensorWrapper):
    """One COLMAP camera model with batched parameters; `_data` is (..., 2 + P) = (w, h, params)."""

    eps = 1e-6  # minimal depth of a projectable point
    num_undistort_iterations = 20

    def __init__(self, model: str, width: TensorLike | float, height: TensorLike | float,
                 params: TensorLike):
        num_focal, num_dist = _check_model(model)
        params = torch.as_tensor(params)
        if params.shape[-1:] != (num_focal + 2 + num_dist,):
            raise ValueError(f"{model} takes {num_focal + 2 + num_dist} parameters, "
                             f"got shape {tuple(params.shape)}")
        (params,) = _promote(params)
        size = torch.stack(torch.broadcast_tensors(
            torch.as_tensor(width, dtype=params.dtype, device=params.device),
            torch.as_tensor(height, dtype=params.dtype, device=params.device)), -1)
        batch = torch.broadcast_shapes(size.shape[:-1], params.shape[:-1])
        self.model = model
        self._data = torch.cat([size.expand(*batch, 2), params.expand(*batch, params.shape[-1])], -1)

    @classmethod
    def from_colmap(cls, camera) -> Camera:
        """pycolmap.Camera -> unbatched float64 Camera."""
        return cls(camera.model.name, float(camera.width), float(camera.height),
                   torch.as_tensor(np.asarray(camera.params, dtype=np.float64)))

    @classmethod
    def from_query_intrinsics(cls, intrinsics) -> Camera:
        """pixloc_core.io.QueryIntrinsics -> unbatched float64 Camera."""
        return cls(intrinsics.model, float(intrinsics.width), float(intrinsics.height),
                   torch.tensor(intrinsics.params, dtype=torch.float64))

    def to_colmap(self, camera_id: int = 1):
        """Unbatched Camera -> pycolmap.Camera; the size is rounded to whole pixels."""
        import pycolmap

        if self.shape != ():
            raise ValueError(f"to_colmap needs an unbatched Camera, got shape {tuple(self.shape)}")
        width, height = (int(round(v)) for v in self.size.tolist())
        return pycolmap.Camera(camera_id=camera_id, model=self.model, width=width, height=height,
                               params=self.params.detach().cpu().double().numpy())

    # ----- accessors
    @property
    def _num_focal(self) -> int:
        return CAMERA_MODELS[self.model][0]

    @property
    def params(self) -> torch.Tensor:
        """(..., P) in COLMAP's order."""
        return self._data[..., 2:]

    @property
    def size(self) -> torch.Tensor:
        """(..., 2) = (width, height)."""
        return self._data[..., :2]

    @property
    def f(self) -> torch.Tensor:
        """(..., 2) = (fx, fy)."""
        return self.params[..., :self._num_focal].expand(*self.shape, 2)

    @property
    def c(self) -> torch.Tensor:
        """(..., 2) principal point, COLMAP pixel convention."""
        return self.params[..., self._num_focal:self._num_focal + 2]

    @property
    def dist(self) -> torch.Tensor:
        """(..., k) the model's distortion coefficients, k in {0, 1, 2, 4}."""
        return self.params[..., self._num_focal + 2:]

    def _wrap(self, data: torch.Tensor) -> Camera:
        return Camera(self.model, data[..., 0], data[..., 1], data[..., 2:])

    def is_valid(self) -> torch.Tensor:
        """(...,) bool: finite parameters, positive focal lengths and size."""
        return (torch.isfinite(self._data).all(-1) & (self.f > 0).all(-1) & (self.size > 0).all(-1))

    def scale(self, scales: float | tuple[float, float]) -> Camera:
        """Resize the image by s or (sx, sy): f, c and size all scale (corner-origin pixels).
        A single focal length takes the mean scale, as COLMAP's `Camera::Rescale`."""
        sx, sy = (scales, scales) if isinstance(scales, (int, float)) else scales
        s = torch.tensor([sx, sy], dtype=self.dtype, device=self.device)
        focal_scale = s if self._num_focal == 2 else s.mean(0, keepdim=True)
        params = torch.cat([self.params[..., :self._num_focal] * focal_scale, self.c * s, self.dist], -1)
        return Camera(self.model, self.size[..., 0] * sx, self.size[..., 1] * sy, params)

    # ----- distortion, on normalized image coordinates (..., N, 2)
    def _distortion_coefficients(self) -> torch.Tensor:
        """(..., 1, 4) = (k1, k2, p1, p2), zero where the model has none."""
        return F.pad(self.dist, (0, 4 - self.dist.shape[-1]))[..., None, :]

    def distort(self, p_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Undistorted (..., N, 2) -> distorted normalized points (..., N, 2), valid (..., N).

        r_d = r (1 + k1 r^2 + k2 r^4) is invertible only while d r_d / d r = 1 + 3 k1 r^2 + 5 k2 r^4
        stays positive; beyond its first positive root in r^2 a strong negative distortion folds
        far points back into the image, so they are marked invalid instead of wrapped."""
        k1, k2, p1, p2 = self._distortion_coefficients().unbind(-1)
        u, v = p_norm.unbind(-1)
        r2 = u * u + v * v
        radial = k1 * r2 + k2 * r2 * r2
        u_d = u * (1 + radial) + 2 * p1 * u * v + p2 * (r2 + 2 * u * u)
        v_d = v * (1 + radial) + 2 * p2 * u * v + p1 * (r2 + 2 * v * v)
        # First positive root of 5 k2 s^2 + 3 k1 s + 1, written as 2 / (-3 k1 + sqrt(disc)) to
        # stay finite when k2 = 0; no real or no positive root means no bound.
        disc = 9 * k1 * k1 - 20 * k2
        denominator = -3 * k1 + torch.sqrt(disc.clamp(min=0))
        bounded = (disc >= 0) & (denominator > 0)
        max_r2 = torch.where(bounded, 2 / torch.where(bounded, denominator, torch.ones_like(denominator)),
                             torch.full_like(denominator, math.inf))
        return torch.stack([u_d, v_d], -1), r2 < max_r2

    def J_distort(self, p_norm: torch.Tensor) -> torch.Tensor:
        """Jacobian of `distort` w.r.t. the undistorted point: (..., N, 2, 2)."""
        k1, k2, p1, p2 = self._distortion_coefficients().unbind(-1)
        u, v = p_norm.unbind(-1)
        r2 = u * u + v * v
        radial = k1 * r2 + k2 * r2 * r2
        d_radial_d_r2 = k1 + 2 * k2 * r2
        du_du = 1 + radial + 2 * u * u * d_radial_d_r2 + 2 * p1 * v + 6 * p2 * u
        dv_dv = 1 + radial + 2 * v * v * d_radial_d_r2 + 2 * p2 * u + 6 * p1 * v
        cross = 2 * u * v * d_radial_d_r2 + 2 * p1 * u + 2 * p2 * v  # du_d/dv = dv_d/du
        return torch.stack([du_du, cross, cross, dv_dv], -1).unflatten(-1, (2, 2))

    def undistort(self, p_dist: torch.Tensor) -> torch.Tensor:
        """Distorted (..., N, 2) -> undistorted normalized points by Newton's method."""
        p = p_dist
        for _ in range(self.num_undistort_iterations):
            residual = self.distort(p)[0] - p_dist
            a, b, c, d = self.J_distort(p).flatten(-2).unbind(-1)
            det = a * d - b * c
            det = torch.where(det.abs() > torch.finfo(det.dtype).tiny, det, torch.ones_like(det))
            # p -= J^-1 residual, with the 2x2 inverse written out
            step_u = (d * residual[..., 0] - b * residual[..., 1]) / det
            step_v = (a * residual[..., 1] - c * residual[..., 0]) / det
            p = p - torch.stack([step_u, step_v], -1)
        return p

    # ----- projection
    def project(self, p3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Camera-frame points (..., N, 3) -> pixels (..., N, 2), valid (..., N): in front of the
        camera and inside the monotonic range of the distortion."""
        z = p3d[..., -1]
        in_front = z > self.eps
        p_norm = p3d[..., :2] / z.clamp(min=self.eps)[..., None]
        p_dist, valid_distortion = self.distort(p_norm)
        return p_dist * self.f[..., None, :] + self.c[..., None, :], in_front & valid_distortion

    def J_project(self, p3d: torch.Tensor) -> torch.Tensor:
        """Jacobian of `project` w.r.t. the camera-frame point: (..., N, 2, 3)."""
        x, y, z = p3d.unbind(-1)
        z = z.clamp(min=self.eps)
        zero = torch.zeros_like(z)
        J_perspective = torch.stack([1 / z, zero, -x / z**2, zero, 1 / z, -y / z**2], -1).unflatten(-1, (2, 3))
        J_dist = self.J_distort(p3d[..., :2] / z[..., None])
        return self.f[..., None, :, None] * (J_dist @ J_perspective)

    def unproject(self, p2d: torch.Tensor) -> torch.Tensor:
        """Pixels (..., N, 2) -> camera rays (..., N, 3) with z = 1."""
        p_dist = (p2d - self.c[..., None, :]) / self.f[..., None, :]
        p_norm = self.undistort(p_dist)
        return torch.cat([p_norm, torch.ones_like(p_norm[..., :1])], -1)

    def in_image(self, p2d: torch.Tensor, pad: float = 0) -> torch.Tensor:
        """(..., N) bool: inside [pad, w - pad] x [pad, h - pad] (corner-origin pixels)."""
        size = self.size[..., None, :]
        return ((p2d >= pad) & (p2d <= size - pad)).all(-1)

    def __repr__(self) -> str:
        return f"Camera {self.model}: {tuple(self.shape)} {self.dtype} {self.device}"


def perturb_poses(T: Pose, translation_m: torch.Tensor | float, rotation_deg: torch.Tensor | float,
                  generator: torch.Generator, num: int | None = None) -> Pose:
    """(M,) copies of a world-to-camera pose T with the camera centre moved by translation_m and
    the orientation turned by rotation_deg about the centre, in uniformly random directions.
    The magnitudes are (M,) tensors, or numbers repeated for `num` copies."""
    translation_m, rotation_deg = torch.broadcast_tensors(torch.as_tensor(translation_m, dtype=T.dtype),
                                                          torch.as_tensor(rotation_deg, dtype=T.dtype))
    if num is not None:
        translation_m, rotation_deg = translation_m.expand(num), rotation_deg.expand(num)
    directions = F.normalize(torch.randn(len(translation_m), 2, 3, generator=generator), dim=-1).to(T.dtype)
    R = so3_exp(directions[:, 1] * torch.deg2rad(rotation_deg)[:, None]) @ T.R  # (M, 3, 3)
    center = T.center() + directions[:, 0] * translation_m[:, None]  # (M, 3)
    return Pose.from_Rt(R, -(R @ center[..., None])[..., 0])
