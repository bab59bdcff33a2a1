"""`pixloc bench precision`: can a user trust `success`? Precision (the fraction of successful
poses that are right: error < 1 m and < 5 deg) and recall (right and successful, over all queries)
per method, on synthetic streets at several reference densities and prior noises, and on the
real sets of ../shared/data; and the precision/recall curves over the main thresholds (`sweeps`:
the prior consistency multiplier k, the PnP split shift and std, and the bounds on an aligned
pose: its cost cap, the cap of a refined verified pose, its position std).

Each job runs once with every final check at its loosest (`PERMISSIVE`) and records the checks'
values per row (jobs/results.py); success under any thresholds is then recomputed from those
values with the same `verdict` the job uses, so the curves cost no extra localization. Synthetic priors
are map-frame, the true centre plus Gaussian noise of the given std per horizontal axis, with that
std as sigma_m.
"""
from __future__ import annotations

import logging
import math
import os
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench import write_report
from jobs import features as features_job
from jobs import localize as localize_job
from jobs import map as map_job
from jobs.results import read_results
from pixloc_core.evaluate import RIGHT_DEG, RIGHT_M, pose_errors
from pixloc_core.extractors import DEFAULT as DEFAULT_EXTRACTOR
from pixloc_core.geometry import Pose
from pixloc_core.io import Prior, read_poses, read_priors, write_priors
from pixloc_core.localize import Checks, LocalizeConf, VerifyConf, alignment_verdict, verdict
from pixloc_core.synthetic import dataset

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
# VerifyConf with nothing refused: every pose a method finds keeps success=true in the job's rows
# (the methods' own minimums, e.g. sparse's 15 PnP inliers, still apply).
PERMISSIVE = {"min_inliers": 0, "min_inlier_ratio": 0.0, "max_pnp_position_std_m": math.inf,
              "max_pnp_split_shift_m": math.inf, "max_pnp_leave_one_out_std_m": math.inf, "max_rival_ratio": math.inf,
              "trust_prior": "low",
              "max_refinement_shift_m": math.inf, "max_refinement_turn_deg": math.inf}
# The bounds on an aligned pose (LocalizeConf), likewise open in the jobs and applied by the
# evaluation with the job's own `alignment_verdict`; the hypothesis labels of the verified starts
# (a refined PnP pose, an input pose) tell it which rows had one.
OPEN_BOUNDS = {"max_cost": math.inf, "max_refined_cost": math.inf, "max_position_std_m": math.inf,
               "min_keypoint_support": 0, "min_keypoint_support_ratio": 0.0}
ALIGNMENT_BOUNDS = tuple(OPEN_BOUNDS)
VERIFIED_STARTS = ("sparse", "input")
DEFAULT_BOUNDS = {bound: getattr(LocalizeConf(), bound) for bound in ALIGNMENT_BOUNDS}

default_conf = {
    "work_dir": ROOT / "outputs" / "bench" / "precision",
    "refs": [40, 60, 150],
    "gps_noise_m": [2.0, 10.0],
    "queries": 15,
    "seed": 5,
    "width": 320,
    "height": 240,
    "methods": ["sparse", "sparse+dense", "dense"],
    "extractor": DEFAULT_EXTRACTOR,  # of the dense alignments (their bounds are what it calibrates)
    # The same streets at 640x480 as a user makes them (`synthetic_scene(full_size=True)`), with
    # synth's own geodetic priors (10 m): wrong PnP poses showed there that never did at 320x240.
    "full_size_refs": [40],
    "real_sets": ["fountain-P11", "lund"],
    "workers": 2,
    # The curves: each threshold swept with the others at their defaults. VerifyConf fields, and
    # and the bounds on an aligned pose (ALIGNMENT_BOUNDS).
    "sweeps": {
        "prior_sigmas": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0, 1000.0],  # 1000: no prior check
        "max_pnp_split_shift_m": [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 1000.0],
        "max_pnp_position_std_m": [0.25, 0.33, 0.4, 0.5, 0.75, 1.0, 1.5, 3.0, 1000.0],
        "max_pnp_leave_one_out_std_m": [0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 1000.0],
        "max_cost": [0.05, 0.055, 0.06, 0.065, 0.07, 0.075, 0.08, 0.085, 0.09],
        "max_refined_cost": [0.06, 0.07, 0.075, 0.08, 0.085, 0.09, 0.1, 1000.0],
        "max_position_std_m": [0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.1, 1000.0],
        "min_keypoint_support": [0, 5, 10, 15, 20, 30, 50],
        "min_keypoint_support_ratio": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3],
    },
}
quick_conf = {"refs": [40], "gps_noise_m": [10.0], "queries": 6, "methods": ["sparse"], "full_size_refs": [],
              "real_sets": []}


def synthetic_scene(refs: int, conf: dict, full_size: bool = False) -> tuple[Path, Path, Path]:
    """Rendered, mapped and featurized once per reference count (reused from work_dir). The
    reduced scenes are 320x240 with a lighter map; `full_size` is the scene as `pixloc synth` and
    `pixloc map` make it by default (640x480, the map's own SIFT settings)."""
    work = Path(conf["work_dir"]) / (f"synth-{refs}-640x480" if full_size else f"synth-{refs}")
    scene = work / "scene"
    size = {} if full_size else {"width": conf["width"], "height": conf["height"]}
    if not (scene / "gt_queries.txt").is_file():
        dataset.main(scene, {"num_refs": refs, "num_queries": conf["queries"], "seed": conf["seed"],
                             "workers": conf["workers"], **size})
    if not (work / "map" / "shards.json").is_file():
        map_job.build_map(scene / "mapping", work / "map", reference_model=scene / "reference_model",
                          priors=read_priors(scene / "mapping_priors.csv"),
                          conf=None if full_size else {"sift": {"max_num_features": 1024}, "pairs": {"num_neighbors": 5}})
    store = work / ("store" if conf["extractor"] == "classic" else f"store-{conf['extractor']}")
    features_job.main(work / "map", scene / "mapping", str(store), conf={"workers": conf["workers"],
                                                                       "extractor": conf["extractor"]})
    return scene, work / "map", store


def noisy_map_priors(gt: dict, sigma: float, seed: int, path: Path) -> Path:
    """Map-frame priors: the true centres moved by N(0, sigma^2) per horizontal axis."""
    rng = np.random.default_rng(seed)
    priors = {}
    for name, (qvec, tvec) in sorted(gt.items()):
        center = Pose.from_qvec_tvec(torch.tensor(qvec), torch.tensor(tvec)).center().numpy()
        center[:2] += rng.normal(0.0, sigma, 2)
        priors[name] = Prior(tuple(center.tolist()), geodetic=False, sigma_m=sigma)
    write_priors(path, priors)
    return path


def localize(map_dir: Path, store: Path, queries: Path, priors: Path, out: Path, method: str, conf: dict,
             query_list: Path | None = None) -> Path:
    localize_job.main(map_dir, str(store), queries, out, query_list=query_list, priors=priors, overwrite=True,
                      conf={"method": method, "workers": conf["workers"],
                            "extractor": conf["extractor"],
                            "shard": {"localize": {"verify": PERMISSIVE, **OPEN_BOUNDS}}})
    return out


def run_methods(map_dir: Path, store: Path, queries: Path, priors: Path, work: Path, gt: dict, conf: dict,
                query_list: Path | None = None) -> dict[str, dict]:
    """Every method's job on one scene (results in work/<method>), each evaluated against gt."""
    return {method: evaluate_run(localize(map_dir, store, queries, priors, work / method.replace("+", "_"), method,
                                          conf, query_list), gt, conf["sweeps"])
            for method in conf["methods"]}


def rows_with_errors(results: Path, gt: dict) -> list[dict]:
    """The rows of the queries with ground truth, each with its pose error (inf without a pose)."""
    table = read_results(results).to_pylist()
    poses = {row["name"]: (np.array(row["qvec"]), np.array(row["tvec"])) for row in table if row["qvec"]}
    errors = pose_errors(poses, gt)
    return [{**row, "error_m": errors[row["name"]][0], "error_deg": errors[row["name"]][1]}
            for row in table if row["name"] in gt]


def checks_of(row: dict) -> Checks:
    values = {key: row[key] for key in Checks.__dataclass_fields__}
    return Checks(**{key: (math.nan if value is None else value) for key, value in values.items()})


def precision_recall(rows: list[dict], total: int, conf: VerifyConf, bounds: dict[str, float] = DEFAULT_BOUNDS) -> dict:
    """Success as the job decides it under `conf` (from the recorded checks) and, for a pose that
    came out of an alignment, within `bounds` (ALIGNMENT_BOUNDS), against the truth."""
    localize_conf = replace(LocalizeConf(), **bounds)

    def within_bounds(row: dict) -> bool:
        if not math.isfinite(row["cost"]):  # a PnP pose, not aligned
            return True
        std = math.nan if row["position_std_m"] is None else row["position_std_m"]
        return not alignment_verdict(row["cost"], std, row["hypothesis"] in VERIFIED_STARTS, localize_conf,
                                     checks_of(row))

    successes = [row for row in rows if row["success"] and not verdict(checks_of(row), conf) and within_bounds(row)]
    right = [row for row in successes if row["error_m"] < RIGHT_M and row["error_deg"] < RIGHT_DEG]
    wrong = [row for row in successes if row not in right]
    return {"successes": len(successes), "right": len(right),
            "precision": len(right) / len(successes) if successes else None,
            "recall": len(right) / total if total else None,
            "worst_success_m": max((row["error_m"] for row in successes), default=None),
            "wrong": sorted(row["name"] for row in wrong)}


def evaluate_run(results: Path, gt: dict, sweeps: dict[str, list[float]]) -> dict:
    rows = rows_with_errors(results, gt)
    default = VerifyConf()

    def at(threshold: str, value: float) -> dict:
        if threshold in ALIGNMENT_BOUNDS:
            return precision_recall(rows, len(gt), default, {**DEFAULT_BOUNDS, threshold: value})
        return precision_recall(rows, len(gt), replace(default, **{threshold: value}))

    return {"queries": len(gt), **precision_recall(rows, len(gt), default),
            "unchecked": precision_recall(rows, len(gt), replace(default, trust_prior="low")),
            "curves": {threshold: [{threshold: value, **at(threshold, value)} for value in values]
                       for threshold, values in sweeps.items()}}


def real_runs(name: str, conf: dict) -> dict[str, dict]:
    from bench import real

    work = Path(conf["work_dir"]) / name
    real_conf = {**real.default_conf, "work_dir": Path(conf["work_dir"]), "workers": conf["workers"],
                 "extractors": [conf["extractor"]], "keypoints": ["sift"]}
    prepared = real.PREPARERS[name](real_conf["data_root"], work / "data", None)
    if name == "fountain-P11":
        built = real.build(prepared, work, real_conf, ["--reference-model", prepared.reference_model])
        gt = read_poses(prepared.gt_poses)
    else:
        built = real.build(prepared, work, real_conf, ["--gps-from-exif"])
        gt = read_poses(real.lund_pseudo_ground_truth(prepared, built.map_dir, work, real_conf))
    return run_methods(built.map_dir, built.stores["sift", conf["extractor"]], prepared.query_dir, prepared.priors, work, gt,
                       conf, prepared.query_list)


def print_table(report: dict) -> None:
    print(f"\nprecision of success (right: < {RIGHT_M} m and < {RIGHT_DEG} deg) / recall, default checks"
          f" (without the prior check in brackets)")
    print(f"{'scene':38}{'method':14}{'precision':>11}{'recall':>8}{'succ':>6}  {'[unchecked]':>18}")
    for scene, methods in report["scenes"].items():
        for method, entry in methods.items():
            unchecked = entry["unchecked"]
            precision = "-" if entry["precision"] is None else f"{100 * entry['precision']:.0f} %"
            unchecked_precision = "-" if unchecked["precision"] is None else f"{100 * unchecked['precision']:.0f} %"
            print(f"{scene:38}{method:14}{precision:>11}{100 * entry['recall']:>7.0f}%{entry['successes']:>6}"
                  f"  [{unchecked_precision:>6} / {100 * unchecked['recall']:.0f} %]")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = list(report["conf"]["sweeps"])
    columns = 2
    rows = math.ceil(len(thresholds) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 5 * rows), sharey=True, squeeze=False)
    for axis, threshold in zip(axes.flat, thresholds):
        for scene, methods in report["scenes"].items():
            for method, entry in methods.items():
                points = [(c["recall"], c["precision"]) for c in entry["curves"][threshold] if c["precision"] is not None]
                if points:
                    axis.plot(*zip(*points), marker="o", label=f"{scene} {method}")
        axis.set_xlabel("recall")
        axis.set_ylabel("precision of success")
        axis.set_title(f"over {threshold}")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=6)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main(out: Path | None = None, quick: bool = False, **overrides) -> dict:
    conf = {**default_conf, **(quick_conf if quick else {}), **overrides}
    report = {"conf": {key: (str(value) if isinstance(value, Path) else value) for key, value in conf.items()},
              "machine": {"node": platform.node(), "cpus": os.cpu_count(), "load_avg": list(os.getloadavg())},
              "scenes": {}}
    for refs in conf["refs"]:
        scene, map_dir, store = synthetic_scene(refs, conf)
        gt = read_poses(scene / "gt_queries.txt")
        for noise in conf["gps_noise_m"]:
            work = scene.parent / f"noise-{noise:g}"
            work.mkdir(parents=True, exist_ok=True)
            priors = noisy_map_priors(gt, noise, conf["seed"], work / "priors.csv")
            report["scenes"][f"synth {refs} refs, {noise:g} m"] = run_methods(
                map_dir, store, scene / "queries", priors, work, gt, conf, scene / "queries_with_intrinsics.txt")
            write_report(report, out)  # so far: a later scene that fails loses nothing measured
    for refs in conf["full_size_refs"]:
        scene, map_dir, store = synthetic_scene(refs, conf, full_size=True)
        report["scenes"][f"synth {refs} refs 640x480, geodetic 10 m"] = run_methods(
            map_dir, store, scene / "queries", scene / "priors.csv", scene.parent, read_poses(scene / "gt_queries.txt"),
            conf)
        write_report(report, out)
    for name in conf["real_sets"]:
        report["scenes"][name] = real_runs(name, conf)
    print_table(report)
    if out is not None:
        write_report(report, out)
        plot(report, Path(out).with_suffix(".png"))
    return report
