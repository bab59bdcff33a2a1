"""`pixloc map` (cell by cell), `pixloc features` and `pixloc localize` on a two-node Ray cluster
on this machine (`ray.cluster_utils.Cluster`, 1 CPU per node), every input, output and work file
in the moto S3 bucket: the same results as a local run with local paths, keypoint writers, query
workers, feature writers and shard actors on both nodes, and the second node's shard actor killed
mid-job still leaves exactly one row per query.

The session's local Ray (`ray_cluster`) makes the reference run; the two-node cluster runs in a
subprocess with its own Ray, so that only one Ray is ever initialised per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = {"workers": 2}
# classic: the tests' cheap extractor; the default (alike-n) costs 7x on a CPU, test_demo and test_features_job run it
FEATURES = {**WORKERS, "extractor": "classic"}
MAP_CONF = {"sift": {"max_num_features": 1024}, "pairs": {"num_neighbors": 5}}
CELLS_CONF = {**MAP_CONF, "shards": {"cell_size_m": 30.0, "halo_m": 10.0}}  # several cells on the street


def localize_conf() -> dict:
    return {**WORKERS, "flush_every": 1}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_cluster) -> dict:
    """A small street, its map, store and results with local paths on the session's Ray."""
    from jobs import features as features_job
    from jobs import localize as localize_job
    from jobs import map as map_job
    from pixloc_core.io import read_priors
    from pixloc_core.synthetic import dataset

    root = tmp_path_factory.mktemp("multinode")
    scene = dataset.main(root / "scene", {"blocks": (1, 1), "num_refs": 48, "num_queries": 6,
                                          "width": 320, "height": 240, "seed": 4})
    priors = read_priors(scene / "mapping_priors.csv")
    map_job.build_map(scene / "mapping", root / "map", reference_model=scene / "reference_model", priors=priors,
                      conf=MAP_CONF)
    map_job.build_map_in_cells(scene / "mapping", root / "map_in_cells", scene / "reference_model", priors, CELLS_CONF)
    features_job.main(root / "map", scene / "mapping", str(root / "store"), conf=FEATURES)
    localize_job.main(root / "map", str(root / "store"), scene / "queries", root / "results",
                      query_list=scene / "queries_with_intrinsics.txt", priors=scene / "priors.csv",
                      conf=localize_conf())
    return {"root": root, "scene": scene}


def test_two_nodes_with_s3_inputs_match_the_local_run(local_run, s3_bucket, tmp_path):
    from cluster.store import FeatureStore
    from jobs.results import read_results
    from pixloc_core import files
    from pixloc_core.files import Url

    root, scene = local_run["root"], local_run["scene"]
    bucket = Url(f"s3://{s3_bucket}/city")
    for folder in ("mapping", "queries", "reference_model"):
        files.copy_folder(scene / folder, bucket / folder)
    for name in ("priors.csv", "queries_with_intrinsics.txt", "mapping_priors.csv"):
        files.write_bytes(bucket / name, (scene / name).read_bytes())
    files.copy_folder(root / "map", bucket / "map")

    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), files.CACHE_ENV: str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.run([sys.executable, __file__, bucket, str(report)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-4000:]
    two_nodes = json.loads(report.read_text())

    # Placement: two alive nodes; every kind of process on both.
    assert len(two_nodes["nodes"]) == 2
    for kind in ("keypoint_writer", "feature_writer", "query_worker"):
        assert set(two_nodes["actor_nodes"][kind]) == set(two_nodes["nodes"]), (kind, two_nodes["actor_nodes"])
    # Shard actors: placed by a SPREAD placement group (cluster/router.py), one per node here.
    assert set(two_nodes["killed"]["actor_nodes"]["shard_actor"]) == set(two_nodes["nodes"]), two_nodes["killed"]
    assert two_nodes["killed"]["node"] != two_nodes["driver_node"]
    assert two_nodes["killed"]["name"]

    # Map: built cell by cell with its work files in the bucket, the local cell-by-cell map.
    from pixloc_core.map_io import SceneMap

    assert two_nodes["map_in_cells"]["cells"] > 1 and not two_nodes["map_in_cells"]["failed_cells"]
    assert two_nodes["map_in_cells"]["fingerprint"] == SceneMap.load(root / "map_in_cells").fingerprint

    # Features: the S3 store holds the same rows as the local one, partition by partition.
    local_store, remote_store = FeatureStore.open(str(root / "store")), FeatureStore.open(bucket / "store")
    cells = sorted(path.name.removeprefix("cell=") for path in (root / "store").glob("cell=*"))
    assert cells
    for cell in cells:
        for level in range(len(local_store.info.strides)):
            assert remote_store.is_published(cell, level)
            expected, found = (store.load_table(cell, level).sort_by([("point3D_id", "ascending"),
                                                                       ("image_id", "ascending")])
                               for store in (local_store, remote_store))
            assert found.equals(expected), (cell, level)

    # Localize: one row per query despite the killed actor; the same poses as the local run.
    local, remote = read_results(root / "results"), read_results(bucket / "results")
    names = remote.column("name").to_pylist()
    assert len(names) == len(set(names)) == local.num_rows == 6
    assert sum(local.column("success").to_pylist()) >= 2  # verified successes, whose poses are compared
    local_rows, remote_rows = _rows_by_name(local), _rows_by_name(remote)
    for name, row in local_rows.items():
        other = remote_rows[name]
        assert other["success"] == row["success"] and other["error"] == row["error"], name
        if row["success"]:
            np.testing.assert_allclose(other["tvec"], row["tvec"], atol=1e-3)
            np.testing.assert_allclose(np.abs(other["qvec"]), np.abs(row["qvec"]), atol=1e-4)
    assert files.is_file(bucket / "results/poses.txt")


def _rows_by_name(table: pa.Table) -> dict[str, dict]:
    return {row["name"]: row for row in table.to_pylist()}


# ----- the two-node part, in its own process


def _actor_nodes() -> dict[str, list[str]]:
    """Node ids of every actor of this cluster so far (alive or dead), by kind of process."""
    import ray

    kinds = {"FeatureFileWriter": "keypoint_writer", "ReferenceFeatureWriter": "feature_writer",
             "QueryFeaturizer": "query_worker",
             "QueryWorker": "query_worker", "ShardActor": "shard_actor"}
    nodes: dict[str, set[str]] = {kind: set() for kind in kinds.values()}
    for actor in ray._private.state.actors().values():
        for marker, kind in kinds.items():
            if marker in actor["ActorClassName"]:
                nodes[kind].add(actor["Address"]["NodeID"])
    return {kind: sorted(ids) for kind, ids in nodes.items()}


def _kill_a_shard_actor_of_the_other_node(killed: dict, driver_node: str):
    """on_result callback: at the first result, kill the shard actor that lives on the node
    without the driver (Ray restarts it and retries the calls in flight). It waits for the pool's
    actors to be up: on a loaded machine an actor the first queries did not need may still be
    starting."""
    import ray

    def callback(row: dict) -> None:
        if killed:
            return
        names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                 if actor["name"].startswith("shard-")]
        handles = {name: ray.get_actor(name, namespace="pixloc") for name in names}
        ray.get([handle.stats.remote() for handle in handles.values()])
        alive = [actor for actor in ray._private.state.actors(actor_state_name="ALIVE").values()
                 if actor["Name"] in handles]
        # The one on the other node (the placement check of the test says there is one).
        target = min(alive, key=lambda actor: actor["Address"]["NodeID"] == driver_node)
        # Where the actors lived before the kill: the restarted one may come back elsewhere.
        killed.update(name=target["Name"], node=target["Address"]["NodeID"], actor_nodes=_actor_nodes())
        ray.kill(handles[target["Name"]], no_restart=False)
    return callback


def two_node_run(bucket: str, report: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from jobs import features as features_job
    from jobs import localize as localize_job
    from jobs import map as map_job
    from pixloc_core.io import read_priors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        driver_node = ray.get_runtime_context().get_node_id()
        in_cells = map_job.build_map_in_cells(
            f"{bucket}/mapping", f"{bucket}/map_in_cells", f"{bucket}/reference_model",
            read_priors(f"{bucket}/mapping_priors.csv"), CELLS_CONF, address=cluster.address)
        features_job.main(f"{bucket}/map", f"{bucket}/mapping", f"{bucket}/store", conf=FEATURES,
                          address=cluster.address)
        killed: dict = {}
        localize_job.main(f"{bucket}/map", f"{bucket}/store", f"{bucket}/queries", f"{bucket}/results",
                          query_list=f"{bucket}/queries_with_intrinsics.txt", priors=f"{bucket}/priors.csv",
                          address=cluster.address, conf=localize_conf(),
                          on_result=_kill_a_shard_actor_of_the_other_node(killed, driver_node))
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
        report.write_text(json.dumps({"nodes": nodes, "driver_node": driver_node, "killed": killed,
                                      "actor_nodes": _actor_nodes(),
                                      "map_in_cells": {"fingerprint": in_cells.fingerprint,
                                                       "cells": len(in_cells.shards.cell_ids),
                                                       "failed_cells": in_cells.manifest["failed_cells"]}}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    two_node_run(sys.argv[1], Path(sys.argv[2]))
