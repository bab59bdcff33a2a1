"""Benchmarks: each module's `main(out, **conf) -> dict` prints a table and writes its JSON report."""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def write_report(report: dict, out: Path | None) -> None:
    """The JSON report, when a path is given (the console table is each benchmark's own)."""
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        logger.info("Wrote %s", out)
