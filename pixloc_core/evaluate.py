"""Localization accuracy against ground-truth poses: median errors and recall at thresholds.

A query of the ground truth without an estimate (missing, or failed) counts with an infinite
error, so that recall is always over all ground-truth queries.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .geometry import Pose

# (metres, degrees), the thresholds of the outdoor visual localization benchmarks
RECALL_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.25, 2.0), (0.5, 5.0), (5.0, 10.0))
# A pose below both is right: the precision of success is the fraction of estimates that are.
RIGHT_M, RIGHT_DEG = 1.0, 5.0

PoseDict = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (qvec wxyz, tvec), as io.read_poses


def recall_key(t_m: float, R_deg: float) -> str:
    return f"{t_m:g}m_{R_deg:g}deg"


def pose_errors(estimates: PoseDict, ground_truth: PoseDict) -> dict[str, tuple[float, float]]:
    """name -> (translation error in metres, rotation error in degrees) for every GT query;
    (inf, inf) where there is no estimate."""
    names = sorted(ground_truth)
    found = [name for name in names if name in estimates]
    errors = {name: (math.inf, math.inf) for name in names}
    if found:
        def stack(poses: PoseDict) -> Pose:
            qvecs = torch.tensor(np.array([poses[n][0] for n in found]), dtype=torch.float64)
            tvecs = torch.tensor(np.array([poses[n][1] for n in found]), dtype=torch.float64)
            return Pose.from_qvec_tvec(qvecs, tvecs)

        dR, dt = stack(estimates).error_to(stack(ground_truth))  # (N,) each
        for name, t_err, R_err in zip(found, dt.tolist(), dR.tolist()):
            # a non-finite estimate is no estimate
            errors[name] = (t_err, R_err) if math.isfinite(t_err) and math.isfinite(R_err) else (math.inf, math.inf)
    return errors


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity: a median that is infinite (most queries failed) becomes null."""
    return float(value) if math.isfinite(value) else None


def summarize(errors: dict[str, tuple[float, float]]) -> dict:
    """The eval dict of the DESIGN contract:
    {"n", "median_t_m", "median_R_deg", "recall": {"0.25m_2deg", "0.5m_5deg", "5m_10deg"}}, and
    "precision": the fraction of the estimates (finite errors) under RIGHT_M and RIGHT_DEG, null
    without any."""
    if not errors:
        raise ValueError("no ground-truth queries to evaluate")
    t_err = np.array([t for t, _ in errors.values()])
    R_err = np.array([R for _, R in errors.values()])
    recall = {recall_key(t, R): float(np.mean((t_err <= t) & (R_err <= R))) for t, R in RECALL_THRESHOLDS}
    estimated = np.isfinite(t_err)
    right = (t_err < RIGHT_M) & (R_err < RIGHT_DEG)
    return {
        "n": len(errors),
        "median_t_m": _finite_or_none(np.median(t_err)),
        "median_R_deg": _finite_or_none(np.median(R_err)),
        "recall": recall,
        "precision": float(right.sum() / estimated.sum()) if estimated.any() else None,
    }


def evaluate(estimates: PoseDict, ground_truth: PoseDict) -> dict:
    return summarize(pose_errors(estimates, ground_truth))


def format_summary(summary: dict, title: str = "") -> str:
    """One line per number, for the console."""
    def number(value: float | None, unit: str) -> str:
        return "inf" if value is None else f"{value:.3f} {unit}"

    lines = [title] if title else []
    lines.append(f"  queries       {summary['n']}")
    lines.append(f"  median error  {number(summary['median_t_m'], 'm')}, {number(summary['median_R_deg'], 'deg')}")
    for key, value in summary["recall"].items():
        lines.append(f"  recall {key:<10} {100 * value:6.1f} %")
    if summary["precision"] is not None:
        lines.append(f"  precision of the estimates (< {RIGHT_M:g} m, {RIGHT_DEG:g} deg) {100 * summary['precision']:.1f} %")
    return "\n".join(lines)
