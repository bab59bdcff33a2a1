"""`pixloc synth`: render a seeded, geotagged synthetic street scene or city (`--blocks WxH`);
see pixloc_core.synthetic.dataset."""
from __future__ import annotations

import argparse
from pathlib import Path

from pixloc_core.synthetic import dataset

from .config import merge_conf

default_conf = dataset.default_conf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    conf = dataset.default_conf
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=conf["seed"], help="scene and pose seed (same seed, same bytes)")
    parser.add_argument("--blocks", type=_blocks, default=conf["blocks"], metavar="WxH",
                        help="city blocks east-west x north-south, streets around and between them "
                        "(default {}x{})".format(*conf["blocks"]))
    parser.add_argument("--refs", type=int, default=conf["num_refs"],
                        help=f"number of mapping images (default: one per {conf['ref_spacing_m']} m of street)")
    parser.add_argument("--queries", type=int, default=conf["num_queries"], help="number of query images")
    parser.add_argument("--gps-noise", type=float, default=conf["gps_noise_m"], metavar="METRES",
                        help="std dev of the query GPS priors, per horizontal axis (east and north)")
    parser.add_argument("--width", type=int, default=conf["width"])
    parser.add_argument("--height", type=int, default=conf["height"])
    parser.add_argument("--workers", type=int, default=conf["workers"], help="rendering processes")


def _blocks(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H), both >= 1."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH (e.g. 15x15), got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"both block counts must be >= 1, got {text!r}")
    return width, height


def run(args: argparse.Namespace) -> int:
    for name in ("refs", "queries", "width", "height", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < (1 if name != "queries" else 0):
            raise SystemExit(f"pixloc synth: --{name} must be positive, got {getattr(args, name)}")
    if args.gps_noise < 0:
        raise SystemExit(f"pixloc synth: --gps-noise must be >= 0, got {args.gps_noise}")
    dataset.main(args.out, merge_conf(default_conf, {
        "seed": args.seed, "blocks": args.blocks, "num_refs": args.refs, "num_queries": args.queries, "gps_noise_m": args.gps_noise,
        "width": args.width, "height": args.height, "workers": args.workers,
    }, args.conf))
    return 0
