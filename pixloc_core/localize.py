"""Localization of one query from its GPS prior, without Ray: the per-query logic of the batch job.

    prior -> pose hypotheses -> featuremetric alignment -> the lowest final cost, checked

Hypotheses are the poses of the reference images nearest to the prior, moved to the prior's
position and turned to look at what the reference looked at (a nearby photo shows roughly the
same scene, and the GPS says nothing about heading), or a SIFT + PnP pose, which a geometric
check (its inliers) already verified. All hypotheses of one alignment are refined together against
the reference points, coarse to fine (the finer levels only for those of lowest cost at the
coarsest, see AlignConf.num_kept); the lowest final cost wins, and its Hessian gives the pose's
uncertainty.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .align import AlignResult, FeaturemetricAligner, ReferenceLevel
from .extractors.base import Pyramid
from .geometry import Camera, Pose, so3_exp

METHODS = ("dense", "sparse", "sparse+dense")


@dataclass(frozen=True)
class LocalizeConf:
    num_reference_hypotheses: int = 4  # K nearest reference images turned into hypotheses
    # A result needs this many valid points at the finest level and a sane cost (the robust cost
    # of unit features saturates near 0.106). The cost alone does not tell right from wrong
    # poses, so a pose that no geometric check verified (one grown from a reference image's pose,
    # unlike a SIFT + PnP pose) must also be well constrained: on the synthetic street at 640x480,
    # wrong ones had a position std of 0.09-1.5 m, right ones 0.01-0.08 m.
    min_points: int = 100
    max_cost: float = 0.09
    max_position_std_m: float = 0.05
    # Points per level seen by some hypothesis, coarse to fine (an alignment on the fine levels
    # only takes the last ones): they bound the alignment time. The coarsest level aligns every
    # hypothesis and for the most iterations, while its features, blurred over 16 pixels and
    # more, make near points redundant: there, fewer do.
    max_points: tuple[int, ...] = (1000, 2000, 2000)
    max_depth_m: float = 60.0  # farther points are too coarse to help


@dataclass
class Localization:
    """The outcome for one query; plain values so that it crosses process boundaries cheaply."""

    success: bool
    qvec: tuple[float, ...] | None = None  # world-to-camera (w, x, y, z)
    tvec: tuple[float, ...] | None = None
    cost: float = math.inf
    num_points: int = 0
    hypothesis: str = ""  # which hypothesis won, e.g. "sparse" or "ref:<image name>"
    position_std_m: float = math.nan
    rotation_std_deg: float = math.nan
    error: str = ""
    retryable: bool = False  # failed because of the infrastructure (store, process, disk): --resume retries it

    def pose(self) -> Pose | None:
        if self.qvec is None:
            return None
        return Pose.from_qvec_tvec(torch.tensor(self.qvec, dtype=torch.float64),
                                   torch.tensor(self.tvec, dtype=torch.float64))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def failure(cls, error: str, retryable: bool = False) -> Localization:
        return cls(success=False, error=error, retryable=retryable)


def reference_hypotheses(prior_xyz: np.ndarray, reference_poses: Pose, k: int) -> tuple[Pose, np.ndarray]:
    """Poses of the k reference images nearest to the prior (horizontally), each moved so that its
    centre is at the prior's (x, y) and at the reference's own height (GPS altitude is poor).

    prior_xyz (3,) in the map frame (z up); reference_poses (R,) world-to-camera.
    Returns the hypotheses (K,) and the indices (K,) of the references they come from."""
    centers = reference_poses.center().double()  # (R, 3)
    prior = torch.as_tensor(prior_xyz, dtype=torch.float64)
    horizontal_distance = torch.linalg.norm(centers[:, :2] - prior[:2], dim=-1)  # (R,)
    k = min(k, len(horizontal_distance))
    nearest = torch.topk(horizontal_distance, k, largest=False).indices  # (K,)
    new_centers = torch.cat([prior[:2].expand(k, 2), centers[nearest, 2:]], -1)  # (K, 3)
    R = reference_poses.R.double()[nearest]  # (K, 3, 3)
    t = -(R @ new_centers[..., None])[..., 0]  # t = -R c
    return Pose.from_Rt(R, t), nearest.numpy()


def viewed_points(poses: Pose, depths: torch.Tensor) -> torch.Tensor:
    """The points (R, 3) that reference images (R,) look at: on their optical axis, at the given
    depths (R,), e.g. the median depth of the 3D points each observes (NaN: unknown)."""
    axis = poses.R[..., 2, :]  # (R, 3): the camera's z axis in the world frame, R^T e_z
    return poses.center() + depths[:, None].to(axis) * axis


def turned_towards(hypotheses: Pose, targets: torch.Tensor) -> Pose:
    """Each hypothesis (M,) turned by the smallest rotation that points its optical axis at its
    target (M, 3), keeping its centre; unchanged where the target is unknown (NaN) or not in
    front of it (a turn of 90 degrees or more would be needed).

    A reference hypothesis moved to the prior keeps looking the reference's way, which misses the
    scene when the prior is beside the reference and the scene near (photos taken around an
    object); turned towards what the reference looked at, it sees that scene in the middle of
    the image again, as the reference did. In a street the turn is small, and it compensates the
    parallax of the prior's sideways error at the scene's typical depth."""
    centers = hypotheses.center()  # (M, 3)
    axis = hypotheses.R[..., 2, :]  # (M, 3)
    direction = torch.nn.functional.normalize(targets.to(centers) - centers, dim=-1)
    cosine = (axis * direction).sum(-1)
    possible = torch.isfinite(direction).all(-1) & (cosine > 0)
    normal = torch.linalg.cross(axis, direction)  # (M, 3), |normal| = sine of the turn
    angle = torch.atan2(normal.norm(dim=-1), cosine).where(possible, 0.0)
    turn = so3_exp(torch.nn.functional.normalize(normal.where(possible[:, None], 0.0), dim=-1) * angle[:, None])
    R = hypotheses.R @ turn.transpose(-1, -2)  # world-frame turn: the new axis R^T e_z is turn @ axis
    return Pose.from_Rt(R, -(R @ centers[..., None])[..., 0])


def visible_points(reference: ReferenceLevel, hypotheses: Pose, camera: Camera, max_points: int,
                   max_depth_m: float) -> ReferenceLevel:
    """The points that some hypothesis (M,) sees inside the image and closer than max_depth_m, at
    most max_points of them (an even subsample, deterministic): alignment time grows with the
    points, and points no hypothesis sees only cost time."""
    camera = camera.to(hypotheses.dtype)
    points = reference.points3D.to(hypotheses.dtype)  # (N, 3)
    p3d_cam = hypotheses.transform(points.expand(hypotheses.shape[0], -1, -1))  # (M, N, 3)
    p2d, in_front = camera.project(p3d_cam)
    seen = (in_front & camera.in_image(p2d) & (p3d_cam[..., 2] < max_depth_m)).any(0)  # (N,)
    index = torch.nonzero(seen)[:, 0]
    if len(index) > max_points:
        index = index[torch.linspace(0, len(index) - 1, max_points).round().long()]
    return reference[index]


def pose_uncertainty(hessian: torch.Tensor, cost: float, pose: Pose) -> tuple[float, float]:
    """1-sigma position (m) and rotation (deg) uncertainty from the Gauss-Newton Hessian (6, 6) of
    the left update delta = (v, w), scaled by the mean cost as the residual variance.

    Under T <- exp(delta) T the camera centre c = -R^T t moves by -R^T v to first order, so the
    centre covariance is R^T Cov(v) R; its trace is the squared position uncertainty."""
    hessian = hessian.double()
    if not bool(torch.isfinite(hessian).all()) or not math.isfinite(cost):
        return math.nan, math.nan
    covariance = torch.linalg.pinv(hessian) * cost  # (6, 6)
    R = pose.R.double()
    center_covariance = R.T @ covariance[:3, :3] @ R
    position_std = math.sqrt(max(float(torch.trace(center_covariance)), 0.0))
    rotation_std = math.degrees(math.sqrt(max(float(torch.trace(covariance[3:, 3:])), 0.0)))
    return position_std, rotation_std


def checked(result: AlignResult, index: int, label: str, verified: bool, conf: LocalizeConf) -> Localization:
    """Hypothesis `index` of an alignment, with the success criteria applied; `verified` when its
    initial pose passed a geometric check (PnP inliers), which replaces the uncertainty check."""
    if not bool(result.success[index]):
        return Localization.failure(f"{label}: {result.failure_reason[index]}")
    pose = result.poses[index]
    cost, num_points = float(result.cost[index]), int(result.num_points[index])
    position_std, rotation_std = pose_uncertainty(result.hessian[index], cost, pose)
    localization = Localization(
        success=True, qvec=tuple(pose.qvec().double().tolist()), tvec=tuple(pose.t.double().tolist()),
        cost=cost, num_points=num_points, hypothesis=label, position_std_m=position_std,
        rotation_std_deg=rotation_std)
    if num_points < conf.min_points:
        localization.success, localization.error = False, f"too few points: {num_points} < {conf.min_points}"
    elif cost > conf.max_cost:
        localization.success, localization.error = False, f"cost too high: {cost:.4f} > {conf.max_cost}"
    elif not verified and not position_std <= conf.max_position_std_m:
        localization.success = False
        localization.error = f"position too uncertain: std {position_std:.3f} m > {conf.max_position_std_m} m"
    return localization


@torch.no_grad()
def align_hypotheses(aligner: FeaturemetricAligner, query: Pyramid, camera: Camera,
                     references: list[ReferenceLevel], hypotheses: Pose, labels: list[str],
                     conf: LocalizeConf, verified: bool = False) -> Localization:
    """Refine all hypotheses (M,) of one query coarse to fine and keep the lowest cost.

    `query` and `references` run coarse to fine with as many levels as the aligner expects (all
    three from rough hypotheses, only the fine ones from poses that are already close); `camera`
    is the query camera at the resolution the pyramid was computed from; `verified`: whether the
    hypotheses passed a geometric check (see `checked`)."""
    if len(hypotheses.shape) != 1 or hypotheses.shape[0] != len(labels):
        raise ValueError(f"need one label per hypothesis, got {tuple(hypotheses.shape)} poses and {len(labels)} labels")
    if hypotheses.shape[0] == 0:
        return Localization.failure("no pose hypothesis")
    dtype = torch.promote_types(query[0].features.dtype, torch.float32)  # float16 features are storage only
    hypotheses = hypotheses.to(dtype)
    camera = camera.to(dtype)
    references = [visible_points(reference, hypotheses, camera, max_points, conf.max_depth_m)
                  for reference, max_points in zip(references, conf.max_points[-len(references):])]
    result = aligner(query, references, camera, hypotheses)
    return best_of([checked(result, index, label, verified, conf) for index, label in enumerate(labels)])


def best_of(localizations: list[Localization]) -> Localization:
    """The successful result of lowest cost, else the failure of lowest cost (the first one when
    none got as far as a cost)."""
    if not localizations:
        return Localization.failure("no result")
    successful = [loc for loc in localizations if loc.success]
    if successful:
        return min(successful, key=lambda loc: loc.cost)
    # A failure is final only if no part of it failed for a reason a retry could remove.
    best = min(localizations, key=lambda loc: loc.cost)
    return replace(best, retryable=any(loc.retryable for loc in localizations))


# ----- verification: the checks every pose marked successful passes, whatever method made it

TRUST_PRIOR = ("normal", "low")


@dataclass(frozen=True)
class VerifyConf:
    """Thresholds of the final checks, chosen with `pixloc bench precision` (README)."""

    # A PnP pose: enough inliers, and enough of the 2D-3D matches agreeing (a wrong pose found
    # among many random matches has a low ratio), and a plausible covariance.
    min_inliers: int = 30
    min_inlier_ratio: float = 0.15
    max_pnp_position_std_m: float = 1.0
    # The pose must lie within prior_sigmas * sigma + prior_margin_m of its prior (horizontally:
    # GPS altitude is poor), unless the priors may be wrong (trust_prior "low").
    prior_sigmas: float = 3.0
    prior_margin_m: float = 5.0
    trust_prior: str = "normal"
    # A refined PnP pose must stay near its PnP start: a refinement that wanders off found another
    # minimum, and one of the two is wrong.
    max_refinement_shift_m: float = 1.0
    max_refinement_turn_deg: float = 5.0


@dataclass
class Checks:
    """The values a pose is verified on (NaN / 0: not applicable to how the pose was found)."""

    inliers: int = 0  # PnP inliers
    matches: int = 0  # 2D-3D matches given to PnP
    pnp_position_std_m: float = math.nan  # from PnP's covariance
    prior_distance_m: float = math.nan  # horizontal, between the prior and the camera centre
    prior_sigma_m: float = math.nan
    refinement_shift_m: float = math.nan  # between the PnP pose and its featuremetric refinement
    refinement_turn_deg: float = math.nan

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "inlier_ratio": self.inlier_ratio}


def pose_difference(first: Pose, second: Pose) -> tuple[float, float]:
    """Distance (m) between the camera centres and angle (deg) between the rotations."""
    shift = float(torch.linalg.norm(first.center() - second.center()))
    relative = first.R @ second.R.transpose(-1, -2)
    cosine = ((torch.diagonal(relative, dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return shift, math.degrees(float(torch.arccos(cosine)))


def measure(localization: Localization, prior_xyz: np.ndarray | None, prior_sigma_m: float | None,
            pnp_pose: Pose | None = None, inliers: int = 0, matches: int = 0,
            pnp_position_std_m: float = math.nan) -> Checks:
    """The check values of a result: PnP statistics when its pose comes from PnP (hypothesis
    "sparse..."), the distance to the prior, and how far the refinement moved the PnP pose."""
    checks = Checks(prior_sigma_m=math.nan if prior_sigma_m is None else float(prior_sigma_m))
    pose = localization.pose()
    if pose is None:
        return checks
    if prior_xyz is not None:
        checks.prior_distance_m = float(np.linalg.norm(pose.center().numpy()[:2] - np.asarray(prior_xyz)[:2]))
    if localization.hypothesis.startswith("sparse"):
        checks.inliers, checks.matches, checks.pnp_position_std_m = inliers, matches, pnp_position_std_m
        if pnp_pose is not None and localization.hypothesis == "sparse":
            checks.refinement_shift_m, checks.refinement_turn_deg = pose_difference(pose.double(), pnp_pose.double())
    return checks


def verdict(checks: Checks, conf: VerifyConf) -> str:
    """Why a pose with these check values is not trusted; empty when every check passes."""
    if checks.matches:  # a PnP pose
        if checks.inliers < conf.min_inliers:
            return f"too few PnP inliers: {checks.inliers} < {conf.min_inliers}"
        if checks.inlier_ratio < conf.min_inlier_ratio:
            return (f"too few matches agree with the pose: {checks.inliers}/{checks.matches} inliers "
                    f"({checks.inlier_ratio:.2f} < {conf.min_inlier_ratio})")
        if not checks.pnp_position_std_m <= conf.max_pnp_position_std_m:
            return f"PnP pose too uncertain: std {checks.pnp_position_std_m:.2f} m > {conf.max_pnp_position_std_m} m"
    if checks.refinement_shift_m > conf.max_refinement_shift_m or checks.refinement_turn_deg > conf.max_refinement_turn_deg:
        return (f"refinement disagrees with PnP: moved {checks.refinement_shift_m:.2f} m, "
                f"{checks.refinement_turn_deg:.1f} deg")
    if conf.trust_prior != "low" and math.isfinite(checks.prior_distance_m) and math.isfinite(checks.prior_sigma_m):
        if checks.prior_distance_m > conf.prior_sigmas * checks.prior_sigma_m + conf.prior_margin_m:
            return (f"inconsistent with the prior: {checks.prior_distance_m:.1f} m from it, "
                    f"sigma {checks.prior_sigma_m:.1f} m")
    return ""


def verify(localization: Localization, checks: Checks, conf: VerifyConf) -> Localization:
    """The result, no longer successful (pose kept, reason given) when a check fails."""
    if not localization.success:
        return localization
    reason = verdict(checks, conf)
    if reason:
        return replace(localization, success=False, error=reason)
    return localization
