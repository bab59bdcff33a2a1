"""From a GPS prior to the shard actors that can localize the query.

`Router` turns a prior (map-frame position and sigma) into the map cells to search, best first.
`ShardPool` owns the `ShardActor`s: one per cell, created on first use, named after the cell
(`shard-<cell>-<pool>.<n>` in namespace `pixloc`), and kept under a memory budget by killing the
least recently used idle actors (a killed cell is simply reloaded if a later query needs it).
"""
from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import ray

from .shard_actor import QueryRequest, ShardActor, ShardConf
from pixloc_core.shards import ShardIndex

logger = logging.getLogger(__name__)

NAMESPACE = "pixloc"
RemoteShardActor = ray.remote(ShardActor)


class PriorOutsideMap(ValueError):
    pass


@dataclass(frozen=True)
class RouterConf:
    sigma_multiplier: float = 3.0  # search radius = multiplier * sigma + margin
    margin_m: float = 5.0
    default_sigma_m: float = 10.0  # for priors without a sigma
    max_cells: int = 2  # at most this many cells searched per query (see Router.cells)
    memory_budget_mb: float = 4096.0  # reference features held by all shard actors together
    actor_cpus: float = 0.0  # logical CPUs reserved per actor (0: share the nodes with the CNN pool)
    # Alignments run one at a time per actor: they are many small torch calls, so two threads of
    # one actor mostly wait for each other on the GIL (measured: each query's alignment took ~2x
    # as long, with no gain in throughput); parallelism comes from the cells' actors.
    actor_concurrency: int = 1


class Router:
    def __init__(self, shards: ShardIndex, conf: RouterConf = RouterConf()):
        self.shards = shards
        self.conf = conf

    def search_radius(self, sigma_m: float | None) -> float:
        sigma = self.conf.default_sigma_m if sigma_m is None or not np.isfinite(sigma_m) else sigma_m
        return self.conf.sigma_multiplier * sigma + self.conf.margin_m

    def cells(self, position: np.ndarray, sigma_m: float | None) -> list[str]:
        """The cells to search, best first: the cell holding most reference images within the
        prior's radius (its own images or its halo), then others only while they add images the
        chosen ones lack. PriorOutsideMap when no cell is within the radius."""
        radius = self.search_radius(sigma_m)
        candidates = self.shards.cells_within(position, radius)
        if not candidates:
            raise PriorOutsideMap(f"prior outside the map: no map cell within {radius:.0f} m of "
                                  f"({position[0]:.1f}, {position[1]:.1f})")
        nearby = set(self.shards.images_near(position, radius))
        coverage = {cell: nearby & set(self.shards.images_of(cell)) for cell in candidates}
        chosen, covered = [], set()
        for cell in sorted(candidates, key=lambda cell: len(coverage[cell]), reverse=True):
            if len(chosen) == self.conf.max_cells or (chosen and not coverage[cell] - covered):
                continue
            chosen.append(cell)
            covered |= coverage[cell]
        return chosen

    def reference_images(self, position: np.ndarray, sigma_m: float | None) -> list[str]:
        """Names of the reference images within the search radius, nearest first."""
        return self.shards.images_near(position, self.search_radius(sigma_m))


class ShardPool:
    """Lazily created, named shard actors with least-recently-used eviction under a memory budget."""

    def __init__(self, store_url: str, extractor_id: str, map_fingerprint: str, shard_conf: ShardConf,
                 conf: RouterConf = RouterConf()):
        self.store_url, self.extractor_id, self.map_fingerprint = store_url, extractor_id, map_fingerprint
        self.shard_conf = shard_conf
        self.conf = conf
        self.actors: OrderedDict[str, ray.actor.ActorHandle] = OrderedDict()  # least recently used first
        self.in_flight: dict[str, int] = {}
        self.memory: dict[str, int] = {}
        self.pool_id = uuid.uuid4().hex[:8]
        self.incarnations: dict[str, int] = {}

    def actor_name(self, cell: str) -> str:
        """Unique per pool and incarnation: a killed actor's name is released asynchronously, so
        a successor (after an eviction, or in the next job of the same Ray) must not reuse it."""
        self.incarnations[cell] = self.incarnations.get(cell, -1) + 1
        return f"shard-{cell}-{self.pool_id}.{self.incarnations[cell]}"

    def actor(self, cell: str) -> ray.actor.ActorHandle:
        if cell not in self.actors:
            self.actors[cell] = RemoteShardActor.options(
                name=self.actor_name(cell), namespace=NAMESPACE,
                max_restarts=-1, max_task_retries=-1, num_cpus=self.conf.actor_cpus,
                max_concurrency=self.conf.actor_concurrency,
            ).remote(self.store_url, self.extractor_id, self.map_fingerprint, cell, self.shard_conf)
            self.in_flight[cell] = 0
            self.memory[cell] = 0
        self.actors.move_to_end(cell)
        return self.actors[cell]

    def submit(self, cell: str, request: QueryRequest) -> ray.ObjectRef:
        reference = self.actor(cell).localize.remote(request)
        self.in_flight[cell] += 1
        return reference

    def finished(self, cell: str, memory_bytes: int | None) -> None:
        """A call to the cell's actor returned; evict idle actors while over the budget."""
        self.in_flight[cell] -= 1
        if memory_bytes is not None:
            self.memory[cell] = memory_bytes
        budget = self.conf.memory_budget_mb * 2**20
        for victim in list(self.actors):
            if sum(self.memory.values()) <= budget:
                break
            if self.in_flight[victim] == 0 and victim != cell:
                self.evict(victim)

    def evict(self, cell: str) -> None:
        logger.debug("evicting shard %s (%.0f MB)", cell, self.memory[cell] / 2**20)
        ray.kill(self.actors.pop(cell), no_restart=True)
        del self.in_flight[cell], self.memory[cell]

    def shutdown(self) -> None:
        for cell in list(self.actors):
            self.evict(cell)
