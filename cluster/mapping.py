"""The distributed stages of `pixloc map`: features per image (Ray Data), matches per chunk of pairs
(Ray tasks), one triangulation or SfM submodel per cell (Ray tasks), the cells' points merged cell
by cell (Ray tasks, pixloc_core/mapping/cell_merge.py) and the merged map's model and tables
written in pieces (Ray tasks, pixloc_core/mapping/model_pieces.py).

Every stage writes one file per unit of work under MAP/mapping (pixloc_core/mapping/feature_files.py
and cells.py) and returns only small records to the driver, so no process holds every image's
features, and a rerun skips the units whose files exist: a killed job resumes where it stopped.
The images and MAP/mapping may be local (one machine, or a disk every node mounts) or s3://
prefixes, which every node reads and writes without a shared disk.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import ray
from tqdm import tqdm

from pixloc_core import files
from pixloc_core.files import Location
from pixloc_core.images import ImageReadError, read_image
from pixloc_core.mapping import cell_merge
from pixloc_core.mapping import cells as cell_step
from pixloc_core.mapping import keypoints, matching, model_pieces
from pixloc_core.mapping.feature_files import FeatureFiles, MatchFiles

from .runtime import set_torch_threads

if TYPE_CHECKING:
    import pycolmap

logger = logging.getLogger(__name__)


class FeatureFileWriter:
    """Ray Data callable class: one keypoint extractor per worker, one feature file per image."""

    def __init__(self, root: str, images_dir: str, kind: str, sift_conf: dict):
        set_torch_threads()
        self.files = FeatureFiles(files.location(root))
        self.images_dir = files.location(images_dir)
        self.extractor = keypoints.keypoint_extractor(kind, sift_conf)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Returns per image its name and why it was skipped ("" when written)."""
        failures = []
        for name in batch["name"].tolist():
            try:
                self.files.write(name, self.extractor(read_image(self.images_dir / name)))
                failures.append("")
            except ImageReadError as error:
                failures.append(str(error).split(": ", 1)[-1])
        return {"name": batch["name"], "failure": np.array(failures, dtype=object)}


def extract_features(images_dir: Location, names: list[str], root: Location, kind: str, sift_conf: dict,
                     workers: int) -> list[dict[str, str]]:
    """Feature files for the images of `names` that have none yet; returns one {"name", "reason"}
    per unreadable image (no file is written for it, so that a rerun retries it)."""
    written = FeatureFiles(root)
    pending = [name for name in names if not written.has(name)]
    logger.info("features: %d images, %d already extracted", len(names), len(names) - len(pending))
    if not pending:
        return []
    dataset = ray.data.from_items([{"name": name} for name in pending]).map_batches(
        FeatureFileWriter, fn_constructor_kwargs={"root": files.absolute(root), "images_dir": files.absolute(images_dir),
                                                  "kind": kind, "sift_conf": {**sift_conf, "num_threads": 1}},
        batch_size=4, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    skipped = []
    for row in tqdm(dataset.iter_rows(), total=len(pending), desc=f"keypoints ({kind})", unit="img"):
        if row["failure"]:
            logger.warning("skipping %s: %s", row["name"], row["failure"])
            skipped.append({"name": row["name"], "reason": row["failure"]})
    return skipped


@ray.remote(num_cpus=1)
def _match_chunk(root: str, chunk: list[tuple[str, list[str]]], conf: dict, features_root: str) -> int:
    """Matches of every pair of `chunk` (name0, its partners), one file per name0; each image's
    descriptors are read once per chunk, and only those of the chunk's images."""
    set_torch_threads()
    features, matches_files = FeatureFiles(features_root), MatchFiles(root)
    descriptors: dict[str, object] = {}

    def normalized(name: str):
        if name not in descriptors:
            descriptors[name] = matching.normalize_descriptors(features[name].descriptors)
        return descriptors[name]

    for name0, partners in chunk:
        matches_files.write(name0, {name1: matching.match_descriptors(normalized(name0), normalized(name1), **conf)
                                    for name1 in partners})
    return len(chunk)


def match_pairs(root: Location, grouped_pairs: dict[str, list[str]], conf: dict, images_per_task: int = 32,
                features_root: Location | None = None) -> None:
    """grouped_pairs: name0 -> partners (feature_files.group_pairs), images with features (under
    `features_root`, default `root`) only; the matches go under `root`. Consecutive names form a
    task, so that the images of a chunk lie near each other."""
    conf = {**matching.default_conf, **conf}
    written = MatchFiles(root)
    pending = [(name0, partners) for name0, partners in grouped_pairs.items() if not written.has(name0)]
    logger.info("matching: %d pairs of %d images, %d images already matched",
                sum(map(len, grouped_pairs.values())), len(grouped_pairs), len(grouped_pairs) - len(pending))
    tasks = [_match_chunk.remote(files.absolute(root), pending[start:start + images_per_task], conf,
                                 files.absolute(features_root or root))
             for start in range(0, len(pending), images_per_task)]
    with tqdm(total=len(pending), desc="matching", unit="img") as progress:
        while tasks:
            done, tasks = ray.wait(tasks)
            progress.update(sum(ray.get(done)))


@ray.remote(num_cpus=1)
def _run_cell(step: str, root: str, cell: str, images_dir: str, conf: dict, features_root: str
              ) -> cell_step.CellResult:
    set_torch_threads()
    import pycolmap

    pycolmap.logging.minloglevel = 2
    return importlib.import_module(step).main(files.location(root), cell, files.location(images_dir), conf,
                                              files.location(features_root))


def run_cells(step: ModuleType, root: Location, cells: list[str], images_dir: Location, conf: dict,
              features_root: Location | None = None) -> list[cell_step.CellResult]:
    """One Ray task per cell not done yet, running `step.main` (a per-cell step: cells.py
    triangulates a cell, submodels.py reconstructs one); the results of every cell, finished
    before or now."""
    pending = [cell for cell in cells if not step.is_done(root, cell)]
    label = step.__name__.rsplit(".", 1)[-1]
    logger.info("%s: %d cells, %d already done", label, len(cells), len(cells) - len(pending))
    tasks = [_run_cell.remote(step.__name__, files.absolute(root), cell, files.absolute(images_dir), conf,
                              files.absolute(features_root or root)) for cell in pending]
    results = {}
    with tqdm(total=len(pending), desc=label, unit="cell") as progress:
        while tasks:
            done, tasks = ray.wait(tasks)
            for result in ray.get(done):
                results[result.cell] = result
            progress.update(len(done))
    return [results.get(cell) or step.read_result(root, cell) for cell in cells]


@ray.remote(num_cpus=1)
def _step_task(step: Callable, root: str, jobs: list[tuple], common: dict) -> list:
    """step(root, *job, **common) for each job of a chunk (a function of pixloc_core.mapping)."""
    set_torch_threads()
    import pycolmap

    pycolmap.logging.minloglevel = 2
    return [step(files.location(root), *job, **common) for job in jobs]


def _run_step(step: Callable, root: Location, jobs: list[tuple], common: dict, label: str,
              jobs_per_task: int) -> list:
    """The results of `step` for every job, in Ray tasks of `jobs_per_task` jobs."""
    chunks = [jobs[start:start + jobs_per_task] for start in range(0, len(jobs), jobs_per_task)]
    common_ref = ray.put(common)  # shared tables go to the object store once, not with every task
    tasks = {_step_task.remote(step, files.absolute(root), chunk, common_ref): index
             for index, chunk in enumerate(chunks)}
    results: list = [None] * len(chunks)
    with tqdm(total=len(jobs), desc=label, unit="job", leave=False) as progress:
        pending = list(tasks)
        while pending:
            done, pending = ray.wait(pending)
            for task in done:
                results[tasks[task]] = ray.get(task)
                progress.update(len(chunks[tasks[task]]))
    return [result for chunk in results for result in chunk]


def merge_cells(root: Location, images_of: dict[str, list[int]], owner_of: dict[int, str],
                features_root: Location, conf: dict, cells_per_task: int = 8) -> dict[str, int]:
    """The points of the cells (images_of: cell -> its image ids, core and halo, of the cells with
    points) merged cell by cell on Ray (pixloc_core/mapping/cell_merge.py); owner_of: image id ->
    the cell whose core holds it. Returns the owners (each with a merged file) and their numbers of
    points, in the owners' order."""
    cells_of_image: dict[int, list[str]] = {}
    for cell, image_ids in images_of.items():
        for image_id in image_ids:
            cells_of_image.setdefault(image_id, []).append(cell)
    jobs = []
    for cell, image_ids in images_of.items():
        shared = sorted(image_id for image_id in image_ids if len(cells_of_image[image_id]) > 1)
        neighbours = sorted({other for image_id in shared for other in cells_of_image[image_id]} - {cell})
        jobs.append((cell, cell_merge.Neighbourhood(neighbours, np.array(shared, dtype=np.int64))))
    round_index, changed = 0, True
    while changed:
        changed = any(_run_step(cell_merge.label_round, root, [(cell, round_index, neighbourhood)
                                                            for cell, neighbourhood in jobs], {},
                                      f"track labels, round {round_index}", cells_per_task))
        round_index += 1
    logger.info("merge: the track labels of %d cells settled after %d rounds", len(jobs), round_index)

    owner_cells = sorted(set(owner_of.values()))
    position = {cell: index for index, cell in enumerate(owner_cells)}
    image_ids = np.array(sorted(owner_of), dtype=np.int64)
    owners = cell_merge.Owners(image_ids, np.array([position[owner_of[i]] for i in image_ids.tolist()]), owner_cells)
    sources: dict[str, list[str]] = {}
    routed = _run_step(cell_merge.route, root, [(cell,) for cell, _ in jobs], {"final_round": round_index - 1,
                                                                            "owners": owners},
                             "routing tracks", cells_per_task)
    for (cell, _), owners_written in zip(jobs, routed):
        for owner in owners_written:
            sources.setdefault(owner, []).append(cell)
    merged = sorted(sources)
    counts = _run_step(cell_merge.merge_owned, root, [(owner, sources[owner]) for owner in merged],
                             {"features_root": files.absolute(features_root), "conf": conf}, "merging tracks",
                             cells_per_task)
    logger.info("merge: %d points from the tracks of %d owner cells", sum(counts), len(merged))
    cell_merge.delete_files(root, cell_merge.LABELS, cell_merge.ROUTED)
    return dict(zip(merged, counts))


def write_pieces(root: Location, owner_points: dict[str, int], skeleton: pycolmap.Reconstruction,
                 features_root: Location, descriptor_dim: int, jobs_per_task: int = 8) -> model_pieces.Pieces:
    """The merged map's model and tables written in pieces on Ray (pixloc_core/mapping/model_pieces.py):
    the owners' points (owner_points: owner -> its number of points, in the order of their ids) sent
    to the chunks of images they are observed in, then each chunk's images and table rows.
    skeleton: the map's cameras and posed images (no 2D points)."""
    chunks = model_pieces.ImageChunks(np.array(sorted(skeleton.images), dtype=np.int64))
    first_ids = np.r_[1, 1 + np.cumsum(list(owner_points.values()))][:-1].tolist()
    written = _run_step(model_pieces.distribute, root, list(zip(owner_points, first_ids)), {"chunks": chunks},
                        "writing points", jobs_per_task)
    cell_merge.delete_files(root, cell_merge.MERGED)
    senders: dict[int, list[str]] = {}
    for owner, chunk_indices in zip(owner_points, written):
        for chunk in chunk_indices:
            senders.setdefault(chunk, []).append(owner)
    jobs = [(chunk, [model_pieces.ImageEntry.of(skeleton.images[i]) for i in chunks.image_ids_of(chunk).tolist()],
             senders.get(chunk, [])) for chunk in range(chunks.count)]
    _run_step(model_pieces.write_chunk, root, jobs, {"cameras": dict(skeleton.cameras),
                                                    "features_root": files.absolute(features_root),
                                                    "descriptor_dim": descriptor_dim},
              "writing images", max(1, jobs_per_task // 4))
    return model_pieces.Pieces(root, skeleton, owner_points, chunks, descriptor_dim)
