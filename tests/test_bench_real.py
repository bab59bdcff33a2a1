"""`pixloc bench real` end to end on fountain-P11 at 512 px with PnP only, of SIFT and of ALIKE
keypoints (the whole set with every method is `make bench-real`): the real commands, against true
poses."""
from __future__ import annotations

import json

import pytest

from bench.real import main as bench_real
from bench.real import seconds_per_query
from jobs.results import ResultsWriter, read_results


def test_seconds_per_query_sums_the_stages(tmp_path):
    writer = ResultsWriter(tmp_path)
    writer.add({"name": "a.jpg", "success": True, "qvec": [1.0, 0, 0, 0], "tvec": [0.0, 0, 0],
                "read_ms": 100.0, "cnn_ms": 400.0, "align_ms": 500.0})
    writer.add({"name": "b.jpg", "success": False, "read_ms": 1000.0})  # failed early: other stages null
    writer.close()
    assert seconds_per_query(read_results(tmp_path)) == pytest.approx(1.0)


@pytest.mark.slow
def test_bench_real_fountain(shared_data, tmp_path):
    out = tmp_path / "real.json"
    report = bench_real(out, data_root=shared_data, work_dir=tmp_path / "work", sets=("fountain-P11",),
                        methods=("sparse",), keypoints=("sift", "alike-n"), small_query_size=320,
                        prepare={"fountain-P11": {"max_image_size": 512}})
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    full, small = report["sets"]["fountain-P11"], report["sets"]["fountain-P11@320px"]
    assert set(full) == set(small) == {"sparse", "sparse@alike-n", "prior"}
    for entry in (*full.values(), *small.values()):
        assert entry["n"] == 4 and set(entry["recall"]) == {"0.25m_2deg", "0.5m_5deg", "5m_10deg"}
        assert entry["s_per_query"] >= 0
    # the prior is 2 m off by construction; SIFT + PnP on true intrinsics is at centimetres
    assert full["prior"]["median_t_m"] == pytest.approx(2.0, abs=1e-3)
    assert full["sparse"]["median_t_m"] < 0.05 and full["sparse"]["recall"]["0.25m_2deg"] == 1.0
    # the ALIKE map is triangulated from the same poses: its PnP poses are checked against them too
    assert full["sparse@alike-n"]["median_inliers"] >= 15 and full["sparse@alike-n"]["median_t_m"] < 0.25
    assert small["sparse"]["recall"]["5m_10deg"] == 1.0
