"""`pixloc refine`: refine external poses (e.g. hloc's) with the fine feature levels.

PixLoc's "pose post-processing": each query starts from its given pose (one hypothesis), routed
to the cells around that pose, and is aligned at strides 4 and 1 only, since the pose is already
close and the coarse level would only blur it. The pipeline and outputs are those of
`pixloc localize`, with method `refine`.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cluster.router import PriorOutsideMap, Router
from cluster.runtime import init_ray
from pixloc_core.align import AlignConf
from pixloc_core.geometry import Pose, UnsupportedCameraModel
from pixloc_core.io import QueryIntrinsics, read_poses, read_query_list
from pixloc_core.map_io import SceneMap

from .localize import (USER_ERRORS, QueryPlan, References, add_query_job_arguments, execute, open_store,
                       query_intrinsics, query_paths)
from .localize import default_conf as localize_conf
from .config import merge_conf
from .results import ResultsWriter

logger = logging.getLogger(__name__)

default_conf = {
    **localize_conf,
    "method": "refine",
    "pose_sigma_m": 2.0,  # how far the given poses may be off: sets the cells searched around them
    "levels": (1, 2),  # store and pyramid levels used: the fine ones
    "num_iterations": (20, 20),
}


def plan_refinement(references: References, router: Router, paths: list[Path],
                    query_list: dict[str, QueryIntrinsics] | None,
                    poses: dict[str, tuple[np.ndarray, np.ndarray]], sigma_m: float) -> list[QueryPlan]:
    plans = []
    for path in paths:
        plan = QueryPlan(path.name, path)
        try:
            plan.intrinsics, plan.note = query_intrinsics(path, query_list)
            if path.name not in poses:
                raise ValueError("no input pose: not in the poses file")
            qvec, tvec = poses[path.name]
            pose = Pose.from_qvec_tvec(torch.tensor(qvec, dtype=torch.float64), torch.tensor(tvec, dtype=torch.float64))
            plan.prior_xyz, plan.sigma_m = pose.center().numpy(), sigma_m
            plan.cells = router.cells(plan.prior_xyz, sigma_m)
            plan.reference_image_ids = references.ids(router.reference_images(plan.prior_xyz, sigma_m))
            # external poses (e.g. hloc's PnP) count as verified, as in PixLoc's post-processing
            plan.hypotheses, plan.labels, plan.verified = pose[None], ["input"], True
        except (ValueError, OSError, UnsupportedCameraModel, PriorOutsideMap) as error:
            plan.error = str(error)
        plans.append(plan)
    return plans


def main(map_dir: Path, store_url: str, queries_dir: Path, poses: Path, out_dir: Path,
         query_list: Path | None = None, address: str | None = None, conf: dict | None = None) -> Path:
    conf = merge_conf(default_conf, conf)
    shard = conf["shard"]
    conf["shard"] = replace(shard, levels=tuple(conf["levels"]), sparse_levels=len(conf["levels"]),
                            align=AlignConf(num_iterations=tuple(conf["num_iterations"])))
    scene = SceneMap.load(map_dir)
    store = open_store(store_url, conf["extractor"], scene)
    intrinsics = read_query_list(query_list) if query_list is not None else None
    plans = plan_refinement(References(scene), Router(scene.shards, conf["router"]),
                            query_paths(Path(queries_dir), intrinsics),
                            intrinsics, read_poses(poses), conf["pose_sigma_m"])
    writer = ResultsWriter(out_dir, conf["flush_every"])
    with init_ray(address, num_cpus=None if address else conf["workers"]):
        execute(plans, writer, Path(map_dir), store, conf)
    table = writer.close()
    logger.info("%d/%d poses refined -> %s", sum(table.column("success").to_pylist()), table.num_rows, out_dir)
    return writer.out_dir / "results.parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_query_job_arguments(parser, default_conf)
    parser.add_argument("--poses", type=Path, required=True, help="poses to refine (name qw qx qy qz tx ty tz)")


def run(args: argparse.Namespace) -> int:
    try:
        main(args.map, args.store, args.queries, args.poses, args.out, args.query_list, args.address,
             merge_conf(default_conf, {"extractor": args.extractor, "workers": args.workers}, args.conf))
    except USER_ERRORS as error:
        raise SystemExit(f"pixloc refine: {error}") from None
    return 0
