"""`pixloc bench NAME [--out FILE.json] [--conf KEY=VALUE ...]`: run one benchmark of bench/,
print its table, write JSON.

Each benchmark module exposes `default_conf` and `main(out: Path | None, **conf) -> dict`; it prints
its own table and writes the JSON report to `out`. `--conf` (jobs/config.py) overrides entries of
`default_conf`, values read as YAML (`--conf sets=[lund] workers=1`, `pixloc bench basin --conf quick=true`). Register a new benchmark in BENCHMARKS.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = {
    # name: module, imported only when run (benchmarks pull in torch, Ray, pycolmap)
    "align": "bench.align",
    "basin": "bench.basin",
    "store": "bench.store",
    "real": "bench.real",
    "localize": "bench.localize",
    "devices": "bench.devices",
    "scale": "bench.scale",
    "mapping": "bench.mapping",
    "precision": "bench.precision",
    "streaming": "bench.streaming",
}


def main(name: str, out: Path | None = None, conf: dict | None = None) -> dict:
    module = benchmark_module(name, conf or {})
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    return module.main(out, **(conf or {}))


def benchmark_module(name: str, conf: dict) -> ModuleType:
    """The benchmark's module, once its name and the conf keys are known to be valid."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}, expected one of {sorted(BENCHMARKS)}")
    module = importlib.import_module(BENCHMARKS[name])
    keywords = [name for name, parameter in inspect.signature(module.main).parameters.items()
                if parameter.kind is not inspect.Parameter.VAR_KEYWORD and name != "out"]  # e.g. basin's quick
    known = set(module.default_conf) | set(keywords)
    unknown = set(conf) - known
    if unknown:
        raise ValueError(f"bench {name}: unknown conf keys {sorted(unknown)}, expected some of {sorted(known)}")
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--out", type=Path, help="write the report to this JSON file")


def run(args: argparse.Namespace) -> int:
    conf = args.conf  # parsed by jobs.cli (jobs/config.py)
    try:
        benchmark_module(args.name, conf)
    except ValueError as error:
        print(f"pixloc bench: error: {error}", file=sys.stderr)
        return 2
    main(args.name, args.out, conf)
    return 0
