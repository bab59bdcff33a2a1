"""`pixloc bench store`: size, write throughput and read cost of the reference feature store.

On a synthetic scene and its map (built here), it runs `pixloc features` on a local Ray and
measures:

* bytes_per_point: Parquet bytes per stored row (one observation of a 3D point), per level (stride,
  or "wide": the stride-16 level widened);
* images_per_s: reference images per second of the whole job (worker start-up included);
* cell_load_s: seconds to load all levels of the largest cell (one dataset read per level);
* recompute_over_cached: per query, the time to recompute the reference features of its nearest
  reference images (read, CNN pass, sampling: what the reference PixLoc does for every query)
  divided by the time to read the same rows from the store.
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import write_report
from cluster.runtime import init_ray
from cluster.store import SPARSE_LEVEL, FeatureStore
from jobs import cli, features
from pixloc_core.extractors import load_extractor
from pixloc_core.map_io import load_map_index

logger = logging.getLogger(__name__)

default_conf = {
    "extractor": "classic",
    "num_refs": 30,
    "width": 640,
    "height": 480,
    "workers": 2,
    "num_queries": 5,
    "neighbours": 5,  # reference images per query, as PixLoc's retrieval top-k
    "repeats": 3,
}


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def measure(map_dir: Path, images_dir: Path, store_url: str, conf: dict) -> dict:
    """Fill the store from a map, then time reads against recomputation."""
    stats = features.main(map_dir, images_dir, store_url, {"extractor": conf["extractor"], "workers": conf["workers"]})
    first_batch = features.default_conf["batch_size"]
    map_index = load_map_index(map_dir)
    cells = features.map_cells(map_index)
    store = FeatureStore.open(store_url)
    # What a shard loads: the dense levels and the wide one, named by stride ("wide": stride 16 widened).
    levels = {level: str(store.info.strides[level]) if isinstance(level, int) else level
              for level in store.info.levels() if level != SPARSE_LEVEL}

    rows_per_level, bytes_per_point = {}, {}
    for level, name in levels.items():
        manifests = [store.manifest(cell, level) for cell in cells]
        rows_per_level[name] = sum(manifest["rows"] for manifest in manifests)
        size = sum(part["bytes"] for manifest in manifests for part in manifest["files"])
        bytes_per_point[name] = size / rows_per_level[name]

    largest = max(cells, key=lambda cell: len(cells[cell]))
    cell_load_s = timed(lambda: [FeatureStore.open(store_url).load_cell(largest, level)
                                 for level in levels], conf["repeats"])

    # Queries at reference positions spread over the map; each uses its nearest references.
    image_ids, centers = map_index.references.image_ids, map_index.references.centers()
    extractor = load_extractor(conf["extractor"])
    recompute_s, cached_s = [], []
    for query in np.linspace(0, len(image_ids) - 1, conf["num_queries"]).round().astype(int):
        nearest = image_ids[np.argsort(np.linalg.norm(centers - centers[query], axis=1))[:conf["neighbours"]]]
        cell = max(cells, key=lambda c: len(set(cells[c]) & set(nearest.tolist())))
        references = sorted(set(cells[cell]) & set(nearest.tolist()))
        recompute_s.append(timed(lambda: features.sample_reference_images(
            extractor, map_index, images_dir, references, store.info.wide_cells), conf["repeats"]))
        cached_s.append(timed(lambda: [store.load_cell(cell, level, image_ids=references)
                                       for level in levels], conf["repeats"]))
    return {
        "bytes_per_point": bytes_per_point,
        "images_per_s": stats["extracted"] / stats["seconds"],
        "cell_load_s": cell_load_s,
        "recompute_over_cached": statistics.mean(recompute_s) / statistics.mean(cached_s),
        "details": {
            "images": stats["images"], "cells": len(cells), "largest_cell_images": len(cells[largest]),
            "rows_per_level": rows_per_level,
            "recompute_ms_per_query": 1000 * statistics.mean(recompute_s),
            "cached_ms_per_query": 1000 * statistics.mean(cached_s),
            "steady_images_per_s": (stats["extracted"] - first_batch) / (stats["seconds"] - stats["first_commit_s"]),
            "extractor_id": store.info.extractor_id, "workers": conf["workers"],
        },
    }


def build_scene_and_map(work_dir: Path, conf: dict) -> tuple[Path, Path]:
    """A synthetic scene and its map from the reference model, through the CLI contract; kept
    across runs in `work_dir`."""
    scene_dir, map_dir = work_dir / "scene", work_dir / "map"
    if not (scene_dir / "reference_model").is_dir():
        cli.main(["synth", "--out", str(scene_dir), "--refs", str(conf["num_refs"]), "--queries", "0",
                  "--width", str(conf["width"]), "--height", str(conf["height"])])
    if not (map_dir / "manifest.json").is_file():
        cli.main(["map", "--images", str(scene_dir / "mapping"), "--out", str(map_dir),
                  "--reference-model", str(scene_dir / "reference_model")])
    return scene_dir, map_dir


def main(out: Path | None = None, work_dir: Path | None = None, **conf) -> dict:
    conf = {**default_conf, **conf}
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = Path(work_dir or temporary)
        scene_dir, map_dir = build_scene_and_map(work_dir, conf)
        with init_ray(None, num_cpus=conf["workers"]):
            store_dir = Path(tempfile.mkdtemp(dir=work_dir, prefix="store-"))
            report = measure(map_dir, scene_dir / "mapping", str(store_dir), conf)
    print_table(report)
    write_report(report, out)
    return report


def print_table(report: dict) -> None:
    details = report["details"]
    print(f"{'level':>6} {'rows':>9} {'bytes/point':>12}")
    for stride, size in report["bytes_per_point"].items():
        print(f"{stride:>6} {details['rows_per_level'][stride]:>9} {size:>12.1f}")
    print(f"write: {report['images_per_s']:.2f} images/s ({details['images']} images, {details['workers']} workers, "
          f"{details['steady_images_per_s']:.2f} images/s after the first batch)")
    print(f"load one cell ({details['largest_cell_images']} images, all levels): {1000 * report['cell_load_s']:.1f} ms")
    print(f"per query: recompute {details['recompute_ms_per_query']:.0f} ms, read from the store "
          f"{details['cached_ms_per_query']:.1f} ms: recompute/cached = {report['recompute_over_cached']:.0f}x")
