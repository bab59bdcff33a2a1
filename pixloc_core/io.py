"""Plain-text file formats shared with hloc and COLMAP users (see DESIGN.md).

* poses:      `name qw qx qy qz tx ty tz` (world-to-camera, COLMAP convention)
* query list: `name MODEL WIDTH HEIGHT PARAMS...` (hloc's queries_with_intrinsics.txt)
* priors CSV: header `name,lat,lon[,alt][,sigma_m]` (WGS84) or `name,x,y,z[,sigma_m]` (map frame)

Each is read from and written to a local path or an s3:// URL (`pixloc_core.files`).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files


def read_poses(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns {name: (qvec wxyz (4,), tvec (3,))}."""
    poses = {}
    for lineno, line in enumerate(files.read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 8:
            raise ValueError(f"{path}:{lineno}: expected 'name qw qx qy qz tx ty tz', got {len(fields)} fields")
        values = np.array([float(v) for v in fields[1:]])
        poses[fields[0]] = (values[:4], values[4:])
    return poses


def write_poses(path: Path, poses: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    lines = []
    for name, (qvec, tvec) in poses.items():
        values = " ".join(f"{v:.10g}" for v in (*qvec, *tvec))
        lines.append(f"{name} {values}")
    files.write_text(path, "\n".join(lines) + ("\n" if lines else ""))


@dataclass(frozen=True)
class QueryIntrinsics:
    model: str
    width: int
    height: int
    params: tuple[float, ...]


def read_query_list(path: Path) -> dict[str, QueryIntrinsics]:
    queries = {}
    for lineno, line in enumerate(files.read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 5:
            raise ValueError(f"{path}:{lineno}: expected 'name MODEL WIDTH HEIGHT PARAMS...'")
        name, model, width, height, *params = fields
        queries[name] = QueryIntrinsics(model, int(width), int(height), tuple(float(p) for p in params))
    return queries


def write_query_list(path: Path, queries: dict[str, QueryIntrinsics]) -> None:
    lines = [
        " ".join([name, q.model, str(q.width), str(q.height), *(f"{p:.10g}" for p in q.params)])
        for name, q in queries.items()
    ]
    files.write_text(path, "\n".join(lines) + ("\n" if lines else ""))


@dataclass(frozen=True)
class Prior:
    """A position prior: WGS84 (lat, lon, alt) when `geodetic`, else map-frame (x, y, z)."""
    position: tuple[float, float, float]
    geodetic: bool
    sigma_m: float | None = None
    has_altitude: bool = True


def read_priors(path: Path) -> dict[str, Prior]:
    with io.StringIO(files.read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if {"name", "lat", "lon"} <= columns:
            keys, geodetic = ("lat", "lon", "alt"), True
        elif {"name", "x", "y", "z"} <= columns:
            keys, geodetic = ("x", "y", "z"), False
        else:
            raise ValueError(f"{path}: header must be 'name,lat,lon[,alt][,sigma_m]' or 'name,x,y,z[,sigma_m]', got {reader.fieldnames}")
        priors = {}
        for lineno, row in enumerate(reader, 2):
            try:
                has_alt = bool(row.get(keys[2]))
                pos = tuple(float(row[k]) if row.get(k) else 0.0 for k in keys)
                sigma = float(row["sigma_m"]) if row.get("sigma_m") else None
            except ValueError as error:
                raise ValueError(f"{path}:{lineno}: {error}") from None
            priors[row["name"]] = Prior(pos, geodetic, sigma, has_alt)
    return priors


def write_priors(path: Path, priors: dict[str, Prior]) -> None:
    geodetic = {p.geodetic for p in priors.values()}
    if len(geodetic) > 1:
        raise ValueError("cannot mix WGS84 and map-frame priors in one CSV")
    header = ["name", "lat", "lon", "alt"] if geodetic != {False} else ["name", "x", "y", "z"]
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header + ["sigma_m"])
        for name, p in priors.items():
            writer.writerow([name, *(f"{v:.10f}" if p.geodetic else f"{v:.4f}" for v in p.position),
                             "" if p.sigma_m is None else f"{p.sigma_m:.3f}"])
        files.write_text(path, f.getvalue())
