"""Plain-text file formats shared with hloc and COLMAP users (see DESIGN.md).

* poses:      `name qw qx qy qz tx ty tz` (world-to-camera, COLMAP convention)
* query list: `name MODEL WIDTH HEIGHT PARAMS...` (hloc's queries_with_intrinsics.txt)
* priors CSV: header `name,lat,lon[,alt][,sigma_m]` (WGS84) or `name,x,y,z[,sigma_m]` (map frame)

Each is read from and written to a local path or an s3:// URL (`pixloc_core.files`). The readers
parse a file into Arrow columns at once (`*_table`), so that a list of 10^6 queries costs
columns, not 10^6 Python objects; the dict readers are views of those tables for small lists.
Every error names the file and line.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv

from . import files


def _text_fields(path: Path) -> tuple[pa.ListArray, np.ndarray]:
    """The whitespace-separated fields of each line that is neither blank nor a `#` comment, and
    the (1-based) line number of each."""
    lines = pc.split_pattern(pa.array([files.read_text(path)]), "\n").flatten()
    lines = pc.utf8_trim_whitespace(lines)
    kept = pc.invert(pc.or_(pc.equal(lines, ""), pc.starts_with(lines, "#")))
    return pc.utf8_split_whitespace(lines.filter(kept)), np.flatnonzero(kept.to_numpy(zero_copy_only=False)) + 1


def _require_fields(path: Path, fields: pa.ListArray, linenos: np.ndarray, wrong: np.ndarray, message: str) -> None:
    """ValueError naming the first line where `wrong` (a mask over the lines): `message` with {count}."""
    if wrong.any():
        first = int(np.argmax(wrong))
        raise ValueError(f"{path}:{linenos[first]}: {message.format(count=len(fields[first]))}")


def _parsed(path: Path, texts: pa.Array, linenos: np.ndarray, parse: type, arrow_type: pa.DataType) -> pa.Array:
    """`texts` (one per line, or flattened with `linenos` repeated) as numbers: Arrow's parser first;
    where it refuses one, Python's `parse` decides and its error names the line."""
    try:
        return pc.cast(texts, arrow_type)
    except pa.ArrowInvalid:
        values = []
        for text, lineno in zip(texts.to_pylist(), linenos.tolist()):
            try:
                values.append(parse(text))
            except ValueError as error:
                raise ValueError(f"{path}:{lineno}: {error}") from None
        return pa.array(values, arrow_type)


def read_poses_table(path: Path) -> pa.Table:
    """Columns name, qvec (list of 4: wxyz), tvec (list of 3)."""
    fields, linenos = _text_fields(path)
    _require_fields(path, fields, linenos, pc.list_value_length(fields).to_numpy() != 8,
                    "expected 'name qw qx qy qz tx ty tz', got {count} fields")
    names = pc.list_element(fields, 0)
    values = _parsed(path, pc.list_slice(fields, 1, 8).flatten(), np.repeat(linenos, 7), float, pa.float64())
    values = values.to_numpy().reshape(-1, 7)
    return pa.table({"name": names, "qvec": pa.FixedSizeListArray.from_arrays(values[:, :4].ravel(), 4),
                     "tvec": pa.FixedSizeListArray.from_arrays(values[:, 4:].ravel(), 3)})


def read_poses(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns {name: (qvec wxyz (4,), tvec (3,))}."""
    table = read_poses_table(path)
    qvecs = table["qvec"].combine_chunks().flatten().to_numpy().reshape(-1, 4)
    tvecs = table["tvec"].combine_chunks().flatten().to_numpy().reshape(-1, 3)
    return {name: (qvec, tvec) for name, qvec, tvec in zip(table["name"].to_pylist(), qvecs, tvecs)}


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


def read_query_list_table(path: Path) -> pa.Table:
    """Columns name, model, width, height, params (list), in the file's order."""
    fields, linenos = _text_fields(path)
    lengths = pc.list_value_length(fields).to_numpy()
    _require_fields(path, fields, linenos, lengths < 5, "expected 'name MODEL WIDTH HEIGHT PARAMS...'")
    names = pc.list_element(fields, 0)
    _refuse_duplicates(path, names, linenos)
    # Checked column by column: where several lines are bad, the first bad width is named before
    # an earlier line's bad parameter (each message still names its line).
    width, height = (_parsed(path, pc.list_element(fields, index), linenos, int, pa.int64()) for index in (2, 3))
    params = pc.list_slice(fields, 4)
    values = _parsed(path, params.flatten(), np.repeat(linenos, lengths - 4), float, pa.float64())
    offsets = pc.subtract(params.offsets, params.offsets[0])
    return pa.table({"name": names, "model": pc.list_element(fields, 1), "width": width, "height": height,
                     "params": pa.ListArray.from_arrays(offsets, values)})


def read_query_list(path: Path) -> dict[str, QueryIntrinsics]:
    return {row["name"]: QueryIntrinsics(row["model"], row["width"], row["height"], tuple(row["params"]))
            for row in read_query_list_table(path).to_pylist()}


def _first_repeat(names: pa.Array, linenos: np.ndarray) -> tuple[int, int, str] | None:
    """(line, first line, name) of the first line that repeats an earlier line's name, as a reader
    going line by line finds it; None when every name is listed once."""
    order = pc.sort_indices(names).to_numpy()  # stable: equal names keep their line order
    sorted_names = names.take(order)
    repeats = np.flatnonzero(pc.equal(sorted_names[1:], sorted_names[:-1]).to_numpy(zero_copy_only=False)) + 1
    if not len(repeats):
        return None
    second = repeats[np.argmin(linenos[order[repeats]])]  # the earliest repeat is a second occurrence
    return int(linenos[order[second]]), int(linenos[order[second - 1]]), sorted_names[second].as_py()


def _refuse_duplicates(path: Path, names: pa.Array, linenos: np.ndarray) -> None:
    """A name listed twice is an error, not "the last line wins": the two lines may disagree."""
    repeat = _first_repeat(names, linenos)
    if repeat is not None:
        lineno, first, name = repeat
        raise ValueError(f"{path}:{lineno}: {name!r} is listed twice (first on line {first})")


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


PRIOR_KEYS = {True: ("lat", "lon", "alt"), False: ("x", "y", "z")}  # by `geodetic`


def read_priors_table(path: Path) -> pa.Table:
    """Columns name, geodetic, x, y, z (lat, lon, alt when geodetic; z 0 when the altitude is
    empty), sigma_m (null: none given), has_altitude. Every line checked, naming file:line:
    required values present and finite, latitude in [-90, 90] and longitude in [-180, 180], sigma
    positive, each name once."""
    text = files.read_text(path)
    header = next(csv.reader(io.StringIO(text)), [])
    if {"name", "lat", "lon"} <= set(header):
        geodetic = True
    elif {"name", "x", "y", "z"} <= set(header):
        geodetic = False
    else:
        raise ValueError(f"{path}: header must be 'name,lat,lon[,alt][,sigma_m]' or 'name,x,y,z[,sigma_m]', got {header}")
    columns = _csv_columns(text, header)
    rows = len(columns["name"])
    # Records, not physical lines: numbered as csv.DictReader numbers them (blank lines skipped).
    linenos = np.arange(2, rows + 2)
    texts = {key: columns.get(key, pa.repeat(pa.scalar("", pa.string()), rows)) for key in ("name", *PRIOR_KEYS[geodetic], "sigma_m")}
    names = pc.utf8_trim_whitespace(texts["name"])
    first, second, third = (_floats(texts[key]) for key in PRIOR_KEYS[geodetic])
    has_altitude = pc.not_equal(texts[PRIOR_KEYS[geodetic][2]], "").to_numpy(zero_copy_only=False)
    has_sigma = pc.not_equal(texts["sigma_m"], "").to_numpy(zero_copy_only=False)
    sigma = _floats(texts["sigma_m"])
    with np.errstate(invalid="ignore"):
        bad = (pc.equal(names, "").to_numpy(zero_copy_only=False) | ~np.isfinite(first) | ~np.isfinite(second)
               | (has_altitude & ~np.isfinite(third)) | (has_sigma & ~(np.isfinite(sigma) & (sigma > 0))))
        if geodetic:
            bad |= (np.abs(first) > 90) | (np.abs(second) > 180)
    repeat = _first_repeat(names, linenos)
    if repeat is not None and (not bad.any() or repeat[0] <= linenos[np.argmax(bad)]):
        _refuse_duplicates(path, names, linenos)
    if bad.any():  # the line's first failing check says why
        index = int(np.argmax(bad))
        _check_prior(path, linenos[index], {key: texts[key][index].as_py() for key in texts}, geodetic)
    return pa.table({"name": names, "geodetic": np.full(rows, geodetic), "x": first, "y": second,
                     "z": np.where(has_altitude, third, 0.0), "sigma_m": pa.array(sigma, mask=~has_sigma),
                     "has_altitude": has_altitude})


def _csv_columns(text: str, header: list[str]) -> dict[str, pa.Array]:
    """The CSV's columns as strings ("" where empty); a row with fields missing at its end reads
    them as empty, as csv.DictReader does."""
    try:
        table = pyarrow.csv.read_csv(
            pa.BufferReader(files.arrow_buffer(text.encode())),
            convert_options=pyarrow.csv.ConvertOptions(column_types={column: pa.string() for column in header}))
        return {column: table[column].combine_chunks() for column in header}
    except pa.ArrowInvalid:  # rows of another length than the header: the slower reader
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        return {column: pa.array([row.get(column) or "" for row in rows], pa.string()) for column in header}


def read_priors(path: Path) -> dict[str, Prior]:
    """See `read_priors_table`."""
    return {row["name"]: Prior((row["x"], row["y"], row["z"]), row["geodetic"], row["sigma_m"], row["has_altitude"])
            for row in read_priors_table(path).to_pylist()}


def _floats(texts: pa.Array) -> np.ndarray:
    """Numbers of (stripped) texts; NaN where empty or not a number (the line checks say which)."""
    texts = pc.utf8_trim_whitespace(texts)
    try:
        return pc.cast(pc.if_else(pc.equal(texts, ""), None, texts), pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:  # Arrow refuses some: Python's float decides, as _number does
        def number(text: str) -> float:
            try:
                return float(text)
            except ValueError:
                return math.nan
        return np.array([number(text) for text in texts.to_pylist()], np.float64)


def _check_prior(path: Path, lineno: int, row: dict, geodetic: bool) -> None:
    """The checks of one priors line, in order; ValueError naming file:line at the first that fails."""
    keys = PRIOR_KEYS[geodetic]
    try:
        if not (row.get("name") or "").strip():
            raise ValueError("empty name")
        # The altitude may be left empty (GPS altitude is often missing); nothing else.
        position = (_number(row, keys[0]), _number(row, keys[1]), _number(row, keys[2]) if row.get(keys[2]) else 0.0)
        sigma = _number(row, "sigma_m") if row.get("sigma_m") else None
        if geodetic and not -90 <= position[0] <= 90:
            raise ValueError(f"lat {position[0]} outside [-90, 90]")
        if geodetic and not -180 <= position[1] <= 180:
            raise ValueError(f"lon {position[1]} outside [-180, 180]")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma_m must be positive, got {sigma}")
    except ValueError as error:
        raise ValueError(f"{path}:{lineno}: {error}") from None


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
