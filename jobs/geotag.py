"""`pixloc geotag`: write corrected GPS position, altitude and heading into copies of localized photos.

    results (map frame) --geo.json--> WGS84 + heading --> OUT/<photo> (EXIF GPS replaced, pixels kept)
                                                      --> OUT/corrections.csv, corrections.geojson, report.html

With `--store` the photos are localized first (as `pixloc localize`, into --results) from their
EXIF GPS; photos without GPS get the prior `--near LAT,LON --radius M` when given. Originals are
never modified. A photo that fails keeps its original tags (it is still copied) and is listed with
the reason: `no prior`, the localization error, or why its EXIF could not be written.

Earlier outputs are kept unless asked: an --out with corrections (or, with --store, a --results
with results) needs `--resume` (continue the localization, write the corrections again) or
`--overwrite`; every file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixloc_core import files
from pixloc_core.exif import write_exif_gps
from pixloc_core.geo import wgs84_to_enu
from pixloc_core.geometry import quaternion_to_matrix
from pixloc_core.geotag import (ExifGeotag, Geotag, geotags_from_poses, heading_difference, horizontal_move_m,
                                load_georegistration)
from pixloc_core.io import Prior, write_priors
from pixloc_core.localize import METHODS, TRUST_PRIOR, VerifyConf
from pixloc_core.map_io import GeoInfo
from pixloc_core.images import list_images

from .localize import default_conf as localize_conf
from .localize import main as localize
from .report import HEIGHT, WIDTH, PlanView
from .config import merge_conf
from .results import ExistingResults, check_output, read_results

logger = logging.getLogger(__name__)

CORRECTED, FAILED, NO_PRIOR = "corrected", "failed", "no prior"
PRIORS_FILE = "geotag_priors.csv"
CORRECTIONS_FILE = "corrections.csv"

default_conf = {
    "localize": {},  # passed to jobs.localize.main when localizing first (--store)
}


@dataclass
class Correction:
    """One photo: what its EXIF said, what the localization says, and what happened."""

    name: str
    status: str  # CORRECTED, FAILED or NO_PRIOR
    reason: str  # why it failed; empty when corrected
    before: ExifGeotag
    after: Geotag | None = None
    moved_m: float | None = None  # ground distance before -> after
    heading_change_deg: float | None = None  # signed, (-180, 180]


def _localized_geotags(results_dir: Path, geo: GeoInfo) -> tuple[dict[str, Geotag], dict[str, str]]:
    """Geotags of the successful rows and the error of the failed ones, by image name."""
    rows = read_results(results_dir).to_pylist()
    failures = {row["name"]: row["error"] or "localization failed" for row in rows if not row["success"]}
    successes = [row for row in rows if row["success"]]
    if not successes:
        return {}, failures
    R = quaternion_to_matrix(torch.tensor([row["qvec"] for row in successes], dtype=torch.float64)).numpy()
    t = np.array([row["tvec"] for row in successes], dtype=np.float64)
    std = np.array([np.nan if row["position_std_m"] is None else row["position_std_m"] for row in successes])
    geotags = geotags_from_poses(R, t, geo, std)  # (N,)
    return {row["name"]: tag for row, tag in zip(successes, geotags)}, failures


def correct_photo(name: str, images_dir: Path, out_dir: Path, geo: GeoInfo,
                  after: Geotag | None, failure: str | None, near_given: bool) -> Correction:
    """Write the corrected copy of one photo (or the unchanged copy of a failed one)."""
    source, target = images_dir / name, out_dir / name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    before = ExifGeotag.read(source)
    if after is not None:
        try:
            write_exif_gps(source, staging, after.lat, after.lon, after.alt, after.heading_deg, after.accuracy_m)
            os.replace(staging, target)
        except ValueError as error:
            # piexif raises ValueError and its own InvalidImageDataError (a ValueError) for non-JPEGs
            _copy(source, target)
            return Correction(name, FAILED, f"cannot write EXIF: {error}".splitlines()[0], before)
        finally:
            staging.unlink(missing_ok=True)
        moved = horizontal_move_m(before, after, geo.origin_wgs84) if before.has_position else None
        turned = (heading_difference(before.heading_deg, after.heading_deg)
                  if before.heading_deg is not None and after.heading_deg is not None else None)
        return Correction(name, CORRECTED, "", before, after, moved, turned)
    _copy(source, target)
    if failure is None:
        if not before.has_position and not near_given:
            return Correction(name, NO_PRIOR, "no EXIF GPS and no --near", before)
        failure = "not in the localization results"
    status = NO_PRIOR if failure.startswith("no prior") else FAILED
    return Correction(name, status, failure, before)


def _copy(source: Path, target: Path) -> None:
    staging = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


# ----- outputs


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_csv(path: Path, corrections: list[Correction]) -> None:
    columns = ["name", "status", "reason", "lat_before", "lon_before", "alt_before", "heading_before_deg",
               "lat_after", "lon_after", "alt_after", "heading_after_deg", "accuracy_m", "moved_m",
               "heading_change_deg"]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for c in corrections:
        b, a = c.before, c.after
        writer.writerow([
            c.name, c.status, c.reason, _number(b.lat, 8), _number(b.lon, 8), _number(b.alt, 2),
            _number(b.heading_deg, 1), _number(a and a.lat, 8), _number(a and a.lon, 8),
            _number(a and a.alt, 2), _number(a and a.heading_deg, 1), _number(a and a.accuracy_m, 2),
            _number(c.moved_m, 2), _number(c.heading_change_deg, 1)])
    files.write_text(path, text.getvalue())


def geojson(corrections: list[Correction]) -> dict:
    """Per photo: the EXIF point ("before"), the corrected point ("after") and the move between them
    as a LineString; coordinates [lon, lat, alt] (RFC 7946)."""
    features = []

    def feature(geometry_type: str, coordinates, role: str, c: Correction) -> dict:
        properties = {"name": c.name, "role": role, "status": c.status, "reason": c.reason,
                      "moved_m": c.moved_m, "heading_before_deg": c.before.heading_deg,
                      "heading_after_deg": c.after.heading_deg if c.after else None,
                      "accuracy_m": c.after.accuracy_m if c.after else None}
        return {"type": "Feature", "geometry": {"type": geometry_type, "coordinates": coordinates},
                "properties": properties}

    for c in corrections:
        before = [c.before.lon, c.before.lat, c.before.alt or 0.0] if c.before.has_position else None
        after = [c.after.lon, c.after.lat, c.after.alt] if c.after else None
        if before:
            features.append(feature("Point", before, "before", c))
        if after:
            features.append(feature("Point", after, "after", c))
        if before and after:
            features.append(feature("LineString", [before, after], "move", c))
    return {"type": "FeatureCollection", "features": features}


def _move_colour(moved_m: float | None) -> str:
    if moved_m is None:
        return "#1f77b4"  # no EXIF position to compare with
    return "#2ca02c" if moved_m < 2 else "#ff7f0e" if moved_m < 10 else "#d62728"


def plan_view_svg(corrections: list[Correction], geo: GeoInfo) -> str:
    """North-up plan in the map's ENU metres: EXIF position (hollow grey), corrected position
    (coloured by how far it moved), the move as a dashed line, the corrected heading as a tick."""
    points = []  # (name, before (2,) or None, after (2,) or None, heading, colour)
    for c in corrections:
        before = (wgs84_to_enu(c.before.lat, c.before.lon, c.before.alt or 0.0, geo.origin_wgs84)[:2]
                  if c.before.has_position else None)
        after = np.asarray(c.after.enu[:2]) if c.after else None
        if before is not None or after is not None:
            points.append((c.name, before, after, c.after.heading_deg if c.after else None, _move_colour(c.moved_m)))
    if not points:
        return "<p>nothing to draw: no EXIF or corrected position</p>"
    all_points = np.array([p for _, before, after, _, _ in points for p in (before, after) if p is not None])
    view = PlanView(all_points)
    tick_m = 12 / view.scale  # a 12 px heading tick
    shapes = []
    for name, before, after, heading, colour in points:
        title = f"<title>{html.escape(name)}</title>"
        if before is not None and after is not None:
            (x0, y0), (x1, y1) = view(before), view(after)
            shapes.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="{colour}" '
                          f'stroke-width="1.5" stroke-dasharray="4 2"/>')
        if before is not None:
            x, y = view(before)
            shapes.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="none" stroke="#888">{title}</circle>')
        if after is not None:
            x, y = view(after)
            if heading is not None:
                tx, ty = view(after + tick_m * np.array([np.sin(np.radians(heading)), np.cos(np.radians(heading))]))
                shapes.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{tx:.1f}" y2="{ty:.1f}" stroke="{colour}" '
                              f'stroke-width="2"/>')
            shapes.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}">{title}</circle>'
                          f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="10">{html.escape(Path(name).stem)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'style="border:1px solid #ccc;background:white">{"".join(shapes)}'
            f'<text x="{WIDTH - 40}" y="20">N &#8593;</text>{view.scale_bar()}</svg>')


def write_report(path: Path, corrections: list[Correction], geo: GeoInfo) -> None:
    """report.html: counts, the plan view and a table sorted by how far each photo moved."""
    counts = {status: sum(c.status == status for c in corrections) for status in (CORRECTED, FAILED, NO_PRIOR)}
    moves = [c.moved_m for c in corrections if c.moved_m is not None]
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    if moves:
        summary += f"; moved median {np.median(moves):.1f} m, max {max(moves):.1f} m"
    ordered = sorted(corrections, key=lambda c: (c.status != CORRECTED, -(c.moved_m or 0.0), c.name))
    rows = []
    for c in ordered:
        accuracy = c.after.accuracy_m if c.after else None
        rows.append(
            f'<tr><td>{html.escape(c.name)}</td><td style="color:{_move_colour(c.moved_m)}">{c.status}</td>'
            f"<td>{_number(c.moved_m, 1)}</td><td>{_number(c.before.heading_deg, 0)}</td>"
            f"<td>{_number(c.after.heading_deg if c.after else None, 0)}</td>"
            f"<td>{_number(c.heading_change_deg, 0)}</td><td>{_number(accuracy, 2)}</td>"
            f"<td>{html.escape(c.reason)}</td></tr>")
    files.write_text(path, f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>pixloc geotag report</title>
<style>body{{font:14px sans-serif;margin:20px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:3px 8px;text-align:right}} td:first-child,td:last-child{{text-align:left}}</style>
</head><body>
<h1>Geotag corrections</h1>
<p>{len(corrections)} photos: {summary}.</p>
<p>Hollow grey: EXIF position; filled: corrected position (green &lt; 2 m, orange &lt; 10 m, red &ge; 10 m,
blue: no EXIF position), with its heading as a tick; dashed: the move.</p>
{plan_view_svg(corrections, geo)}
<h2>Photos, largest move first</h2>
<table><tr><th>photo</th><th>status</th><th>moved (m)</th><th>heading before (&deg;)</th>
<th>heading after (&deg;)</th><th>change (&deg;)</th><th>accuracy (m)</th><th>reason</th></tr>
{chr(10).join(rows)}
</table></body></html>
""")


# ----- the job


def write_localization_priors(path: Path, images_dir: Path, names: list[str],
                              near: tuple[float, float] | None, radius_m: float | None) -> None:
    """WGS84 priors: the EXIF GPS, else --near with --radius as its sigma; photos with neither are
    left out and come back from localization as `no prior`."""
    priors = {}
    for name in names:
        before = ExifGeotag.read(images_dir / name)
        if before.has_position:
            priors[name] = Prior((before.lat, before.lon, before.alt or 0.0), geodetic=True)
        elif near is not None:
            priors[name] = Prior((*near, 0.0), geodetic=True, sigma_m=radius_m, has_altitude=False)
    write_priors(path, priors)


def main(results_dir: Path, images_dir: Path, map_dir: Path, out_dir: Path, store_url: str | None = None,
         near: tuple[float, float] | None = None, radius_m: float | None = None,
         conf: dict | None = None, resume: bool = False, overwrite: bool = False) -> list[Correction]:
    """Geotag every image of `images_dir` into `out_dir`; with `store_url`, localize them first
    into `results_dir`. Returns one Correction per image."""
    conf = merge_conf(default_conf, conf)
    images_dir, out_dir, results_dir = Path(images_dir), Path(out_dir), Path(results_dir)
    if images_dir.resolve() == out_dir.resolve():
        raise ValueError(f"{out_dir}: the output folder must differ from the images folder (originals are kept)")
    if near is not None and store_url is None:
        raise ValueError("--near only applies when localizing here: pass --store as well")
    if (out_dir / CORRECTIONS_FILE).is_file() and not (resume or overwrite):
        raise ExistingResults(f"{out_dir}: holds the corrections of an earlier run; pass --resume or "
                              "--overwrite to write them again")
    if store_url is not None:
        check_output(results_dir, resume, overwrite)
    geo = load_georegistration(map_dir)
    names = list_images(images_dir)
    if not names:
        raise ValueError(f"{images_dir}: no images")
    if store_url is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        priors = results_dir / PRIORS_FILE
        write_localization_priors(priors, images_dir, names, near, radius_m)
        localize(map_dir, store_url, images_dir, results_dir, priors=priors, conf=conf["localize"], resume=resume,
                 overwrite=overwrite)
    geotags, failures = _localized_geotags(results_dir, geo)

    out_dir.mkdir(parents=True, exist_ok=True)
    corrections = [correct_photo(name, images_dir, out_dir, geo, geotags.get(name), failures.get(name),
                                 near is not None)
                   for name in tqdm(names, desc="geotag", unit="photo")]
    write_csv(out_dir / CORRECTIONS_FILE, corrections)
    files.write_text(out_dir / "corrections.geojson", json.dumps(geojson(corrections), indent=1))
    write_report(out_dir / "report.html", corrections, geo)
    for c in corrections:
        if c.status != CORRECTED:
            logger.warning("%s: %s (%s), original tags kept", c.name, c.status, c.reason)
    logger.info("%d/%d photos corrected -> %s", sum(c.status == CORRECTED for c in corrections),
                len(corrections), out_dir)
    return corrections


def _lat_lon(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAT,LON in degrees, got {text!r}") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise argparse.ArgumentTypeError(f"LAT,LON out of range: {text!r}")
    return lat, lon


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, required=True,
                        help="results directory of `pixloc localize` (written here when --store is given)")
    parser.add_argument("--images", type=Path, required=True, help="folder of the original photos")
    parser.add_argument("--map", type=Path, required=True, help="geo-registered map directory (geo.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the corrected copies and reports")
    parser.add_argument("--store", help="feature store URL: localize the photos first, as `pixloc localize`")
    parser.add_argument("--near", type=_lat_lon, help="LAT,LON prior for photos without GPS (with --store)")
    parser.add_argument("--radius", type=float, default=100.0, help="metres around --near to search (default 100)")
    parser.add_argument("--method", choices=METHODS, default=localize_conf["method"],
                        help="localization method (with --store)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the localization in --results (with --store) and write the corrections again")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results and corrections")
    parser.add_argument("--trust-prior", choices=TRUST_PRIOR, default=VerifyConf.trust_prior,
                        help="low: the EXIF GPS may be stale: a pose far from it may still succeed (with --store)")


def run(args: argparse.Namespace) -> int:
    if args.radius <= 0:
        raise SystemExit(f"pixloc geotag: --radius must be positive, got {args.radius}")
    main(args.results, args.images, args.map, args.out, args.store, args.near, args.radius,
         merge_conf(default_conf, {"localize": {
             "method": args.method, "shard": {"localize": {"verify": {"trust_prior": args.trust_prior}}}}}, args.conf), args.resume, args.overwrite)
    return 0
