"""`pixloc bench streaming`: what the driver of `pixloc localize` costs before the first query
runs, per number of queries, the old way (one Python object per query) beside the new (columns).

For N query-list entries (with a WGS84 priors CSV), each way in a fresh process connected to one
local Ray, from reading the input files to a Ray dataset ready to run:

* prepare_s: wall seconds;
* peak_rss_mb: the process's measured peak RSS (ru_maxrss), and rss_before_mb, its RSS once
  imports, the Ray connection and a warm-up on 10 queries are done (what it costs whatever N);
* held_bytes_per_query: RSS once the dataset is ready minus rss_before, divided by N (what the
  driver holds per query while the job runs);
* sent_bytes_per_query: what the driver counts as sent (the new: the query table's Arrow bytes;
  the old: each QueryInput pickled).

The old way is main's driver before the query table (kept here only, as the baseline): read the
query list and priors into dicts of dataclasses, a QueryInput per query, each prior converted on
its own for the spatial order, `ray.data.from_items`, every query pickled to count its bytes. Its
readers are today's (columnar, then turned into dicts), so its reading time is a lower bound of the
old code's.

first_result: on a small synthetic scene (`pixloc synth`, its map and store), `pixloc localize`
with query lists of growing length whose entries are symlinks to the scene's few query images
(each entry with its source's intrinsics and prior): seconds from the call to the first result row
(Ray start-up, worker start-up and one query included), then the job is stopped.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import write_report
from pixloc_core import files
from pixloc_core.geo import EnuOrigin
from pixloc_core.io import read_priors, read_query_list, write_priors, write_query_list
from pixloc_core.map_io import GeoInfo, MapIndex, Similarity

logger = logging.getLogger(__name__)

default_conf = {
    "sizes": [1000, 10000, 100000, 1000000],  # query-list entries
    "ways": ["old", "new"],
    "old_max_queries": 100000,  # the old way takes minutes beyond (2.4 min for 10^5 at load 44)
    "origin": (47.3769, 8.5417),  # WGS84 of the map's ENU origin; priors spread around it
    "spread_m": 2000.0,  # priors uniform in a square of this side
    "cell_size_m": 50.0,
    "first_result_entries": [100, 10000],  # query lists of the first-result jobs; [] skips them
    "workers": 2,
    "quick": False,  # CI smoke test: small sizes, no first-result jobs
}
QUICK = {"sizes": [1000], "first_result_entries": []}


def write_inputs(folder: Path, count: int, conf: dict) -> tuple[Path, Path]:
    """A query list and a WGS84 priors CSV of `count` queries (fast, vectorized text)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    names = [f"q_{index:07d}.jpg" for index in range(count)]
    query_list, priors = folder / "queries.txt", folder / "priors.csv"
    query_list.write_text("".join(f"{name} PINHOLE 320 240 277.3 277.3 160 120\n" for name in names))
    east, north = rng.uniform(-conf["spread_m"] / 2, conf["spread_m"] / 2, (2, count))
    lat = conf["origin"][0] + north / 111_320.0
    lon = conf["origin"][1] + east / (111_320.0 * np.cos(np.radians(conf["origin"][0])))
    priors.write_text("name,lat,lon,alt,sigma_m\n" + "".join(
        f"{name},{a:.8f},{o:.8f},409.6,10\n" for name, a, o in zip(names, lat, lon)))
    return query_list, priors


def map_index(conf: dict) -> MapIndex:
    """A georegistered map without images: all that ordering priors needs of one."""
    return MapIndex(GeoInfo(EnuOrigin(*conf["origin"]), Similarity.identity()), None, {"fingerprint": ""}, None)


def prepare_old(query_list: Path, priors: Path, queries_dir: Path, index: MapIndex, cell_size_m: float):
    from pixloc_core.localize import QueryInput, spatial_order
    import ray

    intrinsics, prior_of = read_query_list(query_list), read_priors(priors)
    queries = [QueryInput(name, files.absolute(queries_dir / name), intrinsics[name], prior_of.get(name))
               for name in intrinsics]
    positions = np.array([index.prior_to_map(query.prior) for query in queries])
    queries = [queries[i] for i in spatial_order(positions, cell_size_m).tolist()]
    sent = sum(len(pickle.dumps(query)) for query in queries)
    return queries, ray.data.from_items([{"query": query} for query in queries]), sent


def prepare_new(query_list: Path, priors: Path, queries_dir: Path, index: MapIndex, cell_size_m: float):
    from jobs.localize import default_conf, query_dataset, query_names
    from pixloc_core.io import read_priors_table, read_query_list_table
    from pixloc_core.localize import query_positions, query_table, spatial_order

    listed = read_query_list_table(query_list)
    queries = query_table(query_names(queries_dir, listed), files.absolute(queries_dir), listed,
                          read_priors_table(priors))
    queries = queries.take(spatial_order(query_positions(queries, index), cell_size_m))
    return queries, query_dataset(queries, default_conf), queries.nbytes


PREPARE = {"old": prepare_old, "new": prepare_new}


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def measure_prepare(way: str, query_list: Path, priors: Path, count: int, address: str, conf: dict) -> dict:
    """In a fresh process (its own peak RSS): one way's preparation, after a warm-up on 10 queries
    (imports and Ray Data's first calls, the same whatever N)."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    warm_up = write_inputs(query_list.parent / "warm-up", 10, conf)
    PREPARE[way](*warm_up, query_list.parent / "images", map_index(conf), conf["cell_size_m"])
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    queries, dataset, sent = PREPARE[way](query_list, priors, query_list.parent / "images", map_index(conf),
                                          conf["cell_size_m"])
    seconds = time.perf_counter() - start
    gc.collect()
    held_mb = rss_mb() - before  # queries and dataset still referenced, as during the job
    return {"way": way, "queries": count, "prepare_s": seconds, "rss_before_mb": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "held_bytes_per_query": held_mb * 2**20 / count, "sent_bytes_per_query": sent / count,
            "dataset_rows": dataset.count() if len(queries) else 0}


def first_result_s(entries: int, scene: dict, work: Path, conf: dict) -> float:
    """Seconds from `localize.main` to its first result row, for a query list of `entries`."""
    from jobs import localize

    folder = work / f"first-{entries}"
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    sources = sorted(scene["intrinsics"])
    listed, priors = {}, {}
    for index in range(entries):
        source = sources[index % len(sources)]
        name = f"e_{index:06d}.jpg"
        (images / name).symlink_to(scene["queries"] / source)
        listed[name], priors[name] = scene["intrinsics"][source], scene["priors"][source]
    write_query_list(folder / "queries.txt", listed)
    write_priors(folder / "priors.csv", priors)

    class FirstRow(Exception):
        pass

    def stop(row: dict) -> None:
        raise FirstRow

    start = time.perf_counter()
    try:
        localize.main(scene["map"], scene["store"], images, folder / "out", folder / "queries.txt",
                      folder / "priors.csv", conf={"workers": conf["workers"]}, on_result=stop)
    except FirstRow:
        return time.perf_counter() - start
    raise RuntimeError("the job ended without a result row")


def build_scene(work: Path, conf: dict) -> dict:
    """A synthetic street with 4 queries, its map and its store, through the CLI contract."""
    from jobs import cli, features

    scene_dir, map_dir, store = work / "scene", work / "map", work / "store"
    cli.main(["synth", "--out", str(scene_dir), "--refs", "30", "--queries", "4", "--width", "320", "--height", "240"])
    cli.main(["map", "--images", str(scene_dir / "mapping"), "--out", str(map_dir),
              "--reference-model", str(scene_dir / "reference_model")])
    features.main(map_dir, scene_dir / "mapping", str(store), {"workers": conf["workers"]})
    return {"map": map_dir, "store": str(store), "queries": scene_dir / "queries",
            "intrinsics": read_query_list(scene_dir / "queries_with_intrinsics.txt"),
            "priors": read_priors(scene_dir / "priors.csv")}


def main(out: Path | None = None, **conf) -> dict:
    import ray

    from cluster.runtime import init_ray

    conf = {**default_conf, **(QUICK if conf.get("quick") else {}), **conf}
    report = {"prepare": [], "first_result": []}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        with init_ray(None, num_cpus=1):
            address = ray.get_runtime_context().gcs_address
            for count in conf["sizes"]:
                query_list, priors = write_inputs(work / f"inputs-{count}", count, conf)
                for way in conf["ways"]:
                    if way == "old" and count > conf["old_max_queries"]:
                        continue
                    with multiprocessing.get_context("spawn").Pool(1) as pool:
                        result = pool.apply(measure_prepare, (way, query_list, priors, count, address, conf))
                    logger.info("%s", result)
                    report["prepare"].append(result)
        if conf["first_result_entries"]:
            scene = build_scene(work, conf)
            for entries in conf["first_result_entries"]:
                report["first_result"].append({"entries": entries,
                                               "first_result_s": first_result_s(entries, scene, work, conf)})
    print_table(report)
    write_report(report, out)
    return report


def print_table(report: dict) -> None:
    print(f"{'queries':>9} {'way':>4} {'prepare s':>10} {'peak RSS MB':>12} {'RSS before':>11} "
          f"{'held B/query':>13} {'sent B/query':>13}")
    for row in report["prepare"]:
        print(f"{row['queries']:>9} {row['way']:>4} {row['prepare_s']:>10.2f} {row['peak_rss_mb']:>12.0f} "
              f"{row['rss_before_mb']:>11.0f} {row['held_bytes_per_query']:>13.0f} {row['sent_bytes_per_query']:>13.0f}")
    for row in report["first_result"]:
        print(f"first result with {row['entries']} query-list entries: {row['first_result_s']:.1f} s")
