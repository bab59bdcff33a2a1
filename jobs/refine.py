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

from pixloc_core import files
from pixloc_core.align import AlignConf
from pixloc_core.files import Location
from pixloc_core.io import read_poses_table, read_query_list_table
from pixloc_core.localize import PlanConf, query_table

from .config import merge_conf
from .localize import add_query_job_arguments, query_job_conf, query_names, run_job
from .localize import default_conf as localize_conf
from .results import check_output

logger = logging.getLogger(__name__)

default_conf = {
    **localize_conf,
    "method": "refine",
    "pose_sigma_m": 2.0,  # how far the given poses may be off: sets the cells searched around them
    "levels": (1, 2),  # store and pyramid levels used: the fine ones
    "num_iterations": (20, 20),
}


def main(map_dir: Location, store_url: str, queries_dir: Location, poses: Location, out_dir: Location,
         query_list: Location | None = None, address: str | None = None, conf: dict | None = None,
         resume: bool = False, overwrite: bool = False) -> Location:
    conf = merge_conf(default_conf, conf)
    shard = conf["shard"]
    conf["shard"] = replace(shard, levels=tuple(conf["levels"]), align=AlignConf(num_iterations=tuple(conf["num_iterations"])),
                            localize=replace(shard.localize, sparse_levels=len(conf["levels"])))
    check_output(out_dir, resume, overwrite)
    listed = read_query_list_table(query_list) if query_list is not None else None
    queries_dir = files.location(queries_dir)
    queries = query_table(query_names(queries_dir, listed), files.absolute(queries_dir), listed,
                          poses=read_poses_table(poses))
    plan_conf = PlanConf(conf["search"], refine=True, pose_sigma_m=conf["pose_sigma_m"],
                         match_reference_scale=conf["match_reference_scale"])
    return run_job(map_dir, store_url, queries, out_dir, conf, plan_conf, address, resume, overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_query_job_arguments(parser, default_conf)
    parser.add_argument("--poses", type=files.location, required=True, help="poses to refine (name qw qx qy qz tx ty tz)")


def run(args: argparse.Namespace) -> int:
    main(args.map, args.store, args.queries, args.poses, args.out, args.query_list, args.address,
         merge_conf(default_conf, query_job_conf(args, default_conf), args.conf), args.resume, args.overwrite)
    return 0
