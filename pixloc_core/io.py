"""Plain-text file formats shared with hloc and COLMAP users (see DESIGN.md).

* poses:      `name qw qx qy qz tx ty tz` (world-to-camera, COLMAP convention)
* query list: `name MODEL WIDTH HEIGHT PARAMS...` (hloc's queries_with_intrinsics.txt)
* priors CSV: header `name,lat,lon[,alt][,sigma_m]` (WGS84) or `name,x,y,z[,sigma_m]` (map frame)

Each is read from and written to a local path or an s3:// URL (`pixloc_core.files`).
"""
from __future__ import annotations

import csv
import io
import math
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
    queries, first_line = {}, {}
    for lineno, line in enumerate(files.read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 5:
            raise ValueError(f"{path}:{lineno}: expected 'name MODEL WIDTH HEIGHT PARAMS...'")
        name, model, width, height, *params = fields
        _refuse_duplicate(path, name, lineno, first_line)
        try:
            queries[name] = QueryIntrinsics(model, int(width), int(height), tuple(float(p) for p in params))
        except ValueError as error:
            raise ValueError(f"{path}:{lineno}: {error}") from None
    return queries


def _refuse_duplicate(path: Path, name: str, lineno: int, first_line: dict[str, int]) -> None:
    """A name listed twice is an error, not "the last line wins": the two lines may disagree."""
    if name in first_line:
        raise ValueError(f"{path}:{lineno}: {name!r} is listed twice (first on line {first_line[name]})")
    first_line[name] = lineno


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
    """Every line checked, naming file:line: required values present and finite, latitude in
    [-90, 90] and longitude in [-180, 180], sigma positive, each name once."""
    with io.StringIO(files.read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if {"name", "lat", "lon"} <= columns:
            keys, geodetic = ("lat", "lon", "alt"), True
        elif {"name", "x", "y", "z"} <= columns:
            keys, geodetic = ("x", "y", "z"), False
        else:
            raise ValueError(f"{path}: header must be 'name,lat,lon[,alt][,sigma_m]' or 'name,x,y,z[,sigma_m]', got {reader.fieldnames}")
        priors, first_line = {}, {}
        for lineno, row in enumerate(reader, 2):
            try:
                name = (row.get("name") or "").strip()
                if not name:
                    raise ValueError("empty name")
                _refuse_duplicate(path, name, lineno, first_line)
                # The altitude may be left empty (GPS altitude is often missing); nothing else.
                position = (_number(row, keys[0]), _number(row, keys[1]),
                            _number(row, keys[2]) if row.get(keys[2]) else 0.0)
                sigma = _number(row, "sigma_m") if row.get("sigma_m") else None
                if geodetic and not -90 <= position[0] <= 90:
                    raise ValueError(f"lat {position[0]} outside [-90, 90]")
                if geodetic and not -180 <= position[1] <= 180:
                    raise ValueError(f"lon {position[1]} outside [-180, 180]")
                if sigma is not None and not sigma > 0:
                    raise ValueError(f"sigma_m must be positive, got {sigma}")
            except ValueError as error:
                message = str(error)
                raise ValueError(message if message.startswith(f"{path}:") else f"{path}:{lineno}: {message}") from None
            priors[name] = Prior(position, geodetic, sigma, bool(row.get(keys[2])))
    return priors


def _number(row: dict, key: str) -> float:
    text = (row.get(key) or "").strip()
    if not text:
        raise ValueError(f"{key} is empty")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{key} is not finite: {text!r}")
    return value


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
