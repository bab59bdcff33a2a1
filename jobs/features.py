"""`pixloc features`: precompute the reference features of a map into the Parquet store.

A Ray Data job over the reference images. A pool of stateful workers (a callable class holding the
extractor) reads the observations of its batch's images from the map's MAP/observations.parquet
(the 2D keypoints of the model that observe a 3D point: exact, no reprojection error), loads each
image, extracts its pyramid and samples every level there, then writes one part file per batch and
partition (cell, level), and into the cell's sparse partition the map's descriptor of each observed
point with its position, for SIFT + PnP inside the cell's shard actor. An image belongs to every
cell that lists it, core or halo, so its rows are written into each of them. The driver holds only
the map's compact tables (reference images, shard index, manifest: O(images), no 3D points, no
descriptors), commits each returned batch and publishes a cell's partitions once all its images
are committed; a rerun skips committed images (see cluster/store.py for the layout and the commit
protocol). A map written before its tables existed gets them derived from its model, once.

After `pixloc map --update`, the same store follows the map: the cells whose fingerprint the
update left unchanged keep their partitions, and only the images of the changed and new cells are
read again.

A rerun also repairs: published partitions whose files are missing or of the wrong size (with
`--repair`: whose checksums differ too) are recomputed from their cell's images and republished;
no other partition is rewritten.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from tqdm import tqdm

from cluster.runtime import gpus_per_worker, init_ray, set_torch_threads
from cluster.store import (SPARSE_LEVEL, WIDE_LEVEL, Commit, FeatureStore, PartFile, PartitionPublisher, StoreInfo,
                           batch_key, observation_table, parse_partition_dir, partition_dir, sparse_table)
from pixloc_core.extractors import DEFAULT as DEFAULT_EXTRACTOR, load_extractor
from pixloc_core.extractors.base import Extractor, resize_longest_side, sample_level, widened
from pixloc_core import files
from pixloc_core.files import Location
from pixloc_core.images import ImageReadError, list_images, read_image
from pixloc_core.map_io import (ImageObservations, MapIndex, ReferenceImages, load_map_index, observation_table_info,
                                read_observations)

from .config import merge_conf

logger = logging.getLogger(__name__)

default_conf = {
    "extractor": None,  # None: the existing store's extractor, DEFAULT_EXTRACTOR for a new store
    "checkpoint": None,  # the extractor's weights file, when not the shipped ones (a path every node can read)
    "workers": 2,
    "batch_size": 4,  # images per worker call, and so per part file
    "cpus_per_worker": 1,
    "gpus_per_worker": None,  # None: the cluster's GPUs shared among the workers, if it has any
    "aggregate": False,  # one row per 3D point and cell instead of one per observation
    "repair": False,  # also read every published file to find damaged ones (sizes are always checked)
    # The coarsest level widened over (2 r + 1)^2 of its cells is stored too (StoreInfo.wide_cells),
    # a second start of `localize`'s coarse-to-fine alignment. None: the existing store's setting,
    # NEW_STORE_WIDE_CELLS for a new store; 0: none.
    "wide_cells": None,
}
# r = 3: `pixloc bench basin` on fountain-P11, r = 1, 2, 3, 5 at stride 16: 65, 75, 79, 82 % mean
# success for `alike-n` (50 % without); r = 3 keeps the windows (112 px at stride 16) within a
# 640 px image's facade.
NEW_STORE_WIDE_CELLS = 3


class ReferenceImageError(ValueError):
    """A reference image that cannot be read; the message names the file and the reason."""


class ImageFolders:
    """The folders a map's photos are read from (the build's and each update's): every image from
    the first folder that holds it. One listing per folder, not one request per image."""

    def __init__(self, folders: Sequence[Location]):
        self.folders = list(folders)
        self.paths: dict[str, str] = {}
        for folder in self.folders:
            root = files.absolute(folder).rstrip("/")  # names the file from any worker on any node
            for name in list_images(folder):
                self.paths.setdefault(name, f"{root}/{name}")

    def locate(self, items: list[dict], map_dir: Location) -> list[dict]:
        """The items, each with the "path" of its image; all of them must be found."""
        self.require([item["name"] for item in items], map_dir)
        return [{**item, "path": self.paths[item["name"]]} for item in items]

    def require(self, names: list[str], map_dir: Location) -> None:
        missing = [name for name in names if name not in self.paths]
        if missing:
            raise FileNotFoundError(f"{', '.join(map(str, self.folders))}: {len(missing)} reference images of "
                                    f"{map_dir} not found, e.g. {', '.join(missing[:3])}")


def map_cells(map_index: MapIndex) -> dict[str, list[int]]:
    """Cell id -> the ids of its reference images, core and halo."""
    if map_index.shards is None:
        raise FileNotFoundError(f"{map_index.path}: the map has no shard index (shards.json); rebuild it with `pixloc map`")
    references = map_index.references
    image_ids = dict(zip(references.names, references.image_ids.tolist()))
    return {cell: sorted(image_ids[name] for name in map_index.shards.images_of(cell)) for cell in map_index.shards.cell_ids}


def partition_items(references: ReferenceImages, partitions: dict[tuple[str, int | str], list[int]]) -> list[dict]:
    """One Ray Data row per reference image of some partition (cell, level) -> image ids: its id,
    name, camera size and the partitions (`partition_dir` strings) it writes into; the workers
    read its observations themselves."""
    partitions_of_image = defaultdict(list)
    for (cell_id, level), image_ids in sorted(partitions.items(), key=str):
        for image_id in image_ids:
            partitions_of_image[image_id].append(partition_dir(cell_id, level))
    return [{"image_id": image_id, "name": references.name(image_id),
             "camera_size": references.camera_size(image_id), "partitions": partitions_of_image[image_id]}
            for image_id in sorted(partitions_of_image)]


SampledLevels = dict[int | str, tuple[torch.Tensor, torch.Tensor]]  # partition level -> features (N, C), confidences (N,)


def sample_reference_image(extractor: Extractor, path: Location, xy: np.ndarray, camera_size: np.ndarray,
                           wide_cells: int = 0) -> SampledLevels:
    """Per partition level (0 the coarsest, WIDE_LEVEL when wide_cells > 0): features (N, C) and
    confidences (N,) of a reference image at the pixels `xy` (N, 2) of its observations, in the
    model's camera of size (w, h)."""
    image, _ = resize_longest_side(read_image(path), extractor.max_size)
    levels = dict(enumerate(level[0].to("cpu") for level in extractor.extract(image[None])))
    if wide_cells:
        levels[WIDE_LEVEL] = widened(levels[0], wide_cells)
    # The observations are in pixels of the model's camera; sampling normalises by its size,
    # so the resized image needs no camera of its own.
    p2d = torch.from_numpy(xy).float()  # (N, 2)
    return {key: sample_level(level, p2d, torch.as_tensor(camera_size).float()) for key, level in levels.items()}


def sample_reference_images(extractor: Extractor, map_index: MapIndex, images_dir: Location, image_ids: list[int],
                            wide_cells: int = 0) -> list[tuple[ImageObservations, SampledLevels]]:
    """What the reference PixLoc does for every query, for the benchmarks that compare with the
    store: per image, its observations and `sample_reference_image`, computed from the photo."""
    observed = read_observations(map_index.path, image_ids)
    references = map_index.references
    return [(observed[image_id], sample_reference_image(
                extractor, files.location(images_dir) / references.name(image_id),
                observed[image_id].xy, references.camera_size(image_id), wide_cells))
            for image_id in image_ids]


class ReferenceFeatureWriter:
    """Ray Data callable class: one extractor per worker, reused across batches."""

    def __init__(self, store_url: str, extractor_name: str, checkpoint: str | None, map_url: str,
                 map_fingerprint: str):
        set_torch_threads()
        self.extractor = load_extractor(extractor_name, checkpoint)
        self.store = FeatureStore.open(store_url, extractor_id=self.extractor.extractor_id)
        self.map_url = files.location(map_url)
        self.map_fingerprint = map_fingerprint

    def extract(self, item: dict, observed: ImageObservations) -> dict[tuple[str, int | str], pa.Table]:
        """The rows of one image (`ImageFolders.locate`d), per partition (cell, level) it writes into."""
        levels = sample_reference_image(self.extractor, files.location(str(item["path"])), observed.xy,
                                        item["camera_size"], self.store.info.wide_cells)
        image_ids = np.full(len(observed.point3D_ids), item["image_id"], np.int32)
        tables = {}
        for partition in item["partitions"]:
            cell, level = parse_partition_dir(str(partition))
            if level == SPARSE_LEVEL:
                rows = observed.described
                tables[cell, level] = sparse_table(observed.point3D_ids[rows], image_ids[rows], observed.xyz[rows],
                                                   observed.descriptors)
                continue
            features, confidence = levels[level]
            tables[cell, level] = observation_table(observed.point3D_ids, image_ids, observed.xyz,
                                                    features.numpy(), confidence.numpy())
        return tables

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Writes the batch's part files; returns its commit record (JSON, empty when no image
        succeeded) and the unreadable images, which are left out of it so that a rerun retries them."""
        rows = [{column: values[i] for column, values in batch.items()} for i in range(len(batch["image_id"]))]
        observed = read_observations(self.map_url, batch["image_id"].tolist())
        partitions, image_ids, failures = defaultdict(list), [], []
        for row in rows:
            try:
                tables = self.extract(row, observed[int(row["image_id"])])
            except ImageReadError as error:
                failures.append(str(error))
                continue
            image_ids.append(int(row["image_id"]))
            for partition, table in tables.items():
                partitions[partition].append(table)
        commit = ""
        if image_ids:
            key = batch_key(image_ids)
            parts = [self.store.write_part(cell, level, key, pa.concat_tables(tables))
                     for (cell, level), tables in sorted(partitions.items(), key=str)]
            commit = json.dumps(Commit(key, image_ids, parts, self.map_fingerprint).to_json())
        return {"commit": np.array([commit]), "failures": np.array([json.dumps(failures)])}


def pyramid_shape(extractor: Extractor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides and channels per level, from one pass on a small blank image."""
    pyramid = extractor.extract(torch.zeros(1, 3, 64, 64))
    return tuple(level.stride for level in pyramid), tuple(level.features.shape[1] for level in pyramid)


def extract(store: FeatureStore, map_index: MapIndex, items: list[dict], conf: dict, description: str,
            on_commit: Callable[[Commit], None]) -> list[str]:
    """Run the workers over `items` (Ray initialised) of the map `map_index`; each returned batch
    goes to `on_commit`. Returns the unreadable images' errors."""
    dataset = ray.data.from_items(items).map_batches(
        ReferenceFeatureWriter,
        fn_constructor_kwargs={"store_url": store.url, "extractor_name": conf["extractor"], "checkpoint": conf["checkpoint"],
                               "map_url": files.absolute(map_index.path), "map_fingerprint": map_index.fingerprint},
        batch_size=conf["batch_size"],
        compute=ray.data.ActorPoolStrategy(size=conf["workers"]),
        num_cpus=conf["cpus_per_worker"], num_gpus=gpus_per_worker(conf))
    failures: list[str] = []
    with tqdm(total=len(items), desc=description, unit="img") as progress:
        for row in dataset.iter_rows():
            batch_failures = json.loads(row["failures"])
            failures += batch_failures
            progress.update(len(batch_failures))
            if row["commit"]:
                commit = Commit.from_json(json.loads(row["commit"]))
                on_commit(commit)
                progress.update(len(commit.image_ids))
    return failures


def repair(store: FeatureStore, map_index: MapIndex, cells: dict[str, list[int]],
           images: ImageFolders, conf: dict, damaged: dict[tuple[str, int], str]) -> list[str]:
    """Recompute the damaged partitions from all images of their cells and republish them (Ray
    initialised); nothing is committed, so a failed repair leaves them damaged for the next rerun.
    Returns the unreadable images' errors."""
    for (cell, level), reason in sorted(damaged.items()):
        logger.warning("repairing cell %s level %s: %s", cell, level, reason)
    parts: dict[tuple[str, int | str], list[PartFile]] = defaultdict(list)

    def collect(commit: Commit) -> None:
        for part in commit.parts:
            parts[part.cell, part.level].append(part)

    items = images.locate(partition_items(map_index.references, {partition: cells[partition[0]] for partition in damaged}),
                          map_index.path)
    failures = extract(store, map_index, items, conf, "repair reference features", collect)
    if not failures:
        fingerprints = map_index.manifest["cell_fingerprints"]
        for cell, level in damaged:
            store.publish(cell, level, parts[cell, level], fingerprints[cell])
    return failures


def main(map_dir: Location, images_dir: Location | Sequence[Location] | None, store_url: str,
         conf: dict | None = None, address: str | None = None) -> dict:
    """Fill the store for every reference image in a cell of the map whose partitions are not
    current, and recompute damaged partitions; returns counts and timings. The images are read
    from `images_dir` (one folder or several); None: the folders the map was built and updated from."""
    conf = merge_conf(default_conf, conf)
    if conf["checkpoint"] is not None:
        conf["checkpoint"] = files.absolute(conf["checkpoint"])  # the workers' working directory may differ
    # The compact map (O(images)); the workers read the observations of their images themselves.
    map_index = load_map_index(map_dir, with_observations=True)
    cells = map_cells(map_index)
    store_exists = FeatureStore.exists(store_url)
    # Settings left unset follow an existing store (a job filling it on after a map update, or
    # resumed), so that a new default never turns it into a store of another extractor.
    existing = FeatureStore.open(store_url).info if store_exists else None
    if conf["extractor"] is None:
        conf["extractor"] = existing.extractor_name if existing else DEFAULT_EXTRACTOR
    if conf["wide_cells"] is None:
        conf["wide_cells"] = existing.wide_cells if existing else NEW_STORE_WIDE_CELLS
    extractor = load_extractor(conf["extractor"], conf["checkpoint"])
    strides, channels = pyramid_shape(extractor)
    _, descriptor_dim = observation_table_info(map_dir)
    info = StoreInfo(extractor.extractor_id, map_index.fingerprint, strides, channels, conf["aggregate"],
                     sparse_keypoints=map_index.keypoint_type if descriptor_dim else "",
                     sparse_dim=descriptor_dim, wide_cells=conf["wide_cells"])
    if images_dir is None:
        folders = [files.location(folder) for folder in map_index.image_folders]
    else:
        folders = [images_dir] if isinstance(images_dir, (Path, str)) else list(images_dir)
    images = ImageFolders(folders)
    if not store_exists:
        # Before the store is created: a first run that cannot read its images must not leave a
        # store.json behind, which would bind the store to this run's extractor and settings.
        images.require(sorted({name for cell in cells for name in map_index.shards.images_of(cell)}), map_dir)
    store = FeatureStore.create(store_url, info, earlier_maps=map_index.earlier_fingerprints)
    fingerprints = map_index.manifest["cell_fingerprints"]
    current = {cell for cell in cells if all(store.is_current(cell, level, fingerprints[cell], map_index.fingerprint)
                                             for level in info.levels())}
    if store.info.map_fingerprint != map_index.fingerprint:
        logger.info("%s: store of the map before its update: %d of %d cells unchanged, their partitions reused",
                    store.url, len(current), len(cells))
    stale = {cell: image_ids for cell, image_ids in cells.items() if cell not in current}
    publisher = PartitionPublisher(store, stale, fingerprints, map_index.fingerprint)
    for commit in store.commits(map_index.fingerprint):
        publisher.record(commit)
    items = images.locate(partition_items(map_index.references, {(cell, level): image_ids for cell, image_ids in stale.items()
                                                                 for level in info.levels()}), map_dir)
    pending = [item for item in items if item["image_id"] not in publisher.committed]
    logger.info("%s: %d reference images in %d cells to fill, %d already committed, %d to extract with %s",
                store.url, len(items), len(stale), len(items) - len(pending), len(pending), extractor.extractor_id)
    publisher.publish_unpublished()
    damaged = store.damaged_partitions([(cell, level) for cell in sorted(current) for level in info.levels()],
                                       checksums=conf["repair"])
    if address is not None and store.storage.is_local:
        logger.warning("%s: a local store on a Ray cluster only works if every node mounts it at this path "
                       "(use s3://bucket/prefix otherwise)", store.url)

    extracted = 0  # counted from what the workers return, not from what was asked of them
    failures: list[str] = []
    seconds = first_commit_s = 0.0
    if pending or damaged:
        with init_ray(address, num_cpus=None if address else conf["workers"] * conf["cpus_per_worker"]):
            start = time.perf_counter()
            if damaged:
                failures += repair(store, map_index, cells, images, conf, damaged)

            def commit_batch(commit: Commit) -> None:
                nonlocal extracted, first_commit_s
                store.commit(commit)
                publisher.add(commit)
                first_commit_s = first_commit_s or time.perf_counter() - start
                extracted += len(commit.image_ids)

            if pending:
                failures += extract(store, map_index, pending, conf, "reference features", commit_batch)
            seconds = time.perf_counter() - start
    if failures:
        raise ReferenceImageError(f"{len(failures)} reference image(s) unreadable, their cells are not "
                                  f"published (fix them and rerun to resume): {'; '.join(failures[:3])}")
    store.adopt_map(map_index.fingerprint)
    # seconds: the Ray Data job(s), worker start-up included; first_commit_s: until the first batch.
    num_images = len({image_id for image_ids in cells.values() for image_id in image_ids})
    return {"images": num_images, "skipped": num_images - len(pending), "extracted": extracted,
            "cells_published": publisher.published, "cells_reused": len(current),
            "partitions_repaired": len(damaged), "seconds": seconds, "first_commit_s": first_commit_s}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map", type=files.location, required=True,
                        help="map directory written by `pixloc map` (a local path or s3://bucket/prefix)")
    parser.add_argument("--images", type=files.location, nargs="+", default=None,
                        help="folder(s) of the reference images, local paths or s3://bucket/prefix; an image is "
                             "read from the first that holds it (default: the folders the map was built and "
                             "updated from, as its manifest records them)")
    parser.add_argument("--store", required=True, help="store URL: a local path or s3://bucket/prefix")
    parser.add_argument("--extractor", default=default_conf["extractor"],
                        help=f"feature extractor name (default: an existing store's, {DEFAULT_EXTRACTOR} for a new one)")
    parser.add_argument("--checkpoint", default=default_conf["checkpoint"],
                        help="the extractor's weights (e.g. PixLoc's checkpoint_best.tar with --extractor unet-vgg16, "
                             "or one written by `pixloc train`); default: the shipped ones")
    parser.add_argument("--workers", type=int, default=default_conf["workers"], help="extraction workers")
    parser.add_argument("--address", default=None, help="Ray cluster: 'auto' or ray://host:port (default: local)")
    parser.add_argument("--aggregate", action="store_true",
                        help="store one confidence-weighted mean feature per 3D point and cell")
    parser.add_argument("--repair", action="store_true",
                        help="verify the checksum of every published file and recompute damaged partitions "
                             "(missing files and wrong sizes are always repaired)")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise SystemExit(f"pixloc features: --workers must be positive, got {args.workers}")
    flags = {"extractor": args.extractor, "checkpoint": args.checkpoint, "workers": args.workers, "aggregate": args.aggregate, "repair": args.repair}
    stats = main(args.map, args.images, args.store, address=args.address, conf=merge_conf(default_conf, flags, args.conf))
    logger.info("%d images (%d extracted, %d already stored), %d cells published, %d partitions repaired in %.1f s",
                stats["images"], stats["extracted"], stats["skipped"], stats["cells_published"],
                stats["partitions_repaired"], stats["seconds"])
    return 0
