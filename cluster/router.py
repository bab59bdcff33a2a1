"""The bounded pool of shard actors, and the routing of a cell to the actor that hosts it.

`ShardPool` (driver) starts a fixed number N of `ShardActor`s, named `shard-<pool>-<i>` in
namespace `pixloc`, whatever the size of the map: each hosts the cells that hash to it
(`pixloc_core.localize.actor_for_cell`, stable across processes), so a cell lives in one actor and
is loaded there once while it stays in that actor's memory budget. `ShardClient` (query workers)
finds the actors by name and sends each (cell, request) to its host.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pixloc_core.localize import QueryRequest, actor_for_cell

from .shard_actor import ShardActor, ShardConf, ShardStats

logger = logging.getLogger(__name__)

NAMESPACE = "pixloc"
PLACEMENT_TOKEN_BYTES = 2**20
PLACEMENT_TIMEOUT_S = 60.0
RemoteShardActor = ray.remote(ShardActor)


@dataclass(frozen=True)
class PoolConf:
    shard_actors: int | None = None  # actor processes; None: one per CPU of the cluster
    actor_cpus: float = 0.0  # logical CPUs reserved per actor (0: share the nodes with the query workers)


def default_shard_actors() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def spread_over_nodes(count: int) -> tuple[PlacementGroup, list[PlacementGroupSchedulingStrategy]]:
    """A placement group of `count` bundles spread over the nodes, and one placement per actor.
    Ray packs zero-CPU actors onto one node and treats a soft node affinity as a mere preference
    (measured on a two-node ray.cluster_utils.Cluster: both actors on one node either way); the
    bundles of a SPREAD placement group land on distinct nodes while there are any, and when a
    node dies its bundles are placed again elsewhere, where the actors restart. A bundle holds a
    token of memory: placement, not a reservation (the LRU budget bounds the actor's memory)."""
    group = placement_group([{"memory": PLACEMENT_TOKEN_BYTES}] * count, strategy="SPREAD")
    if not group.wait(PLACEMENT_TIMEOUT_S):
        remove_placement_group(group)
        raise RuntimeError(f"the cluster did not place {count} shard actors within {PLACEMENT_TIMEOUT_S} s")
    return group, [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
                   for index in range(count)]


class ShardPool:
    """N shard actors started together, stopped together. Alignments run one at a time per actor:
    they are many small torch calls, so two threads of one actor mostly wait for each other on the
    GIL (measured: each query's alignment took ~2x as long, with no gain in throughput);
    parallelism comes from the N actors."""

    def __init__(self, store_url: str, extractor_id: str, map_fingerprint: str, shard_conf: ShardConf,
                 conf: PoolConf = PoolConf()):
        size = conf.shard_actors or default_shard_actors()
        if size < 1:
            raise ValueError(f"--shard-actors must be positive, got {size}")
        pool_id = uuid.uuid4().hex[:8]  # a killed pool's names are released asynchronously: never reuse one
        self.names = [f"shard-{pool_id}-{index}" for index in range(size)]
        # The pool's memory and alignment are spread over the cluster's nodes.
        self.placement_group, placements = spread_over_nodes(size)
        self.actors = [RemoteShardActor.options(
            name=name, namespace=NAMESPACE, max_restarts=-1, max_task_retries=-1, num_cpus=conf.actor_cpus,
            memory=PLACEMENT_TOKEN_BYTES, max_concurrency=1, scheduling_strategy=placement,
        ).remote(store_url, extractor_id, map_fingerprint, shard_conf)
            for name, placement in zip(self.names, placements)]

    def stats(self) -> list[ShardStats]:
        return ray.get([actor.stats.remote() for actor in self.actors])

    def summary(self) -> dict:
        """Cell calls and loads, evictions, actor count and memory over the pool (for the job
        summary; an actor that restarted counts from its restart)."""
        stats = self.stats()
        return {"actor_processes": len(stats), "cell_calls": sum(s.calls for s in stats),
                "cell_loads": sum(s.loads for s in stats),
                "evictions": sum(s.evictions for s in stats), "cells_held": sum(len(s.cells) for s in stats),
                "shard_peak_rss_mb": max(s.peak_rss_mb for s in stats),
                "actors": [asdict(s) for s in stats]}

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)


class ShardClient:
    """Inside a query worker: the pool's actors, by name, and the routing of a cell to its host."""

    def __init__(self, names: list[str]):
        self.actors = [ray.get_actor(name, namespace=NAMESPACE) for name in names]

    def submit(self, cell: str, request: QueryRequest | ray.ObjectRef, rank: int = 0) -> ray.ObjectRef:
        """The future CellAnswer of `request` (or a reference to one: the pyramid is not copied) in
        the `rank`-th of its query's cells."""
        return self.actors[actor_for_cell(cell, len(self.actors))].localize.remote(cell, request, rank)

