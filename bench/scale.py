"""`pixloc bench scale`: memory, throughput and accuracy of `pixloc localize` as the map grows.

Synthetic cities (`pixloc synth --blocks WxH`) at constant reference density, from the default
street (150 references) to >= 10,000 references, each with its own fixed set of queries (the
first `queries` of the city's, at random points of its streets). Each city's scene and map are
built once into `data_dir` (kept across runs, with the seconds they took in `build.json`); the
feature store is rebuilt when the code's store format changes.

Every job runs as the user runs it, `pixloc features` / `pixloc localize` in a subprocess, while
this process samples /proc every `sample_interval_s` for the subprocess and all its descendants
(the local Ray: gcs, raylet, workers, actors): peak RSS (VmHWM) per process kind, told apart by
the process title Ray gives each worker, and CPU seconds of the whole tree (Ray start-up
included). Per size: `sizes[]` (with `repeats`, the run of median CPU-s per query of that many
rounds over the sizes); `order`: the same queries in the input order (random along the
streets) and sorted by position, on the largest size; `nodes`: queries/s on a simulated cluster
(`ray.cluster_utils.Cluster`) of 1 and then 2 one-CPU nodes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench import write_report
from jobs import map as map_job
from jobs.results import STAGES, successful_poses
from pixloc_core.evaluate import evaluate
from pixloc_core.geo import EnuOrigin, wgs84_to_enu
from pixloc_core.io import read_poses, read_priors, read_query_list, write_query_list
from pixloc_core.synthetic import dataset

logger = logging.getLogger(__name__)

default_conf = {
    "data_dir": "outputs/bench/scale-data",
    "blocks": [[2, 1], [4, 4], [8, 8], [15, 15]],  # 150, 864, 3,110 and 10,286 references
    "num_queries": 200,
    "width": 320,
    "height": 240,
    "gps_noise_m": 10.0,
    "seed": 11,
    "map": {"sift": {"max_num_features": 2048}, "pairs": {"num_neighbors": 5}},  # as the demo's
    "queries": 200,  # localized per size (the same first ones of each city's query set)
    "workers": 2,
    "method": "sparse+dense",
    "extractor": "classic",
    "localize_conf": (),  # KEY=VALUE overrides of every localize job (`pixloc localize --conf`)
    "repeats": 1,  # rounds over the sizes; each size reports its run of median CPU-s per query
    "order": True,  # the largest size's queries again, sorted by position
    "nodes_queries": 60,  # 1 vs 2 simulated nodes, on the smallest size (0: skip)
    "sample_interval_s": 0.2,
    # Process kinds by Ray's process title (`ray::<class>...`); the driver is the job's process.
    "kinds": {"query_worker": ["QueryFeaturizer", "QueryWorker"], "shard_actor": ["ShardActor"],
              "feature_worker": ["ReferenceFeatureWriter"]},
    "job_timeout_s": 7200,
    "plot": True,
}

# A span of 8.6x in references (150 to 1,286) that runs in well under 15 minutes once built.
QUICK = {"blocks": [[2, 1], [5, 5]], "queries": 40, "nodes_queries": 20}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the rendering pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _Timed:
    """Wall and CPU seconds of a block, added to `record[name]`."""

    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu_s()

    def __exit__(self, *exc_info):
        self.record[self.name] = {"wall_s": round(time.perf_counter() - self.wall, 1),
                                  "cpu_s": round(_cpu_s() - self.cpu, 1)}


def city_dir(conf: dict, blocks: tuple[int, int]) -> Path:
    return Path(conf["data_dir"]) / f"city-{blocks[0]}x{blocks[1]}-q{conf['num_queries']}-{conf['width']}px"


def build_city(conf: dict, blocks: tuple[int, int]) -> Path:
    """Scene and map of one city, built once; their build times in ROOT/build.json."""
    root = city_dir(conf, blocks)
    build_file = root / "build.json"
    build = json.loads(build_file.read_text()) if build_file.is_file() else {}
    scene_dir, map_dir = root / "scene", root / "map"
    if not (scene_dir / "scene.json").is_file():
        with _Timed(build, "synth"):
            dataset.main(scene_dir, {"blocks": tuple(blocks), "num_queries": conf["num_queries"],
                                     "width": conf["width"], "height": conf["height"],
                                     "gps_noise_m": conf["gps_noise_m"], "seed": conf["seed"]})
        build_file.write_text(json.dumps(build, indent=1))
    if not (map_dir / "manifest.json").is_file():
        with _Timed(build, "map"):
            # Cell by cell on Ray, as a user maps a city: a build interrupted midway resumes.
            map_job.build_map_in_cells(scene_dir / "mapping", map_dir, scene_dir / "reference_model",
                                       read_priors(scene_dir / "mapping_priors.csv"), conf["map"], conf["workers"])
        build_file.write_text(json.dumps(build, indent=1))
    return root


# ----- measuring a process tree through /proc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    return children


def _descendants(root: int) -> list[int]:
    children, found, stack = _children_by_parent(), [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


@dataclass
class ProcessRecord:
    kind: str = "other"
    peak_rss_kb: int = 0
    cpu_s: float = 0.0


@dataclass
class TreeSampler:
    """Samples a process and its descendants until stopped: per pid its kind (the last one seen
    other than 'other', as Ray workers take their actor's title once it starts), VmHWM, CPU s."""

    root: int
    kinds: dict[str, list[str]]
    interval_s: float
    records: dict[int, ProcessRecord] = field(default_factory=dict)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def kind_of(self, pid: int, title: str) -> str:
        if pid == self.root:
            return "driver"
        return next((kind for kind, markers in self.kinds.items() if any(m in title for m in markers)), "other")

    def sample(self) -> None:
        for pid in _descendants(self.root):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                status = Path(f"/proc/{pid}/status").read_text()
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            record = self.records.setdefault(pid, ProcessRecord())
            kind = self.kind_of(pid, title)
            if kind != "other":
                record.kind = kind
            hwm = [line for line in status.splitlines() if line.startswith("VmHWM:")]
            if hwm:
                record.peak_rss_kb = max(record.peak_rss_kb, int(hwm[0].split()[1]))
            record.cpu_s = max(record.cpu_s, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)  # utime + stime

    def summary(self) -> dict:
        by_kind: dict[str, list[ProcessRecord]] = {}
        for record in self.records.values():
            by_kind.setdefault(record.kind, []).append(record)
        return {
            "peak_rss_mb": {kind: round(max(r.peak_rss_kb for r in records) / 1024, 1)
                            for kind, records in by_kind.items()},
            "processes": {kind: len(records) for kind, records in by_kind.items()},
            "cpu_s": sum(record.cpu_s for record in self.records.values()),
            "cpu_s_by_kind": {kind: round(sum(r.cpu_s for r in records), 1) for kind, records in by_kind.items()},
        }


@dataclass
class JobRun:
    seconds: float
    tree: dict  # TreeSampler.summary()
    log: str


def run_job(args: list[str], conf: dict, log_file: Path) -> JobRun:
    """`pixloc ARGS...` in a subprocess, sampled; raises with the log's tail if it fails."""
    command = [sys.executable, "-m", "jobs.cli", *args]
    start = time.perf_counter()
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        with TreeSampler(process.pid, conf["kinds"], conf["sample_interval_s"]) as sampler:
            try:
                process.wait(timeout=conf["job_timeout_s"])
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    seconds = time.perf_counter() - start
    text = log_file.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"pixloc {args[0]} failed ({process.returncode}), see {log_file}:\n{text[-3000:]}")
    return JobRun(seconds, sampler.summary(), text)


# ----- the benchmark


def query_subset(scene_dir: Path, count: int, out_file: Path, sort_by_position: bool = False) -> list[str]:
    """The first `count` queries of the city (random points along its streets), as a query list;
    sorted by a 50 m grid of their GPS priors (rows of cells, west to east) if asked."""
    intrinsics = read_query_list(scene_dir / "queries_with_intrinsics.txt")
    names = list(intrinsics)[:count]
    if sort_by_position:
        summary = json.loads((scene_dir / "scene.json").read_text())
        origin = EnuOrigin(summary["origin"]["lat"], summary["origin"]["lon"], summary["origin"]["alt"])
        priors = read_priors(scene_dir / "priors.csv")
        lla = np.array([priors[name].position for name in names])
        east, north = wgs84_to_enu(lla[:, 0], lla[:, 1], lla[:, 2], origin)[:, :2].T
        names = [names[i] for i in np.lexsort((east, np.floor(north / 50.0)))]
    write_query_list(out_file, {name: intrinsics[name] for name in names})
    return names


def ensure_store(root: Path, conf: dict) -> dict:
    """The city's feature store for this code; rebuilt once if the existing one is refused."""
    store = root / "store"
    args = ["features", "--map", str(root / "map"), "--images", str(root / "scene/mapping"),
            "--store", str(store), "--workers", str(conf["workers"]), "--extractor", conf["extractor"]]
    try:
        run = run_job(args, conf, root / "features.log")
    except RuntimeError as error:
        logger.warning("%s: store refused, rebuilding it (%s)", store, str(error).splitlines()[0])
        shutil.rmtree(store, ignore_errors=True)
        run = run_job(args, conf, root / "features.log")
    extracted = re.search(r"\((\d+) extracted", run.log)
    # The memory of an extracting job: a rerun on a current store only plans.
    return {"wall_s": round(run.seconds, 1), "cpu_s": round(run.tree["cpu_s"], 1),
            "extracted": int(extracted.group(1)) if extracted else None,
            "peak_rss_mb": {kind: run.tree["peak_rss_mb"].get(kind) for kind in ("driver", "feature_worker")}}


def localize_args(root: Path, query_list: Path, out: Path, conf: dict, workers: int,
                  address: str | None = None) -> list[str]:
    args = ["localize", "--map", str(root / "map"), "--store", str(root / "store"),
            "--queries", str(root / "scene/queries"), "--query-list", str(query_list),
            "--priors", str(root / "scene/priors.csv"), "--out", str(out), "--method", conf["method"],
            "--extractor", conf["extractor"], "--workers", str(workers)]
    args += ["--conf", *conf["localize_conf"]] if conf["localize_conf"] else []
    return args + (["--address", address] if address else [])


def job_summary(out: Path) -> dict:
    """What the job reports about itself (cell loads, evictions, actors), when it does."""
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def measure_size(blocks: tuple[int, int], conf: dict, work: Path, repeat: int = 0) -> dict:
    root = build_city(conf, blocks)
    build = json.loads((root / "build.json").read_text())
    build["features"] = ensure_store(root, conf)
    manifest = json.loads((root / "map/manifest.json").read_text())
    cells = len(json.loads((root / "map/shards.json").read_text())["cells"])
    out = work / f"city-{blocks[0]}x{blocks[1]}" / f"run-{repeat}"
    names = query_subset(root / "scene", conf["queries"], work / f"queries-{blocks[0]}x{blocks[1]}.txt")
    run = run_job(localize_args(root, work / f"queries-{blocks[0]}x{blocks[1]}.txt", out, conf, conf["workers"]),
                  conf, work / f"localize-{blocks[0]}x{blocks[1]}-run-{repeat}.log")
    table = pq.read_table(out / "results.parquet")
    ground_truth = {name: pose for name, pose in read_poses(root / "scene/gt_queries.txt").items() if name in names}
    summary = job_summary(out)
    peak = run.tree["peak_rss_mb"]
    accuracy = evaluate(successful_poses(table), ground_truth)
    return {
        "blocks": list(blocks),
        "refs": manifest["num_images"],
        "points": manifest["num_points3D"],
        "cells": cells,
        "queries": table.num_rows,
        "queries_per_s": table.num_rows / run.seconds,
        "cpu_s_per_query": run.tree["cpu_s"] / table.num_rows,
        "stage_ms": {stage: float(np.nanmean(table.column(f"{stage}_ms").to_numpy(zero_copy_only=False)))
                     for stage in STAGES},
        "peak_rss_mb": {kind: peak.get(kind) for kind in ("driver", "query_worker", "shard_actor")},
        "actor_processes": run.tree["processes"].get("shard_actor", 0),
        # Without a job summary every shard actor process loaded its one cell once.
        "cell_loads": summary.get("cell_loads", run.tree["processes"].get("shard_actor", 0)),
        "cell_calls_per_query": summary.get("cell_calls", math.nan) / table.num_rows,
        "driver_bytes_per_query": summary.get("driver_bytes_per_query"),  # counted by the job, when it does
        "recall": accuracy["recall"],
        "precision": accuracy["precision"],
        "details": {"job_s": run.seconds, "cpu_s": run.tree["cpu_s"], "cpu_s_by_kind": run.tree["cpu_s_by_kind"],
                    "processes": run.tree["processes"],
                    "peak_rss_mb_all": peak, "build": build, "job_summary": summary},
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median CPU-s per query (an odd number of runs: a real one), with every run's
    CPU-s per query and queries/s beside it."""
    median = sorted(runs, key=lambda run: run["cpu_s_per_query"])[(len(runs) - 1) // 2]
    return {**median, "runs": {"cpu_s_per_query": [run["cpu_s_per_query"] for run in runs],
                               "queries_per_s": [run["queries_per_s"] for run in runs]}}


def measure_order(blocks: tuple[int, int], shuffled_s: float, conf: dict, work: Path) -> dict:
    """The largest size's queries sorted by position, against its run in the input order (the
    synthetic queries are numbered in random order along the streets)."""
    root = city_dir(conf, blocks)
    query_list = work / "queries-sorted.txt"
    query_subset(root / "scene", conf["queries"], query_list, sort_by_position=True)
    run = run_job(localize_args(root, query_list, work / "sorted", conf, conf["workers"]), conf,
                  work / "localize-sorted.log")
    return {"sorted_s": run.seconds, "shuffled_s": shuffled_s, "blocks": list(blocks),
            "queries": conf["queries"]}


def measure_nodes(blocks: tuple[int, int], conf: dict, work: Path) -> dict:
    """queries/s of the same job on a simulated cluster of one, then two, one-CPU nodes."""
    from ray.cluster_utils import Cluster

    root = city_dir(conf, blocks)
    query_list = work / "queries-nodes.txt"
    query_subset(root / "scene", conf["nodes_queries"], query_list)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    rates = {}
    try:
        for nodes in (1, 2):
            if nodes == 2:
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            run = run_job(localize_args(root, query_list, work / f"nodes-{nodes}", conf, nodes, cluster.address),
                          conf, work / f"localize-nodes-{nodes}.log")
            rates[str(nodes)] = conf["nodes_queries"] / run.seconds
    finally:
        cluster.shutdown()
    return rates


def main(out: Path | None = None, quick: bool = False, **conf) -> dict:
    conf = {**default_conf, **(QUICK if quick else {}), **conf}
    work = Path(conf["data_dir"]) / "runs" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    # Rounds of every size in turn, so that the machine's drifts (this VM's speed varies by 15 %
    # from one minute to the next) reach every size alike.
    rounds = [[measure_size(tuple(blocks), conf, work, repeat) for blocks in conf["blocks"]]
              for repeat in range(conf["repeats"])]
    sizes = [median_run(list(runs)) for runs in zip(*rounds)]
    largest = tuple(conf["blocks"][-1])
    order = measure_order(largest, sizes[-1]["details"]["job_s"], conf, work) if conf["order"] else {}
    nodes = measure_nodes(tuple(conf["blocks"][0]), conf, work) if conf["nodes_queries"] else {}
    report = {"sizes": sizes, "order": order, "nodes": nodes,
              "details": {"conf": {key: value for key, value in conf.items() if key != "kinds"},
                          "machine": machine_load(), "work_dir": str(work)}}
    print_table(report)
    write_report(report, out)
    if conf["plot"]:
        plot(report, Path(out).with_suffix(".png") if out else work / "scale.png")
    return report


def machine_load() -> dict:
    return {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg())}


def print_table(report: dict) -> None:
    header = (f"{'refs':>6} {'points':>8} {'cells':>5} {'q':>4} {'q/s':>5} {'CPU s/q':>7} "
              f"{'RSS MB drv/wrk/act':>20} {'actors':>6} {'loads':>5} {'B/q drv':>8} {'R@.25m':>6} {'prec':>5}  ms/stage")
    print(header)
    for size in report["sizes"]:
        rss = "/".join("-" if size["peak_rss_mb"][k] is None else f"{size['peak_rss_mb'][k]:.0f}"
                       for k in ("driver", "query_worker", "shard_actor"))
        traffic = "-" if size["driver_bytes_per_query"] is None else f"{size['driver_bytes_per_query']:.0f}"
        stages = " ".join(f"{stage} {ms:.0f}" for stage, ms in size["stage_ms"].items())
        precision = "-" if size["precision"] is None else f"{100 * size['precision']:.0f}%"
        print(f"{size['refs']:>6} {size['points']:>8} {size['cells']:>5} {size['queries']:>4} "
              f"{size['queries_per_s']:>5.2f} {size['cpu_s_per_query']:>7.2f} {rss:>20} {size['actor_processes']:>6} "
              f"{size['cell_loads']:>5} {traffic:>8} {100 * size['recall']['0.25m_2deg']:>5.1f}% {precision:>5}  {stages}")
        features = size["details"]["build"]["features"]
        if features.get("extracted"):
            rss = features["peak_rss_mb"]
            print(f"{'':>6} pixloc features: {features['extracted']} images in {features['wall_s']:.0f} s, "
                  f"peak RSS MB driver {rss['driver']:.0f} / worker {rss['feature_worker'] or 0:.0f}")
        if len(size["runs"]["cpu_s_per_query"]) > 1:
            print(f"{'':>6} CPU s/q of each run: " + ", ".join(f"{cpu:.2f}" for cpu in size["runs"]["cpu_s_per_query"]))
    if report["order"]:
        order = report["order"]
        print(f"order ({order['queries']} queries, {order['blocks']} blocks): sorted {order['sorted_s']:.0f} s, "
              f"input order {order['shuffled_s']:.0f} s (x{order['shuffled_s'] / order['sorted_s']:.2f})")
    if report["nodes"]:
        print("simulated cluster, queries/s: " + ", ".join(f"{n} node(s) {qps:.2f}" for n, qps in report["nodes"].items()))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = [size["refs"] for size in report["sizes"]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in ("driver", "query_worker", "shard_actor"):
        axes[0].plot(refs, [size["peak_rss_mb"][kind] or np.nan for size in report["sizes"]], "o-", label=kind)
    axes[0].set(title="peak RSS per process (MB)", xlabel="reference images", xscale="log")
    axes[0].legend()
    axes[1].plot(refs, [size["cpu_s_per_query"] for size in report["sizes"]], "o-", label="CPU s / query")
    axes[1].plot(refs, [size["queries_per_s"] for size in report["sizes"]], "s-", label="queries / s")
    axes[1].plot(refs, [size["recall"]["0.25m_2deg"] for size in report["sizes"]], "^-", label="recall 0.25 m, 2°")
    axes[1].set(title="throughput and accuracy", xlabel="reference images", xscale="log")
    axes[1].legend()
    bottom = np.zeros(len(refs))
    for stage in STAGES:
        values = np.array([size["stage_ms"][stage] for size in report["sizes"]])
        axes[2].bar(range(len(refs)), values, bottom=bottom, label=stage)
        bottom += values
    axes[2].set(title="ms per query and stage", xticks=range(len(refs)), xticklabels=refs, xlabel="reference images")
    axes[2].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("Wrote %s", path)
