"""WGS84 <-> local East-North-Up (ENU) conversions.

Maps and synthetic scenes live in a metric frame; GPS lives in WGS84. The bridge is an ENU frame
(x east, y north, z up, metres) tangent to the ellipsoid at an origin (lat, lon, alt).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

# EPSG:4979 is WGS84 geographic 3D (lat, lon, ellipsoidal height); EPSG:4978 is WGS84 ECEF.
WGS84, ECEF = "EPSG:4979", "EPSG:4978"


@cache
def transformer(source: str, target: str):
    """pyproj imported on first use: the alignment and extractors (GPU machines) need none of it."""
    from pyproj import Transformer

    return Transformer.from_crs(source, target, always_xy=True)


@dataclass(frozen=True)
class EnuOrigin:
    lat: float
    lon: float
    alt: float = 0.0

    def rotation_ecef_to_enu(self) -> np.ndarray:
        lat, lon = np.radians(self.lat), np.radians(self.lon)
        sl, cl, so, co = np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon)
        return np.array([
            [-so, co, 0.0],
            [-sl * co, -sl * so, cl],
            [cl * co, cl * so, sl],
        ])

    def ecef(self) -> np.ndarray:
        return np.array(transformer(WGS84, ECEF).transform(self.lon, self.lat, self.alt))

    def to_list(self) -> list[float]:
        return [self.lat, self.lon, self.alt]


def wgs84_to_enu(lat, lon, alt, origin: EnuOrigin) -> np.ndarray:
    """Geodetic coordinates (degrees, metres; scalars or arrays) to ENU, shape (..., 3)."""
    lat, lon, alt = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (lat, lon, alt)))
    ecef = np.stack(transformer(WGS84, ECEF).transform(lon, lat, alt), axis=-1)
    return (ecef - origin.ecef()) @ origin.rotation_ecef_to_enu().T


def enu_to_wgs84(xyz, origin: EnuOrigin) -> np.ndarray:
    """ENU points (..., 3) to geodetic (..., 3) as (lat, lon, alt)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    ecef = xyz @ origin.rotation_ecef_to_enu() + origin.ecef()
    lon, lat, alt = transformer(ECEF, WGS84).transform(ecef[..., 0], ecef[..., 1], ecef[..., 2])
    return np.stack([lat, lon, alt], axis=-1)
