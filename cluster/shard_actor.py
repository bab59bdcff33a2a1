"""Shard actors: each holds the reference data of several map cells in memory and localizes queries
in them.

A query worker sends (cell, QueryRequest) to the actor that hosts the cell (see
`cluster.router.ShardPool`); the actor loads the cell from the feature store on first use (dense
levels and sparse points), keeps it in a least-recently-used cache whose budget is the actor
process's real resident memory, and runs the per-query policy of pixloc_core.localize on it. The
actor is cache + call: every decision about a query lives in `localize_in_cell`.

Actors restart when their process dies (`max_restarts=-1`) and their calls are retried
(`max_task_retries=-1`): a restarted actor reloads its cells lazily, so a killed actor costs time
but never a query.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import ray
import torch

from pixloc_core import sparse
from pixloc_core.align import AlignConf
from pixloc_core.localize import (Aligners, CellData, LocalizeConf, Localization, QueryRequest, WideLevel,
                                  localize_in_cell)

from .runtime import peak_rss_mb, release_freed_memory, rss_mb, set_torch_threads
from .store import WIDE_LEVEL, FeatureStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardConf:
    levels: tuple[int, ...] = (0, 1, 2)  # store levels held, coarse to fine (refinement: the fine ones)
    # Rough hypotheses mostly end in distinct minima at the coarsest level; only the best one goes on.
    align: AlignConf = field(default_factory=lambda: AlignConf(num_kept=1))
    # Learned dampings of the extractor's checkpoint, 3 rows of 6 raw values, finest level first
    # (PixLoc's order); None: AlignConf.damping. Jobs take them from `--checkpoint`.
    dampings: tuple[tuple[float, ...], ...] | None = None
    localize: LocalizeConf = field(default_factory=LocalizeConf)
    sparse: dict = field(default_factory=dict)  # overrides of pixloc_core.sparse.default_conf
    with_sparse: bool = True  # hold the cells' sparse points (for the sparse methods)
    with_wide: bool = True  # hold the cells' wide level (for LocalizeConf.second_stage_methods)
    # Resident memory an actor may add to what it took once started (torch, Ray and the aligners:
    # ~0.5 GB) before it drops its least recently used cells; the cell in use always stays. So an
    # actor's memory is bounded whatever the map's size. Its first load adds ~90 MB of Arrow and
    # torch state for good, and a cell of bench scale's city takes 3-10 MB: ~12 cells by default.
    cache_mb: float = 192.0


@dataclass
class CellAnswer:
    """A shard's answer for one query in one cell."""

    cell: str
    localization: Localization
    timings: dict[str, float]  # load_ms, sparse_ms, align_ms
    peak_rss_mb: float  # of the actor process so far


@dataclass
class ShardStats:
    cells: list[str]  # held now, least recently used first
    loads: int  # cell loads since the actor (re)started
    evictions: int
    calls: int
    rss_mb: float
    peak_rss_mb: float
    cell_bytes: int  # what the held cells' arrays take
    restarted: bool


class ShardActor:
    """Several cells of the map in an LRU under a resident-memory budget; created by `ShardPool`."""

    def __init__(self, store_url: str, extractor_id: str, map_fingerprint: str, conf: ShardConf):
        set_torch_threads()
        self.conf = conf
        self.store_url, self.extractor_id, self.map_fingerprint = store_url, extractor_id, map_fingerprint
        self.store: FeatureStore | None = None  # opened on the first load
        self.aligners = Aligners.from_conf(conf.align, conf.localize.sparse_levels,
                                           None if conf.dampings is None else torch.tensor(conf.dampings))
        self.sparse_conf = {**sparse.default_conf, **conf.sparse}
        self.cells: OrderedDict[str, CellData] = OrderedDict()  # least recently used first
        self.loads = self.evictions = self.calls = 0
        self.started_rss_mb = rss_mb()

    def _load(self, cell: str) -> CellData:
        if self.store is None:
            self.store = FeatureStore.open(self.store_url, self.extractor_id, self.map_fingerprint)
        references, observers = [], []
        for level in self.conf.levels:
            reference, observer = self.store.load_cell_with_image_ids(cell, level)
            references.append(reference)
            observers.append(observer)
        points = self.store.load_sparse(cell) if self.conf.with_sparse else None
        wide = None
        # The wide level is a second start in place of store level 0, for the alignments that begin there.
        holds_wide = self.conf.with_wide and self.conf.localize.wide_start and self.conf.levels[0] == 0
        if self.store.info.wide_cells and holds_wide:
            wide = WideLevel(self.store.info.wide_cells, *self.store.load_cell_with_image_ids(cell, WIDE_LEVEL))
        return CellData(cell, references, observers, points, wide)

    def cell(self, cell: str) -> tuple[CellData, float]:
        """The cell's data, loaded if needed, and the seconds its load took (0 when cached)."""
        if cell in self.cells:
            self.cells.move_to_end(cell)
            return self.cells[cell], 0.0
        start = time.perf_counter()
        self.cells[cell] = self._load(cell)
        self.loads += 1
        seconds = time.perf_counter() - start
        self._evict_over_budget()
        return self.cells[cell], seconds

    def _evict_over_budget(self) -> None:
        """Drop least recently used cells while the process has grown by more than its budget."""
        while len(self.cells) > 1 and rss_mb() - self.started_rss_mb > self.conf.cache_mb:
            victim, data = self.cells.popitem(last=False)
            logger.debug("evicting cell %s (%.0f MB of arrays)", victim, data.nbytes / 2**20)
            del data
            self.evictions += 1
            release_freed_memory()  # a cell holds no reference cycles: `del` freed it

    def localize(self, cell: str, request: QueryRequest, rank: int = 0) -> CellAnswer:
        self.calls += 1
        data, load_s = self.cell(cell)
        localization, timings = localize_in_cell(request, data, self.aligners, self.conf.localize, self.sparse_conf,
                                                 rank)
        return CellAnswer(cell, localization, {"load_ms": 1000 * load_s, **timings}, peak_rss_mb())

    def stats(self) -> ShardStats:
        return ShardStats(list(self.cells), self.loads, self.evictions, self.calls, rss_mb(), peak_rss_mb(),
                          sum(data.nbytes for data in self.cells.values()),
                          ray.get_runtime_context().was_current_actor_reconstructed)
