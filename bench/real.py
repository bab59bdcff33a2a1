"""`pixloc bench real`: accuracy and speed on the real photos of ../shared/data.

Every step is the user's command (`pixloc map`, `features`, `localize`), run per set:

* fountain-P11 (Strecha 2008, true poses): map from the known poses of all images but every third
  (`--reference-model`), queries 0001/0004/0007/0010 with priors = true centre + 2 m.
* lund (OpenSfM): map by SfM + GPS georegistration from all images but every fourth; the held-out
  images are queries with their own EXIF GPS as prior. Pseudo ground truth in the map's own
  frame: the queries registered into the map by COLMAP's incremental mapper with the map's poses
  and cameras fixed, from all their SIFT matches to their GPS-nearest mapping images, with new
  tracks triangulated and all new poses and points bundle-adjusted (pixloc_core.datasets.
  register_pseudo_ground_truth). It shares the map's intrinsics and frame, so it measures
  localization against the map, not the map against the world; a query that does not register
  has no pseudo ground truth and counts as a failure.
* sacre_coeur (hloc demo): map by SfM of the 10 photos (no GPS: a local frame without scale), the
  night query with a prior covering the whole map; no ground truth, so we report whether it
  localizes and save an overlay of the map points reprojected with its pose.

Methods: `sparse` (SIFT + PnP; `sparse@alike-n`: the same with a map of, and queries described by,
another keypoint type: `--conf 'keypoints=[sift,alike-n]'`; JSON: also its median inliers),
`dense` (featuremetric alignment from the prior's hypotheses),
`sparse+dense`, and `prior`: the prior position with the rotation of the nearest reference image
turned towards what that image looked at (the first pose `dense` starts from). Each set runs again with the queries downscaled to 480 px
(`SET@480px`), on the same map and store. s_per_query is the mean per-query compute (read, CNN,
SIFT, store load, matching, alignment) from results.parquet; Ray start-up is not included.
"""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw

from bench import ExtractorSpec, write_report
from cluster.runtime import init_ray
from jobs.cli import main as pixloc
from jobs.results import STAGES, read_results, successful_poses
from pixloc_core.datasets import LUND, PREPARERS, PreparedSet, register_pseudo_ground_truth
from pixloc_core.evaluate import RECALL_THRESHOLDS, evaluate, pose_errors, recall_key
from pixloc_core.extractors import DEFAULT as DEFAULT_EXTRACTOR
from pixloc_core.geometry import Camera, Pose
from pixloc_core.io import Prior, read_poses, write_poses, write_priors
from pixloc_core.localize import ReferencePoses, query_intrinsics
from pixloc_core.map_io import MODEL_DIR, ReferenceImages, SceneMap

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
REFINE_TOLERANCE_M = 0.002  # "within 1.25x + 2 mm": below this, a refinement is not worse

default_conf = {
    "data_root": ROOT.parent / "shared" / "data",
    "work_dir": ROOT / "outputs" / "bench" / "real",
    "sets": ("fountain-P11", "lund", "sacre_coeur"),
    "methods": ("sparse", "dense", "sparse+dense"),
    "small_query_size": 480,  # the second run of every set, where SIFT thins out
    # Every dense method runs with each (bench.ExtractorSpec: "name" or "name=CHECKPOINT"): a store
    # per extractor, one map. `classic` first (the `sparse` runs use the first one's store), then the
    # default extractor, which it is compared with.
    "extractors": tuple(dict.fromkeys(("classic", DEFAULT_EXTRACTOR))),
    # `sparse` runs with each keypoint type: the first's map is built as the set says, every other's
    # triangulated with its keypoints from that map's poses and cameras (the same frame, so the
    # same ground truth), with a store of its own.
    "keypoints": ("sift",),
    "workers": 2,
    "prepare": {},  # per-set overrides of pixloc_core.datasets.default_conf
    # Per-set `pixloc map --conf` settings of the first map, e.g. Lund's SfM in submodels on Ray:
    # `--conf 'map_conf={lund: [submodels.single_sfm_max_images=0]}'`.
    "map_conf": {},
    # `pixloc localize --conf` settings of every run, e.g. the refinement alone, not combined with
    # its PnP start: `--conf 'localize_conf=[shard.localize.combine_refinement_with_pnp=false]'`.
    "localize_conf": (),
}


def run_pixloc(*argv: str | Path) -> None:
    argv = [str(a) for a in argv]
    logger.info("pixloc %s", " ".join(argv))
    if pixloc(argv) != 0:
        raise RuntimeError(f"pixloc {' '.join(argv)} failed")


def seconds_per_query(table: pa.Table) -> float:
    """Mean over the queries of the summed stage timings (ms columns), in seconds."""
    stage_ms = np.stack([np.nan_to_num(np.asarray(table.column(f"{stage}_ms").to_pylist(), dtype=np.float64))
                         for stage in STAGES])  # (S, N)
    return float(stage_ms.sum(0).mean() / 1000) if table.num_rows else float("nan")


def prior_poses(table: pa.Table, scene: SceneMap) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The prior as a pose: its position, with the rotation of the first hypothesis `dense` starts
    from (a GPS prior has none: the nearest reference's, turned towards what it looked at)."""
    references = ReferencePoses(ReferenceImages.from_scene(scene))
    poses = {}
    for name, prior_xyz in zip(table.column("name").to_pylist(), table.column("prior_xyz").to_pylist()):
        if prior_xyz is not None:
            center = torch.tensor(prior_xyz, dtype=torch.float64)
            R = references.hypotheses(center.numpy(), 1)[0].R[0].double()
            pose = Pose.from_Rt(R, -R @ center)
            poses[name] = (pose.qvec().numpy(), pose.t.numpy())
    return poses


@dataclass(frozen=True)
class Run:
    method: str
    extractor: str
    keypoints: str  # of the map

    @property
    def label(self) -> str:
        """The run's key in the report: `sparse`, `sparse@alike-n` (its keypoint type), or e.g.
        `dense alike-n` (its extractor)."""
        if self.method == "sparse":
            return "sparse" if self.keypoints == "sift" else f"sparse@{self.keypoints}"
        return f"{self.method} {ExtractorSpec.parse(self.extractor).label}"


def runs(conf: dict) -> list[Run]:
    """`sparse` runs no CNN, so once per keypoint type, with the first extractor's store; the
    methods with an alignment once per extractor, on the first keypoint type's map."""
    first_extractor, first_keypoints = conf["extractors"][0], conf["keypoints"][0]
    return [run for method in conf["methods"]
            for run in ([Run(method, first_extractor, kind) for kind in conf["keypoints"]] if method == "sparse"
                        else [Run(method, extractor, first_keypoints) for extractor in conf["extractors"]])]


def localize_all(prepared: PreparedSet, built: BuiltMaps, out_dir: Path, conf: dict) -> None:
    """`pixloc localize` with every method and extractor on the prepared queries."""
    for run in runs(conf):
        args = ["localize", "--map", built.maps[run.keypoints], "--store", built.stores[run.keypoints, run.extractor],
                "--queries", prepared.query_dir, "--out", results_dir(out_dir, run.label), "--method", run.method,
                *ExtractorSpec.parse(run.extractor).cli_args(), "--workers", str(conf["workers"]), "--overwrite"]
        args += ["--priors", prepared.priors] if prepared.priors else []
        args += ["--query-list", prepared.query_list] if prepared.query_list else []
        args += ["--conf", *conf["localize_conf"]] if conf["localize_conf"] else []
        run_pixloc(*args)


def results_dir(out_dir: Path, label: str) -> Path:
    return out_dir / label.replace("+", "_").replace(" ", "_")


def evaluate_set(out_dir: Path, conf: dict, map_dir: Path, gt: dict | None) -> tuple[dict[str, dict], dict]:
    """{run label: eval dict (or {"n"} without ground truth) + s_per_query + localized}, with the
    prior as one more entry when there is ground truth; and the issue's goals per extractor."""
    entries, errors = {}, {}
    table = None
    for run in runs(conf):
        label = run.label
        table = read_results(results_dir(out_dir, label))
        estimates = successful_poses(table)
        entries[label] = evaluate(estimates, gt) if gt else {"n": table.num_rows}
        entries[label] |= {"s_per_query": seconds_per_query(table), "localized": len(estimates)}
        if run.method == "sparse":
            inliers = [row["inliers"] for row in table.select(["success", "inliers"]).to_pylist() if row["success"]]
            entries[label]["median_inliers"] = float(np.median(inliers)) if inliers else None
        if gt:
            errors[label] = pose_errors(estimates, gt)
    if gt and table is not None:
        entries["prior"] = evaluate(prior_poses(table, SceneMap.load(map_dir)), gt) | {"s_per_query": 0.0}
    per_extractor = {}
    for extractor in conf["extractors"]:
        # goals() compares the methods by name: this extractor's runs under their method names.
        labels = {Run(method, extractor, conf["keypoints"][0]).label: method for method in conf["methods"]}
        per_extractor[ExtractorSpec.parse(extractor).label] = goals(
            {labels.get(k, k): v for k, v in entries.items() if k in labels},
            {labels[k]: v for k, v in errors.items() if k in labels})
    return entries, per_extractor


def goals(entries: dict[str, dict], errors: dict[str, dict[str, tuple[float, float]]]) -> dict:
    """The issue's targets: refinement never degrades SIFT + PnP (median within 1.25x + 2 mm of
    `sparse`, worse than its starting pose, the `sparse` pose, in at most 5 % of the queries), and
    `dense` reaches 90 % of `sparse`'s recall at (0.25 m, 2 deg) in at most a third of its time."""
    report = {}
    if {"sparse", "sparse+dense"} <= errors.keys():
        sparse, refined = errors["sparse"], errors["sparse+dense"]
        worse = float(np.mean([refined[n][0] > sparse[n][0] + REFINE_TOLERANCE_M for n in sparse]))
        median_sparse, median_refined = entries["sparse"]["median_t_m"], entries["sparse+dense"]["median_t_m"]
        median_ok = median_refined is not None and (
            median_sparse is not None and median_refined <= 1.25 * median_sparse + REFINE_TOLERANCE_M)
        report["refined_worse_than_sparse"] = worse
        report["refinement_never_degrades"] = bool(median_ok and worse <= 0.05)
    if {"sparse", "dense"} <= entries.keys() and "recall" in entries["sparse"]:
        key = recall_key(*RECALL_THRESHOLDS[0])
        recall_sparse, recall_dense = entries["sparse"]["recall"][key], entries["dense"]["recall"][key]
        recall_ratio = recall_dense / recall_sparse if recall_sparse > 0 else None
        time_ratio = entries["dense"]["s_per_query"] / entries["sparse"]["s_per_query"]
        report["dense_recall_over_sparse"] = recall_ratio
        report["dense_time_over_sparse"] = time_ratio
        report["dense_goal_met"] = bool(recall_ratio is not None and recall_ratio >= 0.9 and time_ratio <= 1 / 3)
    return report


@dataclass
class BuiltMaps:
    maps: dict[str, Path]  # keypoint type -> map directory
    stores: dict[tuple[str, str], Path]  # (keypoint type, extractor) -> feature store

    @property
    def map_dir(self) -> Path:
        """The map every alignment runs on, and the ground truth's frame: the first type's."""
        return next(iter(self.maps.values()))


def build(prepared: PreparedSet, work: Path, conf: dict, map_args: list) -> BuiltMaps:
    """`pixloc map` with the first keypoint type as `map_args` say, and with each other type from
    that map's poses; `pixloc features` on the mapping images, once per extractor for the first
    map and with the first extractor for the others (their `sparse` runs need no CNN)."""
    first, *others = conf["keypoints"]
    maps = {first: work / "map"}
    settings = conf["map_conf"].get(prepared.name, [])
    run_pixloc("map", "--images", prepared.mapping_dir, "--out", maps[first], "--keypoints", first, *map_args,
               *(["--conf", *settings] if settings else []))
    priors = [arg for arg in map_args if arg == "--gps-from-exif"]  # the same georegistration
    for kind in others:
        maps[kind] = work / f"map-{kind}"
        run_pixloc("map", "--images", prepared.mapping_dir, "--out", maps[kind], "--keypoints", kind,
                   "--reference-model", maps[first] / MODEL_DIR, "--single-process", *priors)
    stores = {}
    aligned = any(method != "sparse" for method in conf["methods"])  # the runs that use every extractor
    for kind, map_dir in maps.items():
        for extractor in conf["extractors"] if kind == first and aligned else conf["extractors"][:1]:
            spec = ExtractorSpec.parse(extractor)
            name = "store" if extractor == "classic" else f"store-{spec.label}"
            stores[kind, extractor] = work / (name if kind == first else f"{name}-{kind}")
            run_pixloc("features", "--map", map_dir, "--images", prepared.mapping_dir,
                       "--store", stores[kind, extractor], *spec.cli_args(), "--workers", str(conf["workers"]))
    return BuiltMaps(maps, stores)


def lund_pseudo_ground_truth(prepared: PreparedSet, map_dir: Path, work: Path, conf: dict) -> Path:
    """The queries registered into the map with its poses and cameras fixed."""
    poses = register_pseudo_ground_truth(map_dir, Path(conf["data_root"]) / LUND / "images", prepared.query_names,
                                         work / "pseudo_ground_truth")
    gt_path = work / "gt_queries.txt"
    write_poses(gt_path, poses)
    return gt_path


def whole_map_prior(prepared: PreparedSet, map_dir: Path) -> Path:
    """A map-frame prior for queries without GPS: the centroid of the reference cameras, with a
    sigma that reaches every one of them."""
    centers = ReferenceImages.from_scene(SceneMap.load(map_dir, with_descriptors=False)).centers()  # (R, 3)
    centroid = centers.mean(0)
    radius = float(np.linalg.norm(centers - centroid, axis=1).max())
    path = prepared.query_dir.parent / "priors.csv"
    write_priors(path, {name: Prior(tuple(centroid), geodetic=False, sigma_m=radius) for name in prepared.query_names})
    return path


def save_overlay(query_path: Path, pose: Pose, scene: SceneMap, out_path: Path) -> int:
    """Draws the map's 3D points reprojected with `pose` on the query; returns how many land in it."""
    camera = Camera.from_query_intrinsics(query_intrinsics(query_path, None, scene)[0])
    points = torch.from_numpy(np.stack([p.xyz for p in scene.reconstruction.points3D.values()]))  # (P, 3)
    p2d, valid = camera.project(pose.transform(points))  # (P, 2), (P,)
    valid &= camera.in_image(p2d)
    image = Image.open(query_path).convert("RGB")
    draw = ImageDraw.Draw(image)
    for x, y in p2d[valid].tolist():
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(0, 255, 0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    return int(valid.sum())


def bench_set(name: str, conf: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """All runs of one set, {SET: {method: ...}, SET@480px: {method: ...}}, and their goals."""
    work = Path(conf["work_dir"]) / name
    prepare = PREPARERS[name]
    prepared = prepare(conf["data_root"], work / "data", conf["prepare"].get(name))
    small = prepare(conf["data_root"], work / f"data@{conf['small_query_size']}px",
                    {**conf["prepare"].get(name, {}), "query_max_image_size": conf["small_query_size"]})
    if name == "fountain-P11":
        built = build(prepared, work, conf, ["--reference-model", prepared.reference_model])
        gt = read_poses(prepared.gt_poses)
    elif name == "lund":
        built = build(prepared, work, conf, ["--gps-from-exif"])
        gt = read_poses(lund_pseudo_ground_truth(prepared, built.map_dir, work, conf))
    else:
        built = build(prepared, work, conf, [])
        gt = None
        prepared = replace(prepared, priors=whole_map_prior(prepared, built.map_dir))
        small = replace(small, priors=whole_map_prior(small, built.map_dir))
    small_name = f"{name}@{conf['small_query_size']}px"
    query_sets = {name: (prepared, work / "results"), small_name: (small, work / "results_small")}
    report, set_goals = {}, {}
    for run_name, (queries, out_dir) in query_sets.items():
        localize_all(queries, built, out_dir, conf)
        report[run_name], per_extractor = evaluate_set(out_dir, conf, built.map_dir, gt)
        set_goals |= {f"{run_name} {extractor}": goals for extractor, goals in per_extractor.items()}
    if name == "sacre_coeur":
        add_overlays(report[name], prepared, built.map_dir, work)
    return report, set_goals


def add_overlays(methods: dict[str, dict], prepared: PreparedSet, map_dir: Path, work: Path) -> None:
    """Per method that localized the query: an overlay PNG and how many map points land in the image."""
    scene = SceneMap.load(map_dir)
    for method, entry in methods.items():
        poses = successful_poses(read_results(results_dir(work / "results", method)))
        for name, (qvec, tvec) in poses.items():
            pose = Pose.from_qvec_tvec(torch.from_numpy(qvec), torch.from_numpy(tvec))
            path = work / f"overlay_{Path(name).stem}_{method.replace('+', '_')}.png"
            entry["overlay"] = str(path)
            entry["points_in_image"] = save_overlay(prepared.query_dir / name, pose, scene, path)


def print_table(report: dict) -> None:
    header = f"{'set':<22}{'method':<26}{'n':>3}{'med t (m)':>11}{'med R (deg)':>12}" \
             f"{'.25m/2d':>9}{'.5m/5d':>8}{'5m/10d':>8}{'s/query':>9}"
    print(header)
    print("-" * len(header))
    for set_name, methods in report["sets"].items():
        for method, entry in methods.items():
            if "recall" not in entry:
                print(f"{set_name:<22}{method:<26}{entry['n']:>3}  localized {entry['localized']}/{entry['n']}"
                      f"{'':>31}{entry['s_per_query']:>9.2f}")
                continue
            t, R = entry["median_t_m"], entry["median_R_deg"]
            recalls = [100 * v for v in entry["recall"].values()]
            print(f"{set_name:<22}{method:<26}{entry['n']:>3}"
                  f"{'inf' if t is None else f'{t:.4f}':>11}{'inf' if R is None else f'{R:.3f}':>12}"
                  f"{recalls[0]:>8.0f}%{recalls[1]:>7.0f}%{recalls[2]:>7.0f}%{entry['s_per_query']:>9.2f}")
    for set_name, set_goals in report["goals"].items():
        if set_goals:
            print(f"{set_name}: " + ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                                             for key, value in set_goals.items()))


def machine() -> dict:
    """Where the numbers come from: they are CPU timings."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    return {"platform": platform.platform(), "cpu": models[0] if models else platform.processor(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(out: Path | None = None, **conf) -> dict:
    conf = {**default_conf, **conf}
    data_root = Path(conf["data_root"])
    if not data_root.is_dir():
        raise FileNotFoundError(f"{data_root}: real data not found (see DEVELOPERS.md)")
    report = {"sets": {}, "goals": {}, "machine": machine(),
              "pseudo_ground_truth": {"lund": "held-out images registered into the map (COLMAP incremental "
                                              "mapper, map poses and cameras fixed, SIFT matches to the 10 "
                                              "GPS-nearest images, new tracks, bundle adjustment)"}}
    with init_ray(num_cpus=conf["workers"]):
        for name in conf["sets"]:
            sets, set_goals = bench_set(name, conf)
            report["sets"].update(sets)
            report["goals"].update(set_goals)
    print_table(report)
    write_report(report, out)
    return report
