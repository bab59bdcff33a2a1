"""`pixloc bench scale` smoke test: a tiny form of the quick span, every key of the report measured."""
from __future__ import annotations

import json

from jobs.bench import main as bench_main

TINY = {"blocks": [[1, 1]], "num_queries": 3, "queries": 3, "width": 160, "height": 120, "nodes_queries": 0,
        "map": {"sift": {"max_num_features": 512}, "pairs": {"num_neighbors": 4}}, "plot": True}


def test_bench_scale_reports_measured_numbers(tmp_path):
    out = tmp_path / "scale.json"
    report = bench_main("scale", out, {**TINY, "quick": True, "data_dir": str(tmp_path / "data"),
                                       "localize_conf": ["queries_per_call=1"]})  # reaches `pixloc localize`
    assert json.loads(out.read_text())["sizes"][0]["refs"] == report["sizes"][0]["refs"] > 0
    (size,) = report["sizes"]
    assert size["queries"] == 3 and size["points"] > 0 and size["cells"] >= 1
    assert size["queries_per_s"] > 0 and size["cpu_s_per_query"] > 0
    # Measured from /proc: the driver, and Ray's query workers, held real memory.
    assert size["peak_rss_mb"]["driver"] > 100 and size["peak_rss_mb"]["query_worker"] > 100
    assert set(size["stage_ms"]) >= {"read", "cnn", "align"}
    assert set(size["recall"]) == {"0.25m_2deg", "0.5m_5deg", "5m_10deg"}
    assert size["precision"] is None or 0 <= size["precision"] <= 1
    assert report["order"]["sorted_s"] > 0 and report["order"]["shuffled_s"] > 0
    assert report["nodes"] == {}
    assert out.with_suffix(".png").stat().st_size > 10_000
    build = size["details"]["build"]
    assert build["synth"]["cpu_s"] > 0 and build["map"]["wall_s"] > 0 and build["features"]["wall_s"] > 0
