"""`pixloc localize` and `pixloc refine` end to end on a small synthetic scene, on the session's
local Ray: accuracy, one row per query with bad input as failures, resume after a driver crash,
a shard actor killed mid-job, and the per-query logic without Ray."""
from __future__ import annotations

import itertools
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from cluster.router import PoolConf
from cluster.shard_actor import ShardConf
from cluster.store import WIDE_LEVEL
from jobs import cli
from jobs import features as features_job
from jobs import localize as localize_job
from jobs import map as map_job
from jobs import refine as refine_job
from jobs.results import read_results
from pixloc_core import sparse
from pixloc_core.evaluate import pose_errors
from pixloc_core.extractors import load_extractor, shipped_weights
from pixloc_core.extractors.checkpoint import write_checkpoint
from pixloc_core.extractors.base import resized
from pixloc_core.geometry import Camera, Pose, so3_exp
from pixloc_core.io import (Prior, QueryIntrinsics, read_poses, read_priors, read_query_list, write_poses,
                            write_priors, write_query_list)
from pixloc_core.align import ReferenceLevel
from pixloc_core.localize import (Aligners, CellData, LocalizeConf, PlanConf, Planner, QueryInput, WideLevel,
                                  actor_for_cell, alignment_starts, moved_along_axes,
                                  Localization, alignment_covariance, feature_scale, localize_in_cell, pose_std,
                                  reference_hypotheses,
                                  refined_with_pnp, refinement_references,
                                  spatial_order, turned_towards, viewed_points, visible_points)
from pixloc_core.map_io import load_map_index
from pixloc_core.synthetic import dataset

CONF = {"workers": 2, "flush_every": 1}
# classic: the tests' cheap extractor; the default (alike-n) costs 7x on a CPU, test_demo and test_features_job run it
FEATURES = {"workers": 2, "extractor": "classic"}


@pytest.fixture(scope="module")
def scene(tmp_path_factory, ray_cluster) -> dict[str, Path]:
    """A 320x240 street with 60 references and 6 queries, its map and its feature store. At this
    size the map is thin: SIFT + PnP finds half of the queries, and two of them pass the verified
    success (PnP position std <= 0.75 m); the others must fail cleanly."""
    root = tmp_path_factory.mktemp("localize")
    scene_dir = dataset.main(root / "scene", {"num_refs": 60, "num_queries": 6, "width": 320, "height": 240})
    map_job.build_map(scene_dir / "mapping", root / "map", reference_model=scene_dir / "reference_model",
                      priors=read_priors(scene_dir / "mapping_priors.csv"),
                      conf={"sift": {"max_num_features": 1024}, "pairs": {"num_neighbors": 5}})
    features_job.main(root / "map", scene_dir / "mapping", str(root / "store"), conf=FEATURES)
    return {"root": root, "scene": scene_dir, "map": root / "map", "store": root / "store"}


@pytest.fixture(scope="module")
def faulty_queries(scene) -> dict[str, Path]:
    """The 6 good queries plus: a corrupt image, one without a prior, one whose prior lies 5 km
    away, one with a fisheye camera model."""
    scene_dir, root = scene["scene"], scene["root"]
    queries = root / "faulty_queries"
    shutil.copytree(scene_dir / "queries", queries)
    good = sorted(p.name for p in (scene_dir / "queries").iterdir())
    (queries / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    for name in ("no_prior.jpg", "far_away.jpg", "fisheye.jpg"):
        shutil.copy(queries / good[0], queries / name)

    intrinsics = read_query_list(scene_dir / "queries_with_intrinsics.txt")
    pinhole = intrinsics[good[0]]
    intrinsics.update({name: pinhole for name in ("corrupt.jpg", "no_prior.jpg", "far_away.jpg")})
    intrinsics["fisheye.jpg"] = QueryIntrinsics("OPENCV_FISHEYE", pinhole.width, pinhole.height,
                                                (*pinhole.params, 0.1, 0.0, 0.0, 0.0))
    write_query_list(root / "faulty_intrinsics.txt", intrinsics)

    priors = read_priors(scene_dir / "priors.csv")
    lat, lon, alt = priors[good[0]].position
    far = Prior((lat + 0.05, lon, alt), geodetic=True, sigma_m=10.0)  # about 5.5 km north
    priors.update({"corrupt.jpg": priors[good[0]], "far_away.jpg": far, "fisheye.jpg": priors[good[0]]})
    write_priors(root / "faulty_priors.csv", priors)
    return {"queries": queries, "query_list": root / "faulty_intrinsics.txt", "priors": root / "faulty_priors.csv",
            "good": good}


def run_localize(scene, faulty, out: Path, **kwargs) -> Path:
    return localize_job.main(scene["map"], str(scene["store"]), faulty["queries"], out,
                             query_list=faulty["query_list"], priors=faulty["priors"],
                             conf={**CONF, **kwargs.pop("conf", {})}, **kwargs)


def test_every_query_gets_one_row_and_good_ones_are_accurate(scene, faulty_queries, tmp_path):
    results = run_localize(scene, faulty_queries, tmp_path / "out")
    table = pq.read_table(results)
    rows = {row["name"]: row for row in table.to_pylist()}
    assert sorted(rows) == sorted(faulty_queries["good"] + ["corrupt.jpg", "no_prior.jpg", "far_away.jpg",
                                                            "fisheye.jpg"])
    assert not rows["corrupt.jpg"]["success"] and "cannot decode" in rows["corrupt.jpg"]["error"]
    assert not rows["no_prior.jpg"]["success"] and rows["no_prior.jpg"]["error"].startswith("no prior")
    assert not rows["far_away.jpg"]["success"] and "outside the map" in rows["far_away.jpg"]["error"]
    assert not rows["fisheye.jpg"]["success"] and "OPENCV_FISHEYE" in rows["fisheye.jpg"]["error"]

    errors = pose_errors(read_poses(results.parent / "poses.txt"), read_poses(scene["scene"] / "gt_queries.txt"))
    accurate = [name for name, (t, R) in errors.items() if t < 0.25 and R < 2.0]
    assert len(accurate) >= 2, errors
    # what is reported as localized is right
    assert all(t < 0.5 for t, _ in errors.values() if math.isfinite(t)), errors
    for name in accurate:
        row = rows[name]
        assert row["num_points"] > 0 and math.isfinite(row["cost"]) and row["cell"]
        assert row["prior_distance_m"] > 0 and row["position_std_m"] >= 0
        assert row["cnn_ms"] > 0 and row["align_ms"] > 0
        assert row["worker_peak_rss_mb"] > 0 and row["shard_peak_rss_mb"] > 0

    # a bounded pool (one actor per CPU of the 2-CPU test cluster), each cell loaded once, and
    # only metadata through the driver
    summary = localize_job.read_summary(results.parent)
    assert summary["actor_processes"] == 2 and summary["queries"] == len(rows)
    touched = {row["cell"] for row in rows.values() if row["cell"]}
    assert len(touched) <= summary["cell_loads"] <= len(touched) + 2 and summary["evictions"] == 0
    assert 0 < summary["driver_bytes_per_query"] <= 10_000


def test_the_sparse_method_computes_no_dense_features(scene, faulty_queries, tmp_path):
    results = run_localize(scene, faulty_queries, tmp_path / "out", conf={"method": "sparse"})
    rows = {row["name"]: row for row in pq.read_table(results).to_pylist()}
    good = [rows[name] for name in faulty_queries["good"]]
    assert all(row["cnn_ms"] == 0 and row["sparse_ms"] > 0 and row["method"] == "sparse" for row in good)
    assert any(row["success"] for row in good)
    assert all(row["hypothesis"] == "sparse" for row in good if row["success"])


def test_resume_after_a_driver_crash_answers_each_query_once(scene, faulty_queries, tmp_path, monkeypatch):
    out = tmp_path / "out"

    class DriverCrash(Exception):
        pass

    def crash_after_three(row: dict) -> None:
        crash_after_three.seen += 1
        if crash_after_three.seen == 3:
            raise DriverCrash

    crash_after_three.seen = 0
    with pytest.raises(DriverCrash):
        run_localize(scene, faulty_queries, out, on_result=crash_after_three)
    first = set(read_results(out).column("name").to_pylist())
    assert len(first) >= 3  # flushed as they came: the crash lost nothing already answered

    answered = []
    # a zero memory budget also makes each shard actor evict every other cell at each load
    run_localize(scene, faulty_queries, out, resume=True, on_result=lambda row: answered.append(row["name"]),
                 conf={"shard": ShardConf(cache_mb=0), "pool": PoolConf(shard_actors=1)})
    summary = localize_job.read_summary(out)
    assert summary["actor_processes"] == 1 and summary["evictions"] == summary["cell_loads"] - 1
    names = read_results(out).column("name").to_pylist()
    assert sorted(names) == sorted(set(names))
    assert set(names) == first | set(answered) and not first & set(answered)
    assert len(names) == len(faulty_queries["good"]) + 4
    assert not (out / "parts").exists()
    assert not any("shard" in error for error in read_results(out).column("error").to_pylist())

    def must_not_start(*args, **kwargs):
        raise AssertionError("a resumed job with nothing left started Ray")

    monkeypatch.setattr(localize_job, "init_ray", must_not_start)
    run_localize(scene, faulty_queries, out, resume=True)
    assert sorted(read_results(out).column("name").to_pylist()) == sorted(names)


def test_a_killed_shard_actor_restarts_and_no_query_is_lost(scene, faulty_queries, tmp_path):
    killed, statuses = [], []

    def kill_the_shards(row: dict) -> None:
        """At the first answer of a shard, kill every shard actor (Ray restarts them and retries
        the calls in flight); at the next answer, ask a restarted actor whether it was restarted."""
        if not row["cell"]:
            return
        if not killed:
            names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                     if actor["name"].startswith("shard-")]
            assert names
            for name in names:
                killed.append(ray.get_actor(name, namespace="pixloc"))
                ray.kill(killed[-1], no_restart=False)
        elif not statuses:
            statuses.append(ray.get(killed[0].stats.remote()))

    results = run_localize(scene, faulty_queries, tmp_path / "out", on_result=kill_the_shards)
    assert killed and statuses and statuses[0].restarted
    table = pq.read_table(results)
    names = table.column("name").to_pylist()
    assert sorted(names) == sorted(set(names)) and len(names) == len(faulty_queries["good"]) + 4
    assert not any("shard" in error for error in table.column("error").to_pylist())
    errors = pose_errors(read_poses(results.parent / "poses.txt"), read_poses(scene["scene"] / "gt_queries.txt"))
    assert sum(t < 0.25 and R < 2.0 for t, R in errors.values()) >= 2, errors


def perturbed_ground_truth(scene_dir: Path, path: Path) -> tuple[dict, dict]:
    """The queries' true poses moved by ~0.15 m and ~1 deg, written to `path`: (perturbed, truth)."""
    ground_truth = read_poses(scene_dir / "gt_queries.txt")
    generator = torch.Generator().manual_seed(0)
    perturbed = {}
    for name, (qvec, tvec) in ground_truth.items():
        pose = Pose.from_qvec_tvec(torch.tensor(qvec), torch.tensor(tvec))
        delta = torch.cat([0.15 * torch.randn(3, generator=generator, dtype=torch.float64),
                           math.radians(1.0) * torch.randn(3, generator=generator, dtype=torch.float64)])
        moved = Pose.exp(delta) @ pose
        perturbed[name] = (moved.qvec().numpy(), moved.t.numpy())
    write_poses(path, perturbed)
    return perturbed, ground_truth


def test_refine_improves_perturbed_poses(scene, tmp_path):
    scene_dir = scene["scene"]
    perturbed, ground_truth = perturbed_ground_truth(scene_dir, tmp_path / "perturbed.txt")
    results = refine_job.main(scene["map"], str(scene["store"]), scene_dir / "queries", tmp_path / "perturbed.txt",
                              tmp_path / "refined", query_list=scene_dir / "queries_with_intrinsics.txt", conf=CONF)
    table = pq.read_table(results)
    assert table.num_rows == len(ground_truth) and set(table.column("method").to_pylist()) == {"refine"}
    before = pose_errors(perturbed, ground_truth)
    after = pose_errors(read_poses(results.parent / "poses.txt"), ground_truth)
    refined = [name for name in ground_truth if math.isfinite(after[name][0])]
    assert len(refined) >= 2, after
    assert np.median([after[name][0] for name in refined]) < np.median([before[name][0] for name in refined])


def test_the_checkpoints_dampings_reach_the_shards_aligners(scene, tmp_path):
    """`--checkpoint` on features and refine: the shipped unet-small weights once with their own
    dampings and once with every damping at its maximum (1e5), which stalls the Gauss-Newton
    steps. Same weights, so one store serves both; only if the shard actors' aligners take the
    checkpoint's dampings do the two runs differ. `refine` is not told the extractor: it takes
    the store's."""
    scene_dir = scene["scene"]
    stalled = tmp_path / "stalled.tar"
    write_checkpoint(stalled, load_extractor("unet-small"), torch.full((3, 6), 20.0), conf={"extractor": "unet-small"})
    store = tmp_path / "store"
    assert cli.main(["features", "--map", str(scene["map"]), "--images", str(scene_dir / "mapping"),
                     "--store", str(store), "--extractor", "unet-small", "--checkpoint", str(stalled)]) == 0
    perturbed, _ = perturbed_ground_truth(scene_dir, tmp_path / "perturbed.txt")
    moved = {}
    for checkpoint in (shipped_weights("unet-small"), stalled):
        out = tmp_path / checkpoint.stem
        assert cli.main(["refine", "--map", str(scene["map"]), "--store", str(store),
                         "--queries", str(scene_dir / "queries"), "--poses", str(tmp_path / "perturbed.txt"),
                         "--query-list", str(scene_dir / "queries_with_intrinsics.txt"), "--out", str(out),
                         "--checkpoint", str(checkpoint)]) == 0  # the extractor: the store's
        rows = [row for row in read_results(out).to_pylist() if row["qvec"] is not None]
        assert len(rows) >= 3, rows
        moved[checkpoint.stem] = [pose_errors({row["name"]: (row["qvec"], row["tvec"])}, perturbed)[row["name"]][0]
                                  for row in rows]
    assert np.median(moved["unet-small"]) > 0.05, moved
    assert max(moved["stalled"]) < 0.005, moved


def test_a_map_of_learned_keypoints_localizes_queries_described_alike(scene, tmp_path, capsys):
    """`pixloc map --keypoints alike-n`: the map's points carry ALIKE descriptors, the store says
    so, and the sparse localizer describes the queries with ALIKE too (from the store, no flag)."""
    scene_dir = scene["scene"]
    map_dir, store = tmp_path / "map", tmp_path / "store"
    built = map_job.build_map(scene_dir / "mapping", map_dir, reference_model=scene_dir / "reference_model",
                              priors=read_priors(scene_dir / "mapping_priors.csv"),
                              conf={"keypoints": "alike-n", "sift": {"max_num_features": 1024},
                                    "pairs": {"num_neighbors": 5}})
    assert built.keypoints == "alike-n" and built.descriptors.shape[1] == 128
    assert built.reconstruction.num_points3D() > 300
    features_job.main(map_dir, scene_dir / "mapping", str(store), conf=FEATURES)
    results = localize_job.main(map_dir, str(store), scene_dir / "queries", tmp_path / "out",
                                query_list=scene_dir / "queries_with_intrinsics.txt", priors=scene_dir / "priors.csv",
                                conf={**CONF, "method": "sparse"})
    rows = [row for row in pq.read_table(results).to_pylist() if row["success"]]
    errors = pose_errors(read_poses(results.parent / "poses.txt"), read_poses(scene_dir / "gt_queries.txt"))
    localized = {name: error for name, error in errors.items() if math.isfinite(error[0])}
    assert len(rows) == len(localized) >= 2 and all(row["inliers"] >= 15 for row in rows), rows
    assert all(t < 0.25 and R < 2.0 for t, R in localized.values()), errors

    # queries described with another type than the map's points: refused before any work
    capsys.readouterr()
    assert cli.main(["localize", "--map", str(map_dir), "--store", str(store), "--queries", str(scene_dir / "queries"),
                     "--priors", str(scene_dir / "priors.csv"), "--out", str(tmp_path / "mixed"),
                     "--method", "sparse", "--conf", "sparse.keypoints=sift"]) == 1
    message = capsys.readouterr().err
    assert message.startswith("pixloc localize: ") and message.count("\n") == 1
    assert "alike-n descriptors, not sparse.keypoints=sift" in message


def test_an_unreachable_store_is_a_one_line_error(scene, faulty_queries, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert cli.main(["localize", "--map", str(scene["map"]), "--store", "s3://pixloc-test/store",
                     "--queries", str(faulty_queries["queries"]), "--out", str(tmp_path / "out"),
                     "--priors", str(faulty_queries["priors"]), "--query-list", str(faulty_queries["query_list"])]) == 1
    message = capsys.readouterr().err
    assert message.startswith("pixloc localize: ") and "s3://pixloc-test/store" in message
    assert message.count("\n") == 1


# ----- the per-query logic, without Ray


def test_plan_and_policy_run_without_ray(scene):
    """Planner (from the compact map) and localize_in_cell (on a cell read straight from the store)
    in this process: what the query workers and shard actors run, without them."""
    map_index = load_map_index(scene["map"])
    assert (scene["map"] / "references.parquet").is_file()  # written with the map
    extractor = load_extractor("classic").eval()
    store = localize_job.open_store(str(scene["store"]), extractor.extractor_id, map_index.fingerprint)
    planner = Planner(map_index)
    intrinsics = read_query_list(scene["scene"] / "queries_with_intrinsics.txt")
    priors = read_priors(scene["scene"] / "priors.csv")
    ground_truth = read_poses(scene["scene"] / "gt_queries.txt")
    keypoints = sparse.keypoint_extractor(sparse.default_conf)
    conf = ShardConf()
    aligners = Aligners.from_conf(conf.align, conf.localize.sparse_levels)
    errors = {}
    for name in sorted(ground_truth):
        plan = planner.plan(QueryInput(name, str(scene["scene"] / "queries" / name), intrinsics[name], priors[name]))
        assert not plan.error and plan.cells and plan.hypotheses.shape == (4,) and plan.reference_image_ids
        request, _ = localize_job.query_request(plan, "sparse+dense", conf.levels, extractor, keypoints)
        cell = plan.cells[0]
        levels = [store.load_cell_with_image_ids(cell, level) for level in conf.levels]
        data = CellData(cell, [reference for reference, _ in levels], [ids for _, ids in levels], store.load_sparse(cell))
        # the sparse candidates are the cell's points near the prior, not the whole cell
        assert len(data.sparse_candidates(plan.reference_image_ids, 0)) < len(data.sparse)
        assert np.allclose(np.linalg.norm(data.sparse.descriptors.astype(np.float32), axis=1), 1, atol=1e-2)
        localization, timings = localize_in_cell(request, data, aligners, conf.localize, sparse.default_conf)
        assert timings["sparse_ms"] > 0
        if localization.success:
            errors[name] = pose_errors({name: (np.array(localization.qvec), np.array(localization.tvec))},
                                       ground_truth)[name]
    assert sum(t < 0.25 and R < 2.0 for t, R in errors.values()) >= 2, errors
    assert all(t < 0.5 for t, _ in errors.values()), errors

    # without PnP pose, the coarse-to-fine alignment runs in the query's first cell only
    blind = replace(request, keypoints=sparse.QueryKeypoints(np.zeros((0, 2)), np.zeros((0, 128), np.float16)))
    first, first_timings = localize_in_cell(blind, data, aligners, conf.localize, sparse.default_conf, rank=0)
    later, later_timings = localize_in_cell(blind, data, aligners, conf.localize, sparse.default_conf, rank=1)
    assert first_timings["align_ms"] > 0 and first.hypothesis != "sparse"
    assert later_timings["align_ms"] == 0 and not later.success and later.error.startswith("sparse:")

    # a query whose prior is far from the map is planned as a failure, not an exception
    far = Prior((1e4, 0.0, 1.6), geodetic=False, sigma_m=5.0)
    plan = planner.plan(QueryInput("far", str(scene["scene"] / "queries" / name), intrinsics[name], far))
    assert "outside the map" in plan.error


def test_hypotheses_moved_along_their_optical_axes():
    """Each pose moved by each distance along the axis it looks down, distance-major; the rotation kept."""
    poses = Pose.from_Rt(so3_exp(torch.tensor([[0.1, -0.4, 0.2], [0.0, 1.2, 0.0]], dtype=torch.float64)),
                         torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 7.0]], dtype=torch.float64))
    moved = moved_along_axes(poses, [-4.0, 2.5])
    assert moved.shape == (4,)
    centres = -(poses.R.transpose(-1, -2) @ poses.t[..., None])[..., 0]
    axes = poses.R[:, 2]  # the optical axis in the world frame: the third row of world-to-camera R
    for index, (distance, original) in enumerate(itertools.product([-4.0, 2.5], range(2))):
        torch.testing.assert_close(moved.R[index], poses.R[original])
        centre = -(moved.R[index].T @ moved.t[index])
        torch.testing.assert_close(centre, centres[original] + distance * axes[original])


def test_the_wide_start_aligns_where_the_coarsest_level_cannot(scene):
    """`dense` aligns the hypotheses from the coarsest level and, where the store holds it, from
    the wide level (alignment_starts), and keeps the result of lowest final cost. With the cell's
    coarsest level emptied, the plain start cannot align at all: every query's answer is then an
    alignment of the wide start (a finite cost at the finest level), and without the wide level
    every query fails for want of points. (Whether its poses are right is `pixloc bench basin`'s
    and `bench real`'s to measure: this 320 x 240 street is too small for a 7 x 7-cell window.)"""
    map_index = load_map_index(scene["map"])
    extractor = load_extractor("classic").eval()
    store = localize_job.open_store(str(scene["store"]), extractor.extractor_id, map_index.fingerprint)
    assert store.info.wide_cells == features_job.NEW_STORE_WIDE_CELLS
    planner = Planner(map_index)
    intrinsics = read_query_list(scene["scene"] / "queries_with_intrinsics.txt")
    priors = read_priors(scene["scene"] / "priors.csv")
    conf = ShardConf()
    aligners = Aligners.from_conf(conf.align, conf.localize.sparse_levels)
    for name in sorted(intrinsics):
        plan = planner.plan(QueryInput(name, str(scene["scene"] / "queries" / name), intrinsics[name], priors[name]))
        request, _ = localize_job.query_request(plan, "dense", conf.levels, extractor)
        cell = plan.cells[0]
        levels = [store.load_cell_with_image_ids(cell, level) for level in conf.levels]
        references, observers = [reference for reference, _ in levels], [ids for _, ids in levels]
        wide = WideLevel(store.info.wide_cells, *store.load_cell_with_image_ids(cell, WIDE_LEVEL))
        assert len(wide.reference.points3D) == len(references[0].points3D)  # the same observations
        emptied = CellData(cell, [references[0][torch.zeros(0, dtype=torch.long)], *references[1:]],
                           [observers[0][:0], *observers[1:]], store.load_sparse(cell), wide=wide)
        starts = alignment_starts(request, emptied, request.pyramid(), emptied.references, conf.localize)
        assert [start.labels[0].removeprefix(request.labels[0]) for start in starts] == [
            "", ", wide start", ", -4 m along its axis", ", -4 m along its axis, wide start"]
        localization, _ = localize_in_cell(request, emptied, aligners, conf.localize, sparse.default_conf)
        assert localization.hypothesis.endswith(", wide start") and math.isfinite(localization.cost), localization
        without_wide, _ = localize_in_cell(request, replace(emptied, wide=None), aligners, conf.localize,
                                           sparse.default_conf)
        assert not without_wide.success and "no reference points at stride 16" in without_wide.error
        # `sparse+dense` without a PnP pose aligns the hypotheses once (second_stage_methods)
        blind = replace(request, method="sparse+dense",
                        keypoints=sparse.QueryKeypoints(np.zeros((0, 2)), np.zeros((0, 128), np.float16)))
        fallback, _ = localize_in_cell(blind, emptied, aligners, conf.localize, sparse.default_conf)
        assert not fallback.success and "no reference points at stride 16" in fallback.error, fallback.error


def test_a_small_query_is_featurized_at_the_scale_of_the_reference_features(scene, tmp_path):
    """A query at half the references' resolution is resized back to their focal length before
    its features are computed (feature_scale), so the camera of its pyramid is the references'."""
    references_table = scene["map"] / "references.parquet"
    table = pq.read_table(references_table)
    pq.write_table(table.drop_columns(["camera_id"]).replace_schema_metadata(table.schema.metadata), references_table)
    map_index = load_map_index(scene["map"])  # a table without the column is derived again
    assert "camera_id" in pq.read_table(references_table).column_names
    extractor = load_extractor("classic").eval()
    name = sorted(read_poses(scene["scene"] / "gt_queries.txt"))[0]
    full = read_query_list(scene["scene"] / "queries_with_intrinsics.txt")[name]
    Image.open(scene["scene"] / "queries" / name).resize((full.width // 2, full.height // 2), Image.LANCZOS).save(
        tmp_path / name, quality=95)
    half = QueryIntrinsics(full.model, full.width // 2, full.height // 2, tuple(v / 2 for v in full.params))
    query = QueryInput(name, str(tmp_path / name), half, read_priors(scene["scene"] / "priors.csv")[name])
    levels = ShardConf().levels
    for match, expected_camera in ((True, full), (False, half)):
        planner = Planner(map_index, PlanConf(match_reference_scale=match), feature_max_size=extractor.max_size)
        plan = planner.plan(query)
        assert not plan.error
        if match:  # the synthetic references share the query camera's focal length
            assert plan.reference_focal_px == pytest.approx(full.params[0])
        request, _ = localize_job.query_request(plan, "dense", levels, extractor)
        camera = request.camera().scale(request.pyramid_scale)
        expected = Camera.from_query_intrinsics(expected_camera)
        assert torch.allclose(camera.params, expected.params) and torch.equal(camera.size, expected.size)
        finest = request.pyramid()[-1]
        assert finest.features.shape[-2:] == (expected_camera.height, expected_camera.width)


def test_feature_scale_matches_the_reference_focal_within_max_size():
    query = QueryIntrinsics("SIMPLE_PINHOLE", 480, 320, (400.0, 240.0, 160.0))
    assert feature_scale(query, 850.0, 1024) == pytest.approx(850 / 400)  # up, to the references' focal
    assert feature_scale(query, 850.0, 640) == pytest.approx(640 / 480)  # no further than max_size
    assert feature_scale(query, 200.0, 1024) == pytest.approx(0.5)  # down as well
    assert feature_scale(query, None, 1024) == 1.0 and feature_scale(query, None, 240) == 0.5
    assert feature_scale(query, math.nan, 1024) == 1.0
    tensor, scale = resized(np.zeros((320, 480, 3), np.uint8), 850 / 400)
    assert tensor.shape == (3, 680, 1020) and scale == 1020 / 480
    tensor, scale = resized(np.zeros((320, 480, 3), np.uint8), 1.0001)
    assert tensor.shape == (3, 320, 480) and scale == 1.0


def test_spatial_order_groups_cells_and_keeps_unknown_positions_last():
    rng = np.random.default_rng(0)
    positions = rng.uniform(-500, 500, (400, 2))
    positions[::50] = np.nan
    order = spatial_order(positions, 50.0)
    assert sorted(order.tolist()) == list(range(400))
    known = order[:-8]
    assert np.isfinite(positions[known]).all() and np.isnan(positions[order[-8:]]).all()
    cells = [tuple(cell) for cell in np.floor(positions[known] / 50.0).astype(int).tolist()]
    runs = 1 + sum(a != b for a, b in zip(cells, cells[1:]))
    assert runs == len(set(cells))  # each cell's queries come together
    # consecutive cells are mostly neighbours (a space-filling curve), not scattered
    steps = np.abs(np.diff(np.array(list(dict.fromkeys(cells))), axis=0)).max(1)
    assert np.median(steps) <= 1
    # a resumed job with every query answered orders nothing (it crashed on the empty table)
    assert spatial_order(np.zeros((0, 3)), 50.0).tolist() == spatial_order([], 50.0).tolist() == []


def test_cells_map_to_one_actor_stably():
    cells = [f"x{x:+05d}_y{y:+05d}" for x in range(-5, 5) for y in range(-5, 5)]
    hosts = [actor_for_cell(cell, 4) for cell in cells]
    assert hosts == [actor_for_cell(cell, 4) for cell in cells] and set(hosts) == {0, 1, 2, 3}


def test_reference_hypotheses_keep_rotation_and_move_to_the_prior():
    angles = torch.tensor([0.1, 1.2, 2.5], dtype=torch.float64)
    R = torch.stack([Pose.from_aa(torch.tensor([0.0, 0.0, a], dtype=torch.float64), torch.zeros(3)).R for a in angles])
    centers = torch.tensor([[0.0, 0.0, 1.5], [10.0, 0.0, 1.6], [20.0, 0.0, 1.7]], dtype=torch.float64)
    references = Pose.from_Rt(R, -(R @ centers[..., None])[..., 0])
    hypotheses, nearest = reference_hypotheses(np.array([9.0, 2.0, 99.0]), references, 2)
    assert nearest.tolist() == [1, 0]
    assert torch.allclose(hypotheses.center(), torch.tensor([[9.0, 2.0, 1.6], [9.0, 2.0, 1.5]], dtype=torch.float64))
    assert torch.allclose(hypotheses.R, R[[1, 0]])


def test_hypotheses_turn_towards_what_their_reference_looked_at():
    # A reference at the origin looking along +x (camera y down = world -z), 10 m from its scene.
    R = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    reference = Pose.from_Rt(R, torch.zeros(3, dtype=torch.float64))[None]
    target = viewed_points(reference, torch.tensor([10.0], dtype=torch.float64))
    assert torch.allclose(target, torch.tensor([[10.0, 0.0, 0.0]], dtype=torch.float64))

    moved, _ = reference_hypotheses(np.array([0.0, 3.0, 0.0]), reference, 1)
    turned = turned_towards(moved, target)
    assert torch.allclose(turned.center(), moved.center())
    expected_axis = torch.nn.functional.normalize(torch.tensor([10.0, -3.0, 0.0], dtype=torch.float64), dim=0)
    assert torch.allclose(turned.R[0, 2], expected_axis)
    assert torch.allclose(turned.R[0, 1], R[1])  # a turn about the vertical keeps the camera upright

    # Unknown, or behind the moved camera: nothing to turn towards.
    beyond, _ = reference_hypotheses(np.array([12.0, 3.0, 0.0]), reference, 1)
    for hypothesis, unusable in ((moved, torch.full((1, 3), math.nan, dtype=torch.float64)), (beyond, target)):
        kept = turned_towards(hypothesis, unusable)
        assert torch.allclose(kept.R, hypothesis.R) and torch.allclose(kept.t, hypothesis.t)


def test_visible_points_keeps_what_some_hypothesis_sees():
    from pixloc_core.geometry import Camera

    camera = Camera("PINHOLE", 100.0, 100.0, torch.tensor([50.0, 50.0, 50.0, 50.0]))
    points = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, -5.0], [30.0, 0.0, 5.0], [0.0, 0.0, 500.0]],
                          dtype=torch.float64)
    reference = ReferenceLevel(points, torch.eye(4), torch.ones(4))
    identity = Pose.from_Rt(torch.eye(3, dtype=torch.float64)[None], torch.zeros(1, 3, dtype=torch.float64))
    kept = visible_points(reference, identity, camera, max_points=10, max_depth_m=100.0)
    assert kept.points3D.tolist() == [[0.0, 0.0, 5.0]]
    turned = Pose.stack([identity[0], Pose.from_aa(torch.tensor([0.0, math.pi, 0.0], dtype=torch.float64),
                                                   torch.zeros(3, dtype=torch.float64))])
    kept = visible_points(reference, turned, camera, max_points=10, max_depth_m=100.0)
    assert kept.points3D.tolist() == [[0.0, 0.0, 5.0], [0.0, 0.0, -5.0]]


def test_pose_std_is_the_inverse_hessian_times_the_residual_variance():
    hessian = torch.diag(torch.tensor([100.0, 400.0, 2500.0, 1e4, 1e4, 1e4], dtype=torch.float64))
    position_std, rotation_std = pose_std(alignment_covariance(hessian, 0.04))
    assert position_std == pytest.approx(math.sqrt(0.04 * (1 / 100 + 1 / 400 + 1 / 2500)))
    assert rotation_std == pytest.approx(math.degrees(math.sqrt(0.04 * 3e-4)))
    assert all(math.isnan(v) for v in pose_std(alignment_covariance(hessian, math.inf)))


def _localization(pose: Pose, covariance: torch.Tensor, **values) -> Localization:
    return Localization(success=True, qvec=tuple(pose.qvec().tolist()), tvec=tuple(pose.t.tolist()),
                        covariance=tuple(covariance.flatten().tolist()), **values)


def test_a_refined_pnp_pose_is_combined_with_its_start_by_their_covariances():
    start = Pose.from_aa(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([5.0, 1.0, -2.0]))
    delta = torch.tensor([0.02, -0.01, 0.03, 0.004, 0.002, -0.003], dtype=torch.float64)
    aligned = Pose.exp(delta) @ start
    loose, tight = torch.eye(6, dtype=torch.float64) * 1e-2, torch.eye(6, dtype=torch.float64) * 1e-6
    pnp = _localization(start, tight)
    refined = _localization(aligned, loose, cost=0.05, hypothesis="sparse", position_std_m=0.17)

    # a tight PnP pose holds: the loose refinement moves it by 1e-4 of the way
    held = refined_with_pnp(refined, pnp)
    assert torch.allclose((held.pose() @ start.inv()).log(), delta * 1e-4, atol=1e-9)
    assert held.cost == 0.05 and held.hypothesis == "sparse"
    assert held.position_std_m == pytest.approx(math.sqrt(3 / (1 / 1e-6 + 1 / 1e-2)))
    # a loose PnP pose gives way to a tight refinement; equal ones meet halfway
    moved = refined_with_pnp(_localization(aligned, tight), _localization(start, loose))
    assert torch.allclose((moved.pose() @ aligned.inv()).log(), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    halfway = refined_with_pnp(_localization(aligned, tight), _localization(start, tight))
    assert torch.allclose((halfway.pose() @ start.inv()).log(), delta / 2, atol=1e-5)
    # without a covariance (or with NaNs) the refinement stands as it is
    assert refined_with_pnp(replace(refined, covariance=None), pnp) == replace(refined, covariance=None)
    nan = _localization(start, torch.full((6, 6), math.nan, dtype=torch.float64))
    assert refined_with_pnp(refined, nan) == refined


def test_a_pnp_pose_is_refined_against_every_point_of_the_cell():
    """Rough hypotheses align to the points the references near the prior observe; a PnP pose,
    which already says where the camera is, to every point of the cell (its visible ones are kept
    later): the references near a prior tens of metres off miss much of what the camera sees."""
    observers = np.r_[np.full(250, 1), np.full(150, 2)].astype(np.int32)  # (400,) observing image per row
    level = ReferenceLevel(torch.rand(400, 3), torch.rand(400, 8), torch.rand(400))
    cell = CellData("x+0000_y+0000", [level], [observers])
    conf = LocalizeConf(min_selected_points=200)
    near_prior = refinement_references(cell, [1], from_pnp=False, conf=conf)[0]
    from_pnp = refinement_references(cell, [1], from_pnp=True, conf=conf)[0]
    assert len(near_prior.points3D) == 250 and torch.equal(near_prior.points3D, level.points3D[:250])
    assert len(from_pnp.points3D) == 400
