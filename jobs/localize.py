"""`pixloc localize`: localize a folder of photos from their GPS priors, on Ray.

    driver               what is known per query before reading it, as Arrow columns (the query
                         table: name, path, prior or EXIF, listed intrinsics), in spatial order,
                         handed to Ray Data in blocks; results written as they come
    query workers        Ray Data callable class, a pool of `workers`: each row made a QueryInput and
                         planned (pixloc_core.localize.Planner: intrinsics, prior -> map frame,
                         cells, hypotheses), read, query CNN pass (dense methods) and keypoints
                         (sparse methods), then the query's request to the shard actor of each of
                         its cells, by object reference
    shard actors         a bounded pool (`--shard-actors`), each hosting several cells in memory:
                         SIFT + PnP and featuremetric alignment in the cell (localize_in_cell)
    back in the worker   the best of the cells' answers: one small row per query to the driver

Planning streams: the first rows come back while later blocks wait to be planned, and the driver
holds columns, not one Python object per query. The feature pyramid of a query never goes through
the driver, and no process but `pixloc features` reads the whole map's points or descriptors: the
workers plan from the compact map (shard index and reference table), the actors read their cells
from the store. Every query gets exactly one row: bad input, a corrupt image, a failed alignment or
a crashed call become `success=false` with the reason. `pixloc refine` runs the same pipeline from external poses.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from tqdm import tqdm

from cluster.errors import classify
from cluster.router import PoolConf, ShardClient, ShardPool
from cluster.runtime import gpus_per_worker, init_ray, peak_rss_mb, set_torch_threads
from cluster.shard_actor import CellAnswer, ShardConf
from cluster.store import FeatureStore
from pixloc_core import files, sparse
from pixloc_core.extractors import load_extractor
from pixloc_core.extractors.base import Extractor, resized
from pixloc_core.extractors.keypoints import DetectorExtractor
from pixloc_core.files import Location
from pixloc_core.images import list_images, read_image
from pixloc_core.io import read_priors_table, read_query_list_table
from pixloc_core.localize import (DENSE_METHODS, METHODS, SPARSE_METHODS, TRUST_PRIOR, UNVERIFIED_ALIGNMENT_METHODS,
                                  Localization, PlanConf, Planner, QueryInput, QueryPlan, QueryRequest, SearchConf,
                                  VerifyConf, best_of, feature_scale, query_positions, query_table, search_on, spatial_order)
from pixloc_core.map_io import MapIndex, load_map_index

from .cli import Interrupted
from .config import merge_conf
from .results import ResultsWriter, check_output, completed_names, read_results

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"

default_conf = {
    "extractor": None,  # None: the one the store was extracted with (its name; `checkpoint` for other weights)
    "checkpoint": None,  # the extractor's weights file (its learned dampings go to the shards' aligners)
    "method": "sparse+dense",
    "workers": 2,
    # Queries per worker call: each is sent to its shards as soon as it is featurized, so the
    # shards align up to this many queries per worker while the worker featurizes the next ones.
    "queries_per_call": 4,
    # Ray Data blocks of the query table per worker (see block_rows): each worker call plans only
    # its own queries and its rows stream back, so the first rows come back after one call
    # whatever the number of queries.
    "blocks_per_worker": 16,
    "flush_every": 8,  # rows per results part file
    "search": SearchConf(),
    # Resize each query so that its focal length in pixels matches the nearby references' stored
    # features (pixloc_core.localize.feature_scale); false: only down to the extractor's max_size.
    "match_reference_scale": True,
    "pool": PoolConf(),
    "shard": ShardConf(),  # levels, alignment, memory budget and the per-query policy (LocalizeConf)
    "sparse": {},  # overrides of pixloc_core.sparse.default_conf (keypoints in the worker, PnP in the shard)
}


@dataclass
class _Started:
    """A query whose first shard call is out."""

    plan: QueryPlan
    timings: dict = field(default_factory=dict)
    request: ray.ObjectRef | None = None  # the QueryRequest, put once for every cell's shard
    first_call: ray.ObjectRef | None = None  # future CellAnswer of plan.cells[0]
    error: str = ""
    retryable: bool = False  # the error came from the infrastructure


def result_row(plan: QueryPlan, method: str, localization: Localization, timings: dict, cell: str = "") -> dict:
    """One results row: the localization with its check values (verified in the shard), the prior
    and what planning noted."""
    row = {"name": plan.name, "method": method, "cell": cell, **localization.to_dict(), **timings}
    row["prior_xyz"] = None if plan.prior_xyz is None else plan.prior_xyz.tolist()
    row["note"] = plan.note
    return row


def query_request(plan: QueryPlan, method: str, levels: tuple[int, ...], extractor=None,
                  keypoint_extractor=None) -> tuple[QueryRequest, dict]:
    """The query's pixels turned into what its shards need (the pyramid's `levels` when there is
    an extractor, keypoints when there is a keypoint extractor), and the times that took."""
    timings = {"cnn_ms": 0.0, "sparse_ms": 0.0}
    start = time.perf_counter()
    image = read_image(files.location(plan.path))
    timings["read_ms"] = 1000 * (time.perf_counter() - start)
    pixels = {}
    if extractor is not None:
        start = time.perf_counter()
        tensor, scale = resized(image, feature_scale(plan.intrinsics, plan.reference_focal_px, extractor.max_size))
        if isinstance(extractor, DetectorExtractor) and method in UNVERIFIED_ALIGNMENT_METHODS:
            pyramid, (keypoints,) = extractor.extract_with_keypoints(tensor[None])
            pixels["dense_keypoints"] = sparse.QueryKeypoints(keypoints.xy.cpu().double().numpy(),
                                                              keypoints.descriptors.cpu().half().numpy())
        else:
            pyramid = extractor.extract(tensor[None])
        kept = [pyramid[index] for index in levels]
        # (h, w, C): channel-last, as the alignment reads it; one copy with the conversion
        pixels.update(pyramid_scale=float(scale), strides=[level.stride for level in kept],
                      features=[level.features[0].permute(1, 2, 0).to(
                          "cpu", torch.float16, memory_format=torch.contiguous_format).numpy() for level in kept],
                      confidences=[level.confidence[0].cpu().half().numpy() for level in kept])
        timings["cnn_ms"] = 1000 * (time.perf_counter() - start)
    if keypoint_extractor is not None:
        start = time.perf_counter()
        pixels["keypoints"] = sparse.extract_query_keypoints(keypoint_extractor, image)
        timings["sparse_ms"] = 1000 * (time.perf_counter() - start)
    return QueryRequest.from_plan(plan, method, **pixels), timings


class QueryWorker:
    """Ray Data callable class: a batch of query-table rows in, one result row each out. Holds the
    planner (compact map), the query extractor or keypoint extractor, and handles on the shards."""

    def __init__(self, map_dir: str, plan_conf: PlanConf, method: str, extractor_name: str, checkpoint: str | None,
                 levels: tuple[int, ...], sparse_conf: dict, shard_names: list[str]):
        threads = set_torch_threads()
        self.method, self.levels = method, levels
        self.extractor = load_extractor(extractor_name, checkpoint).eval() if method in DENSE_METHODS else None
        self.planner = Planner(load_map_index(map_dir), plan_conf,
                               self.extractor.max_size if self.extractor is not None else None)
        self.keypoints = None
        if method in SPARSE_METHODS:
            conf = {**sparse.default_conf, **sparse_conf}
            self.keypoints = sparse.keypoint_extractor({**conf, "sift": {**conf["sift"], "num_threads": threads}})
        self.shards = ShardClient(shard_names)

    def start(self, query: QueryInput) -> _Started:
        started = _Started(self.planner.plan(query))
        if started.plan.error:
            started.error, started.retryable = started.plan.error, started.plan.retryable
            return started
        try:
            request, started.timings = query_request(started.plan, self.method, self.levels, self.extractor,
                                                     self.keypoints)
        except Exception as error:  # noqa: BLE001 - any failure of one query is its result, not the job's
            failure = classify(error)
            started.error, started.retryable = failure.message, failure.retryable
            return started
        started.request = ray.put(request)
        started.first_call = self.shards.submit(started.plan.cells[0], started.request)
        return started

    def answer(self, cell: str, call: ray.ObjectRef) -> CellAnswer:
        try:
            return ray.get(call)
        except ray.exceptions.RayError as error:
            failure = classify(error)
            return CellAnswer(cell, Localization.failure(failure.message, failure.retryable), {}, math.nan)

    def finish(self, started: _Started) -> dict:
        if started.error:
            failure = Localization.failure(started.error, started.retryable)
            return {**result_row(started.plan, self.method, failure, started.timings),
                    "worker_peak_rss_mb": peak_rss_mb()}
        answers = [self.answer(started.plan.cells[0], started.first_call)]
        for rank, cell in enumerate(started.plan.cells[1:], start=1):
            if not search_on([answer.localization for answer in answers]):
                break
            answers.append(self.answer(cell, self.shards.submit(cell, started.request, rank)))
        best = best_of([answer.localization for answer in answers])
        cell = next(answer.cell for answer in answers if answer.localization is best)
        timings = {**started.timings, "load_ms": 0.0, "align_ms": 0.0}
        for answer in answers:
            for stage, ms in answer.timings.items():
                timings[stage] += ms
        return {**result_row(started.plan, self.method, best, timings, cell), "worker_peak_rss_mb": peak_rss_mb(),
                "shard_peak_rss_mb": max(answer.peak_rss_mb for answer in answers)}

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        started = [self.start(QueryInput.from_row(row)) for row in batch.to_pylist()]
        return {"row": [self.finish(query) for query in started]}


# ----- the driver


def query_names(queries_dir: Location, listed: pa.Table | None) -> pa.Array:
    """The queries: those of the query list when given, else every image of the folder. A query's
    name in rows, poses.txt and the input lists is its path relative to the queries folder
    (subfolders kept, hloc style), with forward slashes."""
    if listed is not None:
        return listed["name"].combine_chunks()
    return pa.array(list_images(queries_dir), pa.string())


def spatial_schedule(queries: pa.Table, map_index: MapIndex) -> pa.Table:
    """The queries in spatial order of their priors (those known before reading the images: a
    priors file or poses to refine; the others keep their order, at the end), so that each cell's
    queries come together and a job loads each cell about once."""
    order = spatial_order(query_positions(queries, map_index),
                          map_index.shards.cell_size_m if map_index.shards else 50.0)
    return queries.take(order)


def skip_completed(queries: pa.Table, out_dir: Location) -> pa.Table:
    """The queries a resumed job still has to answer (see results.completed_names)."""
    return queries.filter(pc.invert(pc.is_in(queries["name"], value_set=completed_names(out_dir))))


def block_rows(count: int, conf: dict) -> int:
    """Queries per Ray Data block. A worker runs a block as one task, so each worker needs several;
    but the dataset is ready only once a task per block has read its metadata (ray.data.from_arrow),
    so their number stays fixed whatever the number of queries."""
    return max(conf["queries_per_call"], math.ceil(count / (conf["blocks_per_worker"] * conf["workers"])))


def query_dataset(queries: pa.Table, conf: dict) -> ray.data.Dataset:
    """The query table as a Ray dataset of blocks of `block_rows`, each a compact copy: a slice
    keeps the whole table's buffers, and ray.put would copy them all for every block."""
    rows = block_rows(queries.num_rows, conf)
    return ray.data.from_arrow([queries.take(np.arange(offset, min(offset + rows, queries.num_rows)))
                                for offset in range(0, queries.num_rows, rows)])


def execute(queries: pa.Table, writer: ResultsWriter, map_dir: Location, store: FeatureStore, conf: dict,
            plan_conf: PlanConf, on_result: Callable[[dict], None] | None = None) -> dict:
    """Run the queries (a query table) through the query workers and a pool of shard actors, one
    row each into `writer`; returns the job summary. Needs an initialised Ray."""
    method, workers = conf["method"], conf["workers"]
    shard_conf = replace(conf["shard"], sparse=dict(conf["sparse"] or {}), with_sparse=method in SPARSE_METHODS,
                         with_wide=method in conf["shard"].localize.second_stage_methods)
    pool = ShardPool(store.url, store.info.extractor_id, store.info.map_fingerprint, shard_conf, conf["pool"])
    progress = tqdm(total=queries.num_rows, desc=f"localize ({method})", unit="query", smoothing=0.1)
    start = time.perf_counter()
    # Driver traffic: the query table sent (its Arrow bytes) and the result batches received.
    sent, received, succeeded = queries.nbytes, 0, 0
    worker_rss = []
    try:
        if queries.num_rows:
            dataset = query_dataset(queries, conf).map_batches(
                QueryWorker,
                fn_constructor_kwargs={"map_dir": files.absolute(map_dir), "plan_conf": plan_conf,
                                       "method": method, "extractor_name": conf["extractor"],
                                       "checkpoint": conf["checkpoint"],
                                       "levels": tuple(shard_conf.levels), "sparse_conf": shard_conf.sparse,
                                       "shard_names": pool.names},
                batch_size=conf["queries_per_call"], batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                num_gpus=gpus_per_worker({"workers": workers}))
            # Rows are ~1 KB: without this, Ray Data would gather a whole block's rows into one
            # output block before handing any of them back.
            dataset.context.target_max_block_size = 1
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                received += batch.nbytes
                for row in batch["row"].to_pylist():
                    succeeded += bool(row["success"])
                    worker_rss.append(row["worker_peak_rss_mb"])
                    writer.add(row)
                    progress.update(1)
                    if on_result is not None:
                        on_result(row)
        seconds = time.perf_counter() - start
        count = queries.num_rows
        summary = {"queries": count, "succeeded": succeeded, "method": method, "workers": workers,
                   "seconds": seconds, "queries_per_s": count / seconds if seconds > 0 else math.nan,
                   "driver_bytes_per_query": (sent + received) / max(1, count),
                   "driver_peak_rss_mb": peak_rss_mb(),
                   "query_worker_peak_rss_mb": max(worker_rss, default=math.nan), **pool.summary()}
    finally:
        writer.flush()  # the rows so far, also when the driver is failing
        progress.close()
        pool.shutdown()
    return summary


def open_store(store_url: str, extractor_id: str | None = None, map_fingerprint: str | None = None) -> FeatureStore:
    """The store of the map and extractor (None: any); a local path made absolute, since shard
    actors open it again from their own working directory."""
    if "://" not in store_url:
        store_url = str(Path(store_url).expanduser().resolve())
    return FeatureStore.open(store_url, extractor_id, map_fingerprint)


def with_learned_dampings(shard: ShardConf, extractor: Extractor) -> ShardConf:
    """The shards' conf with the dampings that came with the extractor's weights, unless the
    conf sets its own."""
    if extractor.dampings is None or shard.dampings is not None:
        return shard
    return replace(shard, dampings=tuple(tuple(row) for row in extractor.dampings.tolist()))


def store_keypoints(sparse_conf: dict, store: FeatureStore) -> dict:
    """The sparse conf with the keypoint type of the store's points: queries are described as the
    map was."""
    stored = store.info.sparse_keypoints
    if not stored:
        raise ValueError(f"{store.url}: the store has no sparse partitions, which the sparse methods need "
                         "(written before they existed, or from a map without descriptors: rerun `pixloc features` "
                         "into a new store)")
    if sparse_conf.get("keypoints", stored) != stored:
        raise ValueError(f"{store.url}: the map's points carry {stored} descriptors, not "
                         f"sparse.keypoints={sparse_conf['keypoints']}")
    return {**sparse_conf, "keypoints": stored}


def run_queries(map_dir: Location, store_url: str, queries: pa.Table, writer: ResultsWriter, conf: dict,
                plan_conf: PlanConf, address: str | None,
                on_result: Callable[[dict], None] | None = None) -> dict:
    """The job body shared by localize and refine: open the map and store, schedule, run; writes
    and logs the summary (OUT/summary.json)."""
    map_index = load_map_index(map_dir)
    checkpoint = None if conf["checkpoint"] is None else files.absolute(conf["checkpoint"])  # for every worker
    store = open_store(store_url)
    name = conf["extractor"] or store.info.extractor_name
    extractor = load_extractor(name, checkpoint)
    store.require(extractor.extractor_id, map_index.fingerprint)
    conf = {**conf, "extractor": name, "checkpoint": checkpoint,
            "shard": with_learned_dampings(conf["shard"], extractor)}
    if conf["method"] in SPARSE_METHODS:
        conf = {**conf, "sparse": store_keypoints(conf["sparse"] or {}, store)}
    queries = spatial_schedule(queries, map_index)
    with init_ray(address, num_cpus=None if address else conf["workers"]):
        summary = execute(queries, writer, map_dir, store, conf, plan_conf, on_result)
    table = writer.close()
    summary["results"] = table.num_rows
    files.write_text(writer.out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    logger.info("%d/%d queries localized in %.1f s (%.2f/s) -> %s; %d shard actors, %d cell loads, %d evictions, "
                "%.0f driver bytes per query; peak RSS MB: driver %.0f, query worker %.0f, shard %.0f",
                summary["succeeded"], summary["queries"], summary["seconds"], summary["queries_per_s"],
                writer.out_dir, summary["actor_processes"], summary["cell_loads"], summary["evictions"],
                summary["driver_bytes_per_query"], summary["driver_peak_rss_mb"],
                summary["query_worker_peak_rss_mb"], summary["shard_peak_rss_mb"])
    return summary


def read_summary(out_dir: Location) -> dict:
    """The summary of the last localize/refine run into `out_dir`."""
    return json.loads(files.read_text(files.location(out_dir) / SUMMARY_FILE))


def main(map_dir: Location, store_url: str, queries_dir: Location, out_dir: Location,
         query_list: Location | None = None, priors: Location | None = None, gps_from_exif: bool = False, resume: bool = False,
         address: str | None = None, conf: dict | None = None,
         on_result: Callable[[dict], None] | None = None, overwrite: bool = False) -> Location:
    """Localize the queries of `queries_dir` into `out_dir`; returns the path of results.parquet.
    Every input is read and checked before anything is written; RetryableFailures when some queries
    failed because of the infrastructure (their rows say so, `--resume` retries them)."""
    conf = merge_conf(default_conf, conf)
    if conf["method"] not in METHODS:
        raise ValueError(f"unknown method {conf['method']!r}, expected one of {METHODS}")
    if priors is None and not gps_from_exif:
        raise ValueError("priors needed: pass --priors CSV or --gps-from-exif")
    check_output(out_dir, resume, overwrite)
    listed = read_query_list_table(query_list) if query_list is not None else None
    priors_table = read_priors_table(priors) if priors else None
    queries_dir = files.location(queries_dir)
    queries = query_table(query_names(queries_dir, listed), files.absolute(queries_dir), listed, priors_table,
                          prior_from_exif=priors_table is None)
    plan_conf = PlanConf(conf["search"], conf["shard"].localize.num_reference_hypotheses,
                         match_reference_scale=conf["match_reference_scale"])
    return run_job(map_dir, store_url, queries, out_dir, conf, plan_conf, address, resume, overwrite, on_result)


def run_job(map_dir: Location, store_url: str, queries: pa.Table, out_dir: Location, conf: dict,
            plan_conf: PlanConf, address: str | None, resume: bool, overwrite: bool,
            on_result: Callable[[dict], None] | None = None) -> Location:
    """`run_queries` of the query table (those not answered yet when resuming) into a new
    ResultsWriter of `out_dir`, for localize and refine: Ctrl-C says how many rows were saved;
    RetryableFailures when some queries failed because of the infrastructure. Returns the path of
    results.parquet."""
    total = queries.num_rows
    if resume:
        queries = skip_completed(queries, out_dir)
    logger.info("%d queries to localize (%d already done), method %s", queries.num_rows, total - queries.num_rows,
                conf["method"])
    writer = ResultsWriter(out_dir, conf["flush_every"], resume=resume, overwrite=overwrite)
    try:
        if queries.num_rows:
            run_queries(files.location(map_dir), store_url, queries, writer, conf, plan_conf, address, on_result)
        else:  # every query answered: the earlier runs' rows merged, nothing started
            writer.close()
    except KeyboardInterrupt:  # execute has flushed every row it got
        raise Interrupted(f"interrupted: {read_results(out_dir).num_rows} rows saved in {out_dir}, "
                          "rerun with --resume") from None
    raise_if_retryable(read_results(out_dir), out_dir)
    return writer.out_dir / "results.parquet"


class RetryableFailures(RuntimeError):
    """Some queries failed because of the infrastructure: the job did not finish its work."""


def raise_if_retryable(table: pa.Table, out_dir: Location) -> None:
    retryable = [row for row in table.select(["name", "retryable", "error"]).to_pylist() if row["retryable"]]
    if retryable:
        raise RetryableFailures(f"{len(retryable)} of {table.num_rows} queries failed for reasons outside their "
                                f"input, e.g. {retryable[0]['name']}: {retryable[0]['error']}; fix the cause and "
                                f"rerun with --resume (results so far in {out_dir})")


def add_query_job_arguments(parser: argparse.ArgumentParser, conf: dict) -> None:
    """The flags `pixloc localize` and `pixloc refine` share; defaults from the job's conf."""
    parser.add_argument("--map", type=files.location, required=True,
                        help="map directory written by `pixloc map` (a local path or s3://bucket/prefix)")
    parser.add_argument("--store", required=True, help="feature store URL: a local path or s3://bucket/prefix")
    parser.add_argument("--queries", type=files.location, required=True,
                        help="folder of query images (a local path or s3://bucket/prefix)")
    parser.add_argument("--out", type=files.location, required=True, help="results directory (or s3:// prefix)")
    parser.add_argument("--query-list", type=files.location, help="queries with intrinsics (name MODEL W H PARAMS...)")
    parser.add_argument("--extractor", default=conf["extractor"],
                        help="feature extractor of the store (default: the one the store was extracted with)")
    parser.add_argument("--checkpoint", default=conf["checkpoint"],
                        help="the extractor's weights, as given to `pixloc features` (e.g. PixLoc's checkpoint_best.tar "
                             "with --extractor unet-vgg16); its learned dampings drive the alignment. A path every "
                             "node can read")
    parser.add_argument("--workers", type=int, default=conf["workers"], help="query workers (CNN, keypoints)")
    parser.add_argument("--shard-actors", type=int, default=conf["pool"].shard_actors,
                        help="shard actor processes, each hosting several cells (default: one per CPU)")
    parser.add_argument("--address", default=None, help="Ray cluster: 'auto' or ray://host:port (default: local)")
    parser.add_argument("--resume", action="store_true",
                        help="skip queries already answered (retrying those that failed for reasons outside their input)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")


def query_job_conf(args: argparse.Namespace, conf: dict) -> dict:
    """The conf overrides of the shared flags."""
    if args.workers < 1:
        raise SystemExit(f"pixloc {args.command}: --workers must be positive, got {args.workers}")
    if args.shard_actors is not None and args.shard_actors < 1:
        raise SystemExit(f"pixloc {args.command}: --shard-actors must be positive, got {args.shard_actors}")
    return {"extractor": args.extractor, "checkpoint": args.checkpoint, "workers": args.workers,
            "pool": replace(conf["pool"], shard_actors=args.shard_actors)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_query_job_arguments(parser, default_conf)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--priors", type=files.location, help="CSV name,lat,lon[,alt][,sigma_m] or name,x,y,z[,sigma_m]")
    source.add_argument("--gps-from-exif", action="store_true", help="priors from the images' EXIF GPS")
    parser.add_argument("--method", choices=METHODS, default=default_conf["method"])
    parser.add_argument("--trust-prior", choices=TRUST_PRIOR, default=VerifyConf.trust_prior,
                        help="low: the priors may be wrong (stale GPS): a pose far from its prior may still succeed")


def run(args: argparse.Namespace) -> int:
    flags = {**query_job_conf(args, default_conf), "method": args.method,
             "shard": {"localize": {"verify": {"trust_prior": args.trust_prior}}}}
    main(args.map, args.store, args.queries, args.out, args.query_list, args.priors, args.gps_from_exif,
         args.resume, args.address, merge_conf(default_conf, flags, args.conf), overwrite=args.overwrite)
    return 0
