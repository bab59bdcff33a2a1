"""Whole-file reads handed to Arrow: the process that made them must still exit cleanly."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pixloc_core import files

# Two threaded Parquet reads, then exit at once: what `pixloc localize` does as it closes its
# results. On Python's bytes about a quarter of such processes aborted (SIGABRT) at exit.
READ_THEN_EXIT = """
import sys
from pathlib import Path
from jobs.results import read_results
from pixloc_core.mapping import feature_files
read_results(Path(sys.argv[1]))
feature_files._read(Path(sys.argv[1]))
"""


def test_buffers_for_arrow_are_in_memory_arrow_owns(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4096)
    before = pa.total_allocated_bytes()
    buffer = files.read_arrow_buffer(path)
    assert pa.total_allocated_bytes() - before >= buffer.size == 256 * 4096
    assert buffer.to_pybytes() == path.read_bytes()


def test_processes_exit_cleanly_after_threaded_reads(tmp_path):
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({f"c{i}": np.random.default_rng(i).random(20_000) for i in range(8)}), path)

    def exit_code(_: int) -> int:
        return subprocess.run([sys.executable, "-c", READ_THEN_EXIT, str(path)], capture_output=True).returncode

    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(exit_code, range(16)))
    assert codes == [0] * 16, f"exit codes {codes}"
