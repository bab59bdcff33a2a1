"""`pixloc bench basin`: how far from the truth each extractor's features let the alignment start.

Data: pairs of posed images that observe the same 3D points (a reference, whose features are
sampled at the points' projections, and a query):

* synthetic: views of a seeded street scene (seed 0, which training never sees; see
  pixloc_core.train.synthetic_pairs), points ray-cast from the reference;
* fountain-P11 (../shared/data/strecha): consecutive views with their ground-truth cameras,
  points triangulated from SIFT matches with those cameras (reprojection error under 1 px).

Per initial-error bin (t_m, R_deg), `trials` hypotheses per pair start from the true query pose
with the camera centre moved by exactly t_m and the rotation turned by exactly R_deg (random
directions), and are refined together by the default FeaturemetricAligner (with the extractor's
learned dampings when its checkpoint has them). Success: final error under 5 cm and 0.5 deg.
With `wide_cells` r > 0 (the row "NAME+wideR"), a hypothesis whose alignment fails or ends above
`pixloc localize`'s cost cap (LocalizeConf.max_cost, the one check a pair without keypoints or a
prior allows) is also refined from the coarsest level widened (extractors.base.widened), and the
start of lower final cost wins, as in `pixloc localize` (localize.alignment_starts).
Also reported: milliseconds per image of the feature extraction (best of 3 batches of the first
pair, whose size is in the report), on this machine.
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from bench import ExtractorSpec, write_report
from pixloc_core.align import AlignResult, FeaturemetricAligner, ReferenceLevel
from pixloc_core.datasets import FOUNTAIN, read_strecha_camera
from pixloc_core.extractors import available_extractors
from pixloc_core.extractors.base import Extractor, Pyramid, select, widened
from pixloc_core.geometry import Camera, Pose, perturb_poses
from pixloc_core.mapping.matching import match_descriptors, normalize_descriptors
from pixloc_core.images import list_images
from pixloc_core.localize import LocalizeConf
from pixloc_core.mapping.sift import SiftExtractor
from pixloc_core.train import PosedPair, synthetic_pairs

logger = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

default_conf = {
    "translations_m": (0.3, 1.0, 3.0, 10.0),
    "rotations_deg": (2.0, 5.0, 10.0, 20.0),
    "trials": 8,  # hypotheses per bin and pair
    "success_t_m": 0.05,
    "success_R_deg": 0.5,
    "seed": 0,
    "extractors": None,  # bench.ExtractorSpec: "name", "name=CHECKPOINT" or "name:key=value,..."; None: all available
    "wide_cells": (0, 3),  # per extractor, a row per setting: 0 the coarsest level alone, r > 0 with a wide start
    "synthetic": {"scene_seed": 0, "num_pairs": 6, "width": 640, "height": 480, "num_points": 512,
                  "max_baseline_m": 3.0, "max_rotation_deg": 10.0},
    "fountain": {"data_root": SHARED_DATA, "max_size": 640, "num_pairs": 10, "num_points": 512,
                 "max_reprojection_px": 1.0, "min_angle_deg": 2.0},
}
# CI-sized: two small synthetic pairs, two trials per bin, no real data.
quick_conf = {"trials": 2, "synthetic": {"num_pairs": 2, "width": 320, "height": 240, "num_points": 256},
              "fountain": None}


# ----- fountain-P11 pairs with triangulated points


def _scaled_image(path: Path, max_size: int) -> tuple[np.ndarray, float, float]:
    """(H, W, 3) uint8 downscaled so that the longest side is max_size, and the (x, y) scales."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max_size / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        return np.array(image.resize(size, Image.Resampling.LANCZOS)), size[0] / image.width, size[1] / image.height


def triangulate(p2d: list[np.ndarray], projections: list[np.ndarray]) -> np.ndarray:
    """Linear (DLT) triangulation of N points seen in two views: p2d (N, 2) each, projection
    matrices (3, 4) each -> (N, 3)."""
    rows = [p[:, None, i:i + 1] * P[None, 2:3] - P[None, i:i + 1]  # (N, 1, 4)
            for p, P in zip(p2d, projections) for i in (0, 1)]
    _, _, vh = np.linalg.svd(np.concatenate(rows, 1))  # (N, 4, 4)
    homogeneous = vh[:, -1]
    return homogeneous[:, :3] / homogeneous[:, 3:]


def fountain_pairs(conf: dict) -> list[PosedPair]:
    """Consecutive fountain-P11 views (reference i, query i+1) and the SIFT points they share."""
    root = Path(conf["data_root"]) / FOUNTAIN
    names = list_images(root / "images")[:conf["num_pairs"] + 1]
    sift = SiftExtractor({"max_image_size": conf["max_size"]})
    views = []
    for name in names:
        image, sx, sy = _scaled_image(root / "images" / name, conf["max_size"])
        strecha = read_strecha_camera(root / "gt_dense_cameras" / f"{name}.camera")
        K = strecha.K.copy()
        K[0] *= sx
        K[1] *= sy
        camera = Camera("PINHOLE", float(image.shape[1]), float(image.shape[0]),
                        torch.tensor([K[0, 0], K[1, 1], K[0, 2], K[1, 2]]))
        T = strecha.world_to_camera()
        projection = K @ np.concatenate([T.R.numpy(), T.t.numpy()[:, None]], 1)
        gray = np.asarray(Image.fromarray(image).convert("L"))
        views.append((name, image, camera.float(), T.float(), projection, sift(gray)))

    pairs = []
    for (name0, image0, camera0, T0, P0, features0), (name1, image1, camera1, T1, P1, features1) in zip(
            views, views[1:]):
        matches = match_descriptors(normalize_descriptors(features0.descriptors),
                                    normalize_descriptors(features1.descriptors))
        p2d = [features0.xy[matches[:, 0]], features1.xy[matches[:, 1]]]
        points = triangulate(p2d, [P0, P1])
        keep = np.ones(len(points), dtype=bool)
        rays = []
        for xy, P, T in zip(p2d, (P0, P1), (T0, T1)):
            projected = np.concatenate([points, np.ones((len(points), 1))], 1) @ P.T
            keep &= (projected[:, 2] > 0) & (np.linalg.norm(projected[:, :2] / projected[:, 2:] - xy, axis=1)
                                             < conf["max_reprojection_px"])
            rays.append(points - T.center().double().numpy())
        cosine = np.einsum("nk,nk->n", *rays) / np.linalg.norm(rays[0], axis=1) / np.linalg.norm(rays[1], axis=1)
        keep &= cosine < np.cos(np.radians(conf["min_angle_deg"]))
        points = points[keep]
        # A random subset: matches come sorted by keypoint, i.e. by SIFT scale.
        points = points[np.random.default_rng(0).permutation(len(points))[:conf["num_points"]]]
        logger.info("fountain %s -> %s: %d matches, %d triangulated points", name0, name1, len(matches), len(points))
        if len(points) < 20:
            continue
        images = torch.from_numpy(np.stack([image0, image1])).permute(0, 3, 1, 2).float() / 255
        pairs.append(PosedPair(f"{name0}->{name1}", images, camera0, camera1, T0, T1,
                               torch.tensor(points, dtype=torch.float32)))
    return pairs


# ----- the benchmark


def milliseconds_per_image(extractor: Extractor, images: torch.Tensor, repeats: int = 3) -> float:
    """Best of `repeats` timed extractions of a batch: on a shared machine, the least disturbed run."""
    extractor.extract(images)  # warm-up: allocator, kernels
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        extractor.extract(images)
        timings.append(time.perf_counter() - start)
    return 1000 * min(timings) / len(images)


def align_pair(aligner: FeaturemetricAligner, pyramids: Pyramid, pair: PosedPair, T_init: Pose) -> AlignResult:
    """The query's hypotheses T_init (M,) refined against the reference's features at the points,
    both from `pyramids` (the pair's batch of two)."""
    reference, query = select(pyramids, 0), select(pyramids, 1)
    p2d, _ = pair.reference_camera.project(pair.T_reference.transform(pair.points3D))
    references = [ReferenceLevel.from_observations(level.to("cpu"), pair.points3D, p2d, pair.reference_camera.size)
                  for level in reference]
    with torch.no_grad():
        return aligner([level.to("cpu") for level in query], references, pair.query_camera, T_init)


def evaluate(extractor: Extractor, pairs: list[PosedPair], conf: dict, label: str = "") -> dict[int, list[dict]]:
    """Per `wide_cells` setting, the success rate per bin over all pairs."""
    aligner = FeaturemetricAligner()
    if getattr(extractor, "dampings", None) is not None:
        aligner.load_dampings(extractor.dampings)
    generator = torch.Generator().manual_seed(conf["seed"])
    bins = [(t_m, R_deg) for t_m in conf["translations_m"] for R_deg in conf["rotations_deg"]]
    trials = conf["trials"]
    successes = {cells: torch.zeros(len(bins)) for cells in conf["wide_cells"]}
    for pair in tqdm(pairs, desc=label or "basin", unit="pair"):
        pyramids = extractor.extract(pair.images)
        # All bins of a pair are refined in one batched call.
        magnitudes = torch.tensor(bins).repeat_interleave(trials, 0)  # (B * trials, 2)
        T_init = perturb_poses(pair.T_query, magnitudes[:, 0], magnitudes[:, 1], generator)

        def correct(result: AlignResult) -> torch.Tensor:
            error_R, error_t = result.poses.error_to(pair.T_query[None])
            return result.success & (error_t < conf["success_t_m"]) & (error_R < conf["success_R_deg"])

        plain = align_pair(aligner, pyramids, pair, T_init)
        for cells in conf["wide_cells"]:
            success = correct(plain)
            if cells:
                wide = align_pair(aligner, [widened(pyramids[0], cells), *pyramids[1:]], pair, T_init)
                plain_passes = plain.success & (plain.cost <= LocalizeConf.max_cost)
                wide_wins = ~plain_passes & (wide.cost < plain.cost)  # failures cost inf
                success = torch.where(wide_wins, correct(wide), success)
            successes[cells] += success.float().view(len(bins), trials).sum(1)
    return {cells: [{"t_m": t_m, "R_deg": R_deg, "success_rate": rate}
                    for (t_m, R_deg), rate in zip(bins, (counts / max(1, trials * len(pairs))).tolist())]
            for cells, counts in successes.items()}


def resolve_conf(quick: bool, overrides: dict) -> dict:
    """default_conf, then quick_conf when quick, then overrides; a dataset set to None is skipped."""
    unknown = set(overrides) - set(default_conf)
    if unknown:
        raise ValueError(f"bench basin: unknown options {sorted(unknown)}")
    layers = [default_conf, quick_conf if quick else {}, overrides]
    conf = {}
    for key, default in default_conf.items():
        values = [layer[key] for layer in layers if key in layer]
        if isinstance(default, dict):
            conf[key] = None if None in values else {k: v for value in values for k, v in value.items()}
        else:
            conf[key] = values[-1]
    return conf


def main(out: Path | None = None, quick: bool = False, **overrides) -> dict:
    """Run the benchmark; `out` gets the JSON (and a PNG plot next to it)."""
    conf = resolve_conf(quick, overrides)
    datasets = {}
    if conf["synthetic"] is not None:
        synthetic = conf["synthetic"]
        datasets["synthetic"] = synthetic_pairs(synthetic["num_pairs"], synthetic["scene_seed"], synthetic)
    if conf["fountain"] is not None:
        if (Path(conf["fountain"]["data_root"]) / FOUNTAIN).is_dir():
            datasets["fountain-P11"] = fountain_pairs(conf["fountain"])
        else:
            logger.warning("fountain-P11 not found under %s: skipped.", conf["fountain"]["data_root"])

    specs = conf["extractors"] or available_extractors()
    timing_images = next(iter(datasets.values()))[0].images  # (2, 3, H, W), the first pair
    report = {"extractors": {}, "datasets": {name: len(pairs) for name, pairs in datasets.items()},
              "timing_image_size": list(timing_images.shape[-1:-3:-1]),
              "trials_per_bin_and_pair": conf["trials"], "threads": torch.get_num_threads(),
              "success": {"t_m": conf["success_t_m"], "R_deg": conf["success_R_deg"]}}
    for spec in specs:
        spec = ExtractorSpec.parse(spec)
        name, extractor = spec.label, spec.load()
        per_dataset = {dataset: evaluate(extractor, pairs, conf, label=f"{name} on {dataset}")
                       for dataset, pairs in datasets.items()}
        ms_per_image = milliseconds_per_image(extractor, timing_images)
        for cells in conf["wide_cells"]:
            bins = {dataset: {"bins": settings[cells]} for dataset, settings in per_dataset.items()}
            # Over all datasets, each weighted by its number of pairs.
            weights = [len(datasets[dataset]) for dataset in bins]
            overall = [{**rows[0], "success_rate": sum(w * row["success_rate"] for w, row in zip(weights, rows))
                        / sum(weights)} for rows in zip(*(entry["bins"] for entry in bins.values()))]
            report["extractors"][f"{name}+wide{cells}" if cells else name] = {
                "bins": overall, "datasets": bins, "wide_cells": cells, "ms_per_image": ms_per_image}
    print_table(report)
    write_report(report, out)
    if out is not None:
        plot(report, Path(out).with_suffix(".png"))
    return report


def print_table(report: dict) -> None:
    names = list(report["extractors"])
    datasets = list(report["datasets"])
    print(f"{'t_m':>5} {'R_deg':>5} " + " ".join(f"{name + ' ' + dataset[:5]:>22}"
                                                  for name in names for dataset in datasets))
    first = report["extractors"][names[0]]["bins"] if names else []
    for index, row in enumerate(first):
        cells = [report["extractors"][name]["datasets"][dataset]["bins"][index]["success_rate"]
                 for name in names for dataset in datasets]
        print(f"{row['t_m']:>5.1f} {row['R_deg']:>5.0f} " + " ".join(f"{cell:>22.0%}" for cell in cells))
    means = [statistics.mean(row["success_rate"] for row in report["extractors"][name]["datasets"][dataset]["bins"])
             for name in names for dataset in datasets]
    print(f"{'mean':>11} " + " ".join(f"{mean:>22.1%}" for mean in means))
    print("ms per image (feature extraction): "
          + ", ".join(f"{name} {entry['ms_per_image']:.0f}" for name, entry in report["extractors"].items()))


COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75))


def plot(report: dict, path: Path, panel_size: tuple[int, int] = (640, 360)) -> None:
    """Success rate per bin (x: bins sorted by t then R), one panel per dataset, one line per extractor."""
    datasets = list(report["datasets"])
    width, height = panel_size
    margin = (60, 30, 20, 80)  # left, top, right, bottom
    canvas = Image.new("RGB", (width * max(1, len(datasets)), height), "white")
    draw = ImageDraw.Draw(canvas)
    for panel, dataset in enumerate(datasets):
        x0, y0 = panel * width + margin[0], margin[1]
        x1, y1 = (panel + 1) * width - margin[2], height - margin[3]
        draw.text((x0, 8), f"success rate vs initial error: {dataset}", fill="black")
        for fraction in (0, 0.25, 0.5, 0.75, 1):
            y = y1 - fraction * (y1 - y0)
            draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
            draw.text((x0 - 40, y - 6), f"{fraction:.0%}", fill="black")
        for index, (name, entry) in enumerate(report["extractors"].items()):
            rows = entry["datasets"][dataset]["bins"]
            step = (x1 - x0) / max(1, len(rows) - 1)
            points = [(x0 + i * step, y1 - row["success_rate"] * (y1 - y0)) for i, row in enumerate(rows)]
            color = COLORS[index % len(COLORS)]
            draw.line(points, fill=color, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.text((x1 - 120, y0 + 4 + 14 * index), name, fill=color)
            if index == 0:
                for i, row in enumerate(rows):
                    draw.text((x0 + i * step - 10, y1 + 6 + 14 * (i % 2)), f"{row['t_m']:g}m", fill="black")
                    draw.text((x0 + i * step - 10, y1 + 36 + 14 * (i % 2)), f"{row['R_deg']:g}°", fill="black")
        draw.rectangle([x0, y0, x1, y1], outline="black")
    canvas.save(path)
