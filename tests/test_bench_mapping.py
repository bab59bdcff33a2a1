"""CI smoke test of `pixloc bench mapping`: one small city, the JSON keys, measured numbers."""
from __future__ import annotations

import json

from jobs import bench


def test_mapping_benchmark_smoke(tmp_path):
    out = tmp_path / "mapping.json"
    report = bench.main("mapping", out, {"blocks": [[1, 1]], "num_refs": 24, "workers": [2],
                                         # the single-process map and Lund's two SfMs: not in CI
                                         # (test_submodels.py builds Lund in submodels and in one SfM)
                                         "single_process_max_refs": 0, "lund": False})
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (row,) = report["sizes"]
    assert set(row) == {"refs", "workers", "wall_s", "cpu_s_per_image", "peak_rss_mb", "point_error_m",
                        "single_process_wall_s"}
    assert row["refs"] == 24 and row["workers"] == 2
    assert row["cpu_s_per_image"] > 0 and row["peak_rss_mb"]["driver"] > 50 and row["peak_rss_mb"]["worker"] > 50
    assert row["point_error_m"] < 0.5 and row["single_process_wall_s"] is None
    update = report["update"]
    assert update["new_images"] > 0 and update["registered"] == update["new_images"]
    assert 0 < update["partitions_reused_fraction"] < 1
    assert 0 < update["images_reextracted"] <= update["images"] == 24  # 5 cells: halos reach most images
    assert update["features_wall_s"]["update"] > 0
    assert update["camera_error_m"] < 1e-6  # known poses: the new photos keep them
