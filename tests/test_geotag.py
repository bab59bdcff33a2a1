"""`pixloc geotag`: pose -> WGS84 and heading, corrected EXIF copies with untouched pixels, reports."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import piexif
import pytest
import torch
from PIL import Image

from jobs.cli import main as cli_main
from jobs.geotag import write_localization_priors
from jobs.results import ResultsWriter
from pixloc_core.datasets import LUND
from pixloc_core.exif import read_exif_gps
from pixloc_core.geo import EnuOrigin, wgs84_to_enu
from pixloc_core.geometry import Pose
from pixloc_core.geotag import geotags_from_poses, heading_difference, load_georegistration, read_exif_heading
from pixloc_core.io import read_priors
from pixloc_core.map_io import GeoInfo, Similarity

ORIGIN = EnuOrigin(55.6985, 13.1950, 30.0)  # Lund


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _camera_looking(direction: np.ndarray, center: np.ndarray) -> Pose:
    """World-to-camera pose of a level camera (y down = world -z) looking along `direction` (3,)."""
    z = direction / np.linalg.norm(direction)
    y = np.array([0.0, 0.0, -1.0])
    x = np.cross(y, z)
    R = np.stack([x, y, z])  # rows: the camera axes in the world
    return Pose.from_Rt(torch.from_numpy(R), torch.from_numpy(-R @ center))


def test_heading_and_position_through_the_sim3():
    """The map frame is ENU rotated by 90 deg about up, scaled by 2 and shifted: a camera looking
    along map +x looks north, one along map +y looks west; positions come back through pyproj."""
    geo = GeoInfo(ORIGIN, Similarity(2.0, _rotation_z(90), np.array([10.0, -5.0, 1.0])))
    centers = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.5], [-2.0, 1.0, 0.0]])
    directions = np.array([[1.0, 0, 0], [0, 1.0, 0], [-1.0, -1.0, 0]])
    poses = Pose.stack([_camera_looking(d, c) for d, c in zip(directions, centers)])
    tags = geotags_from_poses(poses.R.numpy(), poses.t.numpy(), geo, np.array([0.5, np.nan, 1.0]))
    assert [round(tag.heading_deg, 6) for tag in tags] == [0.0, 270.0, 135.0]
    assert [tag.accuracy_m for tag in tags] == [1.0, None, 2.0]  # map units -> metres
    # a GPS-registered map adds its own uncertainty: 4.8 m residual over sqrt(16) inliers = 1.2 m
    registered = GeoInfo(geo.origin_wgs84, geo.map_to_enu, {"median_residual_m": 4.8, "num_inliers": 16})
    tags = geotags_from_poses(poses.R.numpy(), poses.t.numpy(), registered, np.array([0.5, np.nan, 1.0]))
    assert [tag.accuracy_m for tag in tags] == pytest.approx([np.hypot(1.0, 1.2), 1.2, np.hypot(2.0, 1.2)])
    for tag, center in zip(tags, centers):
        expected_enu = 2.0 * _rotation_z(90) @ center + [10.0, -5.0, 1.0]
        np.testing.assert_allclose(wgs84_to_enu(tag.lat, tag.lon, tag.alt, ORIGIN), expected_enu, atol=1e-6)


def test_looking_down_has_no_heading():
    geo = GeoInfo(ORIGIN, Similarity.identity())
    R = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])  # optical axis = world -z
    (tag,) = geotags_from_poses(R[None], np.zeros((1, 3)), geo)
    assert tag.heading_deg is None


def test_heading_difference_wraps():
    assert heading_difference(180.0, 340.0) == pytest.approx(160.0)
    assert heading_difference(350.0, 10.0) == pytest.approx(20.0)
    assert heading_difference(10.0, 350.0) == pytest.approx(-20.0)


def test_geo_json_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="geo.json: not found"):
        load_georegistration(tmp_path)
    (tmp_path / "geo.json").write_text(json.dumps({"origin_wgs84": [55.7, 13.2, 0], "map_to_enu": {"scale": 1}}))
    with pytest.raises(ValueError, match="geo.json: invalid geo-registration"):
        load_georegistration(tmp_path)
    (tmp_path / "geo.json").write_text(json.dumps({"origin_wgs84": None, "map_to_enu": None}))
    with pytest.raises(ValueError, match="geo.json: the map is not geo-registered"):
        load_georegistration(tmp_path)


def _scan_data(path: Path) -> bytes:
    """The JPEG bytes from the start-of-scan marker to the end: the compressed pixels."""
    data = path.read_bytes()
    position = 2  # after SOI
    while data[position] == 0xFF:
        marker, length = data[position + 1], int.from_bytes(data[position + 2:position + 4], "big")
        if marker == 0xDA:
            return data[position:]
        position += 2 + length
    raise AssertionError(f"{path}: no start-of-scan marker")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _result_row(name: str, pose: Pose | None, error: str = "", std: float = 0.8) -> dict:
    row = {"name": name, "success": pose is not None, "error": error, "method": "sparse+dense"}
    if pose is not None:
        row |= {"qvec": pose.qvec().tolist(), "tvec": pose.t.tolist(), "position_std_m": std}
    return row


def test_geotag_job_writes_corrected_copies(shared_data, tmp_path):
    """Three Lund photos and a PNG without GPS through `pixloc geotag`: the localized one gets the
    new tags with its pixels and other EXIF untouched; the others keep their tags, with reasons."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("01.jpg", "02.jpg", "03.jpg"):
        shutil.copyfile(shared_data / LUND / "images" / name, images / name)
    Image.new("RGB", (64, 48), (90, 120, 30)).save(images / "nogps.png")
    originals = _digest(images)

    map_dir = tmp_path / "map"
    map_dir.mkdir()
    (map_dir / "geo.json").write_text(json.dumps(GeoInfo(ORIGIN, Similarity.identity()).to_dict()))
    results = tmp_path / "results"
    writer = ResultsWriter(results)
    localized = _camera_looking(np.array([-0.34, 0.94, 0.0]), np.array([-12.0, -40.0, 8.0]))  # NNW, 340 deg
    writer.add(_result_row("01.jpg", localized))
    writer.add(_result_row("02.jpg", None, error="cost too high: 0.2 > 0.05"))
    writer.close()

    out = tmp_path / "out"
    assert cli_main(["geotag", "--results", str(results), "--images", str(images), "--map", str(map_dir),
                     "--out", str(out)]) == 0
    assert _digest(images) == originals

    source, corrected = images / "01.jpg", out / "01.jpg"
    assert _scan_data(corrected) == _scan_data(source)
    before, after = piexif.load(str(source)), piexif.load(str(corrected))
    pointers = {piexif.ImageIFD.ExifTag, piexif.ImageIFD.GPSTag}  # offsets, which move when the GPS IFD grows
    for ifd in ("0th", "Exif"):
        assert {k: v for k, v in after[ifd].items() if k not in pointers} == \
               {k: v for k, v in before[ifd].items() if k not in pointers}
    lat, lon, alt = read_exif_gps(corrected)
    np.testing.assert_allclose(wgs84_to_enu(lat, lon, alt, ORIGIN), [-12.0, -40.0, 8.0], atol=1e-3)
    assert read_exif_heading(corrected) == pytest.approx(340.1, abs=0.1)
    assert after["GPS"][piexif.GPSIFD.GPSImgDirectionRef] == b"T"
    assert after["GPS"][piexif.GPSIFD.GPSHPositioningError] == (80, 100)
    for name in ("02.jpg", "03.jpg", "nogps.png"):  # failed: copied as they were
        assert (out / name).read_bytes() == (images / name).read_bytes()

    rows = {row["name"]: row for row in csv.DictReader(open(out / "corrections.csv"))}
    assert {name: row["status"] for name, row in rows.items()} == {
        "01.jpg": "corrected", "02.jpg": "failed", "03.jpg": "failed", "nogps.png": "no prior"}
    assert rows["02.jpg"]["reason"] == "cost too high: 0.2 > 0.05"
    # the compass before: Mapillary's true heading in ImageDescription (179.2 deg), turned to ~340
    assert float(rows["01.jpg"]["heading_before_deg"]) == pytest.approx(179.2, abs=0.05)
    assert float(rows["01.jpg"]["heading_change_deg"]) == pytest.approx(340.1 - 179.2, abs=0.1)
    assert rows["03.jpg"]["reason"] == "not in the localization results"
    exif_enu = wgs84_to_enu(*read_exif_gps(source), ORIGIN)
    assert float(rows["01.jpg"]["moved_m"]) == pytest.approx(np.hypot(*(exif_enu[:2] - [-12.0, -40.0])), abs=0.01)

    features = json.loads((out / "corrections.geojson").read_text())["features"]
    assert sorted((f["properties"]["name"], f["properties"]["role"], f["geometry"]["type"]) for f in features) == [
        ("01.jpg", "after", "Point"), ("01.jpg", "before", "Point"), ("01.jpg", "move", "LineString"),
        ("02.jpg", "before", "Point"), ("03.jpg", "before", "Point")]
    report = (out / "report.html").read_text()
    assert "<svg" in report and "1 corrected, 2 failed, 1 no prior" in report


def test_priors_for_localization_use_near_only_without_gps(shared_data, tmp_path):
    shutil.copyfile(shared_data / LUND / "images" / "01.jpg", tmp_path / "01.jpg")
    Image.new("RGB", (64, 48)).save(tmp_path / "nogps.jpg")
    write_localization_priors(tmp_path / "a.csv", tmp_path, ["01.jpg", "nogps.jpg"], None, None)
    assert list(read_priors(tmp_path / "a.csv")) == ["01.jpg"]  # no GPS, no --near: no prior
    write_localization_priors(tmp_path / "b.csv", tmp_path, ["01.jpg", "nogps.jpg"], (55.7, 13.19), 250.0)
    priors = read_priors(tmp_path / "b.csv")
    np.testing.assert_allclose(priors["01.jpg"].position, read_exif_gps(tmp_path / "01.jpg"))
    assert priors["nogps.jpg"].position[:2] == (55.7, 13.19) and priors["nogps.jpg"].sigma_m == 250.0


def test_geotag_refuses_to_write_over_the_originals(tmp_path, capsys):
    (tmp_path / "geo.json").write_text(json.dumps(GeoInfo(ORIGIN, Similarity.identity()).to_dict()))
    assert cli_main(["geotag", "--results", str(tmp_path), "--images", str(tmp_path), "--map", str(tmp_path),
                     "--out", str(tmp_path)]) == 1
    assert "must differ from the images folder" in capsys.readouterr().err


def test_geotag_keeps_earlier_corrections_and_results_unless_told(tmp_path, capsys):
    (tmp_path / "geo.json").write_text(json.dumps(GeoInfo(ORIGIN, Similarity.identity()).to_dict()))
    (tmp_path / "images").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "corrections.csv").write_text("name,status\n")
    arguments = ["geotag", "--results", str(tmp_path / "results"), "--images", str(tmp_path / "images"),
                 "--map", str(tmp_path), "--out", str(tmp_path / "out")]
    assert cli_main(arguments) == 1
    assert "holds the corrections of an earlier run; pass --resume or --overwrite" in capsys.readouterr().err
    (tmp_path / "out" / "corrections.csv").unlink()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "results.parquet").write_bytes(b"earlier")
    assert cli_main([*arguments, "--store", str(tmp_path / "store")]) == 1
    assert "holds results of an earlier run; pass --resume" in capsys.readouterr().err
    assert (tmp_path / "results" / "results.parquet").read_bytes() == b"earlier"


def _along_street_m(lat: float, lon: float, heading_deg: float) -> float:
    """Position of a point along a street of the given heading, metres from ORIGIN."""
    east, north, _ = wgs84_to_enu(lat, lon, 0.0, ORIGIN)
    return east * np.sin(np.radians(heading_deg)) + north * np.cos(np.radians(heading_deg))


@pytest.mark.slow
def test_geotag_lund_fixes_stale_gps_and_wrong_compass(shared_data, lund_map, tmp_path):
    """The issue's acceptance on opensfm/lund, as a user would run it: a map of the 29 GPS-tagged
    photos, then all of them geotagged through localization (SIFT + PnP, the fastest method). 27-29
    share one stale GPS fix and must come out at distinct positions along the street, in capture
    order; the compass of 01-20 (EXIF ~180 deg) must turn to the street direction (~340 deg)."""
    images, map_dir, store, out = shared_data / LUND / "images", lund_map, tmp_path / "store", tmp_path / "out"
    assert cli_main(["features", "--map", str(map_dir), "--images", str(images), "--store", str(store)]) == 0
    assert cli_main(["geotag", "--results", str(tmp_path / "results"), "--images", str(images), "--map", str(map_dir),
                     "--out", str(out), "--store", str(store), "--method", "sparse"]) == 0

    rows = {row["name"]: row for row in csv.DictReader(open(out / "corrections.csv"))}
    assert len(rows) == 29
    exif_compass = {row["name"]: float(row["true_heading_deg"]) for row in csv.DictReader(
        line for line in open(shared_data / LUND / "derived_exif_gps.csv") if not line.startswith("#"))}
    street_deg = 340.0
    for name in [f"{i:02d}.jpg" for i in range(1, 21)]:
        assert rows[name]["status"] == "corrected", (name, rows[name]["reason"])
        heading = float(rows[name]["heading_after_deg"])
        assert abs(heading_difference(street_deg, heading)) < 25, (name, heading)
        assert abs(heading_difference(exif_compass[name], heading)) > 120, (name, heading)
        assert read_exif_heading(out / name) == pytest.approx(heading, abs=0.1)

    stale = [f"{i}.jpg" for i in (27, 28, 29)]
    assert all(rows[name]["status"] == "corrected" for name in stale), {n: rows[n]["reason"] for n in stale}
    along = [_along_street_m(float(rows[n]["lat_after"]), float(rows[n]["lon_after"]), street_deg) for n in stale]
    assert along[0] + 1.0 < along[1] and along[1] + 1.0 < along[2], along  # walked up the street
