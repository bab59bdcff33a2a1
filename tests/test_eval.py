"""`pixloc eval` on hand-made pose files and a hand-made results table."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs import eval as eval_job
from jobs.results import rows_to_table
from pixloc_core.evaluate import evaluate, pose_errors
from pixloc_core.geometry import Pose
from pixloc_core.io import write_poses


def pose_entry(yaw_deg: float, center: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(qvec, tvec) of a camera at `center` rotated by yaw about z."""
    pose = Pose.from_aa(torch.tensor([0.0, 0.0, math.radians(yaw_deg)], dtype=torch.float64),
                        torch.zeros(3, dtype=torch.float64))
    t = -(pose.R @ torch.tensor(center, dtype=torch.float64))
    return pose.qvec().numpy(), t.numpy()


@pytest.fixture
def ground_truth():
    return {f"q{i}.jpg": pose_entry(10.0 * i, (float(i), 2.0 * i, 1.5)) for i in range(4)}


def test_errors_are_centre_distance_and_rotation_angle(ground_truth):
    estimates = {
        "q0.jpg": ground_truth["q0.jpg"],  # exact
        "q1.jpg": pose_entry(10.0 + 1.5, (1.0 + 0.1, 2.0, 1.5)),  # 0.1 m, 1.5 deg
        "q2.jpg": pose_entry(20.0, (2.0, 4.0 + 2.4, 1.5 + 3.2)),  # 4 m, 0 deg
        # q3 missing
    }
    errors = pose_errors(estimates, ground_truth)
    assert errors["q0.jpg"] == pytest.approx((0.0, 0.0), abs=1e-6)
    assert errors["q1.jpg"] == pytest.approx((0.1, 1.5), abs=1e-6)
    assert errors["q2.jpg"] == pytest.approx((4.0, 0.0), abs=1e-6)
    assert errors["q3.jpg"] == (math.inf, math.inf)

    summary = evaluate(estimates, ground_truth)
    assert summary["n"] == 4
    assert summary["recall"] == {"0.25m_2deg": 0.5, "0.5m_5deg": 0.5, "5m_10deg": pytest.approx(0.75)}
    assert summary["median_t_m"] == pytest.approx((0.1 + 4.0) / 2)
    assert summary["median_R_deg"] == pytest.approx(0.75)
    assert summary["precision"] == pytest.approx(2 / 3)  # q2, 4 m off, is the one wrong estimate


def test_mostly_failed_has_null_medians(ground_truth):
    summary = evaluate({"q0.jpg": ground_truth["q0.jpg"]}, ground_truth)
    assert summary["median_t_m"] is None and summary["median_R_deg"] is None
    assert summary["recall"]["5m_10deg"] == 0.25 and summary["precision"] == 1.0
    json.dumps(summary, allow_nan=False)
    assert evaluate({}, ground_truth)["precision"] is None


def test_eval_job_reads_poses_files_and_results_tables(tmp_path, ground_truth):
    gt_path = tmp_path / "gt.txt"
    write_poses(gt_path, ground_truth)
    estimates = dict(ground_truth)
    estimates["q1.jpg"] = pose_entry(10.0 + 30.0, (1.0, 2.0, 1.5))  # rotation far off
    write_poses(tmp_path / "poses.txt", estimates)
    summary = eval_job.main(tmp_path / "poses.txt", gt_path, tmp_path / "eval.json")
    assert summary["recall"]["5m_10deg"] == 0.75
    assert json.loads((tmp_path / "eval.json").read_text()) == summary

    # A results table: failed rows and unknown queries do not count as estimates.
    rows = []
    for name, (qvec, tvec) in ground_truth.items():
        success = name != "q2.jpg"
        rows.append({"name": name, "success": success, "qvec": qvec.tolist(), "tvec": tvec.tolist(),
                     "error": "" if success else "cost too high"})
    rows.append({"name": "unknown.jpg", "success": True, "qvec": [1.0, 0, 0, 0], "tvec": [0.0, 0, 0]})
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    pq.write_table(rows_to_table(rows), results_dir / "results.parquet")
    summary = eval_job.main(results_dir, gt_path)
    assert summary["n"] == 4
    assert summary["recall"]["0.25m_2deg"] == 0.75


def test_eval_cli_prints_the_table(tmp_path, ground_truth, capsys):
    from jobs.cli import main as cli_main

    write_poses(tmp_path / "gt.txt", ground_truth)
    write_poses(tmp_path / "est.txt", ground_truth)
    assert cli_main(["eval", "--results", str(tmp_path / "est.txt"), "--gt", str(tmp_path / "gt.txt"),
                     "--json", str(tmp_path / "out" / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert "0.25m_2deg" in printed and "100.0 %" in printed
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["recall"]["0.25m_2deg"] == 1.0
