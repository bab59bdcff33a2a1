"""`pixloc bench mapping`: distributed mapping on synthetic cities of growing size.

Per city (`pixloc synth --blocks WxH`, one reference per 2.52 m of street) and number of Ray
workers, `pixloc map --reference-model` runs in a subprocess whose process tree (driver, raylet,
workers) is sampled from /proc: wall time, CPU-seconds per image (all processes), peak RSS per
process (VmHWM: the driver and the largest worker). The merged map is checked against the true
scene (point error: |estimated - true depth| at sampled observations, raycast in the true scene),
and the single-process map (`--single-process`) runs beside it up to `single_process_max_refs`.
Update: the map of the western part of the first city, then `pixloc map --update` with the rest,
against the from-scratch build: registered images, wall time, camera centre error of the new
images; and `pixloc features` into one store before and after the update: its wall time each time,
the fraction of the store's partitions the update left untouched, and the images read again.
Lund: `pixloc map --gps-from-exif` in SfM submodels on Ray (submodels.py) and `--single-process`
(one SfM): registered photos, GPS residuals, and how far the two maps' cameras lie apart after the
similarity that best aligns them, also for the submodels merged with a bundle adjustment per cell
(`submodels.adjust_cells=true`, resumed from the same submodels); and `pixloc bench real`'s Lund
runs (held-out photos localized against the pseudo ground truth registered into each map) on a map
of each kind.

JSON: {"sizes": [{"refs", "workers", "wall_s", "cpu_s_per_image", "peak_rss_mb": {"driver",
"worker"}, "point_error_m", "single_process_wall_s"}], "lund": {"registered", "residual_median_m",
"residual_max_m", "single_process": {...}, "camera_agreement_m": {...}, "cells_adjusted": {"registered",
..., "camera_agreement_m"}, "localization": {"submodels",
"single_process": bench real's "sets"}, ...}, "update": {...}}
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pycolmap

from cluster.store import MANIFEST_FILE, FeatureStore
from bench import real
from pixloc_core.evaluate import RECALL_THRESHOLDS, recall_key
from pixloc_core.map_io import SceneMap
from pixloc_core.images import list_images
from pixloc_core.mapping import submodels, triangulation
from pixloc_core.synthetic import PinholeIntrinsics, SceneConfig, build_scene, dataset, raycast

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
default_conf = {
    "quick": False,
    "blocks": [[2, 1], [4, 2], [6, 4]],  # about 150, 520 and 1,100 references
    "workers": [1, 2],
    "num_refs": None,  # None: the city's own density; a number: that many (CI smoke test)
    "width": 320,
    "height": 240,
    "single_process_max_refs": 600,
    "update": True,
    "update_fraction": 0.35,  # the eastern part of the first city, added by --update
    "depth_samples_per_image": 50,
    "depth_images": 12,
    # Lund (../shared/data): SfM from its images and EXIF GPS, in submodels on Ray and in one process
    "lund": True,
    "lund_images": ROOT.parent / "shared" / "data" / "opensfm" / "lund" / "images",
    "lund_max_image_size": 640,
    "lund_max_num_features": 2048,
    "lund_localization": True,  # bench real's Lund runs on a submodel map and on one SfM's (minutes)
}
# Under 15 minutes: two small cities, and Lund's three maps without bench real's localization on
# two of them (about half of the full run's Lund time).
QUICK = {"blocks": [[1, 1], [2, 1]], "workers": [1, 2], "single_process_max_refs": 200, "lund_localization": False}


def descendants(pid: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class ProcessTreeMonitor:
    """Samples a process and its descendants: CPU seconds (last seen per process) and VmHWM."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s = pid, interval_s
        self.cpu_s: dict[int, float] = {}
        self.peak_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                self.cpu_s[pid] = (int(fields[11]) + int(fields[12])) / ticks
                status = Path(f"/proc/{pid}/status").read_text()
                hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
                self.peak_mb[pid] = int(hwm.split()[1]) / 1024
            except (OSError, StopIteration, IndexError, ValueError):
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()


def run_pixloc(*args: str) -> dict:
    """`pixloc ARGS` in a subprocess; its wall time, CPU seconds and peak RSS per process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    monitor = ProcessTreeMonitor(process.pid)
    _, stderr = process.communicate()
    monitor.stop()
    if process.returncode:
        raise RuntimeError(f"pixloc {' '.join(map(str, args))} failed: {stderr[-2000:]}")
    workers = [mb for pid, mb in monitor.peak_mb.items() if pid != process.pid]
    return {"wall_s": time.perf_counter() - start, "cpu_s": sum(monitor.cpu_s.values()),
            "peak_rss_mb": {"driver": monitor.peak_mb.get(process.pid, 0.0), "worker": max(workers, default=0.0)}}


def point_error_m(map_dir: Path, scene_dir: Path, conf: dict) -> float:
    """Median |estimated - true depth| (m) at observations of sampled images, the true depth
    raycast in the synthetic scene."""
    summary = json.loads((scene_dir / "scene.json").read_text())
    scene = build_scene(SceneConfig(seed=summary["seed"], blocks_x=summary["conf"]["blocks"][0],
                                    blocks_y=summary["conf"]["blocks"][1]))
    camera = PinholeIntrinsics(conf["width"], conf["height"], *summary["camera"]["params"])
    reconstruction = SceneMap.load(map_dir, with_descriptors=False).reconstruction
    errors = []
    images = list(reconstruction.images.values())
    for image in images[::max(1, len(images) // conf["depth_images"])]:
        pose = image.cam_from_world()
        true_depth = raycast(scene, camera, pose.rotation.matrix(), pose.translation).depth
        observed = [p for p in image.points2D if p.has_point3D()][:conf["depth_samples_per_image"]]
        for point2D in observed:
            depth = (pose * reconstruction.points3D[point2D.point3D_id].xyz)[2]
            column, row = np.clip(np.floor(point2D.xy).astype(int), 0, [conf["width"] - 1, conf["height"] - 1])
            window = true_depth[max(row - 1, 0):row + 2, max(column - 1, 0):column + 2]
            with np.errstate(invalid="ignore"):
                errors.append(float(np.nanmin(np.abs(depth - window))))
    return float(np.median(errors)) if errors else float("nan")


def map_args(scene_dir: Path, out: Path, workers: int, reference: Path | None = None) -> list[str]:
    return ["map", "--images", scene_dir / "mapping", "--out", out, "--reference-model",
            reference or scene_dir / "reference_model", "--priors", scene_dir / "mapping_priors.csv",
            "--workers", str(workers)]


def partition_manifests(store_dir: Path) -> dict[str, bytes]:
    """Each published partition's manifest, by path: a partition the update left alone keeps its bytes."""
    return {str(path.relative_to(store_dir)): path.read_bytes() for path in store_dir.glob(f"cell=*/level=*/{MANIFEST_FILE}")}


def measure_update(scene_dir: Path, work: Path, full_map: Path, conf: dict) -> dict:
    reference = pycolmap.Reconstruction()
    reference.read(scene_dir / "reference_model")
    centers = {image.name: image.projection_center() for image in reference.images.values()}
    threshold = np.quantile([c[0] for c in centers.values()], 1 - conf["update_fraction"])
    west = {name for name, center in centers.items() if center[0] < threshold}
    (work / "west_model").mkdir(parents=True, exist_ok=True)
    triangulation.skeleton_from_reference(reference, west).write(work / "west_model")
    map_dir, store_dir = work / "updated", work / "store"
    features_args = ["features", "--map", map_dir, "--images", scene_dir / "mapping", "--store", store_dir,
                     "--workers", "2"]
    run_pixloc(*map_args(scene_dir, map_dir, 2, work / "west_model"))
    features_map_s = run_pixloc(*features_args)["wall_s"]
    before = partition_manifests(store_dir)
    timed = run_pixloc("map", "--update", map_dir, "--images", scene_dir / "mapping", "--reference-model",
                       scene_dir / "reference_model", "--workers", "2")
    features_update_s = run_pixloc(*features_args)["wall_s"]
    after = partition_manifests(store_dir)
    updated = SceneMap.load(map_dir, with_descriptors=False)
    entry = updated.manifest["updates"][-1]
    store = FeatureStore.open(str(store_dir), map_fingerprint=updated.fingerprint)
    full = SceneMap.load(full_map, with_descriptors=False).reconstruction
    errors = [np.linalg.norm(updated.reconstruction.find_image_with_name(name).projection_center() - centers[name])
              for name in set(centers) - west if updated.reconstruction.find_image_with_name(name) is not None]
    return {"new_images": entry["new_images"], "registered": entry["registered"], "wall_s": timed["wall_s"],
            "cpu_s_per_new_image": timed["cpu_s"] / max(entry["new_images"], 1),
            "partitions_reused_fraction": sum(after[path] == before.get(path) for path in after) / max(len(after), 1),
            "features_wall_s": {"map": features_map_s, "update": features_update_s},
            # the commits left after the store followed the update are those of the images read again
            "images_reextracted": len({i for commit in store.commits() for i in commit.image_ids}),
            "images": updated.reconstruction.num_reg_images(),
            "camera_error_m": float(np.median(errors)) if errors else None,
            "points_updated": updated.reconstruction.num_points3D(), "points_from_scratch": full.num_points3D()}


def sfm_summary(map_dir: Path) -> dict:
    scene_map = SceneMap.load(map_dir, with_descriptors=False)
    registration = scene_map.geo.registration
    return {"registered": scene_map.reconstruction.num_reg_images(), "points": scene_map.reconstruction.num_points3D(),
            "residual_median_m": registration["median_residual_m"], "residual_max_m": registration["max_residual_m"]}


def camera_agreement_m(map_dir: Path, other_dir: Path) -> dict:
    """Camera centre distances between two maps of the same photos after the similarity that best
    aligns the first to the second (their common images): how far one SfM's shape is from the other's."""
    first, second = (submodels.posed_images(SceneMap.load(path, with_descriptors=False).reconstruction)
                     for path in (map_dir, other_dir))
    found = submodels.relative_similarity(first, {name: image.cam_from_world() for name, image in second.items()},
                                          {**submodels.default_conf, "max_alignment_error_m": np.inf})
    if found is None:
        return {"common": 0, "median": None, "max": None}
    similarity = found[0]
    common = sorted(set(first) & set(second))
    distances = np.linalg.norm(similarity * np.stack([first[name].projection_center() for name in common])
                               - np.stack([second[name].projection_center() for name in common]), axis=1)
    return {"common": len(common), "median": float(np.median(distances)), "max": float(np.max(distances))}


SPLIT_INTO_SUBMODELS = "submodels.single_sfm_max_images=0"  # however few the photos


def lund_localization(work: Path) -> dict:
    """bench real's Lund sets (full size and small queries) on a map built in submodels on Ray and
    on one built by one SfM: does localization against the merged map work as well?"""
    return {build: real.main(sets=("lund",), work_dir=work / f"real_{build}",
                             map_conf={"lund": settings})["sets"]
            for build, settings in (("submodels", [SPLIT_INTO_SUBMODELS]), ("single_process", []))}


def measure_lund(work: Path, conf: dict) -> dict:
    """SfM of Lund's photos from their EXIF GPS in submodels on Ray, against one SfM in one process."""
    images = Path(conf["lund_images"])
    args = ["map", "--images", images, "--gps-from-exif", "--max-image-size", str(conf["lund_max_image_size"]),
            "--conf", f"sift.max_num_features={conf['lund_max_num_features']}"]
    in_cells = run_pixloc(*args, SPLIT_INTO_SUBMODELS, "--out", work / "lund_cells", "--workers", "2")
    single = run_pixloc(*args, "--out", work / "lund_single", "--single-process")
    # The same submodels merged again with a bundle adjustment per cell (a copy: the run resumes them)
    if not (work / "lund_cells_adjusted").is_dir():
        shutil.copytree(work / "lund_cells", work / "lund_cells_adjusted")
    adjusted = run_pixloc(*args, SPLIT_INTO_SUBMODELS, "submodels.adjust_cells=true", "--out",
                          work / "lund_cells_adjusted", "--workers", "2")
    manifest = json.loads((work / "lund_cells" / "manifest.json").read_text())
    return {**sfm_summary(work / "lund_cells"), "images": len(list_images(images)), "wall_s": in_cells["wall_s"],
            "peak_rss_mb": in_cells["peak_rss_mb"], "submodels": manifest["submodels"],
            "failed_cells": manifest["failed_cells"],
            "single_process": {**sfm_summary(work / "lund_single"), "wall_s": single["wall_s"],
                               "peak_rss_mb": single["peak_rss_mb"]},
            "camera_agreement_m": camera_agreement_m(work / "lund_cells", work / "lund_single"),
            "cells_adjusted": {**sfm_summary(work / "lund_cells_adjusted"), "wall_s": adjusted["wall_s"],
                               "camera_agreement_m": camera_agreement_m(work / "lund_cells_adjusted",
                                                                        work / "lund_single")},
            "localization": lund_localization(work) if conf["lund_localization"] else None}


def main(out: Path | None = None, work_dir: Path | None = None, **conf) -> dict:
    conf = {**default_conf, **(QUICK if conf.get("quick") else {}), **conf}
    pycolmap.logging.minloglevel = 2
    report = {"sizes": [], "lund": None, "update": None, "uptime": os.getloadavg()}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(work_dir or temporary)
        first_map = None
        for blocks in conf["blocks"]:
            scene_dir = work / f"city_{blocks[0]}x{blocks[1]}"
            if not (scene_dir / "reference_model").is_dir():
                dataset.main(scene_dir, {"blocks": tuple(blocks), "num_refs": conf["num_refs"], "num_queries": 0,
                                         "width": conf["width"], "height": conf["height"]})
            refs = json.loads((scene_dir / "scene.json").read_text())["num_refs"]
            single_s = None
            if refs <= conf["single_process_max_refs"]:
                single_s = run_pixloc(*map_args(scene_dir, work / f"single_{refs}", 1), "--single-process")["wall_s"]
            for workers in conf["workers"]:
                map_dir = work / f"map_{refs}_{workers}"
                timed = run_pixloc(*map_args(scene_dir, map_dir, workers))
                first_map = first_map or (scene_dir, map_dir)
                row = {"refs": refs, "workers": workers, "wall_s": timed["wall_s"],
                       "cpu_s_per_image": timed["cpu_s"] / refs, "peak_rss_mb": timed["peak_rss_mb"],
                       "point_error_m": point_error_m(map_dir, scene_dir, conf),
                       "single_process_wall_s": single_s}
                report["sizes"].append(row)
                logger.info("%s", row)
        if conf["update"] and first_map:
            # per city: a later run in the same work_dir on another city must not resume this one's update
            report["update"] = measure_update(first_map[0], work / f"update_{first_map[0].name}", first_map[1], conf)
        if conf["lund"]:
            if not Path(conf["lund_images"]).is_dir():
                raise FileNotFoundError(f"{conf['lund_images']}: Lund's photos not found (lund=false skips them)")
            report["lund"] = measure_lund(work, conf)
    print_table(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report


def print_table(report: dict) -> None:
    print(f"{'refs':>6} {'workers':>7} {'wall s':>8} {'CPU s/img':>9} {'RSS driver MB':>13} {'RSS worker MB':>13} "
          f"{'point err m':>11} {'1-process s':>11}")
    for row in report["sizes"]:
        single = f"{row['single_process_wall_s']:.1f}" if row["single_process_wall_s"] else "-"
        print(f"{row['refs']:>6} {row['workers']:>7} {row['wall_s']:>8.1f} {row['cpu_s_per_image']:>9.2f} "
              f"{row['peak_rss_mb']['driver']:>13.0f} {row['peak_rss_mb']['worker']:>13.0f} "
              f"{row['point_error_m']:>11.3f} {single:>11}")
    if report["update"]:
        print("update:", json.dumps(report["update"]))
    if report["lund"]:
        lund, single = report["lund"], report["lund"]["single_process"]
        print(f"{'Lund SfM':<16} {'registered':>10} {'points':>7} {'GPS residual median/max m':>26} {'wall s':>7}")
        for label, row in (("submodels on Ray", lund), ("one process", single)):
            print(f"{label:<16} {row['registered']:>6}/{lund['images']:<3} {row['points']:>7} "
                  f"{row['residual_median_m']:>12.2f} / {row['residual_max_m']:<11.2f} {row['wall_s']:>7.1f}")
        agreement, adjusted = lund["camera_agreement_m"], lund["cells_adjusted"]
        print(f"cameras of the two after a similarity: median {agreement['median']:.3f} m, max {agreement['max']:.3f} m "
              f"({agreement['common']} common); submodels {lund['submodels']}, rejected {len(lund['failed_cells'])}")
        print(f"with a bundle adjustment per cell (submodels.adjust_cells=true, resumed: {adjusted['wall_s']:.1f} s): "
              f"median {adjusted['camera_agreement_m']['median']:.3f} m, max {adjusted['camera_agreement_m']['max']:.3f} m "
              f"from one process's; GPS residual {adjusted['residual_median_m']:.2f} / {adjusted['residual_max_m']:.2f} m")
        threshold = RECALL_THRESHOLDS[1]
        for build, sets in (lund["localization"] or {}).items():
            for set_name, methods in sets.items():
                print(f"localization on the {build} map, {set_name}, recall {threshold[0]:g} m / {threshold[1]:g} deg "
                      "(precision): " + ", ".join(
                          f"{method} {100 * entry['recall'][recall_key(*threshold)]:.0f}% ({percent(entry['precision'])})"
                          for method, entry in methods.items() if "recall" in entry))


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"
