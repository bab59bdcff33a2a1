"""EXIF GPS and focal length: round trips, untouched image data, COLMAP's reading, real photos."""
from __future__ import annotations

import csv
import io

import numpy as np
import piexif
import pycolmap
import pytest
from PIL import Image

from pixloc_core.exif import (camera_exif, focal_px_from_35mm, read_exif_focal_px, read_exif_gps,
                              write_exif_gps)


@pytest.fixture
def plain_jpeg(tmp_path):
    path = tmp_path / "plain.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _without_exif(path) -> bytes:
    """The JPEG bytes with the EXIF APP1 segment removed."""
    stripped = io.BytesIO()
    piexif.remove(path.read_bytes(), stripped)
    return stripped.getvalue()


def test_missing_exif_gives_none(plain_jpeg):
    assert read_exif_gps(plain_jpeg) is None
    assert read_exif_focal_px(plain_jpeg, 64, 48) is None


@pytest.mark.parametrize("lat, lon, alt", [(47.3769123, 8.5417456, 408.25), (-33.8567844, -151.2152967, -12.5)])
def test_gps_round_trip_keeps_image_data(plain_jpeg, tmp_path, lat, lon, alt):
    out = tmp_path / "tagged.jpg"
    write_exif_gps(plain_jpeg, out, lat, lon, alt, heading_deg=271.5, accuracy_m=4.0)
    read_lat, read_lon, read_alt = read_exif_gps(out)
    assert abs(read_lat - lat) < 1e-7 and abs(read_lon - lon) < 1e-7
    assert read_alt == pytest.approx(alt, abs=1e-3)
    assert _without_exif(out) == plain_jpeg.read_bytes()
    gps = piexif.load(str(out))["GPS"]
    assert gps[piexif.GPSIFD.GPSImgDirection] == (27150, 100)
    assert gps[piexif.GPSIFD.GPSHPositioningError] == (400, 100)
    bitmap = pycolmap.Bitmap.read(str(out), True)
    assert (bitmap.exif_latitude(), bitmap.exif_longitude()) == pytest.approx((lat, lon), abs=1e-7)


def test_rewriting_gps_in_place_without_altitude(plain_jpeg):
    write_exif_gps(plain_jpeg, plain_jpeg, 10.0, 20.0, 30.0)
    write_exif_gps(plain_jpeg, plain_jpeg, 11.0, 21.0, None)
    assert read_exif_gps(plain_jpeg) == pytest.approx((11.0, 21.0, None))


def test_focal_matches_colmap(tmp_path):
    width, height, focal_35mm = 640, 480, 30
    focal = focal_px_from_35mm(focal_35mm, width, height)
    path = tmp_path / "camera.jpg"
    exif = piexif.dump(camera_exif(focal, width, height, "pixloc-synth", "pixloc-synth"))
    Image.new("RGB", (width, height)).save(path, exif=exif)
    assert piexif.load(str(path))["Exif"][piexif.ExifIFD.FocalLengthIn35mmFilm] == focal_35mm
    assert read_exif_focal_px(path, width, height) == pytest.approx(focal, rel=1e-12)
    assert pycolmap.Bitmap.read(str(path), True).exif_focal_length() == pytest.approx(focal, rel=1e-9)


def test_not_a_jpeg_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello")
    with pytest.raises(ValueError, match="notes.jpg"):
        read_exif_gps(path)


def test_real_phone_photo(shared_data, tmp_path):
    """Lund (iPhone 4S, Mapillary): GPS as listed in the derived CSV, focal as COLMAP reads it."""
    images = shared_data / "opensfm/lund/images"
    with open(shared_data / "opensfm/lund/derived_exif_gps.csv") as f:
        rows = {row["name"]: row for row in csv.DictReader(line for line in f if not line.startswith("#"))}
    row = rows["01.jpg"]
    lat, lon, alt = read_exif_gps(images / "01.jpg")
    assert (lat, lon, alt) == pytest.approx((float(row["lat"]), float(row["lon"]), float(row["alt_m"])), abs=1e-7)
    width, height = int(row["width"]), int(row["height"])
    bitmap = pycolmap.Bitmap.read(str(images / "01.jpg"), True)
    assert read_exif_focal_px(images / "01.jpg", width, height) == pytest.approx(bitmap.exif_focal_length(), rel=1e-9)

    corrected = tmp_path / "01.jpg"
    write_exif_gps(images / "01.jpg", corrected, lat + 1e-4, lon - 1e-4, alt, heading_deg=90.0)
    assert read_exif_gps(corrected) == pytest.approx((lat + 1e-4, lon - 1e-4, alt), abs=1e-7)
    assert _without_exif(corrected) == _without_exif(images / "01.jpg")
    assert piexif.load(str(corrected))["0th"][piexif.ImageIFD.ImageDescription] == \
        piexif.load(str(images / "01.jpg"))["0th"][piexif.ImageIFD.ImageDescription]
