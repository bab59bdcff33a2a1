"""The sparse localizer: query keypoints (SIFT or learned) matched to per-point map descriptors, then RANSAC
PnP with pycolmap and a least-squares refinement, optionally pulled towards a GPS prior.

It gives a pose hypothesis for featuremetric refinement, or a result on its own (`--method sparse`).
The steps are separate functions because they run in different processes at scale: the query
worker extracts the query's keypoints (`extract_query_keypoints`), and the shard actor that holds a
cell's points (`SparsePoints`, read from the feature store) matches them and solves PnP
(`localize_against`). `SparseLocalizer` chains them on a whole in-memory map.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycolmap
import torch

from .geometry import Camera, Pose, skew
from .map_io import SceneMap, observations, point_positions
from .mapping import keypoints, matching

default_conf = {
    # The query keypoint type (mapping/keypoints.py); the map's point descriptors must be of the
    # same kind: the localize job takes it from the feature store.
    "keypoints": "sift",
    "sift": {"max_image_size": 1600, "max_num_features": 8192},  # limits of every keypoint type
    # No mutual check for SIFT: a query keypoint is compared with one descriptor per 3D point, and
    # several points may legitimately look alike (repeated facades); the ratio test does the pruning.
    "matching": {"ratio_threshold": 0.8, "mutual": False},
    "learned_matching": {"ratio_threshold": 0.95, "mutual": True},
    # Without a shard index to select the points near the prior, SparseLocalizer takes those seen
    # by reference images within this distance (the shard actors use the job's search radius).
    "search_radius_m": 150.0,
    # RANSAC's inlier threshold is an angle: 12 px (hloc's) for an image whose longest side is
    # ransac_image_size_px, in proportion for others (ransac_max_error). 12 px held for 320x240
    # queries let wrong poses gather a consensus from a few close matches: on bench scale's four
    # cities (800 queries) 13 wrong PnP poses passed every check at 12 px, 3 at 3.75 px (1.1-1.4 m
    # off), with as many right ones (882).
    "ransac_max_error_px": 12.0,
    "ransac_image_size_px": 1024,
    # RANSAC's sampling seed: the same query gets the same pose in every run (pycolmap's default,
    # -1, seeds from the clock: a query with a marginal set of matches flipped between a right
    # pose and one 6 m off from one benchmark run to the next).
    "ransac_seed": 0,
    "min_inliers": 15,
    # A second pose from the left-out matches is a rival when it lies this far from the first.
    "rival_min_shift_m": 1.0,
    "rival_min_turn_deg": 5.0,
}


@dataclass
class SparseResult:
    success: bool
    cam_from_world: pycolmap.Rigid3d | None
    num_keypoints: int
    num_matches: int
    num_inliers: int
    message: str = ""
    # Of the camera centre, from PnP's covariance for one pixel of keypoint noise: the scale
    # VerifyConf.max_pnp_position_std_m was chosen on.
    position_std_m: float = float("nan")
    # (6, 6) of the left update delta = (v, w) of cam_from_world, T <- exp(delta) T, as the
    # aligner's, scaled by the inliers' reprojection variance as the aligner's is by its residuals.
    covariance: np.ndarray | None = None
    rival_inliers: int = 0  # inliers of the best other pose among the matches the pose left out
    split_shift_m: float = float("nan")  # between the poses of the inliers left and right of the image's middle
    # position_std_m without the inlier that constrains the pose most (leave_one_out_centre_std)
    leave_one_out_std_m: float = float("nan")


@dataclass
class QueryKeypoints:
    """What a query contributes to sparse matching; small enough to travel with the query."""

    xy: np.ndarray  # (N, 2) float64 pixels of the query image, COLMAP convention
    descriptors: np.ndarray  # (N, D) float16, unit norm


@dataclass
class SparsePoints:
    """3D points with one descriptor each, and which reference images observe them (CSR)."""

    point3D_ids: np.ndarray  # (P,) int64, ascending
    xyz: np.ndarray  # (P, 3) float64
    descriptors: np.ndarray  # (P, D) float16, unit norm
    observer_starts: np.ndarray  # (P + 1,) the observers of point p are observer_ids[starts[p]:starts[p + 1]]
    observer_ids: np.ndarray  # (O,) int32 reference image ids

    @classmethod
    def from_observations(cls, point3D_ids: np.ndarray, image_ids: np.ndarray, xyz: np.ndarray,
                          descriptors: np.ndarray) -> SparsePoints:
        """From per-observation rows (N,) (as a store partition holds them): one entry per point."""
        order = np.lexsort((image_ids, point3D_ids))
        sorted_ids = point3D_ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(order) else np.zeros(0, int)
        first = order[starts]
        return cls(sorted_ids[starts].astype(np.int64), np.asarray(xyz, np.float64)[first].reshape(-1, 3),
                   np.asarray(descriptors)[first], np.r_[starts, len(order)].astype(np.int64),
                   np.asarray(image_ids, np.int32)[order])

    def __len__(self) -> int:
        return len(self.point3D_ids)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in (self.point3D_ids, self.xyz, self.descriptors, self.observer_starts,
                                              self.observer_ids))

    def seen_by(self, image_ids: list[int] | np.ndarray) -> np.ndarray:
        """(C,) indices of the points that any of the given reference images observes."""
        observed = np.isin(self.observer_ids, np.asarray(image_ids, np.int32))
        counts = np.add.reduceat(observed.astype(np.int64), self.observer_starts[:-1]) if len(self) else observed
        return np.flatnonzero(counts > 0)


def keypoint_extractor(conf: dict) -> keypoints.KeypointExtractor:
    """The query keypoint extractor of a sparse conf; a callable (H, W, 3) uint8 RGB -> Features."""
    return keypoints.keypoint_extractor(conf["keypoints"], conf["sift"])


def extract_query_keypoints(extractor: keypoints.KeypointExtractor, image: np.ndarray) -> QueryKeypoints:
    """image: (H, W, 3) uint8 RGB at the resolution of the query camera."""
    features = extractor(image)
    descriptors = matching.normalize_descriptors(features.descriptors).half().numpy()
    return QueryKeypoints(features.xy, descriptors)


def localize_against(query: QueryKeypoints, points: SparsePoints, rows: np.ndarray, camera: pycolmap.Camera,
                     conf: dict, prior_position: np.ndarray | None = None,
                     prior_sigma_m: float | None = None) -> SparseResult:
    """2D-3D matching of the query keypoints against the candidate points `rows` (C,), then PnP.
    prior_position: (3,) map frame, pulls the refinement towards the GPS within prior_sigma_m."""
    if len(rows) < conf["min_inliers"]:
        return SparseResult(False, None, len(query.xy), 0, 0, f"only {len(rows)} map points near the prior")
    matches = matching.match_descriptors(torch.from_numpy(query.descriptors).float(),
                                         torch.from_numpy(points.descriptors[rows]).float(),
                                         **keypoints.matching_conf(conf["keypoints"], conf))
    if len(matches) < conf["min_inliers"]:
        return SparseResult(False, None, len(query.xy), len(matches), 0,
                            f"{len(matches)} 2D-3D matches, fewer than {conf['min_inliers']}")
    estimation = pycolmap.AbsolutePoseEstimationOptions()
    estimation.ransac.max_error = ransac_max_error(camera, conf)
    estimation.ransac.random_seed = conf["ransac_seed"]
    refinement = pycolmap.AbsolutePoseRefinementOptions()
    if prior_position is not None and prior_sigma_m:
        refinement.use_position_prior = True
        refinement.position_prior_in_world = np.asarray(prior_position, dtype=np.float64)
        refinement.position_prior_covariance = np.eye(3) * prior_sigma_m ** 2
    estimate = pycolmap.estimate_and_refine_absolute_pose(
        query.xy[matches[:, 0]], points.xyz[rows[matches[:, 1]]], camera, estimation, refinement,
        return_covariance=True)
    num_inliers = 0 if estimate is None else int(estimate["num_inliers"])
    if num_inliers < conf["min_inliers"]:
        return SparseResult(False, None, len(query.xy), len(matches), num_inliers,
                            f"PnP found {num_inliers} inliers, fewer than {conf['min_inliers']}")
    covariance = left_update_covariance(estimate["cam_from_world"], estimate["covariance"])
    outliers = ~np.asarray(estimate["inlier_mask"], bool)
    inlier_matches = matches[~outliers]
    inlier_xy, inlier_xyz = query.xy[inlier_matches[:, 0]], points.xyz[rows[inlier_matches[:, 1]]]
    rival = rival_inliers(query.xy[matches[outliers, 0]], points.xyz[rows[matches[outliers, 1]]], camera,
                          estimation, estimate["cam_from_world"], conf)
    split = split_shift(inlier_xy, inlier_xyz, camera, estimate["cam_from_world"])
    noise = reprojection_variance(inlier_xy, inlier_xyz, camera, estimate["cam_from_world"])
    return SparseResult(True, estimate["cam_from_world"], len(query.xy), len(matches), num_inliers,
                        position_std_m=centre_std_m(covariance), covariance=covariance * noise,
                        rival_inliers=rival, split_shift_m=split,
                        leave_one_out_std_m=leave_one_out_centre_std(inlier_xyz, camera, estimate["cam_from_world"]))


def ransac_max_error(camera: pycolmap.Camera, conf: dict) -> float:
    """RANSAC's inlier threshold in the camera's pixels: conf's at its reference image size."""
    return conf["ransac_max_error_px"] * max(camera.width, camera.height) / conf["ransac_image_size_px"]


def reprojection_variance(xy: np.ndarray, xyz: np.ndarray, camera: pycolmap.Camera,
                          cam_from_world: pycolmap.Rigid3d) -> float:
    """Squared reprojection error per degree of freedom (px^2) of the inliers xy (N, 2) of the
    points xyz (N, 3): the variance of the keypoints' noise, which PnP's covariance takes as one
    pixel. SIFT's inliers on fountain-P11 at 480 px: 0.14-0.48 px^2."""
    residuals = camera.img_from_cam(cam_from_world * xyz) - xy  # (N, 2)
    return float((residuals**2).sum() / max(2 * len(xy) - 6, 1))


def left_update_covariance(cam_from_world: pycolmap.Rigid3d, covariance: np.ndarray) -> np.ndarray:
    """PnP's 6x6 covariance over (rotation, translation) in Ceres' tangent spaces, as the covariance
    of the left update delta = (v, w) the aligner uses (T <- exp(delta) T, `Pose.exp`). Ceres'
    quaternion manifold perturbs R as exp(2 [d]x) R and the translation block adds dt, while the
    left update moves R by exp([w]x) and t by v + [w]x t to first order: w = 2 d, v = dt + 2 [t]x d."""
    t_cross = skew(torch.from_numpy(np.asarray(cam_from_world.translation, np.float64))).numpy()
    jacobian = np.block([[2.0 * t_cross, np.eye(3)], [2.0 * np.eye(3), np.zeros((3, 3))]])  # (v, w) from (d, dt)
    return jacobian @ np.asarray(covariance, np.float64) @ jacobian.T


def centre_std_m(covariance: np.ndarray) -> float:
    """Standard deviation (root of the trace) of the camera centre c = -R^T t from the covariance
    of the left update (left_update_covariance): c moves by -R^T v, and a rotation does not change
    the trace. Ceres' translation block alone also carries the rotation's uncertainty times the
    camera's distance from the world origin: a pose 900 m from it read 0.47 m where the centre is
    known to 7 mm."""
    return float(np.sqrt(max(np.trace(covariance[:3, :3]), 0.0)))


def leave_one_out_centre_std(xyz: np.ndarray, camera: pycolmap.Camera, cam_from_world: pycolmap.Rigid3d) -> float:
    """The camera centre's std (one pixel of keypoint noise, as position_std_m, but from the
    inliers' reprojections alone: no prior, no robust loss) had the inlier that constrains it most
    been left out: the largest over the inliers xyz (N, 3). A right pose does not hinge on one
    match; on a far facade at one depth the others fix the direction to it but not the distance,
    and one wrong match decided it (bench precision, 640x480 street, q_0009: 30 true inliers
    54-57 m away and one wrong 167 m away held a pose 5.3 m off at a std of 0.41 m, 4.3 m without
    that match).

    With the inliers' Jacobians J_i (2, 6) and C = (sum J_i^T J_i)^-1, leaving match i out gives
    (Woodbury) C_i = C + G_i^T (I - H_i)^-1 G_i, with G_i = J_i C and H_i = G_i J_i^T its block
    of the hat matrix (its leverage): a match the pose hinges on has I - H_i near singular."""
    pose = Pose.from_colmap(cam_from_world).double()
    points = pose * torch.from_numpy(np.asarray(xyz, np.float64))  # (N, 3) camera frame
    J = Camera.from_colmap(camera).double().J_project(points) @ pose.J_transform(points)  # (N, 2, 6) d px / d (v, w)
    information = (J.transpose(-1, -2) @ J).sum(0)  # (6, 6)
    covariance, singular = torch.linalg.inv_ex(information)
    if singular:
        return float("inf")
    G = J @ covariance  # (N, 2, 6)
    remaining = torch.eye(2, dtype=J.dtype) - G @ J.transpose(-1, -2)  # (N, 2, 2) = I - H_i
    G_centre = G[..., :3]  # (N, 2, 3): the centre moves by -R^T v, a rotation keeps the trace
    increase, singular = torch.linalg.solve_ex(remaining, G_centre)  # (N, 2, 3) = (I - H_i)^-1 G_i
    if bool(singular.any()):
        return float("inf")
    variances = torch.trace(covariance[:3, :3]) + (G_centre * increase).sum((-1, -2))  # (N,)
    return float(variances.max().clamp(min=0).sqrt())


def split_shift(xy: np.ndarray, xyz: np.ndarray, camera: pycolmap.Camera, cam_from_world: pycolmap.Rigid3d) -> float:
    """Metres between the poses refined from each half of the inliers, split at the median column.
    A right pose explains both halves of the view; a pose held up by look-alike structure on one
    side moves when it has to explain the other side alone."""
    left = xy[:, 0] < np.median(xy[:, 0])
    halves = []
    for half in (left, ~left):
        if half.sum() < 6:  # a pose and a little redundancy
            return float("inf")
        refined = pycolmap.refine_absolute_pose(cam_from_world, xy, xyz, half, camera,
                                                pycolmap.AbsolutePoseRefinementOptions())
        if refined is None:
            return float("inf")
        halves.append(Pose.from_colmap(refined["cam_from_world"]))
    return float(halves[0].error_to(halves[1])[1])


def rival_inliers(xy: np.ndarray, xyz: np.ndarray, camera: pycolmap.Camera,
                  estimation: pycolmap.AbsolutePoseEstimationOptions, found: pycolmap.Rigid3d, conf: dict) -> int:
    """The inliers of a second pose found in the matches the first left out, when it lies
    elsewhere: on repeated structure (alike facades along a street) the right pose and a wrong
    one both gather a consensus, and a pose with a strong rival cannot be trusted."""
    if len(xy) < 4:  # a P3P sample and one point to check it
        return 0
    estimate = pycolmap.estimate_absolute_pose(xy, xyz, camera, estimation)
    if estimate is None:
        return 0
    turn, shift = Pose.from_colmap(estimate["cam_from_world"]).error_to(Pose.from_colmap(found))
    if shift < conf["rival_min_shift_m"] and turn < conf["rival_min_turn_deg"]:
        return 0  # the same pose again: support the first left out, not a rival
    return int(estimate["num_inliers"])


class SparseLocalizer:
    """SIFT + PnP against a whole in-memory map (small maps, tests; the batch job uses the cells)."""

    def __init__(self, scene_map: SceneMap, conf: dict | None = None):
        self.conf = {**default_conf, "keypoints": scene_map.keypoints, **(conf or {})}
        if scene_map.descriptors is None or len(scene_map.descriptors) == 0:
            raise ValueError(f"{scene_map.path}: the map has no point descriptors; sparse localization needs them")
        self.scene_map = scene_map
        self.extractor = keypoint_extractor(self.conf)
        reconstruction = scene_map.reconstruction
        point_ids, image_ids = [], []
        for image_id, image in reconstruction.images.items():
            ids = observations(image).point3D_ids
            point_ids.append(ids)
            image_ids.append(np.full(len(ids), image_id, np.int32))
        point_ids, image_ids = np.concatenate(point_ids), np.concatenate(image_ids)
        rows, described = scene_map.descriptor_rows(point_ids)
        xyz = point_positions(reconstruction, point_ids[described])
        self.points = SparsePoints.from_observations(point_ids[described], image_ids[described], xyz,
                                                     scene_map.descriptors[rows[described]])

    def candidate_rows(self, prior_position: np.ndarray | None) -> np.ndarray:
        """(C,) rows of the candidate points: near the prior when there is one and a shard index."""
        if prior_position is None or self.scene_map.shards is None:
            return np.arange(len(self.points))
        names = self.scene_map.shards.images_near(prior_position, self.conf["search_radius_m"])
        reconstruction = self.scene_map.reconstruction
        return self.points.seen_by([reconstruction.find_image_with_name(name).image_id for name in names])

    def localize(self, image: np.ndarray, camera: pycolmap.Camera, prior_position: np.ndarray | None = None,
                 prior_sigma_m: float | None = None) -> SparseResult:
        """image: (H, W, 3) uint8 RGB at the resolution of `camera`. prior_position: (3,) map frame."""
        query = extract_query_keypoints(self.extractor, image)
        return localize_against(query, self.points, self.candidate_rows(prior_position), camera, self.conf,
                                prior_position, prior_sigma_m)
