"""`pixloc refine`: refine external poses (e.g. hloc's) with the fine feature levels.

PixLoc's "pose post-processing": each query starts from its given pose (one hypothesis), routed
to the cells around that pose, and is aligned at strides 4 and 1 only, since the pose is already
close and the coarse level would only blur it. Planning, pipeline and outputs are those of
`pixloc localize` (pixloc_core.localize.Planner with `refine`), with method `refine`.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from pixloc_core.align import AlignConf
from pixloc_core.io import read_poses, read_query_list
from pixloc_core.localize import PlanConf, QueryInput

from .config import merge_conf
from .localize import add_query_job_arguments, query_job_conf, query_name, query_paths, run_queries
from .localize import default_conf as localize_conf
from .results import ResultsWriter

logger = logging.getLogger(__name__)

default_conf = {
    **localize_conf,
    "method": "refine",
    "pose_sigma_m": 2.0,  # how far the given poses may be off: sets the cells searched around them
    "levels": (1, 2),  # store and pyramid levels used: the fine ones
    "num_iterations": (20, 20),
}


def main(map_dir: Path, store_url: str, queries_dir: Path, poses: Path, out_dir: Path,
         query_list: Path | None = None, address: str | None = None, conf: dict | None = None) -> Path:
    conf = merge_conf(default_conf, conf)
    shard = conf["shard"]
    conf["shard"] = replace(shard, levels=tuple(conf["levels"]), align=AlignConf(num_iterations=tuple(conf["num_iterations"])),
                            localize=replace(shard.localize, sparse_levels=len(conf["levels"])))
    intrinsics = read_query_list(query_list) if query_list is not None else None
    given = read_poses(poses)
    queries = []
    for path in query_paths(Path(queries_dir), intrinsics):
        name = query_name(path, Path(queries_dir))
        pose = given.get(name)
        queries.append(QueryInput(name, str(path.resolve()), intrinsics.get(name) if intrinsics else None,
                                  pose=None if pose is None else (tuple(pose[0].tolist()), tuple(pose[1].tolist()))))
    writer = ResultsWriter(out_dir, conf["flush_every"])
    plan_conf = PlanConf(conf["search"], refine=True, pose_sigma_m=conf["pose_sigma_m"])
    summary = run_queries(Path(map_dir), store_url, queries, writer, conf, plan_conf, address)
    logger.info("%d/%d poses refined -> %s", summary["succeeded"], summary["results"], out_dir)
    return writer.out_dir / "results.parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_query_job_arguments(parser, default_conf)
    parser.add_argument("--poses", type=Path, required=True, help="poses to refine (name qw qx qy qz tx ty tz)")


def run(args: argparse.Namespace) -> int:
    main(args.map, args.store, args.queries, args.poses, args.out, args.query_list, args.address,
         merge_conf(default_conf, query_job_conf(args, default_conf), args.conf))
    return 0
