"""ShardActor: one Ray actor per map cell, holding that cell's reference features.

The actor loads its partitions (one per pyramid level) from the feature store on first use and
keeps them in memory, so the store is read once per cell and job, never per query. Each request
carries one query's feature pyramid, its camera and its pose hypotheses; the actor aligns them
against the points of the cell (restricted to those seen by the reference images near the query)
and answers with a `Localization` as a plain dict.

Actors restart when their process dies (`max_restarts=-1`) and their calls are retried
(`max_task_retries=-1`): a restarted actor reloads its cell lazily, so a killed actor costs time
but never a query.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import ray
import torch

from pixloc_core.align import AlignConf, FeaturemetricAligner, ReferenceLevel
from pixloc_core.extractors.base import FeatureLevel
from pixloc_core.geometry import Camera, Pose
from pixloc_core.localize import LocalizeConf, Localization, align_hypotheses

from .runtime import set_torch_threads
from .store import FeatureStore


@dataclass
class QueryRequest:
    """Everything a shard needs to localize one query; numpy only, so it pickles compactly."""

    name: str
    features: list[np.ndarray]  # per level, coarse to fine: (h, w, C) float16, the layout the alignment reads
    confidences: list[np.ndarray]  # per level: (h, w) float16
    strides: list[int]
    camera_model: str
    camera_size: tuple[float, float]  # (w, h) of the image the pyramid was computed from
    camera_params: tuple[float, ...]  # COLMAP parameters at that size
    hypotheses_qvec: np.ndarray  # (M, 4) world-to-camera
    hypotheses_tvec: np.ndarray  # (M, 3)
    labels: list[str]  # (M,)
    hypotheses_verified: bool = False  # poses from a geometric method (e.g. external PnP poses to refine)
    reference_image_ids: list[int] | None = None  # use only points these images observe; None: all
    sparse_qvec: np.ndarray | None = None  # (4,) the SIFT + PnP pose, refined on the fine levels only
    sparse_tvec: np.ndarray | None = None  # (3,)
    sparse_inliers: int = 0

    def pyramid(self) -> list[FeatureLevel]:
        """Levels whose features are (C, h, w) float16 views of the channel-last arrays: the
        alignment reads them in place, converting only what it samples."""
        return [FeatureLevel(torch.from_numpy(features).permute(2, 0, 1), torch.from_numpy(confidence).float(), stride)
                for features, confidence, stride in zip(self.features, self.confidences, self.strides)]

    def camera(self) -> Camera:
        return Camera(self.camera_model, self.camera_size[0], self.camera_size[1],
                      torch.tensor(self.camera_params, dtype=torch.float64))

    def hypotheses(self) -> Pose:
        return Pose.from_qvec_tvec(torch.from_numpy(np.asarray(self.hypotheses_qvec, np.float64)),
                                   torch.from_numpy(np.asarray(self.hypotheses_tvec, np.float64)))

    def sparse_pose(self) -> Pose | None:
        if self.sparse_qvec is None:
            return None
        return Pose.from_qvec_tvec(torch.from_numpy(np.asarray(self.sparse_qvec, np.float64)),
                                   torch.from_numpy(np.asarray(self.sparse_tvec, np.float64)))

    def sparse_localization(self) -> Localization:
        """The SIFT + PnP pose as it is, when its featuremetric refinement failed."""
        return Localization(success=True, qvec=tuple(np.asarray(self.sparse_qvec, float).tolist()),
                            tvec=tuple(np.asarray(self.sparse_tvec, float).tolist()),
                            num_points=self.sparse_inliers, hypothesis="sparse (PnP only)")


@dataclass(frozen=True)
class ShardConf:
    levels: tuple[int, ...] = (0, 1, 2)  # store levels used, coarse to fine (refinement: the fine ones)
    # Rough hypotheses mostly end in distinct minima at the coarsest level; only the best one goes on.
    align: AlignConf = field(default_factory=lambda: AlignConf(num_kept=1))
    localize: LocalizeConf = field(default_factory=LocalizeConf)
    sparse_levels: int = 2  # the SIFT+PnP pose is already close: refine it on the finest levels only
    min_selected_points: int = 200  # fewer points seen by the nearby references: use the whole cell


class ShardActor:
    """The state of one map cell; created through `ShardPool`, which names and budgets them."""

    def __init__(self, store_url: str, extractor_id: str, map_fingerprint: str, cell: str, conf: ShardConf):
        set_torch_threads()
        self.cell = cell
        self.conf = conf
        self.store_url, self.extractor_id, self.map_fingerprint = store_url, extractor_id, map_fingerprint
        self.aligner = FeaturemetricAligner(conf.align).eval()
        self.fine_aligner = FeaturemetricAligner(
            replace(conf.align, num_iterations=conf.align.num_iterations[-conf.sparse_levels:])).eval()
        self._references: list[ReferenceLevel] | None = None
        self._image_ids: list[np.ndarray | None] = []  # per level: (N,) observing image of each row
        self._lock = threading.Lock()  # concurrent calls share one lazy load

    def _load(self) -> float:
        """Read the cell's partitions once; returns the seconds spent (0 when already loaded)."""
        with self._lock:
            if self._references is not None:
                return 0.0
            start = time.perf_counter()
            store = FeatureStore.open(self.store_url, self.extractor_id, self.map_fingerprint)
            references, image_ids = [], []
            for level in self.conf.levels:
                references.append(store.load_cell(self.cell, level))
                image_ids.append(None if store.info.aggregated else
                                 store.load_table(self.cell, level, ["image_id"]).column("image_id").to_numpy())
            self._image_ids = image_ids
            self._references = references
            return time.perf_counter() - start

    def _selected_references(self, image_ids: list[int] | None) -> list[ReferenceLevel]:
        """The cell's points restricted to the observations of the given reference images."""
        if image_ids is None:
            return self._references
        selected = []
        for reference, observer in zip(self._references, self._image_ids):
            if observer is None:
                selected.append(reference)
                continue
            mask = np.isin(observer, np.asarray(image_ids, observer.dtype))
            if mask.sum() < self.conf.min_selected_points:
                selected.append(reference)
                continue
            selected.append(reference[torch.from_numpy(np.flatnonzero(mask))])
        return selected

    def localize(self, request: QueryRequest) -> dict:
        """Localization.to_dict() of the query in this cell, plus `load_ms`, `align_ms` and
        `memory_bytes`.

        A SIFT + PnP pose is geometrically verified and already close: it is refined on the fine
        levels, and kept as it is if that fails. Only without one are the reference hypotheses
        aligned coarse to fine, the lowest final cost winning: with weight-free features the cost
        alone does not tell a right pose from a wrong one, so it never overrules a verified pose."""
        timings = {"load_ms": 1000 * self._load()}
        start = time.perf_counter()
        camera = request.camera()
        references = self._selected_references(request.reference_image_ids)
        pyramid = request.pyramid()
        sparse_pose = request.sparse_pose()
        if sparse_pose is not None:
            levels = self.conf.sparse_levels
            localization = align_hypotheses(self.fine_aligner, pyramid[-levels:], camera, references[-levels:],
                                            sparse_pose[None], ["sparse"], self.conf.localize, verified=True)
            if not localization.success:
                localization = request.sparse_localization()
        else:
            localization = align_hypotheses(self.aligner, pyramid, camera, references, request.hypotheses(),
                                            list(request.labels), self.conf.localize, request.hypotheses_verified)
        timings["align_ms"] = 1000 * (time.perf_counter() - start)
        return {**localization.to_dict(), **timings, "cell": self.cell, "memory_bytes": self.memory_bytes()}

    def memory_bytes(self) -> int:
        if self._references is None:
            return 0
        return sum(tensor.nbytes for reference in self._references
                   for tensor in (reference.points3D, reference.features, reference.confidence))

    def status(self) -> dict:
        return {"cell": self.cell, "loaded": self._references is not None, "memory_bytes": self.memory_bytes(),
                "restarted": ray.get_runtime_context().was_current_actor_reconstructed}
