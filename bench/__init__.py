"""Benchmarks: each module's `main(out, **conf) -> dict` prints a table and writes its JSON report."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from pixloc_core.extractors import Extractor

logger = logging.getLogger(__name__)


def write_report(report: dict, out: Path | None) -> None:
    """The JSON report, when a path is given (the console table is each benchmark's own)."""
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        logger.info("Wrote %s", out)


@dataclass(frozen=True)
class ExtractorSpec:
    """An extractor as benchmarks name it: "name", "name=CHECKPOINT" (weights of `pixloc train`,
    or a PixLoc checkpoint) or "name:key=value,..." (config overrides, e.g. "alike-n:coarse=encoder")."""

    name: str
    checkpoint: Path | None = None
    overrides: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> ExtractorSpec:
        name, _, options = spec.partition(":")
        if options:
            return cls(name, overrides=tuple((key, yaml.safe_load(value)) for key, _, value in
                                             (item.partition("=") for item in options.split(","))))
        name, _, checkpoint = spec.partition("=")
        return cls(name, Path(checkpoint) if checkpoint else None)

    @property
    def label(self) -> str:
        """How tables and folders call it: a checkpoint by the folder it is in (`pixloc train --out`)."""
        if self.checkpoint is not None:
            return f"{self.name}={self.checkpoint.resolve().parent.name}"
        return self.name + (":" + ",".join(f"{key}={value}" for key, value in self.overrides) if self.overrides else "")

    def load(self) -> Extractor:
        from pixloc_core.extractors import load_extractor  # torch, on use only

        return load_extractor(self.name, checkpoint=self.checkpoint, **dict(self.overrides))

    def cli_args(self) -> list[str]:
        """The same extractor on the command line of `pixloc features` and `localize`."""
        if self.overrides:
            raise ValueError(f"{self.label}: config overrides are for `pixloc bench basin` only")
        return ["--extractor", self.name] + (["--checkpoint", str(self.checkpoint)] if self.checkpoint else [])
