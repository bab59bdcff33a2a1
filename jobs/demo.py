"""`pixloc demo` (and `make demo`): the whole product on a synthetic geotagged street, end to end.

    synth  -> OUT/scene     reference photos with known poses, query photos with 10 m GPS noise
    map    -> OUT/map       triangulated from the reference model, sharded into cells
    features -> OUT/store   reference features, once, into the local Parquet store
    localize -> OUT/results on a local Ray with `workers` workers
    eval + report           prior error vs estimated error, recall, OUT/report.html

Everything runs on one local Ray session started here (and only shut down if started here).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pycolmap

from cluster.runtime import init_ray
from pixloc_core.evaluate import RECALL_THRESHOLDS, evaluate, recall_key
from pixloc_core.io import read_poses, read_priors
from pixloc_core.map_io import SceneMap
from pixloc_core.synthetic import dataset

from . import features as features_job
from . import localize as localize_job
from . import map as map_job
from . import report as report_job
from .config import merge_conf
from .results import read_results, successful_poses

logger = logging.getLogger(__name__)

default_conf = {
    "num_refs": 150,
    "num_queries": 40,
    "gps_noise_m": 10.0,
    "width": 640,
    "height": 480,
    "workers": 2,
    "method": "sparse+dense",
    "seed": 0,
    # SIFT and pairs for the map: enough for a dense street at 640x480, and fast to match on 2 cores
    "map": {"sift": {"max_num_features": 2048}, "pairs": {"num_neighbors": 5}},
}


def prior_errors(table, ground_truth) -> np.ndarray:
    """Distance (m) between each query's prior and its true centre, over the ground truth."""
    truths = report_job.centers(ground_truth)
    priors = {name: xyz for name, xyz in zip(table.column("name").to_pylist(), table.column("prior_xyz").to_pylist())}
    return np.array([np.linalg.norm(np.array(priors[name]) - center) if priors.get(name) else np.inf
                     for name, center in truths.items()])


def comparison_table(prior_error: np.ndarray, summary: dict) -> str:
    """Prior vs estimate: median error and recall (a prior has no rotation: position only)."""
    header = f"{'':12}{'median error':>22}" + "".join(f"{recall_key(t, R):>12}" for t, R in RECALL_THRESHOLDS)
    prior_row = f"{'GPS prior':12}{np.median(prior_error):>20.2f} m" + "".join(
        f"{100 * np.mean(prior_error <= t):>11.1f}%" for t, _ in RECALL_THRESHOLDS)
    median = ("failed" if summary["median_t_m"] is None
              else f"{summary['median_t_m']:.3f} m {summary['median_R_deg']:.2f}°")
    estimate_row = f"{'estimate':12}{median:>22}" + "".join(
        f"{100 * summary['recall'][recall_key(t, R)]:>11.1f}%" for t, R in RECALL_THRESHOLDS)
    return "\n".join([header, prior_row, estimate_row, "(prior recall: position only)"])


def main(out_dir: Path, conf: dict | None = None) -> dict:
    """Run the demo into `out_dir`; returns timings (s) per step and the accuracy summary."""
    conf = merge_conf(default_conf, conf)
    pycolmap.logging.minloglevel = 2
    out_dir = Path(out_dir)
    scene_dir, map_dir, store_url = out_dir / "scene", out_dir / "map", str(out_dir / "store")
    results_dir = out_dir / "results"
    timings = {}
    start = time.perf_counter()

    def step(name: str) -> None:
        nonlocal start
        timings[name] = time.perf_counter() - start
        logger.info("demo: %s done in %.1f s", name, timings[name])
        start = time.perf_counter()

    dataset.main(scene_dir, {"num_refs": conf["num_refs"], "num_queries": conf["num_queries"],
                             "gps_noise_m": conf["gps_noise_m"], "width": conf["width"],
                             "height": conf["height"], "workers": conf["workers"], "seed": conf["seed"]})
    step("synth")
    map_job.build_map(scene_dir / "mapping", map_dir, reference_model=scene_dir / "reference_model",
                      priors=read_priors(scene_dir / "mapping_priors.csv"), conf=conf["map"])
    step("map")
    # A rerun rebuilds the map, whose fingerprint the old store would not match.
    shutil.rmtree(store_url, ignore_errors=True)
    with init_ray(None, num_cpus=conf["workers"]):
        features_job.main(map_dir, scene_dir / "mapping", store_url, conf={"workers": conf["workers"]})
        step("features")
        localize_job.main(map_dir, store_url, scene_dir / "queries", results_dir,
                          query_list=scene_dir / "queries_with_intrinsics.txt", priors=scene_dir / "priors.csv",
                          conf={"workers": conf["workers"], "method": conf["method"]},
                          overwrite=True)  # the demo's own results, of the scene it just rebuilt
        step("localize")

    ground_truth = read_poses(scene_dir / "gt_queries.txt")
    table = read_results(results_dir)
    summary = evaluate(successful_poses(table), ground_truth)
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    reconstruction = SceneMap.load(map_dir).reconstruction
    references = np.array([image.projection_center() for image in reconstruction.images.values()])
    report = report_job.main(results_dir, out_dir / "report.html", ground_truth, references,
                             title=f"pixloc demo: {conf['num_queries']} queries, {conf['gps_noise_m']:g} m GPS noise")
    step("eval+report")
    print(comparison_table(prior_errors(table, ground_truth), summary))
    print(f"report: {report}")
    print("timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
          + f", total {sum(timings.values()):.1f} s")
    return {"timings_s": timings, "eval": summary, "report": str(report)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    parser.add_argument("--workers", type=int, default=default_conf["workers"], help="Ray workers")
    parser.add_argument("--refs", type=int, default=default_conf["num_refs"], help="reference images")
    parser.add_argument("--queries", type=int, default=default_conf["num_queries"], help="query images")
    parser.add_argument("--width", type=int, default=default_conf["width"], help="image width")
    parser.add_argument("--height", type=int, default=default_conf["height"], help="image height")


def run(args: argparse.Namespace) -> int:
    main(args.out, merge_conf(default_conf, {"workers": args.workers, "num_refs": args.refs,
                                             "num_queries": args.queries, "width": args.width,
                                             "height": args.height}, args.conf))
    return 0
