"""`pixloc localize`: localize a folder of photos from their GPS priors, on Ray.

    plan (driver)        intrinsics, prior -> map frame, cells, pose hypotheses; bad input -> failure row
    featurize (Ray Data) read, query CNN pass for the dense methods, SIFT + PnP for the sparse
                         ones, a pool of `workers` actors
    align (ShardActors)  per cell: reference features held in memory, featuremetric alignment
    write (driver)       one row per query, flushed as Parquet parts, folded into results.parquet

Every query gets exactly one row: bad input, a corrupt image, a failed alignment or a crashed call
become `success=false` with the reason. `pixloc refine` runs the same pipeline from external poses.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
from PIL import Image
from tqdm import tqdm

from cluster.errors import Failure, classify
from cluster.filesystem import StorageError
from cluster.router import PriorOutsideMap, Router, RouterConf, ShardPool
from cluster.runtime import init_ray, set_torch_threads
from cluster.shard_actor import QueryRequest, ShardConf
from cluster.store import FeatureStore
from pixloc_core import sparse
from pixloc_core.exif import read_exif_focal_px, read_exif_prior
from pixloc_core.extractors import load_extractor
from pixloc_core.extractors.base import STRIDES, resize_longest_side
from pixloc_core.geometry import Camera, Pose, UnsupportedCameraModel
from pixloc_core.io import Prior, QueryIntrinsics, read_priors, read_query_list
from pixloc_core.localize import (METHODS, TRUST_PRIOR, Checks, Localization, VerifyConf, best_of, measure,
                                  reference_hypotheses, turned_towards, verify, viewed_points)
from pixloc_core.images import list_images, read_image
from pixloc_core.map_io import SceneMap, observations

from .features import gpus_per_worker
from .cli import Interrupted
from .config import merge_conf
from .results import ResultsWriter, check_output, completed_queries

logger = logging.getLogger(__name__)

# Bad input or an unreachable store: a one-line message, not a traceback.
USER_ERRORS = (FileNotFoundError, ValueError, StorageError)

default_conf = {
    "extractor": "classic",
    "method": "sparse+dense",
    "workers": 2,
    "in_flight_per_worker": 1,  # queries being aligned per worker: the alignment parallelism
    "flush_every": 8,  # rows per results part file
    "router": RouterConf(),
    "shard": ShardConf(),  # levels, alignment and the per-query logic (LocalizeConf)
    "sparse": None,  # overrides of pixloc_core.sparse.default_conf
    "verify": VerifyConf(),  # the checks every successful pose passes
}


@dataclass
class QueryPlan:
    """What the driver decides for one query before any pixel is read."""

    name: str
    path: Path
    intrinsics: QueryIntrinsics | None = None
    prior_xyz: np.ndarray | None = None  # (3,) map frame
    sigma_m: float | None = None
    cells: list[str] = field(default_factory=list)
    hypotheses: Pose | None = None  # (M,)
    labels: list[str] = field(default_factory=list)
    verified: bool = False  # the hypotheses come from a geometric method (see LocalizeConf)
    reference_image_ids: list[int] | None = None
    error: str = ""
    retryable: bool = False  # the error came from the infrastructure, not the input
    note: str = ""  # what planning adjusted, e.g. a rescaled camera


class QueryFeaturizer:
    """Ray Data callable class: the query-side work, with one extractor for the dense methods and
    one SIFT + PnP localizer (holding the map's point descriptors) for the sparse ones, per worker."""

    def __init__(self, extractor_name: str | None, map_dir: str | None, sparse_conf: dict | None):
        """extractor_name None: no dense features (the sparse method); map_dir None: no SIFT + PnP."""
        threads = set_torch_threads()
        self.extractor = load_extractor(extractor_name).eval() if extractor_name is not None else None
        self.sparse = None
        if map_dir is not None:
            conf = {**sparse.default_conf, **(sparse_conf or {})}
            conf["sift"] = {**conf["sift"], "num_threads": threads}
            self.sparse = sparse.SparseLocalizer(SceneMap.load(map_dir), conf)

    def featurize(self, item: dict) -> dict:
        timings = {}
        start = time.perf_counter()
        image = read_image(Path(item["path"]))
        timings["read_ms"] = 1000 * (time.perf_counter() - start)

        row = self.empty_features()
        timings["cnn_ms"] = 0.0
        if self.extractor is not None:
            start = time.perf_counter()
            tensor, scale = resize_longest_side(image, self.extractor.max_size)
            pyramid = self.extractor.extract(tensor[None])
            timings["cnn_ms"] = 1000 * (time.perf_counter() - start)
            row = {"scale": scale, "strides": np.array([level.stride for level in pyramid])}
            for index, level in enumerate(pyramid):
                # (h, w, C): channel-last, as the alignment reads it; one copy with the conversion
                row[f"features_{index}"] = level.features[0].permute(1, 2, 0).to(
                    "cpu", torch.float16, memory_format=torch.contiguous_format).numpy()
                row[f"confidence_{index}"] = level.confidence[0].cpu().half().numpy()  # (h, w)

        row.update(sparse_qvec=np.full(4, np.nan), sparse_tvec=np.full(3, np.nan), sparse_inliers=0, sparse_matches=0,
                   sparse_position_std_m=np.nan, sparse_error="")
        timings["sparse_ms"] = 0.0
        if self.sparse is not None:
            start = time.perf_counter()
            camera = Camera(str(item["camera_model"]), *item["camera_size"], torch.tensor(item["camera_params"]))
            prior = np.asarray(item["prior_xyz"], np.float64)
            result = self.sparse.localize(np.asarray(Image.fromarray(image).convert("L")), camera.to_colmap(),
                                          prior, float(item["sigma_m"]))
            if result.success:
                pose = Pose.from_colmap(result.cam_from_world)
                row.update(sparse_qvec=pose.qvec().numpy(), sparse_tvec=pose.t.numpy(),
                           sparse_inliers=result.num_inliers, sparse_matches=result.num_matches,
                           sparse_position_std_m=result.position_std_m)
            else:
                row["sparse_error"] = f"sparse: {result.message}"
            timings["sparse_ms"] = 1000 * (time.perf_counter() - start)
        return {**row, **timings}

    @staticmethod
    def failed(name: str, failure: Failure) -> dict:
        """A row with the columns of a featurized one (Ray Data blocks share one schema), empty."""
        return {"name": name, "error": failure.message, "retryable": failure.retryable, **QueryFeaturizer.empty_features(),
                "sparse_qvec": np.full(4, np.nan), "sparse_tvec": np.full(3, np.nan), "sparse_inliers": 0,
                "sparse_matches": 0, "sparse_position_std_m": np.nan, "sparse_error": "", "read_ms": np.nan,
                "cnn_ms": np.nan, "sparse_ms": np.nan}

    @staticmethod
    def empty_features() -> dict:
        """The feature columns of a row without dense features."""
        row = {"scale": np.nan, "strides": np.array(STRIDES)}
        for index in range(len(STRIDES)):
            row[f"features_{index}"] = np.zeros((0, 0, 0), np.float16)
            row[f"confidence_{index}"] = np.zeros((0, 0), np.float16)
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        outputs = []
        for index, name in enumerate(batch["name"]):
            item = {key: values[index] for key, values in batch.items()}
            try:
                outputs.append({"name": name, "error": "", "retryable": False, **self.featurize(item)})
            except Exception as error:  # noqa: BLE001 - any failure of one query is its result, not the job's
                outputs.append(self.failed(name, classify(error)))
        return {key: [output[key] for output in outputs] for key in outputs[0]}


# ----- planning


class References:
    """The map's reference images: ids, names and world-to-camera poses (R,), and what they look at."""

    # The median depth of an image's points is estimated from at most this many of them.
    max_depth_samples = 256

    def __init__(self, scene: SceneMap):
        self.reconstruction = scene.reconstruction
        self.image_ids = sorted(scene.reconstruction.images)
        images = [scene.reconstruction.images[i] for i in self.image_ids]
        self.names = [image.name for image in images]
        self.poses = Pose.stack([Pose.from_colmap(image.cam_from_world()) for image in images])
        self.id_of = dict(zip(self.names, self.image_ids))
        self._median_depths: dict[int, float] = {}  # index -> depth, computed when first needed

    def ids(self, names: list[str]) -> list[int]:
        return [self.id_of[name] for name in names if name in self.id_of]

    def hypotheses(self, prior_xyz: np.ndarray, k: int) -> tuple[Pose, list[str]]:
        """The poses (K,) that `dense` starts from: the k references nearest to the prior (3,),
        moved there and turned towards what each looked at; and their labels "ref:<name>"."""
        moved, nearest = reference_hypotheses(prior_xyz, self.poses, k)
        return turned_towards(moved, self.viewed_points(nearest)), [f"ref:{self.names[i]}" for i in nearest]

    def viewed_points(self, indices: np.ndarray) -> torch.Tensor:
        """(K, 3) the points that the references `indices` (K,) look at (NaN: an image without 3D points)."""
        for index in indices.tolist():
            if index not in self._median_depths:
                self._median_depths[index] = self._median_depth(index)
        depths = torch.tensor([self._median_depths[index] for index in indices.tolist()], dtype=torch.float64)
        return viewed_points(self.poses[torch.from_numpy(indices)], depths)

    def _median_depth(self, index: int) -> float:
        point3D_ids = observations(self.reconstruction.images[self.image_ids[index]]).point3D_ids
        if len(point3D_ids) == 0:
            return math.nan
        samples = np.linspace(0, len(point3D_ids) - 1, min(len(point3D_ids), self.max_depth_samples)).round()
        sampled_ids = point3D_ids[samples.astype(int)].tolist()
        xyz = np.array([self.reconstruction.points3D[point3D_id].xyz for point3D_id in sampled_ids])  # (S, 3)
        return float(self.poses[index].transform(torch.from_numpy(xyz))[:, 2].median())


def query_intrinsics(path: Path, query_list: dict[str, QueryIntrinsics] | None,
                     scene: SceneMap | None = None, name: str | None = None) -> tuple[QueryIntrinsics, str]:
    """From the query list (checked against the image's size: a camera of another size with the
    same aspect ratio is rescaled, and the note says so), else from the EXIF focal length: the map's
    calibrated camera of the same device (same size and EXIF focal) when it has one, a pinhole
    camera otherwise; checked. Returns the intrinsics and a note (empty when nothing was changed)."""
    name = path.name if name is None else name
    note = ""
    with Image.open(path) as image:
        width, height = image.size
    if query_list is not None:
        if name not in query_list:
            raise ValueError(f"{name}: not in the query list")
        intrinsics = query_list[name]
        if (intrinsics.width, intrinsics.height) != (width, height):
            scale = width / intrinsics.width
            if abs(height - scale * intrinsics.height) > 1.0:
                raise ValueError(f"{name}: the image is {width}x{height}, the query list says "
                                 f"{intrinsics.width}x{intrinsics.height}")
            camera = Camera.from_query_intrinsics(intrinsics).scale(scale)
            intrinsics = QueryIntrinsics(intrinsics.model, width, height, tuple(camera.params.tolist()))
            note = f"camera rescaled by {scale:.4g}: the query list says {query_list[name].width}x{query_list[name].height}"
    else:
        focal = read_exif_focal_px(path, width, height)
        if focal is None:
            raise ValueError(f"{path}: no intrinsics (no --query-list and no EXIF focal length)")
        camera = scene.camera_for_exif(width, height, focal) if scene is not None else None
        if camera is not None:
            intrinsics = QueryIntrinsics(camera.model.name, width, height, tuple(float(v) for v in camera.params))
        else:
            intrinsics = QueryIntrinsics("SIMPLE_PINHOLE", width, height, (focal, width / 2, height / 2))
    if not bool(Camera.from_query_intrinsics(intrinsics).is_valid()):
        raise ValueError(f"{name}: invalid camera {intrinsics}")
    return intrinsics, note


def plan_localization(scene: SceneMap, references: References, router: Router, paths: list[Path],
                      query_list: dict[str, QueryIntrinsics] | None, priors: dict[str, Prior] | None,
                      num_hypotheses: int, queries_dir: Path | None = None) -> list[QueryPlan]:
    """One plan per query, named by its path relative to `queries_dir` (hloc style; the file name
    without it); priors None means EXIF GPS. Anything wrong with one query is that query's error."""
    plans = []
    for path in paths:
        plan = QueryPlan(query_name(path, queries_dir), path)
        try:
            if any(character.isspace() for character in plan.name):
                raise ValueError(f"{plan.name!r}: the name contains whitespace, which the space-separated "
                                 "poses and query-list formats cannot hold; rename the file")
            plan.intrinsics, plan.note = query_intrinsics(path, query_list, scene, plan.name)
            prior = priors.get(plan.name) if priors is not None else read_exif_prior(path)
            if prior is None:
                raise ValueError("no prior: not in the priors file" if priors is not None else "no prior: no EXIF GPS")
            plan.prior_xyz = np.asarray(scene.prior_to_map(prior), np.float64)
            plan.sigma_m = prior.sigma_m
            plan.cells = router.cells(plan.prior_xyz, prior.sigma_m)
            plan.reference_image_ids = references.ids(router.reference_images(plan.prior_xyz, prior.sigma_m))
            plan.hypotheses, plan.labels = references.hypotheses(plan.prior_xyz, num_hypotheses)
        except Exception as error:  # noqa: BLE001 - e.g. a decompression bomb or unreadable EXIF: this query's row
            plan.error, plan.retryable = dataclasses.astuple(classify(error))
        plans.append(plan)
    return plans


def query_name(path: Path, queries_dir: Path | None) -> str:
    """The name a query has in rows, poses.txt and the input lists: its path relative to the
    queries folder, with forward slashes."""
    return path.name if queries_dir is None else path.relative_to(queries_dir).as_posix()


def query_paths(queries_dir: Path, query_list: dict[str, QueryIntrinsics] | None) -> list[Path]:
    """The queries: those of the query list when given, else every image of the folder."""
    if query_list is not None:
        return [queries_dir / name for name in query_list]
    return [queries_dir / name for name in list_images(queries_dir)]


# ----- execution


def featurizer_items(plans: list[QueryPlan], default_sigma_m: float) -> list[dict]:
    """Ray Data rows: what a worker needs to read, featurize and (sparse) localize a query. Paths
    are absolute: workers do not share the driver's working directory."""
    items = []
    for plan in plans:
        intrinsics = plan.intrinsics
        items.append({"name": plan.name, "path": str(plan.path.resolve()), "camera_model": intrinsics.model,
                      "camera_size": [float(intrinsics.width), float(intrinsics.height)],
                      "camera_params": list(intrinsics.params), "prior_xyz": plan.prior_xyz.tolist(),
                      "sigma_m": default_sigma_m if plan.sigma_m is None else plan.sigma_m})
    return items


def sparse_result(row: dict) -> Localization:
    """The SIFT + PnP pose of a featurized row, as a result of its own (method `sparse`)."""
    if not np.isfinite(row["sparse_qvec"]).all():
        return Localization.failure(str(row["sparse_error"]) or "sparse: no pose")
    return Localization(success=True, qvec=tuple(row["sparse_qvec"].tolist()), tvec=tuple(row["sparse_tvec"].tolist()),
                        num_points=int(row["sparse_inliers"]), hypothesis="sparse")


def shard_request(plan: QueryPlan, row: dict, levels: tuple[int, ...]) -> QueryRequest:
    camera = Camera.from_query_intrinsics(plan.intrinsics).scale(float(row["scale"]))
    has_sparse = bool(np.isfinite(row["sparse_qvec"]).all())
    return QueryRequest(
        name=plan.name,
        features=[row[f"features_{i}"] for i in levels],
        confidences=[row[f"confidence_{i}"] for i in levels],
        strides=[int(row["strides"][i]) for i in levels],
        camera_model=camera.model,
        camera_size=tuple(camera.size.tolist()),
        camera_params=tuple(camera.params.tolist()),
        hypotheses_qvec=plan.hypotheses.qvec().numpy(),
        hypotheses_tvec=plan.hypotheses.t.numpy(),
        labels=plan.labels,
        hypotheses_verified=plan.verified,
        reference_image_ids=plan.reference_image_ids,
        sparse_qvec=row["sparse_qvec"] if has_sparse else None,
        sparse_tvec=row["sparse_tvec"] if has_sparse else None,
        sparse_inliers=int(row["sparse_inliers"]),
    )


def pnp_evidence(row: dict) -> dict:
    """What SIFT + PnP found for a featurized row: the `measure` arguments beyond the result."""
    if not np.isfinite(row["sparse_qvec"]).all():
        return {}
    pose = Pose.from_qvec_tvec(torch.from_numpy(np.asarray(row["sparse_qvec"], np.float64)),
                               torch.from_numpy(np.asarray(row["sparse_tvec"], np.float64)))
    return {"pnp_pose": pose, "inliers": int(row["sparse_inliers"]), "matches": int(row["sparse_matches"]),
            "pnp_position_std_m": float(row["sparse_position_std_m"])}


def result_row(plan: QueryPlan, method: str, localization: Localization, timings: dict, cell: str = "",
               checks: Checks | None = None) -> dict:
    row = {"name": plan.name, "method": method, "cell": cell, **localization.to_dict(), **timings,
           **(checks or Checks()).to_dict()}
    row["prior_xyz"] = None if plan.prior_xyz is None else plan.prior_xyz.tolist()
    row["note"] = plan.note
    return row


@dataclass
class _InFlight:
    """A query whose calls to shard actors have not all returned."""

    plan: QueryPlan
    timings: dict
    remaining: int
    sparse_error: str = ""  # why there is no SIFT + PnP hypothesis, reported if all else fails too
    evidence: dict = field(default_factory=dict)  # pnp_evidence of the featurized row
    answers: list[tuple[str, Localization]] = field(default_factory=list)  # (cell, result)


class LocalizationRun:
    """The driver loop: featurized rows in, calls to shard actors out, one result row per query."""

    def __init__(self, writer: ResultsWriter, store: FeatureStore, conf: dict, total: int,
                 on_result: Callable[[dict], None] | None = None):
        self.writer, self.conf, self.on_result = writer, conf, on_result
        self.method = conf["method"]
        self.pool = ShardPool(store.url, store.info.extractor_id, store.info.map_fingerprint, conf["shard"],
                              conf["router"])
        self.progress = tqdm(total=total, desc=f"localize ({self.method})", unit="query", smoothing=0.1)
        self.calls: dict[ray.ObjectRef, tuple[str, str]] = {}  # call -> (query, cell)
        self.in_flight: dict[str, _InFlight] = {}

    def emit(self, plan: QueryPlan, localization: Localization, timings: dict, cell: str = "",
             evidence: dict | None = None) -> None:
        """Verify the result (every method, the same checks) and write its row."""
        sigma = self.conf["router"].default_sigma_m if plan.sigma_m is None else plan.sigma_m
        checks = measure(localization, plan.prior_xyz, sigma, **(evidence or {}))
        row = result_row(plan, self.method, verify(localization, checks, self.conf["verify"]), timings, cell, checks)
        self.writer.add(row)
        self.progress.update(1)
        if self.on_result is not None:
            self.on_result(row)

    def submit(self, plan: QueryPlan, row: dict) -> None:
        """Route one featurized query: a failure or a sparse-only result is final here, otherwise
        the query goes to the shard actor of each of its cells."""
        timings = {key: float(row[key]) for key in ("read_ms", "cnn_ms", "sparse_ms")}
        if row["error"]:
            self.emit(plan, Localization.failure(str(row["error"]), bool(row["retryable"])), timings)
            return
        if self.method == "sparse":
            self.emit(plan, sparse_result(row), timings, plan.cells[0], pnp_evidence(row))
            return
        request = shard_request(plan, row, self.conf["shard"].levels)
        self.in_flight[plan.name] = _InFlight(plan, {**timings, "load_ms": 0.0, "align_ms": 0.0}, len(plan.cells),
                                              str(row["sparse_error"]), pnp_evidence(row))
        for cell in plan.cells:
            self.calls[self.pool.submit(cell, request)] = (plan.name, cell)

    def collect(self, block: bool) -> None:
        """Take the answers that are ready (waiting for one if `block`); emit completed queries."""
        if not self.calls:
            return
        ready, _ = ray.wait(list(self.calls), num_returns=1 if block else len(self.calls),
                            timeout=None if block else 0)
        for call in ready:
            name, cell = self.calls.pop(call)
            query = self.in_flight[name]
            memory = None
            try:
                answer = ray.get(call)
                memory = answer.pop("memory_bytes")
                answer.pop("cell")
                for key in ("load_ms", "align_ms"):
                    query.timings[key] += answer.pop(key)
                localization = Localization(**answer)
            except ray.exceptions.RayError as error:
                failure = classify(error)
                localization = Localization.failure(failure.message, failure.retryable)
            self.pool.finished(cell, memory)
            query.answers.append((cell, localization))
            query.remaining -= 1
            if query.remaining == 0:
                del self.in_flight[name]
                best = best_of([localization for _, localization in query.answers])
                best_cell = next(cell for cell, localization in query.answers if localization is best)
                if not best.success and query.sparse_error:
                    best.error = f"{best.error}; {query.sparse_error}"
                self.emit(query.plan, best, query.timings, best_cell, query.evidence)

    def drain(self) -> None:
        while self.calls:
            self.collect(block=True)

    def close(self) -> None:
        """Flush the rows so far (also when the driver is failing) and release the actors."""
        self.writer.flush()
        self.progress.close()
        self.pool.shutdown()


def execute(plans: list[QueryPlan], writer: ResultsWriter, map_dir: Path, store: FeatureStore, conf: dict,
            on_result: Callable[[dict], None] | None = None) -> None:
    """Run the planned queries through Ray Data and the shard actors, one row each into `writer`.
    Needs an initialised Ray."""
    run = LocalizationRun(writer, store, conf, len(plans), on_result)
    try:
        runnable = {}
        for plan in plans:
            if plan.error:
                run.emit(plan, Localization.failure(plan.error, plan.retryable), {})
            else:
                runnable[plan.name] = plan
        if runnable:
            import ray.data

            workers = conf["workers"]
            with_sparse = conf["method"] in ("sparse", "sparse+dense")
            with_dense = conf["method"] != "sparse"  # also `pixloc refine`, whose method is "refine"
            items = featurizer_items(list(runnable.values()), conf["router"].default_sigma_m)
            dataset = ray.data.from_items(items).map_batches(
                QueryFeaturizer,
                fn_constructor_kwargs={"extractor_name": conf["extractor"] if with_dense else None,
                                       "sparse_conf": conf["sparse"],
                                       "map_dir": str(Path(map_dir).resolve()) if with_sparse else None},
                batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                num_gpus=gpus_per_worker({"gpus_per_worker": None, "workers": workers}))
            max_in_flight = conf["in_flight_per_worker"] * workers
            for batch in dataset.iter_batches(batch_size=1, batch_format="numpy"):
                row = {key: values[0] for key, values in batch.items()}
                run.submit(runnable[str(row["name"])], row)
                run.collect(block=False)
                while len(run.in_flight) >= max_in_flight:
                    run.collect(block=True)
        run.drain()
    finally:
        run.close()


def open_store(store_url: str, extractor_name: str, scene: SceneMap) -> FeatureStore:
    """The store of the map and extractor; a local path made absolute, since shard actors open
    it again from their own working directory."""
    if "://" not in store_url:
        store_url = str(Path(store_url).expanduser().resolve())
    return FeatureStore.open(store_url, load_extractor(extractor_name).extractor_id, scene.fingerprint)


def main(map_dir: Path, store_url: str, queries_dir: Path, out_dir: Path, query_list: Path | None = None,
         priors: Path | None = None, gps_from_exif: bool = False, resume: bool = False,
         address: str | None = None, conf: dict | None = None,
         on_result: Callable[[dict], None] | None = None, overwrite: bool = False) -> Path:
    """Localize the queries of `queries_dir` into `out_dir`; returns the path of results.parquet.
    Every input is read and checked before anything is written."""
    conf = merge_conf(default_conf, conf)
    if conf["method"] not in METHODS:
        raise ValueError(f"unknown method {conf['method']!r}, expected one of {METHODS}")
    if priors is None and not gps_from_exif:
        raise ValueError("priors needed: pass --priors CSV or --gps-from-exif")
    check_output(out_dir, resume, overwrite)
    intrinsics = read_query_list(query_list) if query_list is not None else None
    prior_table = read_priors(priors) if priors else None
    paths = query_paths(Path(queries_dir), intrinsics)
    scene = SceneMap.load(map_dir)
    store = open_store(store_url, conf["extractor"], scene)
    done = completed_queries(out_dir) if resume else set()
    paths = [path for path in paths if query_name(path, Path(queries_dir)) not in done]
    logger.info("%d queries to localize (%d already done), method %s", len(paths), len(done), conf["method"])
    router = Router(scene.shards, conf["router"])
    plans = plan_localization(scene, References(scene), router, paths, intrinsics, prior_table,
                              conf["shard"].localize.num_reference_hypotheses, Path(queries_dir))
    writer = ResultsWriter(out_dir, conf["flush_every"], resume=resume, overwrite=overwrite)
    try:
        with init_ray(address, num_cpus=None if address else conf["workers"]):
            execute(plans, writer, Path(map_dir), store, conf, on_result)
    except KeyboardInterrupt:  # execute has flushed every row it got
        raise Interrupted(f"interrupted: {len(completed_queries(out_dir))} rows saved in {out_dir}, "
                          "rerun with --resume") from None
    table = writer.close()
    num_success = sum(table.column("success").to_pylist())
    logger.info("%d/%d queries localized -> %s", num_success, table.num_rows, writer.out_dir)
    raise_if_retryable(table, out_dir)
    return writer.out_dir / "results.parquet"


class RetryableFailures(RuntimeError):
    """Some queries failed because of the infrastructure: the job did not finish its work."""


def raise_if_retryable(table, out_dir: Path) -> None:
    retryable = [row for row in table.select(["name", "retryable", "error"]).to_pylist() if row["retryable"]]
    if retryable:
        raise RetryableFailures(f"{len(retryable)} of {table.num_rows} queries failed for reasons outside their "
                                f"input, e.g. {retryable[0]['name']}: {retryable[0]['error']}; fix the cause and "
                                f"rerun with --resume (results so far in {out_dir})")


def add_query_job_arguments(parser: argparse.ArgumentParser, conf: dict) -> None:
    """The flags `pixloc localize` and `pixloc refine` share; defaults from the job's conf."""
    parser.add_argument("--map", type=Path, required=True, help="map directory written by `pixloc map`")
    parser.add_argument("--store", required=True, help="feature store URL: a local path or s3://bucket/prefix")
    parser.add_argument("--queries", type=Path, required=True, help="folder of query images")
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--query-list", type=Path, help="queries with intrinsics (name MODEL W H PARAMS...)")
    parser.add_argument("--extractor", default=conf["extractor"], help="feature extractor of the store")
    parser.add_argument("--workers", type=int, default=conf["workers"], help="query CNN workers")
    parser.add_argument("--address", default=None, help="Ray cluster: 'auto' or ray://host:port (default: local)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_query_job_arguments(parser, default_conf)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--priors", type=Path, help="CSV name,lat,lon[,alt][,sigma_m] or name,x,y,z[,sigma_m]")
    source.add_argument("--gps-from-exif", action="store_true", help="priors from the images' EXIF GPS")
    parser.add_argument("--method", choices=METHODS, default=default_conf["method"])
    parser.add_argument("--resume", action="store_true", help="skip queries already in the results")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    parser.add_argument("--trust-prior", choices=TRUST_PRIOR, default=default_conf["verify"].trust_prior,
                        help="low: the priors may be wrong (stale GPS), poses far from them may still succeed")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise SystemExit(f"pixloc localize: --workers must be positive, got {args.workers}")
    flags = {"method": args.method, "extractor": args.extractor, "workers": args.workers,
             "verify": {"trust_prior": args.trust_prior}}
    main(args.map, args.store, args.queries, args.out, args.query_list, args.priors, args.gps_from_exif,
         args.resume, args.address, merge_conf(default_conf, flags, args.conf), overwrite=args.overwrite)
    return 0
