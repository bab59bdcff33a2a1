"""The `pixloc` command line: one subcommand per job module.

Each module listed in COMMANDS exposes `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    # name: (module, one-line help)
    "train": ("jobs.train", "learn features (and dampings) from posed images"),
    "synth": ("jobs.synth", "render a synthetic geotagged street scene"),
    "features": ("jobs.features", "precompute reference features into the Parquet store"),
    "localize": ("jobs.localize", "localize photos from their GPS priors on Ray"),
    "refine": ("jobs.refine", "refine external poses with the fine feature levels"),
    "eval": ("jobs.eval", "accuracy of localization results against ground-truth poses"),
    "demo": ("jobs.demo", "the whole pipeline end to end on a synthetic street"),
    "geotag": ("jobs.geotag", "write corrected GPS/heading EXIF into copies of localized photos"),
    "map": ("jobs.map", "build, import or triangulate a map and shard it"),
    "bench": ("jobs.bench", "run a benchmark, print a table, write JSON"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only `command`'s module is imported (jobs pull in torch and
    Ray, which would make `pixloc --help` take seconds)."""
    parser = argparse.ArgumentParser(prog="pixloc", description="PixLoc-style batch camera localization")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
