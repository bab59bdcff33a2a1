"""Geotags from localized poses: WGS84 position, altitude and compass heading of a camera.

    map frame --(Sim3 map_to_enu from geo.json)--> ENU at origin_wgs84 --(pyproj)--> WGS84

The heading is the optical axis projected on the ENU ground plane, in degrees clockwise from
north, as EXIF GPSImgDirection with reference 'T' (true north) expects. A camera looking straight
up or down has no heading.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import piexif

from .exif import read_exif_gps
from .geo import EnuOrigin, enu_to_wgs84, wgs84_to_enu
from .map_io import GEO_FILE, GeoInfo

# Below this horizontal share of the optical axis (about 84 deg of tilt) the heading is noise.
MIN_HORIZONTAL_AXIS = 0.1


def load_georegistration(map_dir: Path) -> GeoInfo:
    """MAP/geo.json, checked to hold both the ENU origin and the map-to-ENU similarity."""
    path = Path(map_dir) / GEO_FILE
    try:
        geo = GeoInfo.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (is {map_dir} a `pixloc map` output?)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: invalid geo-registration ({error})") from None
    if geo.origin_wgs84 is None or geo.map_to_enu is None:
        raise ValueError(f"{path}: the map is not geo-registered (build it with --priors or --gps-from-exif)")
    return geo


@dataclass(frozen=True)
class Geotag:
    lat: float
    lon: float
    alt: float
    heading_deg: float | None  # clockwise from true north; None for a camera looking up or down
    accuracy_m: float | None  # 1-sigma horizontal position, metres; None when unknown
    enu: tuple[float, float, float]  # camera centre in the map's ENU frame


def heading_from_direction(direction_enu: np.ndarray) -> np.ndarray:
    """(..., 3) ENU directions -> (...,) degrees in [0, 360) clockwise from north; NaN where the
    direction is nearly vertical."""
    direction_enu = np.asarray(direction_enu, dtype=np.float64)
    east, north = direction_enu[..., 0], direction_enu[..., 1]
    horizontal = np.hypot(east, north) / np.linalg.norm(direction_enu, axis=-1)
    heading = np.degrees(np.arctan2(east, north)) % 360.0
    return np.where(horizontal >= MIN_HORIZONTAL_AXIS, heading, np.nan)


def georegistration_std_m(geo: GeoInfo) -> float | None:
    """1-sigma error of the map's placement in WGS84: the GPS residual of the georegistration over
    the square root of its inliers (a similarity fitted to N independent fixes averages their
    noise); None when the map was not registered to GPS (its frame is then taken as exact)."""
    registration = geo.registration or {}
    residual, inliers = registration.get("median_residual_m"), registration.get("num_inliers")
    if residual is None or not inliers:
        return None
    return float(residual) / math.sqrt(inliers)


def geotags_from_poses(R_w2c: np.ndarray, t_w2c: np.ndarray, geo: GeoInfo,
                       position_std_m: np.ndarray | None = None) -> list[Geotag]:
    """R_w2c (N, 3, 3), t_w2c (N, 3): world-to-camera poses in the map frame (COLMAP convention).
    position_std_m (N,): pose uncertainty in map units. The accuracy of each geotag combines it, in
    metres, with the uncertainty of the georegistration; None when neither is known."""
    R_w2c, t_w2c = np.asarray(R_w2c, np.float64), np.asarray(t_w2c, np.float64)
    centers = -np.einsum("nji,nj->ni", R_w2c, t_w2c)  # (N, 3): c = -R^T t
    optical_axes = R_w2c[:, 2, :]  # (N, 3): R^T (0, 0, 1), the camera z axis in the map frame
    centers_enu = geo.map_to_enu.apply(centers)
    lla = enu_to_wgs84(centers_enu, geo.origin_wgs84)  # (N, 3)
    headings = heading_from_direction(optical_axes @ geo.map_to_enu.rotation.T)  # (N,)
    stds = np.full(len(centers), np.nan) if position_std_m is None else np.asarray(position_std_m, np.float64)
    registration_std = georegistration_std_m(geo)

    def accuracy(std: float) -> float | None:
        terms = [value for value in (geo.map_to_enu.scale * std, registration_std)
                 if value is not None and math.isfinite(value)]
        return float(math.hypot(*terms)) if terms else None

    return [Geotag(float(lat), float(lon), float(alt), None if math.isnan(heading) else float(heading),
                   accuracy(std), tuple(float(v) for v in enu))
            for (lat, lon, alt), heading, std, enu in zip(lla, headings, stds, centers_enu)]


def read_exif_heading(path: Path) -> float | None:
    """The compass heading a photo carries, in degrees: EXIF GPSImgDirection, else the true heading
    that Mapillary's apps put in the ImageDescription JSON (`MAPCompassHeading.TrueHeading`);
    None without either."""
    try:
        exif = piexif.load(str(path))
    except (piexif.InvalidImageDataError, ValueError, OSError):
        return None
    direction = (exif.get("GPS") or {}).get(piexif.GPSIFD.GPSImgDirection)
    if direction and direction[1]:
        return direction[0] / direction[1]
    description = (exif.get("0th") or {}).get(piexif.ImageIFD.ImageDescription, b"")
    try:
        heading = json.loads(description)["MAPCompassHeading"]["TrueHeading"]
    except (ValueError, KeyError, TypeError):  # not JSON, or not Mapillary's
        return None
    return float(heading) % 360.0


@dataclass(frozen=True)
class ExifGeotag:
    """What a photo carries before correction; fields None where the tag is absent."""

    lat: float | None = None
    lon: float | None = None
    alt: float | None = None
    heading_deg: float | None = None

    @classmethod
    def read(cls, path: Path) -> ExifGeotag:
        try:
            gps = read_exif_gps(path)
        except ValueError:  # no readable EXIF at all: nothing to compare against
            return cls()
        heading = read_exif_heading(path)
        if gps is None:
            return cls(heading_deg=heading)
        return cls(*gps, heading_deg=heading)

    @property
    def has_position(self) -> bool:
        return self.lat is not None and self.lon is not None


def heading_difference(before_deg: float, after_deg: float) -> float:
    """Signed smallest rotation from `before` to `after`, in (-180, 180]."""
    difference = (after_deg - before_deg) % 360.0
    return difference - 360.0 if difference > 180.0 else difference


def horizontal_move_m(before: ExifGeotag, after: Geotag, origin: EnuOrigin) -> float:
    """Ground distance between the EXIF position and the corrected one (altitude ignored: GPS
    altitude is far worse than its horizontal position)."""
    before_enu = wgs84_to_enu(before.lat, before.lon, before.alt or 0.0, origin)
    return float(np.hypot(*(np.asarray(after.enu[:2]) - before_enu[:2])))
