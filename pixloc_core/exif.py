"""EXIF GPS and focal length, read and written the way COLMAP reads them.

Focal length: COLMAP 4.x turns FocalLengthIn35mmFilm into pixels with the diagonal convention,
f_px = f35 * hypot(width, height) / 43.27 (measured against pycolmap.Bitmap.exif_focal_length).
Writing GPS only replaces the EXIF APP1 segment: every other byte of the file stays the same.
"""
from __future__ import annotations

import math
import struct
from fractions import Fraction
from pathlib import Path

import piexif

from . import files
from .io import Prior

FILM_DIAGONAL_MM = 43.27  # COLMAP's 35 mm film diagonal
_SECONDS_DENOMINATOR = 1_000_000  # 1e-6 arc second, about 3e-8 m


def focal_px_from_35mm(focal_35mm: float, width: int, height: int) -> float:
    return focal_35mm * math.hypot(width, height) / FILM_DIAGONAL_MM


def focal_35mm_from_px(focal_px: float, width: int, height: int) -> float:
    return focal_px * FILM_DIAGONAL_MM / math.hypot(width, height)


_HEAD_BYTES = 1 << 16  # a JPEG's segments before its EXIF: JFIF, often an ICC profile (a few KB)


def remote_exif_bytes(path: Path) -> bytes:
    """What piexif needs of a remote image: a JPEG's EXIF segment ("Exif\\0\\0" and the TIFF
    data), by one ranged read (two for a segment past the first 64 KB), not the whole photo (a
    map's EXIF pass over 10^5 phone photos would download every one); b"" for a JPEG without
    EXIF; another format, or a JPEG whose layout the walk does not follow, whole."""
    head = files.read_head(path, _HEAD_BYTES)
    offset = 2 if head.startswith(b"\xff\xd8") else len(head)
    while offset + 10 <= len(head) and head[offset] == 0xFF:
        marker, length = head[offset + 1], struct.unpack(">H", head[offset + 2:offset + 4])[0]
        if marker == 0xDA:  # start of scan: the image data, no EXIF after it
            return b""
        if marker == 0xE1 and head[offset + 4:offset + 10] == b"Exif\x00\x00":
            end = offset + 2 + length
            return (head if end <= len(head) else files.read_head(path, end))[offset + 4:end]
        offset += 2 + length
    return files.read_bytes(path)


def _load(path: Path) -> dict:
    try:
        if not files.is_remote(path):
            return piexif.load(str(path))  # piexif reads only the file's head itself
        data = remote_exif_bytes(path)
        return piexif.load(data) if data else {}
    except (piexif.InvalidImageDataError, ValueError, OSError, struct.error) as error:
        raise ValueError(f"{path}: cannot read EXIF ({error})") from None


def _rational(value) -> float:
    numerator, denominator = value
    return numerator / denominator if denominator else math.nan


def _to_dms(degrees: float) -> tuple[tuple[int, int], ...]:
    degrees = abs(degrees)
    whole = int(degrees)
    minutes = int((degrees - whole) * 60)
    seconds = round(((degrees - whole) * 60 - minutes) * 60 * _SECONDS_DENOMINATOR)
    return (whole, 1), (minutes, 1), (seconds, _SECONDS_DENOMINATOR)


def _from_dms(dms) -> float:
    degrees, minutes, seconds = (_rational(v) for v in dms)
    return degrees + minutes / 60 + seconds / 3600


def read_exif_gps(path: Path) -> tuple[float, float, float | None] | None:
    """(lat, lon, alt or None) in WGS84 degrees and metres, or None without GPS tags."""
    gps = _load(path).get("GPS") or {}
    if piexif.GPSIFD.GPSLatitude not in gps or piexif.GPSIFD.GPSLongitude not in gps:
        return None
    lat = _from_dms(gps[piexif.GPSIFD.GPSLatitude])
    lon = _from_dms(gps[piexif.GPSIFD.GPSLongitude])
    if gps.get(piexif.GPSIFD.GPSLatitudeRef, b"N") in (b"S", "S"):
        lat = -lat
    if gps.get(piexif.GPSIFD.GPSLongitudeRef, b"E") in (b"W", "W"):
        lon = -lon
    alt = None
    if piexif.GPSIFD.GPSAltitude in gps:
        alt = _rational(gps[piexif.GPSIFD.GPSAltitude])
        if gps.get(piexif.GPSIFD.GPSAltitudeRef, 0) == 1:  # below sea level
            alt = -alt
    return lat, lon, alt


def read_exif_prior(path: Path) -> Prior | None:
    """The EXIF GPS as a WGS84 prior (altitude 0 and flagged absent when EXIF has none), or None."""
    gps = read_exif_gps(path)
    if gps is None:
        return None
    lat, lon, alt = gps
    return Prior((lat, lon, 0.0 if alt is None else alt), geodetic=True, has_altitude=alt is not None)


def read_exif_focal_px(path: Path, width: int, height: int) -> float | None:
    """Focal length in pixels from FocalLengthIn35mmFilm (COLMAP convention), or None."""
    exif = _load(path).get("Exif") or {}
    focal_35mm = exif.get(piexif.ExifIFD.FocalLengthIn35mmFilm)
    if not focal_35mm:
        return None
    return focal_px_from_35mm(float(focal_35mm), width, height)


def gps_ifd(lat: float, lon: float, alt: float | None, heading_deg: float | None = None,
            accuracy_m: float | None = None) -> dict:
    """The EXIF GPS IFD (piexif dict) of a WGS84 position, compass heading and accuracy."""
    gps = {
        piexif.GPSIFD.GPSVersionID: (2, 3, 0, 0),
        piexif.GPSIFD.GPSLatitudeRef: b"N" if lat >= 0 else b"S",
        piexif.GPSIFD.GPSLatitude: _to_dms(lat),
        piexif.GPSIFD.GPSLongitudeRef: b"E" if lon >= 0 else b"W",
        piexif.GPSIFD.GPSLongitude: _to_dms(lon),
    }
    if alt is not None:
        gps[piexif.GPSIFD.GPSAltitudeRef] = 0 if alt >= 0 else 1
        gps[piexif.GPSIFD.GPSAltitude] = (round(abs(alt) * 1000), 1000)
    if heading_deg is not None:
        gps[piexif.GPSIFD.GPSImgDirectionRef] = b"T"
        gps[piexif.GPSIFD.GPSImgDirection] = (round((heading_deg % 360) * 100), 100)
    if accuracy_m is not None:
        gps[piexif.GPSIFD.GPSHPositioningError] = (round(accuracy_m * 100), 100)
    return gps


def camera_exif(focal_px: float, width: int, height: int, make: str, model: str) -> dict:
    """0th and Exif IFDs (piexif dict) that COLMAP reads back as focal_px (up to the integer 35 mm tag).

    COLMAP only uses FocalLengthIn35mmFilm when FocalLength is present too, so both are written;
    FocalLength is for a full-frame sensor, where both values coincide.
    """
    focal_35mm = focal_35mm_from_px(focal_px, width, height)
    focal = Fraction(focal_35mm).limit_denominator(1000)
    return {
        "0th": {piexif.ImageIFD.Make: make.encode(), piexif.ImageIFD.Model: model.encode()},
        "Exif": {
            piexif.ExifIFD.FocalLengthIn35mmFilm: round(focal_35mm),
            piexif.ExifIFD.FocalLength: (focal.numerator, focal.denominator),
            piexif.ExifIFD.PixelXDimension: width,
            piexif.ExifIFD.PixelYDimension: height,
        },
    }


def replace_exif_segment(jpeg: bytes, exif: bytes, name: str = "<bytes>") -> bytes:
    """The JPEG with its EXIF APP1 segment replaced by `exif` (a piexif.dump); every other
    segment (JFIF, XMP, ICC, tables, compressed data) is kept byte for byte."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError(f"{name}: not a JPEG file")
    if len(exif) + 2 > 0xFFFF:
        raise ValueError(f"{name}: EXIF block of {len(exif)} bytes does not fit in one segment")
    segments, position = [], 2
    while jpeg[position:position + 1] == b"\xff" and jpeg[position + 1] not in (0xDA, 0xD9):  # up to start of scan
        length = struct.unpack(">H", jpeg[position + 2:position + 4])[0]
        segments.append(jpeg[position:position + 2 + length])
        position += 2 + length
    kept = [seg for seg in segments if not (seg[:2] == b"\xff\xe1" and seg[4:10] == b"Exif\x00\x00")]
    # EXIF goes first, or right after a JFIF APP0 (both standards want to lead the file).
    at = 1 if kept and kept[0][:2] == b"\xff\xe0" else 0
    kept.insert(at, b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif)
    return jpeg[:2] + b"".join(kept) + jpeg[position:]


def write_exif_gps(src: Path, dst: Path, lat: float, lon: float, alt: float | None,
                   heading_deg: float | None = None, accuracy_m: float | None = None) -> None:
    """Writes the JPEG src to dst (may be src) with its GPS tags replaced; other tags and all
    other bytes of the file are kept."""
    src, dst = Path(src), Path(dst)
    exif = _load(src)
    exif["GPS"] = gps_ifd(lat, lon, alt, heading_deg, accuracy_m)
    dst.write_bytes(replace_exif_segment(src.read_bytes(), piexif.dump(exif), str(src)))
