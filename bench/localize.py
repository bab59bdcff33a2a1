"""`pixloc bench localize`: throughput, stage times and accuracy of `pixloc localize`.

On a synthetic scene (built here, with its map and feature store), on a local Ray:

* qps_1_worker, qps_2_workers: queries per second of the whole job (`sparse+dense`), with 1 and
  2 workers (Ray Data start-up and the shard actors' first loads included);
* stage_ms: mean milliseconds per query of each stage (read, CNN, sparse = SIFT + matching + PnP,
  alignment, store I/O = loading cells, amortised over the queries);
* actor_processes, cell_loads, evictions, driver_bytes_per_query, peak_rss_mb (driver, query
  worker, shard actor: measured ru_maxrss) of the timed 2-worker job (its summary.json);
* cached_over_recompute: per query, localization time when the reference features of its nearby
  reference images are recomputed (read, CNN, sampling: what the reference PixLoc does for every
  query) divided by the time with the cached store; both in-process, same alignment;
* methods: the eval dict of each method (dense, sparse, sparse+dense).
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from bench import write_report
from cluster.runtime import init_ray
from cluster.shard_actor import ShardActor, ShardConf
from cluster.store import WIDE_LEVEL
from jobs import features as features_job
from jobs import localize as localize_job
from jobs import map as map_job
from jobs.results import STAGES, read_results, successful_poses
from pixloc_core.align import ReferenceLevel
from pixloc_core.evaluate import evaluate, format_summary
from pixloc_core.extractors import load_extractor
from pixloc_core.io import read_poses, read_priors, read_query_list
from pixloc_core.localize import METHODS, CellData, Planner, QueryInput, WideLevel, localize_in_cell
from pixloc_core.map_io import MapIndex, load_map_index
from pixloc_core.synthetic import dataset

logger = logging.getLogger(__name__)

default_conf = {
    "num_refs": 60,
    "num_queries": 16,
    "width": 640,
    "height": 480,
    "gps_noise_m": 10.0,
    "method": "sparse+dense",  # timed with 1 and 2 workers
    "recompute_queries": 4,  # queries timed in-process for cached vs recomputed reference features
    "recompute_neighbours": 5,  # reference images recomputed per query, as PixLoc's retrieval top-k
    "seed": 1,
    "extractor": "classic",
    "map": {"sift": {"max_num_features": 2048}, "pairs": {"num_neighbors": 5}},  # as the demo's
}


def build_inputs(work_dir: Path, conf: dict) -> tuple[Path, Path, str]:
    """Scene, map and feature store, kept across runs in `work_dir`."""
    scene_dir, map_dir, store_url = work_dir / "scene", work_dir / "map", str(work_dir / "store")
    if not (scene_dir / "gt_queries.txt").is_file():
        dataset.main(scene_dir, {key: conf[key] for key in ("num_refs", "width", "height", "seed")}
                     | {"num_queries": conf["num_queries"], "gps_noise_m": conf["gps_noise_m"]})
    if not (map_dir / "manifest.json").is_file():
        map_job.build_map(scene_dir / "mapping", map_dir, reference_model=scene_dir / "reference_model",
                          priors=read_priors(scene_dir / "mapping_priors.csv"), conf=conf["map"])
    features_job.main(map_dir, scene_dir / "mapping", store_url,
                      conf={"extractor": conf["extractor"]})  # skips what is already stored
    return scene_dir, map_dir, store_url


def run_job(scene_dir: Path, map_dir: Path, store_url: str, out: Path, method: str, workers: int
            ) -> tuple[float, pa.Table, dict]:
    """Seconds of the whole job, its results and its summary."""
    start = time.perf_counter()
    localize_job.main(map_dir, store_url, scene_dir / "queries", out,
                      query_list=scene_dir / "queries_with_intrinsics.txt",
                      priors=scene_dir / "priors.csv", conf={"method": method, "workers": workers})
    return time.perf_counter() - start, read_results(out), localize_job.read_summary(out)


def stage_ms(table: pa.Table) -> dict[str, float]:
    """Mean per query; the store's cell loads happen once per actor, so they are averaged too."""
    return {stage: float(np.nanmean(np.array(table.column(f"{stage}_ms").to_pylist(), dtype=float)))
            for stage in STAGES}


def recomputed_cell(cell: str, image_ids: list[int], map_index: MapIndex, extractor, images_dir: Path,
                    wide_cells: int) -> CellData:
    """What the reference PixLoc does for every query: the reference features of the query's
    nearest reference images computed from their images, instead of read from the store (with
    the wide level when the store has one, `wide_cells`)."""
    sampled = features_job.sample_reference_images(extractor, map_index, images_dir, image_ids, wide_cells)
    levels = {}
    for key in sampled[0][1]:
        points, features, confidences = zip(*[(torch.from_numpy(observed.xyz), *per_image[key])
                                              for observed, per_image in sampled])
        levels[key] = ReferenceLevel(torch.cat(points), torch.cat(features), torch.cat(confidences))
    wide = levels.pop(WIDE_LEVEL, None)
    references = [levels[index] for index in sorted(levels)]
    return CellData(cell, references, [None] * len(references),
                    wide=WideLevel(wide_cells, wide, None) if wide is not None else None)


def cached_vs_recomputed(scene_dir: Path, map_dir: Path, store_url: str, conf: dict) -> dict:
    """Milliseconds per query of the shard's work with cached and with recomputed reference
    features (`dense`, same alignment); runs inside a Ray worker (the shard class expects one)."""
    map_index = load_map_index(map_dir)
    extractor = load_extractor(conf["extractor"]).eval()
    store = localize_job.open_store(store_url, extractor.extractor_id, map_index.fingerprint)
    planner = Planner(map_index, feature_max_size=extractor.max_size)
    intrinsics = read_query_list(scene_dir / "queries_with_intrinsics.txt")
    priors = read_priors(scene_dir / "priors.csv")
    paths = [scene_dir / "queries" / name for name in intrinsics][:conf["recompute_queries"]]  # the listed queries
    shard_conf = ShardConf(with_sparse=False)
    cached = ShardActor(store.url, store.info.extractor_id, store.info.map_fingerprint, shard_conf)
    timings = {"cached": [], "recompute": []}
    for path in paths:
        plan = planner.plan(QueryInput(path.name, str(path), intrinsics[path.name], priors.get(path.name)))
        if plan.error:
            continue
        request, _ = localize_job.query_request(plan, "dense", shard_conf.levels, extractor)
        cell = plan.cells[0]
        cached.localize(cell, request)  # the first call loads the cell; later queries find it in memory
        start = time.perf_counter()
        cached.localize(cell, request)
        timings["cached"].append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        data = recomputed_cell(cell, plan.reference_image_ids[:conf["recompute_neighbours"]], map_index, extractor,
                               scene_dir / "mapping", store.info.wide_cells)
        localize_in_cell(request, data, cached.aligners, shard_conf.localize, cached.sparse_conf)
        timings["recompute"].append(1000 * (time.perf_counter() - start))
    return {name: statistics.mean(values) for name, values in timings.items()}


def main(out: Path | None = None, work_dir: Path | None = None, **conf) -> dict:
    conf = {**default_conf, **conf}
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = Path(work_dir or temporary)
        with init_ray(None, num_cpus=2):
            scene_dir, map_dir, store_url = build_inputs(work_dir, conf)
            ground_truth = read_poses(scene_dir / "gt_queries.txt")
            seconds, methods, tables, summaries = {}, {}, {}, {}
            for method in METHODS:
                out_dir = work_dir / method.replace("+", "_")
                seconds[method], tables[method], summaries[method] = run_job(scene_dir, map_dir, store_url, out_dir,
                                                                             method, 2)
                methods[method] = evaluate(successful_poses(tables[method]), ground_truth)
            one_worker_s, _, _ = run_job(scene_dir, map_dir, store_url, work_dir / "one_worker", conf["method"], 1)
            # in a Ray worker with one CPU, as the shard actors and query workers run
            measure = ray.remote(num_cpus=1)(cached_vs_recomputed)
            per_query = ray.get(measure.remote(scene_dir, map_dir, store_url, conf))
            num_cells = len(load_map_index(map_dir).shards.cell_ids)
    num_queries = len(ground_truth)
    timed = summaries[conf["method"]]
    report = {
        "qps_1_worker": num_queries / one_worker_s,
        "qps_2_workers": num_queries / seconds[conf["method"]],
        "stage_ms": stage_ms(tables[conf["method"]]),
        "cached_over_recompute": per_query["recompute"] / per_query["cached"],
        "actor_processes": timed["actor_processes"],
        "cell_loads": timed["cell_loads"],
        "evictions": timed["evictions"],
        "cells": num_cells,
        "driver_bytes_per_query": timed["driver_bytes_per_query"],
        "peak_rss_mb": {"driver": timed["driver_peak_rss_mb"], "query_worker": timed["query_worker_peak_rss_mb"],
                        "shard_actor": timed["shard_peak_rss_mb"]},
        "methods": methods,
        "details": {"queries": num_queries, "references": conf["num_refs"],
                    "image_size": [conf["width"], conf["height"]], "method_timed": conf["method"],
                    "job_s": seconds, "cached_ms_per_query": per_query["cached"],
                    "recompute_ms_per_query": per_query["recompute"]},
    }
    print_table(report)
    write_report(report, out)
    return report


def print_table(report: dict) -> None:
    details = report["details"]
    print(f"{details['queries']} queries, {details['references']} references, {details['method_timed']}")
    print(f"queries/s: 1 worker {report['qps_1_worker']:.2f}, 2 workers {report['qps_2_workers']:.2f} "
          f"(x{report['qps_2_workers'] / report['qps_1_worker']:.2f})")
    print("ms per query: " + ", ".join(f"{stage} {ms:.0f}" for stage, ms in report["stage_ms"].items()))
    print(f"{report['actor_processes']} shard actors, {report['cell_loads']} cell loads of {report['cells']} cells, "
          f"{report['evictions']} evictions, {report['driver_bytes_per_query']:.0f} driver bytes per query; peak RSS MB "
          + ", ".join(f"{kind} {mb:.0f}" for kind, mb in report["peak_rss_mb"].items()))
    print(f"per query, cached store {details['cached_ms_per_query']:.0f} ms vs recomputing reference features "
          f"{details['recompute_ms_per_query']:.0f} ms: x{report['cached_over_recompute']:.1f}")
    for method, summary in report["methods"].items():
        print(format_summary(summary, method))
