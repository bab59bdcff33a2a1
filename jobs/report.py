"""A self-contained HTML report of a localization run: a plan view (inline SVG) with, per query, the
GPS prior, the estimate and the ground truth, and a table of the per-query numbers.

The plan view is the map's x-y plane (east-north for a georegistered map); reference cameras are
drawn as grey dots for context.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pixloc_core.evaluate import PoseDict, format_summary, pose_errors, summarize
from pixloc_core.geometry import Pose

from .results import read_results, successful_poses

COLORS = {"reference": "#b0b0b0", "prior": "#e69f00", "estimate": "#0072b2", "truth": "#009e73", "failed": "#d55e00"}
WIDTH, HEIGHT, PAD = 960, 560, 30


def centers(poses: PoseDict) -> dict[str, np.ndarray]:
    """name -> camera centre (3,) of world-to-camera poses."""
    return {name: Pose.from_qvec_tvec(torch.tensor(q, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))
            .center().numpy() for name, (q, t) in poses.items()}


class PlanView:
    """Map x-y (metres) to SVG pixels with one scale on both axes, north up."""

    def __init__(self, points: np.ndarray):
        self.low, high = points.min(0), points.max(0)
        extent = np.maximum(high - self.low, 1.0)
        self.scale = min((WIDTH - 2 * PAD) / extent[0], (HEIGHT - 2 * PAD) / extent[1])

    def __call__(self, xy: np.ndarray) -> tuple[float, float]:
        return PAD + (xy[0] - self.low[0]) * self.scale, HEIGHT - PAD - (xy[1] - self.low[1]) * self.scale

    def scale_bar(self) -> str:
        metres = 10 ** math.floor(math.log10(max((WIDTH - 2 * PAD) / 5 / self.scale, 1e-3)))
        length = metres * self.scale
        y = HEIGHT - 8
        return (f'<line x1="{PAD}" y1="{y}" x2="{PAD + length:.1f}" y2="{y}" stroke="black" stroke-width="2"/>'
                f'<text x="{PAD + length + 5:.1f}" y="{y + 4}" font-size="11">{metres:g} m</text>')


def plan_svg(table: pa.Table, truths: dict[str, np.ndarray], references: np.ndarray | None) -> str:
    names = table.column("name").to_pylist()
    priors = {name: np.array(xyz) for name, xyz in zip(names, table.column("prior_xyz").to_pylist()) if xyz}
    estimates = centers(successful_poses(table))
    clouds = [np.array(list(group.values()))[:, :2] for group in (priors, estimates, truths) if group]
    if references is not None and len(references):
        clouds.append(references[:, :2])
    if not clouds:
        return "<p>nothing to draw: no prior, estimate or ground truth</p>"
    view = PlanView(np.concatenate(clouds))
    shapes = []
    for xy in references[:, :2] if references is not None else []:
        x, y = view(xy)
        shapes.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{COLORS["reference"]}"/>')
    for name in names:
        truth = truths.get(name)
        for kind, position in (("prior", priors.get(name)), ("estimate", estimates.get(name))):
            if position is not None and truth is not None:
                (x0, y0), (x1, y1) = view(position[:2]), view(truth[:2])
                dash = ' stroke-dasharray="4 3"' if kind == "prior" else ""
                shapes.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
                              f'stroke="{COLORS[kind]}" stroke-width="1"{dash}/>')
        label = html.escape(name)
        if name in priors:
            x, y = view(priors[name][:2])
            color = COLORS["prior"] if name in estimates else COLORS["failed"]
            shapes.append(f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="{color}">'
                          f'<title>{label}: prior</title></rect>')
        if truth is not None:
            x, y = view(truth[:2])
            shapes.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="none" stroke="{COLORS["truth"]}" '
                          f'stroke-width="2"><title>{label}: truth</title></circle>')
        if name in estimates:
            x, y = view(estimates[name][:2])
            shapes.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{COLORS["estimate"]}">'
                          f'<title>{label}: estimate</title></circle>')
    legend = "".join(
        f'<rect x="{WIDTH - 150}" y="{12 + 16 * i}" width="10" height="10" fill="{COLORS[kind]}"/>'
        f'<text x="{WIDTH - 135}" y="{21 + 16 * i}" font-size="12">{text}</text>'
        for i, (kind, text) in enumerate((("prior", "GPS prior"), ("estimate", "estimate"), ("truth", "ground truth"),
                                          ("failed", "prior, not localized"), ("reference", "reference camera"))))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'style="border:1px solid #ccc;background:white">{"".join(shapes)}{legend}{view.scale_bar()}</svg>')


def _cell(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def query_table(table: pa.Table, truths: dict[str, np.ndarray], errors: dict[str, tuple[float, float]]) -> str:
    header = ("query", "success", "prior error (m)", "error (m)", "error (deg)", "hypothesis", "cell", "cost",
              "points", "reason")
    rows = []
    for row in table.to_pylist():
        name = row["name"]
        prior_error = (float(np.linalg.norm(np.array(row["prior_xyz"]) - truths[name]))
                       if row["prior_xyz"] and name in truths else None)
        t_err, R_err = errors.get(name, (None, None))
        values = (name, "yes" if row["success"] else "no", prior_error, t_err if row["success"] else None,
                  R_err if row["success"] else None, row["hypothesis"], row["cell"], row["cost"],
                  row["num_points"], row["error"])
        rows.append("<tr>" + "".join(f"<td>{_cell(value, 4 if i == 7 else 2)}</td>" for i, value in enumerate(values))
                    + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" + "".join(rows) + "</table>")


def main(results: Path, out: Path, gt: PoseDict | None = None, reference_centers: np.ndarray | None = None,
         title: str = "pixloc localization report") -> Path:
    """Write the report of a results directory (or results.parquet) to `out` (an .html file)."""
    table = read_results(results).sort_by("name")
    truths = centers(gt) if gt else {}
    errors = pose_errors(successful_poses(table), gt) if gt else {}
    summary = f"<pre>{html.escape(format_summary(summarize(errors), 'accuracy'))}</pre>" if errors else ""
    document = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:20px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ddd;padding:2px 6px;text-align:right}} td:first-child{{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{table.num_rows} queries, {sum(table.column("success").to_pylist())} localized.
Results: {html.escape(str(results))}</p>
{summary}
<h2>Plan view</h2>
{plan_svg(table, truths, reference_centers)}
<h2>Queries</h2>
{query_table(table, truths, errors)}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document)
    return out
