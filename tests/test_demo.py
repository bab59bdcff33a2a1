"""`pixloc demo` end to end at a reduced size: every step runs and every output is written."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

from cluster.store import FeatureStore
from jobs import cli
from jobs.results import read_results
from pixloc_core.extractors import DEFAULT


def test_demo_runs_end_to_end_at_reduced_size_and_again(ray_cluster, tmp_path, capsys):
    out = tmp_path / "demo"
    for _ in range(2):  # a second `make demo` rebuilds everything in its folder
        assert cli.main(["demo", "--out", str(out), "--refs", "24", "--queries", "3", "--width", "320",
                         "--height", "240", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "GPS prior" in printed and "estimate" in printed and "0.25m_2deg" in printed

    summary = json.loads((out / "eval.json").read_text())
    assert summary["n"] == 3 and set(summary["recall"]) == {"0.25m_2deg", "0.5m_5deg", "5m_10deg"}
    assert read_results(out / "results").num_rows == 3
    assert (out / "results" / "poses.txt").is_file()
    assert FeatureStore.open(str(out / "store")).info.extractor_name == DEFAULT  # the default runs end to end

    report = (out / "report.html").read_text()
    svg = report[report.index("<svg"):report.index("</svg>") + len("</svg>")]
    plan = ElementTree.fromstring(svg)
    titles = [element.text for element in plan.iter("{http://www.w3.org/2000/svg}title")]
    assert sum(title.endswith(": truth") for title in titles) == 3
    assert sum(title.endswith(": prior") for title in titles) == 3
