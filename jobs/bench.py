"""`pixloc bench NAME [--out FILE.json]`: run one benchmark of bench/, print its table, write JSON.

Each benchmark module exposes `main(out: Path | None, **kwargs) -> dict`; it prints its own table
and writes the JSON report to `out`. Register a new one in BENCHMARKS.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

BENCHMARKS = {
    # name: module, imported only when run (benchmarks pull in torch, Ray, pycolmap)
    "align": "bench.align",
    "basin": "bench.basin",
    "store": "bench.store",
    "real": "bench.real",
    "localize": "bench.localize",
    "devices": "bench.devices",
}


def main(name: str, out: Path | None = None) -> dict:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}, expected one of {sorted(BENCHMARKS)}")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    return importlib.import_module(BENCHMARKS[name]).main(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--out", type=Path, help="write the report to this JSON file")


def run(args: argparse.Namespace) -> int:
    main(args.name, args.out)
    return 0
