"""Localization of one query from its GPS prior, without Ray: the per-query policy of the batch job.

    QueryInput --Planner.plan--> QueryPlan (intrinsics, prior in the map frame, cells, hypotheses)
    query worker: pixels -> QueryRequest (feature pyramid and/or keypoints), one per query
    shard (per cell): localize_in_cell -> Localization (sparse, dense, refine and the fallbacks)
    query worker: the plan's cells in turn while search_on, then best_of their answers

Every decision of that chain is here; the Ray job (jobs/localize.py) and the shard actors
(cluster/shard_actor.py) only move these messages and cache the cells.

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
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from . import files
from .files import Location, StorageError
from .align import AlignConf, AlignResult, FeaturemetricAligner, ReferenceLevel
from .extractors.base import FeatureLevel, Pyramid, widened
from .geometry import Camera, Pose, so3_exp
from .io import Prior, QueryIntrinsics

METHODS = ("dense", "sparse", "sparse+dense")
SPARSE_METHODS = ("sparse", "sparse+dense")  # those that match keypoints and solve PnP
DENSE_METHODS = ("dense", "sparse+dense", "refine")  # those that need the query's feature pyramid
# Those that may align the plan's rough hypotheses, poses no geometric check verified.
UNVERIFIED_ALIGNMENT_METHODS = ("dense", "sparse+dense")


# ----- verification: the checks every pose marked successful passes, whatever method made it

TRUST_PRIOR = ("normal", "low")


@dataclass(frozen=True)
class VerifyConf:
    """Thresholds of the final checks, chosen with `pixloc bench precision` (README)."""

    # A PnP pose: enough inliers, enough of the 2D-3D matches agreeing (a wrong pose found among
    # many random matches has a low ratio), and a bounded covariance. Before the split check
    # below, wrong poses with stds of 0.76-1.71 m passed every other check and the bound was
    # 0.75 m; with it, bench precision (README) keeps 100 % precision at any std bound, and 1.5 m
    # keeps all but one of the right poses that a bound could refuse.
    min_inliers: int = 20
    min_inlier_ratio: float = 0.15
    max_pnp_position_std_m: float = 1.5
    # A second pose found among the matches the first left out (pixloc_core.sparse.rival_inliers)
    # may have at most this share of its inliers: on repeated structure both the right and a wrong
    # pose gather support.
    max_rival_ratio: float = 0.5
    # The poses refined from the inliers left and right of the image's median column must agree.
    # On bench precision every wrong PnP pose lay 4.2-57 m from its halves' (two of them, 5.3 and
    # 9.9 m off on the 640x480 40-reference street, passed every other check: 32 and 57 inliers,
    # std 0.6 m, no rival); the right ones that passed the other checks 0.0-1.9 m.
    max_pnp_split_shift_m: float = 3.0
    # The PnP pose's std without the one inlier that constrains it most
    # (pixloc_core.sparse.leave_one_out_centre_std), bounded as the std itself: a right pose does
    # not hinge on one match. Over 676 PnP poses of bench scale's four cities and bench
    # precision's streets (SIFT + PnP alone) the 619 right ones that passed the other checks read
    # 0.09 m at the median, 4 of them above 1.5 m (at most 2.4 m); q_0009 above, 5.3 m off, 4.3 m.
    max_pnp_leave_one_out_std_m: float = 1.5
    # The pose must lie within prior_sigmas * sigma + prior_margin_m of its prior (horizontally:
    # GPS altitude is poor), unless the priors may be wrong (trust_prior "low").
    prior_sigmas: float = 3.0
    prior_margin_m: float = 2.0
    trust_prior: str = "normal"
    # A refined PnP pose must stay near its PnP start: a refinement that wanders off found another
    # minimum, and one of the two is wrong.
    max_refinement_shift_m: float = 0.6
    max_refinement_turn_deg: float = 5.0


@dataclass
class Checks:
    """The values a pose is verified on (NaN / 0: not applicable to how the pose was found)."""

    inliers: int = 0  # PnP inliers
    matches: int = 0  # 2D-3D matches given to PnP
    pnp_position_std_m: float = math.nan  # from PnP's covariance
    rival_inliers: int = 0  # PnP inliers of the best other pose (pixloc_core.sparse.rival_inliers)
    pnp_split_shift_m: float = math.nan  # between the poses of the image's two halves (pixloc_core.sparse.split_shift)
    pnp_leave_one_out_std_m: float = math.nan  # the PnP std without its most decisive inlier
    prior_distance_m: float = math.nan  # horizontal, between the prior and the camera centre
    prior_sigma_m: float = math.nan
    refinement_shift_m: float = math.nan  # between the PnP pose and its featuremetric refinement
    refinement_turn_deg: float = math.nan
    # An aligned pose of an extractor that detects keypoints, against the query's own keypoints
    # (keypoint_support): their matches to the cell's features, how many the pose explains, and
    # the ratio of the two (NaN: not measured).
    keypoint_matches: int = 0
    keypoint_support: int = 0
    keypoint_support_ratio: float = math.nan

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "inlier_ratio": self.inlier_ratio}


PNP_CHECKS = ("inliers", "matches", "pnp_position_std_m", "rival_inliers", "pnp_split_shift_m",
              "pnp_leave_one_out_std_m")


@dataclass(frozen=True)
class LocalizeConf:
    num_reference_hypotheses: int = 4  # K nearest reference images turned into hypotheses
    # A result needs this many valid points at the finest level and a sane cost (the robust cost
    # of unit features saturates near 0.106). The cost alone does not tell right from wrong
    # poses, so a pose that no geometric check verified (one grown from a reference image's pose,
    # unlike a SIFT + PnP pose) must also be well constrained (alignment_covariance). The cost cap is
    # from `bench precision`: right aligned poses cost 0.025-0.073 on every scene, while a dense
    # pose of Lund 3.9 m off passed every other check at 0.079 (its PnP-refined pose: 0.061).
    min_points: int = 100
    max_cost: float = 0.075
    # The refinement of a verified start (a PnP pose that passed its checks, an input pose) is
    # refused for its cost only above this: there the geometric checks carry the trust, and the
    # cap of unverified poses refused right ones. In `make demo` (150 references, 640x480) 10 of
    # 40 PnP poses, 2-33 mm from the truth, refined to costs of 0.075-0.082 and were refused.
    max_refined_cost: float = 0.09
    # From `bench precision` (README), `classic` and `alike-n`: on the synthetic streets right
    # aligned poses had stds up to 0.010 m with `classic` (three more of 0.09-0.15 m), wrong ones
    # under the cost cap from 0.031 m (11.6 m off, and 6 m outside its 2 m prior); on the real
    # sets right poses reached 0.027 m (Lund at 480 px), and the lowest wrong one under the cost
    # cap was `alike-n`'s 0.0375 m (Lund, 4.7 m off). Until the std was made independent of the
    # confidences' scale (alignment_covariance) the bound was 0.05 m, about 2.5x the same stds of
    # `classic`, and out of scale for every other extractor.
    max_position_std_m: float = 0.03
    # An aligned pose of an extractor that detects keypoints (ALIKE, XFeat) is checked against the
    # query's own keypoints instead of its std (keypoint_support): at least this many of their
    # matches to the cell's features within keypoint_support_px (pixels of the image the
    # extractor saw) of the pose's projections, and that share of the matches. On `bench
    # precision` with `alike-n` (README), right aligned poses under the cost cap had 7-705 such
    # matches, wrong ones 0-10 (ratios up to 0.31; Lund 12.jpg, 4.7 m off: 4 of 122), while the
    # std did not separate them on Lund (right 0.037-0.067 m, wrong 0.0375 m).
    keypoint_support_px: float = 4.0
    min_keypoint_support: int = 20
    min_keypoint_support_ratio: float = 0.15
    max_support_points: int = 8000  # reference features the keypoints are matched to (of those the pose sees)
    # Points per level seen by some hypothesis, coarse to fine (an alignment on the fine levels
    # only takes the last ones): they bound the alignment time. The coarsest level aligns every
    # hypothesis and for the most iterations, while its features, blurred over 16 pixels and
    # more, make near points redundant: there, fewer do.
    max_points: tuple[int, ...] = (1000, 2000, 2000)
    max_depth_m: float = 60.0  # farther points are too coarse to help
    sparse_levels: int = 2  # a SIFT+PnP pose is already close: refine it on the finest levels only
    # A refined PnP pose is combined with its start by their covariances (refined_with_pnp), not
    # taken alone: the features of a small image are coarser than SIFT's sub-pixel keypoints.
    combine_refinement_with_pnp: bool = True
    min_selected_points: int = 200  # fewer points seen by the nearby references: use the whole cell
    # Rough hypotheses that do not give a pose are also aligned from the coarsest level widened,
    # where the store has it, and moved along their optical axes by these distances
    # (alignment_starts). 4 m: Lund's GPS priors are 4.4 m off (median), and `alike-n`'s basin at
    # 3 m with its wide start is 80-85 % on fountain-P11.
    wide_start: bool = True
    depth_shifts_m: tuple[float, ...] = (-4.0, 4.0)
    # The methods that do so. Not `sparse+dense`, whose rough hypotheses are aligned only where PnP
    # failed: on bench scale's synthetic cities (320 px) it localized no more queries there and
    # took 0.3-0.4 s more per query (1.75 -> 1.16 queries/s), while its `dense` localized Lund's 12.jpg.
    second_stage_methods: tuple[str, ...] = ("dense",)
    verify: VerifyConf = VerifyConf()  # the final checks of every pose, whatever method made it


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
    checks: Checks = field(default_factory=Checks)  # the values it was verified on
    # The 36 values of the (6, 6) covariance of the pose's left update (pose_std); None when its
    # method gives none. Not a result column: it serves refined_with_pnp.
    covariance: tuple[float, ...] | None = None

    @staticmethod
    def pose_fields(pose: Pose) -> dict[str, tuple[float, ...]]:
        """The qvec and tvec values of an unbatched pose (the inverse of `pose`)."""
        return {"qvec": tuple(pose.qvec().double().tolist()), "tvec": tuple(pose.t.double().tolist())}

    def pose(self) -> Pose | None:
        if self.qvec is None:
            return None
        return Pose.from_qvec_tvec(torch.tensor(self.qvec, dtype=torch.float64),
                                   torch.tensor(self.tvec, dtype=torch.float64))

    def pose_covariance(self) -> torch.Tensor | None:
        return None if self.covariance is None else torch.tensor(self.covariance, dtype=torch.float64).reshape(6, 6)

    def to_dict(self) -> dict:
        """Plain values, the checks' flattened beside the others (one column each in the results)."""
        values = asdict(self)
        del values["checks"], values["covariance"]
        return {**values, **self.checks.to_dict()}

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


def alignment_covariance(hessian: torch.Tensor, residual_variance: float) -> torch.Tensor:
    """(6, 6) covariance of the left update delta = (v, w) of an aligned pose from its Gauss-Newton
    Hessian (6, 6) and residual variance (AlignResult.residual_variance): the covariance of a
    weighted least-squares fit, pinv(H) * variance, whatever the confidences' scale; NaN where
    either is not finite."""
    hessian = hessian.double()
    if not bool(torch.isfinite(hessian).all()) or not math.isfinite(residual_variance):
        return torch.full((6, 6), math.nan, dtype=torch.float64)
    return torch.linalg.pinv(hessian) * residual_variance


def pose_std(covariance: torch.Tensor) -> tuple[float, float]:
    """1-sigma position (m) and rotation (deg) uncertainty of a pose from the covariance (6, 6) of
    its left update. Under T <- exp(delta) T the camera centre c = -R^T t moves by -R^T v to first
    order, so the centre covariance is R^T Cov(v) R, whose trace is Cov(v)'s."""
    if not bool(torch.isfinite(covariance).all()):
        return math.nan, math.nan
    position_std = math.sqrt(max(float(torch.trace(covariance[:3, :3])), 0.0))
    rotation_std = math.degrees(math.sqrt(max(float(torch.trace(covariance[3:, 3:])), 0.0)))
    return position_std, rotation_std


def keypoint_support(keypoints, reference: ReferenceLevel, pose: Pose, camera: Camera, conf: LocalizeConf) -> Checks:
    """How well a pose explains the query's own keypoints: their mutual nearest neighbours among
    the reference features of the points the pose sees (the extractor's finest level, where the
    features are its descriptors), and how many of those matches the pose projects within
    conf.keypoint_support_px of their keypoint. The matches depend on the pose only through the
    points it sees, so a pose in a wrong minimum of the featuremetric cost, or on look-alike
    structure, explains few of them. keypoints: pixloc_core.sparse.QueryKeypoints in pixels of the
    image `camera` describes."""
    from .mapping.matching import match_descriptors

    seen = visible_points(reference, pose[None], camera, conf.max_support_points, conf.max_depth_m)
    matches = match_descriptors(torch.from_numpy(keypoints.descriptors).float(),
                                torch.nn.functional.normalize(seen.features.float(), dim=-1),
                                ratio_threshold=1.0, mutual=True)  # (M, 2)
    if len(matches) == 0:
        return Checks(keypoint_support_ratio=0.0)
    matches = torch.from_numpy(matches)
    p2d, _ = camera.project(pose.transform(seen.points3D[matches[:, 1]].to(pose.dtype)))  # (M, 2)
    distance = (torch.from_numpy(keypoints.xy)[matches[:, 0]].to(p2d) - p2d).norm(dim=-1)
    support = int((distance < conf.keypoint_support_px).sum())
    return Checks(keypoint_matches=len(matches), keypoint_support=support,
                  keypoint_support_ratio=support / len(matches))


def checked(result: AlignResult, index: int, label: str, verified: bool, conf: LocalizeConf,
            support: Callable[[Pose], Checks] | None = None) -> Localization:
    """Hypothesis `index` of an alignment, with the success criteria applied; `verified` when its
    initial pose passed a geometric check (PnP inliers), which replaces the uncertainty check and
    loosens the cost cap; `support`, for an extractor that detects keypoints, measures the pose
    against the query's keypoints (keypoint_support), which replaces the uncertainty check."""
    if not bool(result.success[index]):
        return Localization.failure(f"{label}: {result.failure_reason[index]}")
    pose = result.poses[index]
    cost, num_points = float(result.cost[index]), int(result.num_points[index])
    covariance = alignment_covariance(result.hessian[index], float(result.residual_variance[index]))
    position_std, rotation_std = pose_std(covariance)
    checks = support(pose) if support is not None and not verified else Checks()
    localization = Localization(
        success=True, **Localization.pose_fields(pose), cost=cost, num_points=num_points, hypothesis=label,
        position_std_m=position_std, rotation_std_deg=rotation_std, covariance=tuple(covariance.flatten().tolist()),
        checks=checks)
    if num_points < conf.min_points:
        localization.success, localization.error = False, f"too few points: {num_points} < {conf.min_points}"
    elif reason := alignment_verdict(cost, position_std, verified, conf, checks):
        localization.success, localization.error = False, reason
    return localization


def alignment_verdict(cost: float, position_std_m: float, verified: bool, conf: LocalizeConf,
                      checks: Checks = Checks()) -> str:
    """Why an aligned pose is not trusted for its cost, its keypoint support or, without one, its
    position std (see `checked`); empty when it is."""
    max_cost = conf.max_refined_cost if verified else conf.max_cost
    if cost > max_cost:
        return f"cost too high: {cost:.4f} > {max_cost}"
    if verified:
        return ""
    if math.isfinite(checks.keypoint_support_ratio):
        if (checks.keypoint_support < conf.min_keypoint_support
                or checks.keypoint_support_ratio < conf.min_keypoint_support_ratio):
            return (f"too few of the query's keypoints agree with the pose: {checks.keypoint_support} of "
                    f"{checks.keypoint_matches} matches within {conf.keypoint_support_px:g} px")
        return ""
    if not position_std_m <= conf.max_position_std_m:
        return f"position too uncertain: std {position_std_m:.3f} m > {conf.max_position_std_m} m"
    return ""


@torch.no_grad()
def align_hypotheses(aligner: FeaturemetricAligner, query: Pyramid, camera: Camera,
                     references: list[ReferenceLevel], hypotheses: Pose, labels: list[str],
                     conf: LocalizeConf, verified: bool = False, keypoints=None) -> Localization:
    """Refine all hypotheses (M,) of one query coarse to fine and keep the lowest cost.

    `query` and `references` run coarse to fine with as many levels as the aligner expects (all
    three from rough hypotheses, only the fine ones from poses that are already close); `camera`
    is the query camera at the resolution the pyramid was computed from; `verified`: whether the
    hypotheses passed a geometric check (see `checked`); `keypoints`: the query's own keypoints,
    when its extractor detects them (keypoint_support)."""
    if len(hypotheses.shape) != 1 or hypotheses.shape[0] != len(labels):
        raise ValueError(f"need one label per hypothesis, got {tuple(hypotheses.shape)} poses and {len(labels)} labels")
    if hypotheses.shape[0] == 0:
        return Localization.failure("no pose hypothesis")
    dtype = torch.promote_types(query[0].features.dtype, torch.float32)  # float16 features are storage only
    hypotheses = hypotheses.to(dtype)
    camera = camera.to(dtype)
    finest = references[-1]
    references = [visible_points(reference, hypotheses, camera, max_points, conf.max_depth_m)
                  for reference, max_points in zip(references, conf.max_points[-len(references):])]
    result = aligner(query, references, camera, hypotheses)
    support = None if keypoints is None else (lambda pose: keypoint_support(keypoints, finest, pose, camera, conf))
    return best_of([checked(result, index, label, verified, conf, support) for index, label in enumerate(labels)])


def search_on(localizations: list[Localization]) -> bool:
    """Whether a query's next cell (the plan's, best first) is worth a call after the answers of
    the cells before it: not once one of them gave a verified pose, which every check has passed.
    Calling every cell at once made 1.7 cell calls per query in bench scale's 10,286-reference
    city (a second cell adds references wherever streets cross) against 1.2 in its
    150-reference street, and the shard actors' CPU per query grew with them."""
    return not any(localization.success for localization in localizations)


def best_of(localizations: list[Localization]) -> Localization:
    """The successful result of lowest cost (most points among equal costs: PnP-only poses have
    none), else a failure caused by the infrastructure (the part that did not run might have
    succeeded: the row must say why it is retried), else the failure of lowest cost (the first
    one when none got as far as a cost). One of `localizations`: callers find it by identity."""
    if not localizations:
        return Localization.failure("no result")
    successful = [loc for loc in localizations if loc.success]
    if successful:
        return min(successful, key=lambda loc: (loc.cost, -loc.num_points))
    retryable = [loc for loc in localizations if loc.retryable]
    if retryable:
        return retryable[0]
    return min(localizations, key=lambda loc: loc.cost)


# ----- planning: from what the driver knows of a query to what its shards need


class PriorOutsideMap(ValueError):
    pass


@dataclass(frozen=True)
class SearchConf:
    sigma_multiplier: float = 3.0  # search radius = multiplier * sigma + margin
    # The reference images within the radius decide which points PnP may match. With a tight
    # prior (2 m: 11 m at a 5 m margin) those few references missed much of what a camera saw and
    # its keypoints matched look-alike points: a consistent PnP pose 3.6 m / 5.8 deg off, 96 of
    # 128 matches agreeing, std 0.13 m (`bench precision`, 60 references); at 10 m it was right.
    margin_m: float = 10.0
    default_sigma_m: float = 10.0  # for priors without a sigma
    max_cells: int = 2  # at most this many cells searched per query (see CellSearch.cells)


class CellSearch:
    """From a prior (map-frame position and sigma) to the cells and reference images to search."""

    def __init__(self, shards, conf: SearchConf = SearchConf()):
        self.shards = shards  # pixloc_core.shards.ShardIndex
        self.conf = conf

    def sigma(self, sigma_m: float | None) -> float:
        return self.conf.default_sigma_m if sigma_m is None or not np.isfinite(sigma_m) else float(sigma_m)

    def search_radius(self, sigma_m: float | None) -> float:
        return self.conf.sigma_multiplier * self.sigma(sigma_m) + self.conf.margin_m

    def cells(self, position: np.ndarray, sigma_m: float | None) -> list[str]:
        """The cells to search, best first: the cell holding most reference images within the
        prior's radius (its own images or its halo), then others only while they add images the
        chosen ones lack. PriorOutsideMap when no cell is within the radius."""
        radius = self.search_radius(sigma_m)
        candidates = self.shards.cells_within(position, radius)
        if not candidates:
            raise PriorOutsideMap(f"prior outside the map: no map cell within {radius:.0f} m of "
                                  f"({position[0]:.1f}, {position[1]:.1f})")
        nearby = set(self.shards.images_near(position, radius))
        coverage = {cell: nearby & set(self.shards.images_of(cell)) for cell in candidates}
        chosen, covered = [], set()
        for cell in sorted(candidates, key=lambda cell: len(coverage[cell]), reverse=True):
            if len(chosen) == self.conf.max_cells or (chosen and not coverage[cell] - covered):
                continue
            chosen.append(cell)
            covered |= coverage[cell]
        return chosen

    def reference_images(self, position: np.ndarray, sigma_m: float | None) -> list[str]:
        """Names of the reference images within the search radius, nearest first."""
        return self.shards.images_near(position, self.search_radius(sigma_m))


class ReferencePoses:
    """The map's reference images as poses (R,), for hypotheses; from the compact reference table
    (pixloc_core.map_io.ReferenceImages), not from the model. `feature_max_size`: the longest side
    the store's features were computed at (the extractor's max_size), for feature_focal_px."""

    def __init__(self, table, feature_max_size: int | None = None):
        self.table = table
        self.names = table.names
        self.id_of = dict(zip(table.names, table.image_ids.tolist()))
        self.poses = Pose.from_qvec_tvec(torch.from_numpy(table.qvecs), torch.from_numpy(table.tvecs))
        self.median_depths = torch.from_numpy(np.asarray(table.median_depths, np.float64))
        self.row_of = {name: row for row, name in enumerate(table.names)}
        self.feature_focals = None if feature_max_size is None else table.feature_focal_px(feature_max_size)  # (R,)

    def ids(self, names: list[str]) -> list[int]:
        return [self.id_of[name] for name in names if name in self.id_of]

    def feature_focal_px(self, names: list[str]) -> float | None:
        """The median focal length in pixels of these references' stored features; None without
        any, or without a feature_max_size."""
        rows = [self.row_of[name] for name in names if name in self.row_of]
        if self.feature_focals is None or not rows:
            return None
        return float(np.median(self.feature_focals[rows]))

    def hypotheses(self, prior_xyz: np.ndarray, k: int) -> tuple[Pose, list[str]]:
        """The poses (K,) that `dense` starts from: the k references nearest to the prior (3,),
        moved there and turned towards what each looked at; and their labels "ref:<name>"."""
        moved, nearest = reference_hypotheses(prior_xyz, self.poses, k)
        index = torch.from_numpy(nearest)
        targets = viewed_points(self.poses[index], self.median_depths[index])
        return turned_towards(moved, targets), [f"ref:{self.names[i]}" for i in nearest]


@dataclass(frozen=True)
class QueryInput:
    """What the driver knows of a query before any pixel or EXIF is read: small, O(1) per query.
    A job holds them as the columns of a query table (`query_table`); the query worker makes each
    row a QueryInput when it plans it."""

    name: str
    path: str  # absolute (or a URL): workers do not share the driver's working directory
    intrinsics: QueryIntrinsics | None = None  # from the query list; None: from the EXIF focal length
    prior: Prior | None = None  # from the priors file
    prior_from_exif: bool = False  # no priors file: read the EXIF GPS
    pose: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # `refine`: (qvec, tvec) to refine

    @classmethod
    def from_row(cls, row: dict) -> QueryInput:
        """From a row of `query_table` (as `pa.Table.to_pylist` gives it)."""
        intrinsics = None if row["model"] is None else QueryIntrinsics(row["model"], row["width"], row["height"],
                                                                        tuple(row["params"]))
        prior = None if row["geodetic"] is None else Prior((row["x"], row["y"], row["z"]), row["geodetic"],
                                                           row["sigma_m"], row["has_altitude"])
        pose = None if row["qvec"] is None else (tuple(row["qvec"]), tuple(row["tvec"]))
        return cls(row["name"], row["path"], intrinsics, prior, row["prior_from_exif"], pose)


# The query table: one row per query, the columns of a QueryInput; those of the query list
# (io.read_query_list_table), the priors (io.read_priors_table) and the poses to refine
# (io.read_poses_table) are null where the file says nothing of the query.
QUERY_TABLE_SCHEMA = pa.schema([
    ("name", pa.string()), ("path", pa.string()),
    ("model", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("params", pa.list_(pa.float64())),
    ("geodetic", pa.bool_()), ("x", pa.float64()), ("y", pa.float64()), ("z", pa.float64()),
    ("sigma_m", pa.float64()), ("has_altitude", pa.bool_()),
    ("qvec", pa.list_(pa.float64(), 4)), ("tvec", pa.list_(pa.float64(), 3)),
    ("prior_from_exif", pa.bool_()),
])


def query_table(names: pa.Array, folder: str, listed: pa.Table | None = None, priors: pa.Table | None = None,
                poses: pa.Table | None = None, prior_from_exif: bool = False) -> pa.Table:
    """The queries `names` (relative to `folder`, an absolute path or URL) joined by name with what
    the input tables say of them, vectorized: O(columns) Python objects whatever the number of
    queries."""
    columns = {"name": names, "path": pc.binary_join_element_wise(folder, names, "/")}
    for source in (listed, priors, poses):
        if source is not None:
            rows = pc.index_in(names, value_set=source["name"])  # null: not in that file
            columns.update({column: source[column].take(rows) for column in source.column_names if column != "name"})
    columns["prior_from_exif"] = pa.repeat(pa.scalar(prior_from_exif), len(names))
    return pa.table({field.name: columns[field.name].cast(field.type) if field.name in columns
                     else pa.nulls(len(names), field.type) for field in QUERY_TABLE_SCHEMA})


def query_positions(table: pa.Table, map_index) -> np.ndarray:
    """(N, 3) map-frame positions known before reading the images: the centres of the poses to
    refine, else the priors of the priors file (NaN: none, or a prior the map cannot place: the
    worker's planning reports it)."""
    positions = np.full((table.num_rows, 3), np.nan)
    has_pose = table["qvec"].is_valid().to_numpy(zero_copy_only=False)
    if has_pose.any():
        posed = table.filter(pa.array(has_pose))
        qvecs, tvecs = (posed[column].combine_chunks().flatten().to_numpy().reshape(-1, size)
                        for column, size in (("qvec", 4), ("tvec", 3)))
        positions[has_pose] = Pose.from_qvec_tvec(torch.tensor(qvecs), torch.tensor(tvecs)).center().numpy()
    has_prior = table["geodetic"].is_valid().to_numpy(zero_copy_only=False) & ~has_pose
    if has_prior.any():
        prior = table.filter(pa.array(has_prior))
        values = {name: prior[name].to_numpy() for name in ("x", "y", "z", "geodetic", "has_altitude")}
        try:
            positions[has_prior] = map_index.priors_to_map(np.stack([values["x"], values["y"], values["z"]], -1),
                                                           values["geodetic"], values["has_altitude"])
        except ValueError:
            pass  # e.g. WGS84 priors on a map without georegistration: each query's plan says so
    return positions


@dataclass
class QueryPlan:
    """What a query's shards need besides its pixels, decided before they are read."""

    name: str
    path: str
    intrinsics: QueryIntrinsics | None = None
    prior_xyz: np.ndarray | None = None  # (3,) map frame
    sigma_m: float | None = None
    cells: list[str] = field(default_factory=list)
    hypotheses: Pose | None = None  # (M,)
    labels: list[str] = field(default_factory=list)
    verified: bool = False  # the hypotheses come from a geometric method (see `checked`)
    reference_image_ids: list[int] = field(default_factory=list)  # within the search radius
    # The focal length in pixels of those references' stored features (see feature_scale); None: unknown
    reference_focal_px: float | None = None
    error: str = ""
    retryable: bool = False  # the error came from the infrastructure (e.g. a network read), not the input
    note: str = ""  # what planning adjusted, e.g. a rescaled camera


def query_intrinsics(path: Location, listed: QueryIntrinsics | None, scene=None) -> tuple[QueryIntrinsics, str]:
    """The query list's intrinsics when given (checked against the image's size: a camera listed at
    another size with the same aspect ratio is rescaled, and the note says so), else from the EXIF
    focal length: the map's calibrated camera of the same device (same size and EXIF focal,
    `scene.camera_for_exif`) when it has one, a pinhole camera otherwise; checked. Returns the
    intrinsics and the note (empty when nothing was adjusted)."""
    from .exif import read_exif_focal_px
    from .images import image_size

    note = ""
    width, height = image_size(path)
    if listed is not None:
        intrinsics = listed
        if (listed.width, listed.height) != (width, height):
            scale = width / listed.width
            if abs(height - scale * listed.height) > 1.0:
                raise ValueError(f"{Path(path).name}: the image is {width}x{height}, the query list says "
                                 f"{listed.width}x{listed.height}")
            camera = Camera.from_query_intrinsics(listed).scale(scale)
            intrinsics = QueryIntrinsics(listed.model, width, height, tuple(camera.params.tolist()))
            note = f"camera rescaled by {scale:.4g}: the query list says {listed.width}x{listed.height}"
    else:
        focal = read_exif_focal_px(path, width, height)
        if focal is None:
            raise ValueError(f"{path}: no intrinsics (no --query-list and no EXIF focal length)")
        camera = scene.camera_for_exif(width, height, focal) if scene is not None else None
        if camera is not None:
            intrinsics = QueryIntrinsics(camera.model.name, width, height, tuple(float(v) for v in camera.params))
        else:
            intrinsics = QueryIntrinsics("SIMPLE_PINHOLE", width, height, (focal, width / 2, height / 2))
    if not bool(Camera.from_query_intrinsics(intrinsics).is_valid()):
        raise ValueError(f"{Path(path).name}: invalid camera {intrinsics}")
    return intrinsics, note


@dataclass(frozen=True)
class PlanConf:
    search: SearchConf = SearchConf()
    num_reference_hypotheses: int = 4  # K nearest reference images turned into hypotheses (dense)
    refine: bool = False  # the queries carry poses to refine (`pixloc refine`)
    pose_sigma_m: float = 2.0  # refine: how far the given poses may be off (sets the cells searched)
    match_reference_scale: bool = True  # see feature_scale


def feature_scale(intrinsics: QueryIntrinsics, reference_focal_px: float | None, max_size: int) -> float:
    """The factor a query image is resized by before its dense features are computed: the one that
    gives it the focal length in pixels of the reference features it is aligned to, so that a
    feature of either covers the same angle of the scene; never beyond max_size on its longest
    side (nor when the references' focal is unknown). Features that are not scale invariant
    disagree otherwise: fountain-P11's 480 px queries, aligned with `classic` to features of the
    1024 px photos, ended at 2.3 m / 13.5 deg from every hypothesis of query 0001, at a cost
    (0.085) above the true pose's; resized to the references' scale (2.13x), at 0.01 m and cost
    0.051, and the other three queries at lower costs than before."""
    limit = max_size / max(intrinsics.width, intrinsics.height)
    if reference_focal_px is None or not np.isfinite(reference_focal_px):
        return min(1.0, limit)
    focal = float(Camera.from_query_intrinsics(intrinsics).f.mean())
    return min(limit, reference_focal_px / focal)


class Planner:
    """QueryInput -> QueryPlan from the compact map (pixloc_core.map_io.MapIndex): shard index,
    georegistration, reference table. Cheap enough to run in every query worker. `feature_max_size`:
    the longest side the store's features were computed at (the extractor's max_size), which
    sets each plan's reference_focal_px; None: no dense features."""

    def __init__(self, map_index, conf: PlanConf = PlanConf(), feature_max_size: int | None = None):
        if map_index.shards is None:
            raise FileNotFoundError(f"{map_index.path}: the map has no shard index (shards.json); "
                                    "rebuild it with `pixloc map`")
        self.map_index = map_index
        self.conf = conf
        self.search = CellSearch(map_index.shards, conf.search)
        self.references = ReferencePoses(map_index.references,
                                         feature_max_size if conf.match_reference_scale else None)

    def prior(self, query: QueryInput) -> tuple[np.ndarray, float | None, Pose | None]:
        """(3,) map-frame prior position, its sigma, and the pose to refine (None unless refining)."""
        if self.conf.refine:
            if query.pose is None:
                raise ValueError("no input pose: not in the poses file")
            qvec, tvec = query.pose
            pose = Pose.from_qvec_tvec(torch.tensor(qvec, dtype=torch.float64), torch.tensor(tvec, dtype=torch.float64))
            return pose.center().numpy(), self.conf.pose_sigma_m, pose
        if query.prior_from_exif:
            from .exif import read_exif_prior

            prior = read_exif_prior(files.location(query.path))
            if prior is None:
                raise ValueError("no prior: no EXIF GPS")
        elif query.prior is None:
            raise ValueError("no prior: not in the priors file")
        else:
            prior = query.prior
        return np.asarray(self.map_index.prior_to_map(prior), np.float64), prior.sigma_m, None

    def plan(self, query: QueryInput) -> QueryPlan:
        """A plan; bad input becomes its `error`, never an exception."""
        plan = QueryPlan(query.name, query.path)
        try:
            if any(character.isspace() for character in query.name):
                raise ValueError(f"{query.name!r}: the name contains whitespace, which the space-separated poses "
                                 "and query-list formats cannot hold; rename the file")
            plan.intrinsics, plan.note = query_intrinsics(files.location(query.path), query.intrinsics,
                                                          self.map_index)
            plan.prior_xyz, sigma_m, pose = self.prior(query)
            plan.sigma_m = self.search.sigma(sigma_m)
            plan.cells = self.search.cells(plan.prior_xyz, plan.sigma_m)
            nearby = self.search.reference_images(plan.prior_xyz, plan.sigma_m)
            plan.reference_image_ids = self.references.ids(nearby)
            plan.reference_focal_px = self.references.feature_focal_px(nearby)
            if pose is not None:
                # external poses (e.g. hloc's PnP) count as verified, as in PixLoc's post-processing
                plan.hypotheses, plan.labels, plan.verified = pose[None], ["input"], True
            else:
                plan.hypotheses, plan.labels = self.references.hypotheses(plan.prior_xyz,
                                                                          self.conf.num_reference_hypotheses)
        except Exception as error:  # noqa: BLE001 - e.g. a decompression bomb or unreadable EXIF: this query's row
            plan.error = " ".join((str(error) or type(error).__name__).split())
            plan.retryable = isinstance(error, (StorageError, ConnectionError, TimeoutError))
        return plan


def morton_keys(cells: np.ndarray) -> np.ndarray:
    """(N, 2) integer cell coordinates -> (N,) Z-order keys: sorting by them visits the plane
    cell by cell with neighbours mostly close in the order (a space-filling curve)."""
    offset = np.asarray(cells, np.int64) + (1 << 20)  # non-negative, 21 bits per axis
    keys = np.zeros(len(offset), np.int64)
    for bit in range(21):
        keys |= ((offset[:, 0] >> bit) & 1) << (2 * bit)
        keys |= ((offset[:, 1] >> bit) & 1) << (2 * bit + 1)
    return keys


def spatial_order(positions: np.ndarray, cell_size_m: float) -> np.ndarray:
    """(N,) an order of the positions (N, 2|3) (NaN: unknown, kept at the end in input order) in
    which each grid cell's queries come together and neighbouring cells follow each other, so a
    job loads each cell about once."""
    if len(positions) == 0:  # a resumed job with every query answered
        return np.zeros(0, np.int64)
    positions = np.asarray(positions, np.float64).reshape(len(positions), -1)[:, :2]
    known = np.isfinite(positions).all(1)
    keys = np.full(len(positions), np.iinfo(np.int64).max)
    keys[known] = morton_keys(np.floor(positions[known] / cell_size_m).astype(np.int64))
    return np.argsort(keys, kind="stable")


def actor_for_cell(cell: str, num_actors: int) -> int:
    """The shard that hosts a cell: a stable hash, the same in every process and run."""
    return zlib.crc32(cell.encode()) % num_actors


# ----- one query in one cell: the messages and the policy


@dataclass
class QueryRequest:
    """What a shard needs to localize one query in one of its cells; numpy only, so it pickles
    compactly. Made once per query by the query worker and passed to its cells by object reference."""

    name: str
    method: str  # dense, sparse, sparse+dense or refine
    camera_model: str
    camera_size: tuple[float, float]  # (w, h) of the query image
    camera_params: tuple[float, ...]  # COLMAP parameters at that size
    hypotheses_qvec: np.ndarray  # (M, 4) world-to-camera
    hypotheses_tvec: np.ndarray  # (M, 3)
    labels: list[str]  # (M,)
    hypotheses_verified: bool
    reference_image_ids: list[int]  # use the cell's points these images observe (see select_*)
    prior_xyz: np.ndarray  # (3,) map frame
    sigma_m: float
    pyramid_scale: float = 1.0  # the pyramid was computed from the image resized by this factor
    features: list[np.ndarray] | None = None  # per level, coarse to fine: (h, w, C) float16, channel-last
    confidences: list[np.ndarray] | None = None  # per level: (h, w) float16
    strides: list[int] | None = None
    keypoints: object | None = None  # pixloc_core.sparse.QueryKeypoints for the sparse methods
    # The dense extractor's own keypoints (QueryKeypoints in pixels of the pyramid's image), when
    # it detects them: an aligned pose is checked against them (keypoint_support).
    dense_keypoints: object | None = None

    @classmethod
    def from_plan(cls, plan: QueryPlan, method: str, **pixels) -> QueryRequest:
        intrinsics = plan.intrinsics
        return cls(plan.name, method, intrinsics.model, (float(intrinsics.width), float(intrinsics.height)),
                   tuple(intrinsics.params), plan.hypotheses.qvec().numpy(), plan.hypotheses.t.numpy(),
                   list(plan.labels), plan.verified, list(plan.reference_image_ids), plan.prior_xyz,
                   float(plan.sigma_m), **pixels)

    def pyramid(self) -> list[FeatureLevel]:
        """Levels whose features are (C, h, w) float16 views of the channel-last arrays: the
        alignment reads them in place, converting only what it samples."""
        return [FeatureLevel(torch.from_numpy(features).permute(2, 0, 1), torch.from_numpy(confidence).float(), stride)
                for features, confidence, stride in zip(self.features, self.confidences, self.strides)]

    def camera(self) -> Camera:
        """The query camera at the resolution of the image."""
        return Camera(self.camera_model, self.camera_size[0], self.camera_size[1],
                      torch.tensor(self.camera_params, dtype=torch.float64))

    def hypotheses(self) -> Pose:
        return Pose.from_qvec_tvec(torch.from_numpy(np.asarray(self.hypotheses_qvec, np.float64)),
                                   torch.from_numpy(np.asarray(self.hypotheses_tvec, np.float64)))


def observed_by(reference: ReferenceLevel, observer: np.ndarray | None, image_ids: list[int],
                min_points: int) -> ReferenceLevel:
    """The level's points restricted to the observations of the given reference images (all of
    them where they observe fewer than min_points, or where the rows are aggregated: observer None)."""
    mask = None if observer is None else np.isin(observer, np.asarray(image_ids, observer.dtype))
    if mask is None or mask.sum() < min_points:
        return reference
    return reference[torch.from_numpy(np.flatnonzero(mask))]


@dataclass
class WideLevel:
    """A cell's coarsest level widened over `cells` (extractors.base.widened): the coarse-to-fine
    alignment's second start (localize_in_cell)."""

    cells: int
    reference: ReferenceLevel
    observer: np.ndarray | None  # as CellData.observers


@dataclass
class CellData:
    """What a shard holds of one cell: the dense levels, the wide one and the sparse points
    (pixloc_core.sparse.SparsePoints)."""

    cell: str
    references: list[ReferenceLevel]  # per level held, coarse to fine
    observers: list[np.ndarray | None]  # per level: (N,) the observing image of each row; None: aggregated
    sparse: object | None = None
    wide: WideLevel | None = None  # held with the coarsest level, when the store has it

    @property
    def nbytes(self) -> int:
        references = [*self.references, *([self.wide.reference] if self.wide else [])]
        observers = [*self.observers, *([self.wide.observer] if self.wide else [])]
        dense = sum(tensor.nbytes for reference in references
                    for tensor in (reference.points3D, reference.features, reference.confidence))
        return (dense + sum(observer.nbytes for observer in observers if observer is not None)
                + (self.sparse.nbytes if self.sparse is not None else 0))

    def selected_references(self, image_ids: list[int], min_points: int) -> list[ReferenceLevel]:
        """Per level, `observed_by` the given reference images."""
        return [observed_by(reference, observer, image_ids, min_points)
                for reference, observer in zip(self.references, self.observers)]

    def sparse_candidates(self, image_ids: list[int], min_points: int) -> np.ndarray:
        """(C,) rows of the sparse points seen by the given reference images (all where too few)."""
        rows = self.sparse.seen_by(image_ids)
        return rows if len(rows) >= min_points else np.arange(len(self.sparse))


@dataclass
class Aligners:
    coarse_to_fine: FeaturemetricAligner  # every level the shard holds: from rough hypotheses
    fine: FeaturemetricAligner  # the finest `sparse_levels`: from a SIFT + PnP pose

    @classmethod
    def from_conf(cls, align: AlignConf, sparse_levels: int, dampings: torch.Tensor | None = None) -> Aligners:
        """`dampings`: learned ones, (3, 6) raw in PixLoc order (see FeaturemetricAligner.load_dampings)."""
        fine = replace(align, num_iterations=align.num_iterations[-sparse_levels:])
        aligners = cls(FeaturemetricAligner(align).eval(), FeaturemetricAligner(fine).eval())
        if dampings is not None:
            aligners.coarse_to_fine.load_dampings(dampings)
            aligners.fine.load_dampings(dampings)
        return aligners


def sparse_localization(request: QueryRequest, cell: CellData, sparse_conf: dict,
                        conf: LocalizeConf) -> Localization:
    """SIFT + PnP of the query against the cell's points seen near the prior."""
    from . import sparse

    if cell.sparse is None:
        return Localization.failure("sparse: the store has no sparse points (rerun `pixloc features`)")
    rows = cell.sparse_candidates(request.reference_image_ids, conf.min_selected_points)
    result = sparse.localize_against(request.keypoints, cell.sparse, rows, request.camera().to_colmap(),
                                     sparse_conf, request.prior_xyz, request.sigma_m)
    evidence = Checks(inliers=result.num_inliers, matches=result.num_matches,
                      pnp_position_std_m=result.position_std_m, rival_inliers=result.rival_inliers,
                      pnp_split_shift_m=result.split_shift_m, pnp_leave_one_out_std_m=result.leave_one_out_std_m)
    if not result.success:
        return replace(Localization.failure(f"sparse: {result.message}"), checks=evidence)
    pose = Pose.from_colmap(result.cam_from_world)
    return Localization(success=True, **Localization.pose_fields(pose), num_points=result.num_inliers,
                        hypothesis="sparse", checks=evidence, covariance=tuple(result.covariance.flatten().tolist()))


def refined_with_pnp(refined: Localization, pnp: Localization) -> Localization:
    """A refined PnP pose combined with its PnP start, each weighed by its information (inverse
    covariance): the most likely pose given the two as independent Gaussian measurements of it,
    linearised at the start. The featuremetric fit of a 480 px image is coarser than SIFT's
    sub-pixel keypoints (bench real, fountain-P11 at 480 px: 3.3 mm for PnP, 6.7 mm refined),
    while a PnP pose from few or poorly spread keypoints is loosely held and the refinement
    decides. `refined` keeps the cost and checks it was verified with; its pose, stds and
    covariance become the combination's."""
    start, aligned = pnp.pose(), refined.pose()
    start_covariance, aligned_covariance = pnp.pose_covariance(), refined.pose_covariance()
    if (start_covariance is None or aligned_covariance is None
            or not bool(torch.isfinite(start_covariance).all() & torch.isfinite(aligned_covariance).all())):
        return refined
    start_information = torch.linalg.pinv(start_covariance)
    aligned_information = torch.linalg.pinv(aligned_covariance)
    covariance = torch.linalg.pinv(start_information + aligned_information)
    delta = (aligned @ start.inv()).log()  # aligned = exp(delta) @ start
    pose = Pose.exp(covariance @ aligned_information @ delta) @ start
    position_std, rotation_std = pose_std(covariance)
    return replace(refined, **Localization.pose_fields(pose), position_std_m=position_std,
                   rotation_std_deg=rotation_std, covariance=tuple(covariance.flatten().tolist()))


def refinement_references(cell: CellData, reference_image_ids: list[int], from_pnp: bool,
                          conf: LocalizeConf) -> list[ReferenceLevel]:
    """The cell's points an alignment starts from. Rough hypotheses (reference poses moved to the
    prior) see points those nearby references observe. A PnP pose already says where the camera
    is: every point of the cell it sees counts (`visible_points` keeps those), whoever observed
    it, since the references near a prior that is tens of metres off miss much of what the camera
    sees. On `pixloc bench localize`, q_0013 (prior 21.6 m off) kept 220 valid points of that
    selection and refined its 0.07 m PnP pose to 0.27 m; from the whole cell 902 points, 0.16 m."""
    if from_pnp:
        return cell.references
    return cell.selected_references(reference_image_ids, conf.min_selected_points)


def moved_along_axes(hypotheses: Pose, distances_m: Sequence[float]) -> Pose:
    """Each hypothesis (M,) moved by each distance (S,) along its optical axis (forward when
    positive), (S * M,) distance-major: the centre c + d R^T z, so the translation t - d z."""
    distances = torch.tensor(distances_m, dtype=hypotheses.dtype, device=hypotheses.device)
    axis = torch.tensor([0.0, 0.0, 1.0], dtype=hypotheses.dtype, device=hypotheses.device)
    t = hypotheses.t[None] - distances[:, None, None] * axis  # (S, M, 3)
    R = hypotheses.R[None].expand(len(distances), *hypotheses.R.shape)  # (S, M, 3, 3)
    return Pose.from_Rt(R.flatten(0, 1), t.flatten(0, 1))


@dataclass
class AlignmentStart:
    """One coarse-to-fine alignment of a query: its hypotheses, their labels, the query pyramid and
    the reference levels it runs on."""

    hypotheses: Pose  # (M,)
    labels: list[str]  # (M,)
    query: Pyramid
    references: list[ReferenceLevel]


def alignment_starts(request: QueryRequest, cell: CellData, pyramid: Pyramid, references: list[ReferenceLevel],
                     conf: LocalizeConf) -> Iterator[AlignmentStart]:
    """The coarse-to-fine alignments of a query's hypotheses: first the hypotheses as they are from
    the coarsest level as it is, then the others, which localize_in_cell runs only where the first
    gives no pose that passes the checks, for conf.second_stage_methods (a generator, so that they
    are built only then: on Lund all four take 4.6 ms, the first alone 0.2 ms). Each is pruned to
    its best hypothesis after the coarsest level on its own (AlignConf.num_kept), so that none evicts
    another's; the lowest final cost of those passing the checks wins (best_of), and all end on the
    same finer levels, so their costs compare. Either of these loses poses that the other finds:
    * the rough hypotheses as they are, and (conf.depth_shifts_m) moved forward and back along their
      optical axes: a camera looking along a street barely changes its image when it moves along it,
      so a prior off in that direction is where the alignment converges beside the truth (Lund's
      12.jpg, 4.5 m off from the prior alone; 1 cm from the hypotheses 4 m forward);
    * from the coarsest level as it is and, where the cell holds it (conf.wide_start), from that level
      widened: the wider basin (`pixloc bench basin`), but on real streets also minima along the
      viewing direction; alone it lost 2 of Lund's 4 dense poses and the Sacré-Cœur night query.
    README, **A wide start** and **Hypotheses along the viewing direction**."""
    unmoved = request.hypotheses()
    yield AlignmentStart(unmoved, request.labels, pyramid, references)
    hypothesis_sets = [(unmoved, request.labels)]
    if conf.depth_shifts_m and not request.hypotheses_verified:
        hypothesis_sets.append((moved_along_axes(unmoved, conf.depth_shifts_m),
                                [f"{label}, {distance:+g} m along its axis"
                                 for distance in conf.depth_shifts_m for label in request.labels]))
    level_starts = [(pyramid, references, "")]
    if cell.wide is not None and conf.wide_start:
        wide = observed_by(cell.wide.reference, cell.wide.observer, request.reference_image_ids,
                           conf.min_selected_points)
        level_starts.append(([widened(pyramid[0], cell.wide.cells), *pyramid[1:]], [wide, *references[1:]],
                             ", wide start"))
    for set_index, (hypotheses, labels) in enumerate(hypothesis_sets):
        for query, start_references, suffix in level_starts[1:] if set_index == 0 else level_starts:  # first: above
            yield AlignmentStart(hypotheses, [label + suffix for label in labels], query, start_references)


def localize_in_cell(request: QueryRequest, cell: CellData, aligners: Aligners, conf: LocalizeConf,
                     sparse_conf: dict, rank: int = 0) -> tuple[Localization, dict[str, float]]:
    """The per-query policy in one cell, the `rank`-th of the query's cells (search_on); returns
    the result and `sparse_ms`, `align_ms`.

    `sparse`: SIFT + PnP. `sparse+dense`: a PnP pose is geometrically verified and already close,
    so it is refined on the fine levels, and refused if that fails (the refinement is combined with
    it, refined_with_pnp); only without one, and only in
    the query's first cell, are the reference hypotheses aligned coarse to fine (with weight-free
    features the cost alone does not tell a right pose from a wrong one, so it never overrules a
    verified pose). In bench scale's 10,286-reference city every success a second cell added was
    a refined PnP pose (14 of 14), while its coarse-to-fine alignments cost 0.5 s per failed
    query. `dense` and `refine`: the plan's hypotheses aligned on every level the shard holds (from
    alignment_starts: the first, and the others where it gives no pose), the lowest final cost
    winning."""
    timings = {"sparse_ms": 0.0, "align_ms": 0.0}
    pnp = None
    if request.method in SPARSE_METHODS:
        start = time.perf_counter()
        pnp = sparse_localization(request, cell, sparse_conf, conf)
        timings["sparse_ms"] = 1000 * (time.perf_counter() - start)
        if request.method == "sparse" or (not pnp.success and rank > 0):
            return verified(pnp, request, None, pnp, conf), timings
    start = time.perf_counter()
    pyramid = request.pyramid()
    camera = request.camera().scale(request.pyramid_scale)
    if pnp is not None and pnp.success:
        levels = conf.sparse_levels
        references = refinement_references(cell, request.reference_image_ids, from_pnp=True, conf=conf)
        localization = align_hypotheses(aligners.fine, pyramid[-levels:], camera, references[-levels:],
                                        pnp.pose()[None], ["sparse"], conf, verified=True)
        if not localization.success:
            # The features disagree with the PnP pose: on the 40-reference street at 640x480 both
            # PnP poses whose refinement failed were wrong (5.3 and 9.9 m, stds 0.6 m), and no
            # right PnP pose of `bench precision` failed its refinement.
            localization = replace(pnp, success=False, hypothesis="sparse (PnP only)",
                                   error=f"refinement of the PnP pose failed: {localization.error}")
    else:
        references = refinement_references(cell, request.reference_image_ids, from_pnp=False, conf=conf)
        def align(start: AlignmentStart) -> Localization:
            return align_hypotheses(aligners.coarse_to_fine, start.query, camera, start.references, start.hypotheses,
                                    start.labels, conf, request.hypotheses_verified, request.dense_keypoints)

        starts = alignment_starts(request, cell, pyramid, references, conf)
        localization = align(next(starts))
        if not localization.success and request.method in conf.second_stage_methods:
            # The others take 3x the first's time: spent only on the queries it does not localize.
            localization = best_of([localization, *map(align, starts)])
        if not localization.success and pnp is not None:
            localization.error = f"{localization.error}; {pnp.error}"
    refined_from = pnp if pnp is not None and pnp.success else None
    # The checks judge the refinement itself (how far it moved from PnP), before any combination.
    result = verified(localization, request, refined_from, pnp or Localization.failure(""), conf)
    if refined_from is not None and result.success and conf.combine_refinement_with_pnp:
        result = refined_with_pnp(result, refined_from)
    timings["align_ms"] = 1000 * (time.perf_counter() - start)
    return result, timings


def verified(localization: Localization, request: QueryRequest, refined_from: Localization | None,
             pnp: Localization, conf: LocalizeConf) -> Localization:
    """The result with its check values, and no longer successful if a check fails; `pnp` holds
    the PnP statistics, `refined_from` the PnP pose the result may have been refined from."""
    checks = measure(localization, request.prior_xyz, request.sigma_m,
                     refined_from.pose() if refined_from is not None else None, pnp.checks)
    return verify(replace(localization, checks=checks), checks, conf.verify)


def measure(localization: Localization, prior_xyz: np.ndarray | None, prior_sigma_m: float | None,
            pnp_pose: Pose | None = None, pnp_checks: Checks = Checks()) -> Checks:
    """The check values of a result: PnP statistics when its pose comes from PnP (hypothesis
    "sparse..."), the distance to the prior, how far the refinement moved the PnP pose, and the
    keypoint support its alignment measured."""
    measured = localization.checks  # the keypoint support, measured when the pose was aligned
    checks = Checks(prior_sigma_m=math.nan if prior_sigma_m is None else float(prior_sigma_m),
                    keypoint_matches=measured.keypoint_matches, keypoint_support=measured.keypoint_support,
                    keypoint_support_ratio=measured.keypoint_support_ratio)
    pose = localization.pose()
    if pose is None:
        return checks
    if prior_xyz is not None:
        checks.prior_distance_m = float(np.linalg.norm(pose.center().numpy()[:2] - np.asarray(prior_xyz)[:2]))
    if localization.hypothesis.startswith("sparse"):
        for name in PNP_CHECKS:
            setattr(checks, name, getattr(pnp_checks, name))
        if pnp_pose is not None and localization.hypothesis == "sparse":
            turn, shift = pose.double().error_to(pnp_pose.double())
            checks.refinement_shift_m, checks.refinement_turn_deg = float(shift), float(turn)
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
        if not checks.pnp_split_shift_m <= conf.max_pnp_split_shift_m:
            return (f"the image's halves disagree on the PnP pose: their poses lie {checks.pnp_split_shift_m:.2f} m "
                    f"apart > {conf.max_pnp_split_shift_m} m")
        if not checks.pnp_leave_one_out_std_m <= conf.max_pnp_leave_one_out_std_m:
            return (f"the PnP pose hinges on one match: without it its std is {checks.pnp_leave_one_out_std_m:.2f} m "
                    f"> {conf.max_pnp_leave_one_out_std_m} m")
        if checks.rival_inliers > conf.max_rival_ratio * checks.inliers:
            return (f"ambiguous PnP: another pose has {checks.rival_inliers} inliers against this one's "
                    f"{checks.inliers}")
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
