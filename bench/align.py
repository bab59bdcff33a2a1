"""`pixloc bench align`: the basin of convergence of the featuremetric aligner.

A reference and a query view of a synthetic street are rendered; the reference's pixels are lifted
to 3D with the renderer's exact depth and carry its intensity features. Per bin of initial error
(t_m, R_deg), `trials` hypotheses start from the true query pose with the camera centre moved by
exactly t_m metres and the rotation turned by exactly R_deg degrees (random directions and axes),
and are refined in one batched call. A trial succeeds when it ends within 2 cm and 0.2 deg.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import write_report
from pixloc_core.align import AlignResult, FeaturemetricAligner, ReferenceLevel
from pixloc_core.extractors.base import FeatureLevel, Pyramid, select
from pixloc_core.extractors.intensity import IntensityExtractor
from pixloc_core.geometry import Camera, Pose, perturb_poses
from pixloc_core.synthetic import (PinholeIntrinsics, Scene, SceneConfig, build_scene, raycast, render,
                                   sample_walk_poses)
from pixloc_core.synthetic.cameras import street_length

logger = logging.getLogger(__name__)

default_conf = {
    "seed": 0,
    "width": 480,
    "height": 360,
    "focal": 416.0,  # the synthetic dataset's field of view (554.66 px at 640 px wide)
    "query_offset_m": 1.0,  # the query is the reference view moved by this much ...
    "query_offset_deg": 5.0,  # ... and turned by this much
    "num_points": 1000,  # reference points per level
    "trials": 25,  # hypotheses per bin
    "translations_m": (0.1, 0.3, 1.0, 3.0),
    "rotations_deg": (1.0, 3.0, 10.0),
    "success_t_m": 0.02,
    "success_R_deg": 0.2,
}


@dataclass
class AlignmentProblem:
    """Everything the aligner needs for one query, plus the answer."""

    query: Pyramid  # one image, coarse to fine
    references: list[ReferenceLevel]  # coarse to fine
    camera: Camera  # full resolution
    T_true: Pose  # () world-to-camera of the query


def _intrinsics_at(intrinsics: PinholeIntrinsics, width: int, height: int) -> PinholeIntrinsics:
    """The same camera resampled to width x height (corner-origin pixels scale with the size)."""
    sx, sy = width / intrinsics.width, height / intrinsics.height
    return PinholeIntrinsics(width, height, intrinsics.fx * sx, intrinsics.fy * sy,
                             intrinsics.cx * sx, intrinsics.cy * sy)


def _reference_level(level: FeatureLevel, scene: Scene, intrinsics: PinholeIntrinsics, T_ref: Pose,
                     num_points: int, generator: torch.Generator) -> ReferenceLevel:
    """Points seen by the reference at the centres of a level's feature pixels: ray casting at the
    level's resolution gives their exact depth, so features need no interpolation."""
    height, width = level.features.shape[-2:]
    level_intrinsics = _intrinsics_at(intrinsics, width, height)
    depth = torch.from_numpy(raycast(scene, level_intrinsics, T_ref.R.numpy(), T_ref.t.numpy()).depth)  # (h, w)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    p2d_level = torch.stack([cols, rows], -1).reshape(-1, 2).double() + 0.5  # (h*w, 2)
    # Sample where the scene is (not the sky), favouring textured pixels.
    weights = level.confidence.reshape(-1).double() * torch.isfinite(depth.reshape(-1))
    chosen = torch.multinomial(weights, min(num_points, int((weights > 0).sum())), generator=generator)
    camera_level = Camera("PINHOLE", width, height, level_intrinsics.params())
    p3d_ref = camera_level.unproject(p2d_level[chosen]) * depth.reshape(-1)[chosen, None]  # (N, 3)
    points3D = T_ref.inv().transform(p3d_ref)
    return ReferenceLevel.from_observations(level, points3D.float(), p2d_level[chosen],
                                            torch.tensor([width, height], dtype=torch.float64))


def synthetic_problem(conf: dict) -> AlignmentProblem:
    """A reference view along a synthetic street and a query view next to it."""
    conf = {**default_conf, **conf}
    scene = build_scene(SceneConfig(seed=conf["seed"]))
    intrinsics = PinholeIntrinsics.centered(conf["width"], conf["height"], conf["focal"])
    rng = np.random.default_rng(conf["seed"])
    R, t = sample_walk_poses(scene, rng.uniform(0, street_length(scene), 1), rng)
    T_ref = Pose.from_Rt(torch.from_numpy(R[0]), torch.from_numpy(t[0]))  # float64
    generator = torch.Generator().manual_seed(conf["seed"])
    T_query = perturb_poses(T_ref, conf["query_offset_m"], conf["query_offset_deg"], generator, num=1)[0]

    extractor = IntensityExtractor()
    images = np.stack([render(scene, intrinsics, T.R.numpy(), T.t.numpy()) for T in (T_ref, T_query)])
    pyramids = extractor.extract(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    references = [_reference_level(level, scene, intrinsics, T_ref, conf["num_points"], generator)
                  for level in select(pyramids, 0)]
    camera = Camera("PINHOLE", conf["width"], conf["height"], intrinsics.params()).float()
    return AlignmentProblem(select(pyramids, 1), references, camera, T_query.float())


def align_trials(aligner: FeaturemetricAligner, problem: AlignmentProblem, T_init: Pose
                 ) -> tuple[AlignResult, torch.Tensor, torch.Tensor]:
    """Refines T_init (M,) -> the result and its final (rotation deg, translation m) errors (M,)."""
    with torch.no_grad():
        result = aligner(problem.query, problem.references, problem.camera, T_init)
    error_R, error_t = result.poses.error_to(problem.T_true)
    return result, error_R, error_t


def main(out: Path | None = None, **conf) -> dict:
    conf = {**default_conf, **conf}
    problem = synthetic_problem(conf)
    aligner = FeaturemetricAligner()
    generator = torch.Generator().manual_seed(conf["seed"] + 1)
    bins, seconds, iterations = [], 0.0, 0
    for t_m in conf["translations_m"]:
        for R_deg in conf["rotations_deg"]:
            T_init = perturb_poses(problem.T_true, t_m, R_deg, generator, num=conf["trials"])
            start = time.perf_counter()
            result, error_R, error_t = align_trials(aligner, problem, T_init)
            seconds += time.perf_counter() - start
            iterations += sum(result.iterations)
            success = (error_t < conf["success_t_m"]) & (error_R < conf["success_R_deg"])
            bins.append({"t_m": t_m, "R_deg": R_deg, "success_rate": success.float().mean().item(),
                         "median_final_t_m": error_t.median().item(),
                         "median_final_R_deg": error_R.median().item()})
    report = {
        "bins": bins,
        "ms_per_iteration": 1000 * seconds / max(iterations, 1),
        "hypotheses_per_iteration": conf["trials"],
        "points_per_level": [len(reference.points3D) for reference in problem.references],
        "device": str(problem.query[0].features.device),
        "threads": torch.get_num_threads(),
    }
    print_table(report)
    write_report(report, out)
    return report


def print_table(report: dict) -> None:
    print(f"{'t_m':>6} {'R_deg':>6} {'success':>8} {'median t_m':>11} {'median R_deg':>13}")
    for row in report["bins"]:
        print(f"{row['t_m']:>6.1f} {row['R_deg']:>6.1f} {row['success_rate']:>8.0%} "
              f"{row['median_final_t_m']:>11.4f} {row['median_final_R_deg']:>13.3f}")
    print(f"{report['ms_per_iteration']:.1f} ms per batched LM iteration "
          f"({report['hypotheses_per_iteration']} hypotheses, {report['points_per_level']} points per level, "
          f"{report['device']}, {report['threads']} threads)")
