"""The `pixloc` command line: one subcommand per job module.

Each module listed in COMMANDS exposes `add_arguments(parser)`, `run(args) -> int` and (but for
`bench`, whose benchmarks have their own) a `default_conf`. Every subcommand takes
`--conf KEY=VALUE ...` (deep-merged into the job's default_conf, see jobs/config.py; `args.conf`
is the parsed dict) and `--debug`. Errors end here: one line naming the cause (S3 credentials with
the URL, an unreachable endpoint, a full disk with the path, bad input with file:line), the
traceback only with `--debug`; Ctrl-C says what was saved.
"""
from __future__ import annotations

import _thread
import argparse
import contextlib
import importlib
import logging
import sys
import threading

from .config import merge_conf, parse_overrides

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

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class Interrupted(Exception):
    """Ctrl-C, with what the job saved before it stopped (the message)."""


@contextlib.contextmanager
def interrupts_kept():
    """Ctrl-C never lost. Python raises KeyboardInterrupt wherever the main thread is when the
    signal is handled; inside a finalizer (a `__del__`, of which a Ray driver runs many as it
    drops object references, or a weakref callback) it cannot propagate, and Python only reports
    it to sys.unraisablehook: the job then ran to its end (exit 0) as if never interrupted. Here
    such an interrupt is raised again in the main thread a moment later, outside the finalizer,
    or when the block ends before that."""
    previous, timers = sys.unraisablehook, []

    def hook(unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            timers.append(threading.Timer(0.05, _thread.interrupt_main))
            timers[-1].start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        pending = [timer for timer in timers if timer.is_alive()]
        for timer in pending:
            timer.cancel()
    if pending:
        raise KeyboardInterrupt


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only `command`'s module is imported (jobs pull in torch and
    Ray, which would make `pixloc --help` take seconds)."""
    parser = argparse.ArgumentParser(prog="pixloc", description="PixLoc-style batch camera localization")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--conf", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override the job's default_conf (YAML values, dotted keys: router.max_cells=3)")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run, module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    prefix = f"pixloc {args.command}"
    try:
        args.conf = parse_overrides(args.conf)
        if hasattr(args.module, "default_conf"):
            merge_conf(args.module.default_conf, args.conf)  # unknown keys refused before any work
    except ValueError as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with interrupts_kept():
            return args.run(args)
    except (KeyboardInterrupt, Interrupted) as interruption:
        print(f"{prefix}: {interruption or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the one place where any error becomes a message
        if args.debug:
            raise
        from cluster.errors import describe  # only once something failed: it needs neither Ray nor pycolmap

        print(f"{prefix}: {describe(error)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    # `python -m jobs.cli`: run the imported module's main, whose Interrupted is the class the jobs raise
    from jobs import cli

    sys.exit(cli.main())
