"""The driver's query table: the input files read into columns (validation naming file:line),
joined by name, ordered in space, filtered on resume, and each row back as a QueryInput."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.bench import main as bench_main
from jobs.localize import query_names, skip_completed, spatial_schedule
from jobs.results import ResultsWriter
from pixloc_core.geo import EnuOrigin, enu_to_wgs84
from pixloc_core.geometry import Pose
from pixloc_core.io import (Prior, QueryIntrinsics, read_poses_table, read_priors, read_priors_table,
                            read_query_list_table)
from pixloc_core.localize import QueryInput, query_positions, query_table
from pixloc_core.map_io import GeoInfo, MapIndex, Similarity

ORIGIN = EnuOrigin(47.3769, 8.5417, 400.0)


def georegistered_map() -> MapIndex:
    """A map with a georegistration and no images: what ordering needs; cells of 50 m."""
    return MapIndex(GeoInfo(ORIGIN, Similarity(1.0, np.eye(3), np.array([10.0, -5.0, 0.0]))), None,
                    {"fingerprint": ""}, None)


def write(path, text: str):
    path.write_text(text)
    return path


def test_rows_join_the_input_files_by_name_and_come_back_as_query_inputs(tmp_path):
    listed = read_query_list_table(write(tmp_path / "list.txt", "# hloc list\nb.jpg PINHOLE 320 240 200 201 160 120\n\n"
                                                                "a.jpg SIMPLE_RADIAL 640 480 400 320 240 0.01\n"))
    priors = read_priors_table(write(tmp_path / "priors.csv", "name,x,y,z,sigma_m\na.jpg,1,2,,5\n"))
    table = query_table(query_names(tmp_path, listed), str(tmp_path), listed, priors)
    assert table["name"].to_pylist() == ["b.jpg", "a.jpg"]  # the list's order
    b, a = (QueryInput.from_row(row) for row in table.to_pylist())
    assert b == QueryInput("b.jpg", str(tmp_path / "b.jpg"), QueryIntrinsics("PINHOLE", 320, 240, (200.0, 201.0, 160.0, 120.0)))
    assert a == QueryInput("a.jpg", str(tmp_path / "a.jpg"), QueryIntrinsics("SIMPLE_RADIAL", 640, 480, (400.0, 320.0, 240.0, 0.01)),
                           Prior((1.0, 2.0, 0.0), False, 5.0, has_altitude=False))
    poses = read_poses_table(write(tmp_path / "poses.txt", "a.jpg 1 0 0 0 1 2 3\n"))
    exif = query_table(query_names(tmp_path, listed), str(tmp_path), listed, poses=poses, prior_from_exif=True)
    assert [QueryInput.from_row(row).pose for row in exif.to_pylist()] == [None, ((1.0, 0.0, 0.0, 0.0), (1.0, 2.0, 3.0))]
    assert exif["prior_from_exif"].to_pylist() == [True, True]


def test_positions_are_those_of_the_single_prior_conversion_and_order_is_by_cell(tmp_path):
    index = georegistered_map()
    east_north = np.array([[120.0, 30.0], [-80.0, 10.0], [121.0, 31.0], [-79.0, 12.0], [400.0, -300.0]])
    wgs84 = enu_to_wgs84(np.c_[east_north, np.zeros(len(east_north))], ORIGIN)
    names = [f"q{index}.jpg" for index in range(len(east_north))] + ["none.jpg"]
    lines = [f"{name},{lat:.10f},{lon:.10f},401" for name, (lat, lon, _) in zip(names, wgs84)]
    priors_file = write(tmp_path / "priors.csv", "name,lat,lon,alt\n" + "\n".join(lines) + "\n")
    listed = read_query_list_table(write(tmp_path / "list.txt", "".join(f"{name} PINHOLE 32 24 20 20 16 12\n"
                                                                        for name in names)))
    table = query_table(query_names(tmp_path, listed), str(tmp_path), listed, read_priors_table(priors_file))
    positions = query_positions(table, index)
    expected = [index.prior_to_map(prior) for prior in read_priors(priors_file).values()]
    np.testing.assert_allclose(positions[:-1], expected, atol=1e-6)
    assert np.isnan(positions[-1]).all()  # no prior: planned (and refused) by the worker
    # Same-cell queries together, the one without a prior last.
    order = spatial_schedule(table, index)["name"].to_pylist()
    assert order[-1] == "none.jpg"
    assert abs(order.index("q0.jpg") - order.index("q2.jpg")) == abs(order.index("q1.jpg") - order.index("q3.jpg")) == 1
    # Poses to refine are placed at their camera centres.
    pose = Pose.from_Rt(torch.eye(3, dtype=torch.float64), torch.tensor([-5.0, -6.0, -7.0], dtype=torch.float64))
    poses = write(tmp_path / "poses.txt", "q0.jpg " + " ".join(map(str, [*pose.qvec().tolist(), *pose.t.tolist()])))
    refine = query_table(query_names(tmp_path, listed), str(tmp_path), listed, poses=read_poses_table(poses))
    np.testing.assert_allclose(query_positions(refine, index)[0], [5.0, 6.0, 7.0])


def test_resume_skips_answered_queries_but_retries_infrastructure_failures(tmp_path):
    out = tmp_path / "out"
    writer = ResultsWriter(out)
    writer.add({"name": "done.jpg", "success": True})
    writer.add({"name": "bad-input.jpg", "success": False, "error": "corrupt", "retryable": False})
    writer.add({"name": "store-down.jpg", "success": False, "error": "store unreachable", "retryable": True})
    writer.flush()  # a crashed run's parts
    listed = read_query_list_table(write(tmp_path / "list.txt", "".join(
        f"{name} PINHOLE 32 24 20 20 16 12\n" for name in ("new.jpg", "done.jpg", "store-down.jpg", "bad-input.jpg"))))
    table = query_table(query_names(tmp_path, listed), str(tmp_path), listed)
    assert skip_completed(table, out)["name"].to_pylist() == ["new.jpg", "store-down.jpg"]


@pytest.mark.parametrize("text, message", [
    ("a.jpg PINHOLE 32 24 20 20 16 12\nb.jpg PINHOLE 32\n", ":2: expected 'name MODEL WIDTH HEIGHT PARAMS...'"),
    ("a.jpg PINHOLE 32 24 20 20 16 12\n\nb.jpg PINHOLE 32 x 20 20 16 12\n",
     ":3: invalid literal for int\\(\\) with base 10: 'x'"),
    ("a.jpg PINHOLE 32 24 20 20 16 12\nb.jpg PINHOLE 32 24 20 y 16 12\n", ":2: could not convert string to float: 'y'"),
    # the first line that repeats a name, as a reader going line by line stops
    ("a.jpg P 1 1 1\nb.jpg P 1 1 1\nb.jpg P 1 1 1\na.jpg P 1 1 1\n", ":3: 'b.jpg' is listed twice \\(first on line 2\\)"),
])
def test_query_list_errors_name_the_line(tmp_path, text, message):
    path = write(tmp_path / "list.txt", text)
    with pytest.raises(ValueError, match=f"^{path}{message}$"):
        read_query_list_table(path)


def test_priors_errors_name_the_first_bad_line_and_short_rows_leave_values_empty(tmp_path):
    path = write(tmp_path / "priors.csv", "name,x,y,z\na.jpg,1,2,3\na.jpg,1,2,3\nb.jpg,x,2,3\n")
    with pytest.raises(ValueError, match=f"^{path}:3: 'a.jpg' is listed twice"):
        read_priors_table(path)
    path = write(tmp_path / "priors.csv", "name,x,y,z\nb.jpg,x,2,3\na.jpg,1,2,3\na.jpg,1,2,3\n")
    with pytest.raises(ValueError, match=f"^{path}:2: x is not a number: 'x'$"):
        read_priors_table(path)
    path = write(tmp_path / "priors.csv", "name,x,y,z,sigma_m\na.jpg,1,2\n")  # csv.DictReader's reading
    assert read_priors(path) == {"a.jpg": Prior((1.0, 2.0, 0.0), False, None, has_altitude=False)}
    path = write(tmp_path / "poses.txt", "a.jpg 1 0 0 0 1 2 3\nb.jpg 1 0 0 0 1 2\n")
    with pytest.raises(ValueError, match=f"^{path}:2: expected 'name qw qx qy qz tx ty tz', got 7 fields$"):
        read_poses_table(path)


def test_bench_streaming_quick_measures_both_ways(tmp_path, ray_cluster):
    out = tmp_path / "streaming.json"
    report = bench_main("streaming", out, {"quick": True, "sizes": [200]})
    assert json.loads(out.read_text()) == report
    old, new = report["prepare"]
    assert (old["way"], new["way"]) == ("old", "new") and old["queries"] == new["queries"] == 200
    for row in (old, new):
        assert row["prepare_s"] > 0 and row["peak_rss_mb"] > 100 and row["dataset_rows"] == 200
        assert row["sent_bytes_per_query"] > 0
    assert report["first_result"] == []
