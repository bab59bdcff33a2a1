"""Featuremetric pose refinement: coarse-to-fine Levenberg-Marquardt on deep (or any) features.

For a query image with a feature pyramid F (coarse to fine) and reference 3D points P_i (world
frame) carrying features f_i and confidences c_i, the world-to-camera pose T minimises per level

    E(T) = sum_i  w_i * rho(|| r_i ||^2),   r_i = F_hat(pi(T * P_i)) - f_hat_i,

where F_hat, f_hat are L2-normalised features, pi the camera projection at the level's resolution,
rho the robust Barron loss (alpha = 0, i.e. Cauchy) and w_i = c_i * query confidence * validity.
Each iteration linearises around T with the left update T <- exp(delta) @ T, delta = (v, w),

    J_i = dF_hat/dp (C, 2) @ dp/dP_cam (2, 3) @ dP_cam/ddelta (3, 6),

and solves (H + diag(lambda * diag(H))) delta = -g with H = sum w_i rho' J_i^T J_i,
g = sum w_i rho' J_i^T r_i. Because J_i factors through the 2D projection, H and g are
accumulated from per-point 2x2 / 2-vector image-space terms: the (N, C, 6) Jacobian is never built.

All M pose hypotheses of one query are refined together, each with its own early stop and
failure flag; optionally only those of lowest cost after the coarsest level go on (`num_kept`).
A failed hypothesis keeps its (finite) initial pose; nothing non-finite ever leaves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .extractors.base import FeatureLevel, Pyramid, sample_level
from .geometry import Camera, Pose

# Failure codes, kept as a tensor in the loop and turned into AlignResult.failure_reason strings
# once at the end. Level-specific messages are formatted with the level's stride.
_OK, _BAD_INIT, _BAD_CAMERA, _NO_POINTS, _TOO_FEW_POINTS, _DEGENERATE, _PRUNED = range(7)
_REASONS = {
    _OK: "",
    _BAD_INIT: "initial pose is not finite",
    _BAD_CAMERA: "camera is not valid (non-positive focal length or size, or non-finite parameters)",
    _NO_POINTS: "no reference points at stride {stride}",
    _TOO_FEW_POINTS: "fewer than {min_points} valid points at stride {stride}",
    _DEGENERATE: "degenerate Hessian at stride {stride}",
    _PRUNED: "not among the {num_kept} lowest costs at stride {stride}",
}


@dataclass
class ReferenceLevel:
    """Reference 3D points with their features at one pyramid level."""

    points3D: torch.Tensor  # (N, 3) world frame
    features: torch.Tensor  # (N, C)
    confidence: torch.Tensor  # (N,)

    @classmethod
    def from_observations(cls, level: FeatureLevel, points3D: torch.Tensor, p2d: torch.Tensor,
                          image_size: torch.Tensor) -> ReferenceLevel:
        """Features of one reference image, sampled where it observes points3D (N, 3) at image
        pixels p2d (N, 2); image_size (2,) is the (w, h) the pixels refer to."""
        features = _as_single_image(level.features, "reference level features")
        confidence = _as_single_image(level.confidence[None], "reference level confidence")[0]
        sampled_features, sampled_confidence = sample_level(FeatureLevel(features, confidence, level.stride),
                                                            p2d, image_size)
        return cls(points3D, sampled_features, sampled_confidence)

    def __getitem__(self, index: torch.Tensor) -> ReferenceLevel:
        """The points selected by index (K,) (indices or a mask)."""
        return ReferenceLevel(self.points3D[index], self.features[index], self.confidence[index])

    def to(self, *args, **kwargs) -> ReferenceLevel:
        return ReferenceLevel(self.points3D.to(*args, **kwargs), self.features.to(*args, **kwargs),
                              self.confidence.to(*args, **kwargs))


@dataclass
class AlignResult:
    poses: Pose  # (M,) refined world-to-camera poses; the initial pose where success is False
    cost: torch.Tensor  # (M,) robust mean cost at the finest level; inf where success is False
    num_points: torch.Tensor  # (M,) int64, valid points at the finest level
    success: torch.Tensor  # (M,) bool
    hessian: torch.Tensor  # (M, 6, 6) float64, of the final pose at the finest level; 0 on failure
    # (M,) the confidence-weighted cost per degree of freedom, sum_i w_i rho_i / (N - 6): with the
    # Hessian, the pose covariance of a weighted least-squares fit, pinv(H) * residual_variance,
    # which does not change when an extractor's confidences are all scaled (the mean cost does
    # not, the Hessian does). inf where success is False.
    residual_variance: torch.Tensor
    failure_reason: list[str]  # (M,) '' where success
    iterations: list[int] = field(default_factory=list)  # batched iterations run per level, coarse to fine


@dataclass
class AlignConf:
    num_iterations: tuple[int, ...] = (30, 15, 15)  # per level, coarse to fine (coarse goes furthest)
    loss_scale: float = 0.1  # robust loss scale on the residual norm (features are unit vectors)
    pad: float = 2.0  # projections closer than this (feature pixels) to the border are invalid
    min_points: int = 10  # fewer valid points at a level -> failure
    damping: tuple[float, float] = (1e-2, 1e-2)  # initial lambda for translation, rotation
    # A hypothesis stops at a level when a step moves its points by less than this (root mean
    # square, in the level's feature pixels): unlike a step in metres, this does not depend on
    # how far the scene is.
    stop_motion: float = 0.01
    damping_floor: float = 1e-6  # absolute lower bound of the damping, keeps H invertible
    # After the coarsest level only this many hypotheses, those of lowest cost, go on to the finer
    # levels, where each costs the most (0: all go on).
    num_kept: int = 0


# lambda = 10 ** (LOG_MIN + (LOG_MAX - LOG_MIN) * sigmoid(raw)): PixLoc's parametrisation.
DAMPING_LOG_RANGE = (-6.0, 5.0)


def damping_to_raw(lambda_: torch.Tensor) -> torch.Tensor:
    log_min, log_max = DAMPING_LOG_RANGE
    return torch.logit((torch.log10(lambda_) - log_min) / (log_max - log_min))


def raw_to_damping(raw: torch.Tensor) -> torch.Tensor:
    log_min, log_max = DAMPING_LOG_RANGE
    return 10.0 ** (log_min + (log_max - log_min) * torch.sigmoid(raw))


def barron_cauchy(squared: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Barron's robust loss with alpha = 0 applied to squared residuals x = r^2:
    rho(x) = 2 s^2 log(1 + x / (2 s^2)) and its derivative rho'(x) = 1 / (1 + x / (2 s^2)),
    which is the IRLS weight (1 for inliers, decaying as s^2 / x for outliers)."""
    scaled = squared / (2 * scale**2)
    return 2 * scale**2 * torch.log1p(scaled), 1 / (1 + scaled)


def interpolation_weights(fraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (..., 4) of the samples at offsets -1, 0, 1, 2 from floor(x), for x = floor(x) +
    fraction (...,): linear interpolation of the values, and linear interpolation of the central
    differences (F[i + 1] - F[i - 1]) / 2 at the two neighbours (the map's gradient, interpolated)."""
    rest = 1 - fraction
    zero = torch.zeros_like(fraction)
    value = torch.stack([zero, rest, fraction, zero], -1)
    difference = torch.stack([-rest, -fraction, rest, fraction], -1) / 2
    return value, difference


def _as_single_image(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """(1, C, h, w) or (C, h, w) -> (C, h, w)."""
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3:
        raise ValueError(f"{what}: expected (C, h, w) for one image, got {tuple(tensor.shape)}")
    return tensor


@dataclass
class _QueryLevel:
    """A query level prepared once, channel-last so that the pixels around a projection are a
    few contiguous rows: each lookup gathers the 4 x 4 pixels around it and interpolates the
    features, their central differences and the confidence from them. Nothing is computed for
    the pixels no point lands on, which at stride 1 are nearly all of them."""

    features: torch.Tensor  # (h * w, C), as stored (float16 features are converted after the lookup)
    confidence: torch.Tensor  # (h * w,)
    width: int
    height: int
    camera: Camera  # scaled to the level's resolution
    stride: int

    @classmethod
    def prepare(cls, level: FeatureLevel, camera: Camera) -> _QueryLevel:
        features = _as_single_image(level.features, f"query features at stride {level.stride}")
        confidence = _as_single_image(level.confidence[None], f"query confidence at stride {level.stride}")
        if confidence.shape[-2:] != features.shape[-2:]:
            raise ValueError(f"query level at stride {level.stride}: confidence {tuple(confidence.shape[-2:])} "
                             f"and features {tuple(features.shape[-2:])} differ in size")
        channels, height, width = features.shape
        feature_size = camera.size.new_tensor([width, height])
        scales = (feature_size / camera.size).tolist()
        # A copy unless the level is stored channel-last already (as cluster.shard_actor sends it).
        rows = features.permute(1, 2, 0).contiguous().view(height * width, channels)
        return cls(rows, confidence.reshape(-1), width, height, camera.scale(tuple(scales)), level.stride)

    @property
    def dtype(self) -> torch.dtype:
        """What the features are computed in: at least float32."""
        return torch.promote_types(self.features.dtype, torch.float32)

    def sample(self, p2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bilinear lookup at feature pixels p2d (M, N, 2), COLMAP convention as
        `sample_feature_map`, the border extended: features (M, N, C), their derivatives
        d/dx, d/dy (M, N, 2, C) in feature pixels, confidence (M, N), all in p2d's dtype."""
        corner = p2d - 0.5  # pixel centres at integer coordinates
        base = corner.floor()
        value_x, difference_x = interpolation_weights(corner[..., 0] - base[..., 0])  # (M, N, 4)
        value_y, difference_y = interpolation_weights(corner[..., 1] - base[..., 1])
        offsets = torch.arange(-1, 3, device=p2d.device)
        columns = (base[..., 0, None].long() + offsets).clamp(0, self.width - 1)  # (M, N, 4)
        rows = (base[..., 1, None].long() + offsets).clamp(0, self.height - 1)
        index = (rows[..., :, None] * self.width + columns[..., None, :]).flatten(-2)  # (M, N, 16), row-major
        patch = self.features.index_select(0, index.flatten()).view(*index.shape, -1).to(p2d)  # (M, N, 16, C)
        # (M, N, 3, 16): the 4 x 4 weights of the value, d/dx and d/dy; interpolation is separable.
        value = (value_y[..., :, None] * value_x[..., None, :]).flatten(-2)
        weights = torch.stack([value, (value_y[..., :, None] * difference_x[..., None, :]).flatten(-2),
                               (difference_y[..., :, None] * value_x[..., None, :]).flatten(-2)], -2)
        sampled = weights @ patch  # (M, N, 3, C)
        confidence = (value * self.confidence.index_select(0, index.flatten()).view(index.shape).to(p2d)).sum(-1)
        return sampled[..., 0, :], sampled[..., 1:, :], confidence


@dataclass
class _System:
    """Per-hypothesis quantities at the current poses."""

    gradient: torch.Tensor  # (M, 6)
    hessian: torch.Tensor  # (M, 6, 6)
    cost: torch.Tensor  # (M,) robust mean cost
    residual_variance: torch.Tensor  # (M,) see AlignResult
    num_valid: torch.Tensor  # (M,) int64
    motion: torch.Tensor  # (M, 6, 6) mean J^T J of the valid points: delta^T motion delta = their mean squared shift

    @classmethod
    def failed(cls, num_hypotheses: int, like: torch.Tensor) -> _System:
        """What is reported when no hypothesis reached the end."""
        return cls(like.new_zeros(num_hypotheses, 6), like.new_zeros(num_hypotheses, 6, 6),
                   like.new_full((num_hypotheses,), math.inf), like.new_full((num_hypotheses,), math.inf),
                   torch.zeros(num_hypotheses, dtype=torch.long, device=like.device),
                   like.new_zeros(num_hypotheses, 6, 6))


class _Failures:
    """The first failure code (and stride) of each hypothesis, as tensors on the device."""

    def __init__(self, num_hypotheses: int, device: torch.device):
        self.code = torch.full((num_hypotheses,), _OK, dtype=torch.long, device=device)
        self.stride = torch.zeros_like(self.code)

    @property
    def ok(self) -> torch.Tensor:
        return self.code == _OK

    def add(self, mask: torch.Tensor, code: int, stride: int = 0) -> None:
        first = mask & self.ok
        self.code.masked_fill_(first, code)
        self.stride.masked_fill_(first, stride)

    def messages(self, **details) -> list[str]:
        return [_REASONS[code].format(stride=stride, **details)
                for code, stride in zip(self.code.tolist(), self.stride.tolist())]


class FeaturemetricAligner(torch.nn.Module):
    """forward(query pyramid, reference levels, camera, T_init (M,)) -> AlignResult."""

    default_conf = AlignConf()

    def __init__(self, conf: AlignConf | None = None):
        super().__init__()
        self.conf = conf or self.default_conf
        lambda_init = torch.tensor(self.conf.damping).repeat_interleave(3)  # (6,) translation first
        # (num_levels, 6), our pyramid order: row 0 is the COARSEST level (see load_dampings).
        self.damping_raw = torch.nn.Parameter(damping_to_raw(lambda_init).repeat(len(self.conf.num_iterations), 1))

    @property
    def dampings(self) -> torch.Tensor:
        """(num_levels, 6) lambdas, coarse to fine, translation then rotation."""
        return raw_to_damping(self.damping_raw)

    @torch.no_grad()
    def load_dampings(self, raw: torch.Tensor) -> None:
        """Raw damping parameters from a PixLoc checkpoint, (L, 6) with L >= our number of levels.
        PixLoc indexes levels from the FINEST (its optimizer 0 works at stride 1) while our
        pyramids run coarse to fine, so the rows are flipped here; an aligner with fewer levels
        (e.g. refinement at strides 4 and 1) takes the finest ones."""
        num_levels = self.damping_raw.shape[0]
        if raw.ndim != 2 or raw.shape[0] < num_levels or raw.shape[1] != 6:
            raise ValueError(f"load_dampings: expected ({num_levels} or more, 6), got {tuple(raw.shape)}")
        self.damping_raw.copy_(raw[:num_levels].flip(0))

    def forward(self, query: Pyramid, references: list[ReferenceLevel], camera: Camera,
                T_init: Pose) -> AlignResult:
        self._check_inputs(query, references, T_init)
        device = query[0].features.device
        T_init = T_init.to(device)
        camera = camera.to(device=device, dtype=T_init.dtype)  # geometry runs in the pose's precision
        num_hypotheses = T_init.shape[0]
        failures = _Failures(num_hypotheses, device)
        init_finite = T_init.is_finite()  # (M,)
        failures.add(~init_finite, _BAD_INIT)
        failures.add(~camera.is_valid().expand(num_hypotheses), _BAD_CAMERA)
        # Non-finite initial poses are replaced by the identity so that no arithmetic sees NaN.
        T_start = _where(init_finite, T_init, Pose.identity(T_init.shape, T_init.dtype, T_init.device))

        T = T_start
        iterations = []
        for level_index, (level, reference) in enumerate(zip(query, references)):
            if reference.points3D.shape[0] == 0:
                failures.add(torch.ones_like(init_finite), _NO_POINTS, level.stride)
            if not bool(failures.ok.any()):
                iterations.append(0)
                continue
            query_level = _QueryLevel.prepare(level, camera)
            num_kept = self.conf.num_kept if level_index == 0 else 0
            T, num_run, cost = self._align_level(T, query_level, reference, self.dampings[level_index],
                                                 self.conf.num_iterations[level_index], failures, num_kept)
            iterations.append(num_run)
            if level_index == 0 and self.conf.num_kept > 0:
                failures.add(~_lowest(cost.where(failures.ok, math.inf), self.conf.num_kept), _PRUNED, level.stride)

        # The cost, point count and Hessian reported are those of the returned pose; when some
        # hypothesis is still fine, the finest level ran and query_level is the finest.
        system = _System.failed(num_hypotheses, T.t)
        if bool(failures.ok.any()):
            system = self._build_system(T, query_level, references[-1])
            failures.add(system.num_valid < self.conf.min_points, _TOO_FEW_POINTS, query[-1].stride)
            failures.add(~torch.isfinite(system.hessian).flatten(-2).all(-1), _DEGENERATE, query[-1].stride)
        success = failures.ok
        return AlignResult(
            poses=_where(success, T, T_start),
            cost=system.cost.where(success, math.inf),
            num_points=system.num_valid.where(success, 0),
            success=success,
            hessian=system.hessian.double().where(success[:, None, None], 0.0),
            residual_variance=system.residual_variance.where(success, math.inf),
            failure_reason=failures.messages(min_points=self.conf.min_points, num_kept=self.conf.num_kept),
            iterations=iterations,
        )

    def _align_level(self, T: Pose, level: _QueryLevel, reference: ReferenceLevel, damping: torch.Tensor,
                     num_iterations: int, failures: _Failures, num_kept: int = 0
                     ) -> tuple[Pose, int, torch.Tensor]:
        """Up to num_iterations LM steps at one level. A hypothesis stops when its step moves its
        points by less than conf.stop_motion, or when it fails; only the running ones are computed.
        With num_kept > 0 (only that many will go on), the level ends as soon as the num_kept of
        lowest cost have stopped: the others, still moving, are already costlier, and finishing
        them would only decide which of the discarded ones is least bad.
        Returns the poses, the iterations run and the cost (M,) of each hypothesis where it was
        last linearised (inf if never)."""
        num_hypotheses = T.shape[0]
        converged = torch.zeros_like(failures.ok)
        cost = T.t.new_full((num_hypotheses,), math.inf)
        num_run = 0
        while num_run < num_iterations:
            running = (failures.ok & ~converged).nonzero()[:, 0]  # (K,), a host sync like any early stop
            if len(running) == 0:
                break
            system = self._build_system(T[running], level, reference)
            cost = cost.index_put((running,), system.cost.to(cost))
            too_few = system.num_valid < self.conf.min_points  # (K,)
            delta, solved = self._solve(system, damping, active=~too_few)  # (K, 6)
            failures.add(_scatter(running, too_few, num_hypotheses), _TOO_FEW_POINTS, level.stride)
            failures.add(_scatter(running, ~solved, num_hypotheses), _DEGENERATE, level.stride)
            T = Pose.exp(_scatter(running, delta, num_hypotheses)) @ T  # exp(0) = I for the others
            squared_motion = (delta[:, None, :] @ system.motion.to(delta) @ delta[:, :, None])[:, 0, 0]  # (K,)
            converged |= _scatter(running, squared_motion < self.conf.stop_motion**2, num_hypotheses)
            num_run += 1
            if num_kept > 0 and not bool((_lowest(cost.where(failures.ok, math.inf), num_kept) & ~converged).any()):
                break
        return T, num_run, cost

    def _build_system(self, T_cam_world: Pose, level: _QueryLevel, reference: ReferenceLevel) -> _System:
        """Residuals, robust weights, gradient and Gauss-Newton Hessian of all hypotheses."""
        num_hypotheses = T_cam_world.shape[0]
        points = reference.points3D.to(T_cam_world.t.dtype).expand(num_hypotheses, -1, -1)  # (M, N, 3)
        p3d_cam = T_cam_world.transform(points)  # (M, N, 3)
        p2d, visible = level.camera.project(p3d_cam)  # (M, N, 2), (M, N)
        valid = visible & level.camera.in_image(p2d, self.conf.pad)
        # Invalid projections may be inf or NaN: park them on the map before sampling.
        p2d = torch.where(valid[..., None], p2d, torch.zeros_like(p2d))

        features_raw, d_features_raw, query_confidence = level.sample(p2d.to(level.dtype))
        # Interpolation breaks the unit norm: renormalise, f = F / |F|, and chain the Jacobian of
        # the normalisation into the image gradient dF (2, C): J_f = (I - f f^T) dF^T / |F|, so
        # J_f^T J_f = (dF dF^T - a a^T) / |F|^2 and J_f^T r = (dF r - a f.r) / |F| with a = dF f.
        # All are sums over the channels of products, written out: batches of 2 x C matrices
        # make slow matmuls on the CPU.
        norm = features_raw.norm(dim=-1).clamp(min=1e-6)[..., None]  # (M, N, 1)
        features = features_raw / norm
        residuals = features - F.normalize(reference.features.to(features), dim=-1)  # (M, N, C)
        a = (d_features_raw * features[..., None, :]).sum(-1)  # (M, N, 2)
        dF_r = (d_features_raw * residuals[..., None, :]).sum(-1)  # (M, N, 2)
        dF_dF = (d_features_raw[..., :, None, :] * d_features_raw[..., None, :, :]).sum(-1)  # (M, N, 2, 2)
        f_r = (features * residuals).sum(-1, keepdim=True)  # (M, N, 1)
        H_p2d = (dF_dF - a[..., :, None] * a[..., None, :]) / norm[..., None] ** 2  # (M, N, 2, 2) = J_f^T J_f
        g_p2d = (dF_r - a * f_r) / norm  # (M, N, 2) = J_f^T r

        cost, robust_weight = barron_cauchy(residuals.pow(2).sum(-1), self.conf.loss_scale)  # (M, N)
        confidence = torch.where(valid, reference.confidence.to(features) * query_confidence,
                                 torch.zeros_like(query_confidence))
        weights = confidence * robust_weight  # (M, N)

        # d p2d / d delta = J_project [I | -[p]x]: row j of the rotation block is p x (row j of J_project).
        J_project = level.camera.J_project(p3d_cam)  # (M, N, 2, 3)
        J_p2d_pose = torch.cat([J_project, torch.linalg.cross(p3d_cam[..., None, :], J_project)], -1)  # (M, N, 2, 6)
        J_p2d_pose = torch.where(valid[..., None, None], J_p2d_pose, torch.zeros_like(J_p2d_pose))
        weighted_J = weights.to(J_p2d_pose)[..., None, None] * J_p2d_pose  # (M, N, 2, 6)
        gradient = (weighted_J * g_p2d.to(J_p2d_pose)[..., None]).sum((1, 2))  # (M, 6)
        H_p2d = H_p2d.to(J_p2d_pose)
        H_J = H_p2d[..., :, :1] * J_p2d_pose[..., :1, :] + H_p2d[..., :, 1:] * J_p2d_pose[..., 1:, :]  # (M, N, 2, 6)
        hessian = weighted_J.flatten(1, 2).transpose(1, 2) @ H_J.flatten(1, 2)  # (M, 6, 6)
        weighted_cost = (confidence * cost).sum(-1)
        mean_cost = weighted_cost / confidence.sum(-1).clamp(min=1e-12)
        num_valid = valid.sum(-1)
        residual_variance = weighted_cost / (num_valid - 6).clamp(min=1)
        J_flat = J_p2d_pose.flatten(1, 2)  # (M, 2N, 6), zero where invalid
        motion = J_flat.transpose(1, 2) @ J_flat / num_valid.clamp(min=1)[:, None, None]  # (M, 6, 6)
        return _System(gradient, hessian, mean_cost, residual_variance, num_valid, motion)

    def _solve(self, system: _System, damping: torch.Tensor, active: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """delta (M, 6) solving (H + diag(lambda * diag(H))) delta = -g in float64, and whether the
        system was solvable (M,). Inactive or unsolvable hypotheses get delta = 0."""
        hessian, gradient = system.hessian.double(), system.gradient.double()
        finite = torch.isfinite(hessian).flatten(-2).all(-1) & torch.isfinite(gradient).all(-1)
        eye = torch.eye(6, dtype=torch.float64, device=hessian.device)
        hessian = torch.where(finite[:, None, None], hessian, eye)
        gradient = torch.where(finite[:, None], gradient, torch.zeros_like(gradient))
        diagonal = hessian.diagonal(dim1=-2, dim2=-1)
        damped = hessian + torch.diag_embed((damping.double() * diagonal).clamp(min=self.conf.damping_floor))
        cholesky, info = torch.linalg.cholesky_ex(damped)
        solved = finite & (info == 0)
        cholesky = torch.where(solved[:, None, None], cholesky, eye)
        delta = -torch.cholesky_solve(gradient[..., None], cholesky)[..., 0]
        delta = torch.where((solved & active)[:, None], delta, torch.zeros_like(delta))
        return delta.to(system.gradient.dtype), solved | ~active

    def _check_inputs(self, query: Pyramid, references: list[ReferenceLevel], T_init: Pose) -> None:
        num_levels = len(self.conf.num_iterations)
        if len(query) != num_levels or len(references) != num_levels:
            raise ValueError(f"align: expected {num_levels} query and reference levels (coarse to fine), "
                             f"got {len(query)} and {len(references)}")
        if len(T_init.shape) != 1:
            raise ValueError(f"align: T_init must have batch shape (M,), got {tuple(T_init.shape)}")
        for level, reference in zip(query, references):
            num_points = reference.points3D.shape[0]
            if (reference.points3D.shape != (num_points, 3) or reference.features.ndim != 2
                    or reference.features.shape[0] != num_points or reference.confidence.shape != (num_points,)):
                raise ValueError(f"align: reference level at stride {level.stride} needs points3D (N, 3), "
                                 f"features (N, C), confidence (N,); got {tuple(reference.points3D.shape)}, "
                                 f"{tuple(reference.features.shape)}, {tuple(reference.confidence.shape)}")
            query_channels = level.features.shape[-3]
            if reference.features.shape[1] != query_channels:
                raise ValueError(f"align: stride {level.stride}: reference features have "
                                 f"{reference.features.shape[1]} channels, query {query_channels}")


def _scatter(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """values (K, ...) of the hypotheses index (K,) placed into a zero/False tensor (size, ...)."""
    return values.new_zeros(size, *values.shape[1:]).index_put((index,), values)


def _lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """(M,) bool: the k smallest finite values."""
    lowest = torch.zeros_like(values, dtype=torch.bool)
    lowest[torch.topk(values, min(k, len(values)), largest=False).indices] = True
    return lowest & torch.isfinite(values)


def _where(mask: torch.Tensor, a: Pose, b: Pose) -> Pose:
    """Per hypothesis: a where mask (M,) else b."""
    return Pose.from_Rt(torch.where(mask[:, None, None], a.R, b.R), torch.where(mask[:, None], a.t, b.t))
