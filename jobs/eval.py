"""`pixloc eval`: accuracy of localization results against ground-truth poses.

Results are a results directory or results.parquet of `pixloc localize`/`refine`, or any poses
file (`name qw qx qy qz tx ty tz`, e.g. from hloc). Ground-truth queries without a successful
estimate count as failures.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pixloc_core import files
from pixloc_core.evaluate import PoseDict, evaluate, format_summary
from pixloc_core.io import read_poses

from .results import read_results, successful_poses

logger = logging.getLogger(__name__)

default_conf: dict = {}  # nothing to configure: `--conf` keys are refused


def read_estimates(path: Path) -> PoseDict:
    path = Path(path)
    if path.is_file() and path.suffix != ".parquet":
        return read_poses(path)
    return successful_poses(read_results(path))


def main(results: Path, gt: Path, json_path: Path | None = None) -> dict:
    ground_truth = read_poses(gt)
    if not ground_truth:
        raise ValueError(f"{gt}: no ground-truth poses")
    summary = evaluate(read_estimates(results), ground_truth)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        files.write_text(Path(json_path), json.dumps(summary, indent=2) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, required=True,
                        help="results directory, results.parquet or a poses file")
    parser.add_argument("--gt", type=Path, required=True, help="ground-truth poses file")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")


def run(args: argparse.Namespace) -> int:
    summary = main(args.results, args.gt, args.json)
    print(format_summary(summary, f"{args.results} vs {args.gt}"))
    return 0
