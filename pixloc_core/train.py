"""Learning features (and the alignment's dampings) from posed images, as PixLoc does.

A training sample is a pair of posed images that observe the same 3D points: a reference image
whose features are sampled at the points' projections, and a query image whose pose is
perturbed and then refined by the featuremetric alignment, unrolled a few iterations per level.
The loss is the reprojection error of the 3D points between the refined and the true query pose
(pseudo-Huber with a 2 px scale, clamped at 50 px), averaged over the levels, a level counting
only when the previous one ended within `success_px` x its stride of the truth. Gradients flow
through the Gauss-Newton steps into the features, the confidences and the dampings.

A UNet is trained whole, from random weights. A pretrained ALIKE variant keeps the authors'
network frozen: only its confidence heads and the dampings learn (`trainable_extractor`), so a few
minutes of CPU and a few hundred posed pairs are enough.

Pairs come from synthetic scenes (`synthetic_pairs`, the points ray-cast from the reference view
and kept where the query sees the same surface) or from a COLMAP model with posed images
(`colmap_pairs`, the points both images observe). Checkpoints use PixLoc's layout (see
extractors/checkpoint.py): `load_extractor(name, checkpoint)` loads them like official weights.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .align import AlignConf, FeaturemetricAligner, ReferenceLevel
from .conf import merge_conf
from .exif import focal_px_from_35mm
from .extractors import trainable_extractor
from .extractors.base import STRIDES, Extractor, resize_longest_side, select
from .extractors.checkpoint import load_extractor_state, read_checkpoint, split_model_state, write_checkpoint
from .geometry import Camera, Pose, perturb_poses, so3_exp
from .synthetic import PinholeIntrinsics, SceneConfig, build_scene, raycast, render, sample_walk_poses
from .synthetic.cameras import query_arc_lengths
from .synthetic.render import SKY

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_last.tar"

default_conf = {
    "extractor": "unet-small",  # a UNet (trained whole) or an ALIKE variant (its confidences only)
    "seed": 0,
    "num_steps": 1500,
    "pairs_per_step": 2,
    "hypotheses_per_pair": 4,  # perturbed initial poses per pair, aligned together
    "learning_rate": 1e-3,
    "damping_lr_scale": 10.0,  # PixLoc trains the dampings with a larger rate
    "clip_grad": 1.0,
    "num_iterations": (3, 3, 3),  # alignment iterations unrolled per level, coarse to fine
    "init_max_t_m": 1.5,  # initial errors: uniform magnitudes up to these, random directions
    "init_max_R_deg": 7.5,
    "huber_px": 2.0,
    "clamp_px": 50.0,
    "success_px": 3.0,  # a level gates the next when its error is below success_px * stride
    "checkpoint_every": 100,
    "data": {
        "source": "synthetic",  # or "colmap" (then model_dir and image_dir)
        "scene_seeds": (1000, 1012),  # [first, last): kept apart from `pixloc synth`'s seed 0
        "pairs_per_scene": 25,
        "width": 320,
        "height": 240,
        "num_points": 256,
        "max_baseline_m": 3.0,
        "max_rotation_deg": 10.0,
        "model_dir": None,
        "image_dir": None,
        "max_size": 320,
    },
}


@dataclass
class PosedPair:
    """Two posed images of the same size and the 3D points both of them observe."""

    name: str
    images: torch.Tensor  # (2, 3, H, W) in [0, 1]: reference, query
    reference_camera: Camera
    query_camera: Camera
    T_reference: Pose  # world-to-camera
    T_query: Pose
    points3D: torch.Tensor  # (N, 3) world frame


# ----- data


def _pinhole(intrinsics: PinholeIntrinsics) -> Camera:
    return Camera("PINHOLE", float(intrinsics.width), float(intrinsics.height),
                  torch.tensor(intrinsics.params(), dtype=torch.float32))


def _pixels(points: np.ndarray, rotation: np.ndarray, translation: np.ndarray, camera: PinholeIntrinsics
            ) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) -> pixels (N, 2) and depths (N,)."""
    p_cam = points @ rotation.T + translation
    depth = p_cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        p2d = p_cam[:, :2] / depth[:, None] * [camera.fx, camera.fy] + [camera.cx, camera.cy]
    return p2d, depth


def synthetic_pairs(num_pairs: int, scene_seed: int, conf: dict) -> list[PosedPair]:
    """Pairs rendered from one synthetic scene; conf is `default_conf["data"]`.

    The query camera is the reference one moved by up to max_baseline_m (horizontally) and
    turned by up to max_rotation_deg; the points are ray-cast from the reference view and kept
    where the query camera sees the same surface point (no occlusion).
    """
    scene = build_scene(SceneConfig(seed=scene_seed))
    rng = np.random.default_rng([scene_seed, 2])
    width, height = conf["width"], conf["height"]
    # The field of view of `pixloc synth` (30 mm equivalent), at any resolution.
    intrinsics = PinholeIntrinsics.centered(width, height, focal_px_from_35mm(30, width, height))
    pairs = []
    for attempt in range(20 * num_pairs):
        if len(pairs) == num_pairs:
            break
        rotations, translations = sample_walk_poses(scene, query_arc_lengths(scene, 1, rng), rng)
        R_ref, t_ref = rotations[0], translations[0]
        center = -R_ref.T @ t_ref
        heading = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(0, conf["max_baseline_m"]) * np.array([np.cos(heading), np.sin(heading), 0.0])
        axis = rng.normal(size=3)
        angle = np.radians(rng.uniform(0, conf["max_rotation_deg"]))
        R_query = so3_exp(torch.from_numpy(axis / np.linalg.norm(axis) * angle)).numpy() @ R_ref
        t_query = -R_query @ (center + offset)

        hits = raycast(scene, intrinsics, R_ref, t_ref)
        rows, cols = np.nonzero(hits.surface != SKY)
        chosen = rng.choice(len(rows), size=min(len(rows), 4 * conf["num_points"]), replace=False)
        rows, cols = rows[chosen], cols[chosen]
        points = hits.center + hits.depth[rows, cols, None] * hits.directions[rows, cols]  # (K, 3)

        query_hits = raycast(scene, intrinsics, R_query, t_query)
        p2d, depth = _pixels(points, R_query, t_query, intrinsics)
        inside = (depth > 0) & np.all((p2d >= 0) & (p2d < [width, height]), axis=1)
        column, row = np.clip(p2d.astype(int), 0, [width - 1, height - 1]).T
        # Same surface seen: the depth ray-cast through the pixel agrees with the point's.
        unoccluded = np.abs(query_hits.depth[row, column] - depth) < 0.02 * depth + 0.05
        visible = np.flatnonzero(inside & unoccluded)[:conf["num_points"]]
        if len(visible) < conf["num_points"] // 2:
            continue
        images = np.stack([render(scene, intrinsics, R_ref, t_ref), render(scene, intrinsics, R_query, t_query)])
        pairs.append(PosedPair(
            name=f"scene{scene_seed}_pair{len(pairs)}",
            images=torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
            reference_camera=_pinhole(intrinsics), query_camera=_pinhole(intrinsics),
            T_reference=Pose.from_Rt(torch.from_numpy(R_ref), torch.from_numpy(t_ref)).float(),
            T_query=Pose.from_Rt(torch.from_numpy(R_query), torch.from_numpy(t_query)).float(),
            points3D=torch.tensor(points[visible], dtype=torch.float32),
        ))
    if len(pairs) < num_pairs:
        raise ValueError(f"synthetic scene {scene_seed}: only {len(pairs)} of {num_pairs} pairs "
                         "with enough shared points")
    return pairs


def colmap_pairs(model_dir: Path, image_dir: Path, conf: dict) -> list[PosedPair]:
    """One pair per registered image of a COLMAP model: the image as query, and as reference the
    image sharing most 3D points with it; points are those both observe. Images are resized to
    conf["max_size"] and must all come out the same size (one batch)."""
    import pycolmap
    from PIL import Image

    model_dir, image_dir = Path(model_dir), Path(image_dir)
    try:
        reconstruction = pycolmap.Reconstruction(model_dir)
    except Exception as error:  # noqa: BLE001 - pycolmap raises RuntimeError/ValueError variants
        raise ValueError(f"{model_dir}: cannot read COLMAP model ({error})") from None
    observed = {image_id: {p.point3D_id for p in image.points2D if p.has_point3D()}
                for image_id, image in reconstruction.images.items() if image.has_pose}

    def load(image_id: int) -> tuple[torch.Tensor, Camera, Pose]:
        image = reconstruction.images[image_id]
        path = image_dir / image.name
        try:
            with Image.open(path) as file:
                array = np.array(file.convert("RGB"))
        except OSError as error:
            raise ValueError(f"{path}: cannot read image ({error})") from None
        tensor, scale = resize_longest_side(array, conf["max_size"])
        camera = Camera.from_colmap(reconstruction.cameras[image.camera_id]).scale(scale).float()
        return tensor, camera, Pose.from_colmap(image.cam_from_world()).float()

    pairs = []
    for query_id, query_points in sorted(observed.items()):
        reference_id, shared = max(((other, query_points & points) for other, points in observed.items()
                                    if other != query_id), key=lambda item: len(item[1]), default=(None, set()))
        if len(shared) < 20:
            continue
        shared = sorted(shared)[:conf["num_points"]]
        (reference_image, reference_camera, T_reference), (query_image, query_camera, T_query) = (
            load(reference_id), load(query_id))
        if reference_image.shape != query_image.shape:
            raise ValueError(f"{image_dir}: images {reconstruction.images[reference_id].name} and "
                             f"{reconstruction.images[query_id].name} differ in size after resizing")
        pairs.append(PosedPair(
            name=reconstruction.images[query_id].name, images=torch.stack([reference_image, query_image]),
            reference_camera=reference_camera, query_camera=query_camera, T_reference=T_reference, T_query=T_query,
            points3D=torch.tensor(np.array([reconstruction.points3D[i].xyz for i in shared]), dtype=torch.float32),
        ))
    if not pairs:
        raise ValueError(f"{model_dir}: no image pairs sharing at least 20 3D points")
    return pairs


def training_pairs(conf: dict) -> list[PosedPair]:
    data = conf["data"]
    if data["source"] == "synthetic":
        first, last = data["scene_seeds"]
        return [pair for seed in tqdm(range(first, last), desc="rendering pairs", unit="scene")
                for pair in synthetic_pairs(data["pairs_per_scene"], seed, data)]
    if data["source"] == "colmap":
        return colmap_pairs(data["model_dir"], data["image_dir"], data)
    raise ValueError(f"unknown training data source {data['source']!r}, expected 'synthetic' or 'colmap'")


# ----- model and loss


class PoseLearner(torch.nn.Module):
    """An extractor plus one single-level aligner per pyramid level, so that the pose after each
    level is available to the loss; each aligner's `damping_raw` is that level's damping."""

    def __init__(self, extractor: Extractor, num_iterations: tuple[int, ...]):
        super().__init__()
        self.extractor = extractor
        self.aligners = torch.nn.ModuleList(FeaturemetricAligner(AlignConf(num_iterations=(n,)))
                                            for n in num_iterations)

    def raw_dampings(self) -> torch.Tensor:
        """(3, 6) finest level first, the checkpoint (PixLoc) order; our levels run coarse to fine."""
        return torch.cat([aligner.damping_raw for aligner in self.aligners]).flip(0)

    def load_raw_dampings(self, raw: torch.Tensor) -> None:
        """Inverse of raw_dampings."""
        for aligner, row in zip(self.aligners, raw.flip(0)):
            aligner.load_dampings(row[None])

    def forward(self, pairs: list[PosedPair], T_init: list[Pose]) -> list[list[Pose]]:
        """Per pair, the refined query poses (M,) after each level, coarse to fine."""
        pyramids = self.extractor(torch.cat([pair.images for pair in pairs]))  # levels of (2P, C, h, w)
        estimates = []
        for index, (pair, T) in enumerate(zip(pairs, T_init)):
            reference, query = select(pyramids, 2 * index), select(pyramids, 2 * index + 1)
            per_level = []
            for aligner, reference_level, query_level in zip(self.aligners, reference, query):
                references = [self.reference_level(reference_level, pair)]
                T = aligner([query_level], references, pair.query_camera, T).poses
                per_level.append(T)
                T = T.detach()  # as PixLoc: each level is trained from where the previous one ended
            estimates.append(per_level)
        return estimates

    @staticmethod
    def reference_level(level, pair: PosedPair) -> ReferenceLevel:
        p2d, _ = pair.reference_camera.project(pair.T_reference.transform(pair.points3D))
        return ReferenceLevel.from_observations(level, pair.points3D, p2d, pair.reference_camera.size)


def reprojection_loss(pair: PosedPair, T_init: Pose, per_level: list[Pose], conf: dict
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated mean over levels of the robust reprojection error (M,), and the mean reprojection
    error after the last level (M,) in pixels."""
    camera = pair.query_camera

    def project(T: Pose) -> tuple[torch.Tensor, torch.Tensor]:
        return camera.project(T.transform(pair.points3D))  # (M, N, 2), (M, N)

    p2d_true, valid_true = project(pair.T_query[None])
    _, valid_init = project(T_init)
    mask = (valid_true & valid_init & camera.in_image(p2d_true)).float()  # (M, N)

    def masked_mean(values: torch.Tensor) -> torch.Tensor:  # (M, N) -> (M,)
        return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def squared_distances(T: Pose) -> torch.Tensor:  # (M, N)
        return (project(T)[0] - p2d_true).pow(2).sum(-1)

    delta = conf["huber_px"]
    total, gate = 0.0, torch.ones(len(T_init), dtype=torch.bool)
    for T, stride in zip(per_level, STRIDES):
        # Pseudo-Huber in pixels: quadratic below huber_px, linear above, clamped for far outliers.
        robust = delta * ((1 + squared_distances(T) / delta**2).sqrt() - 1)
        error = masked_mean(robust.clamp(max=conf["clamp_px"]))
        total = total + gate.float() * error / len(per_level)
        gate = error.detach() < conf["success_px"] * stride
    with torch.no_grad():
        final_px = masked_mean(squared_distances(per_level[-1]).sqrt())
    return total, final_px


# ----- training


def _finite_gradients(parameters) -> bool:
    return all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None)


def train(pairs: list[PosedPair], out_dir: Path, conf: dict | None = None) -> Path:
    """Train (or resume from out_dir/checkpoint_last.tar) until conf["num_steps"]; returns the checkpoint."""
    conf = merge_conf(default_conf, conf)
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    torch.manual_seed(conf["seed"])
    learner = PoseLearner(trainable_extractor(conf["extractor"]), tuple(conf["num_iterations"]))
    damping_parameters = [aligner.damping_raw for aligner in learner.aligners]
    trained = [parameter for parameter in learner.extractor.parameters() if parameter.requires_grad]
    # A frozen network keeps its BatchNorm statistics: its layers stay in eval mode.
    frozen = len(trained) < len(list(learner.extractor.parameters()))
    optimizer = torch.optim.Adam([
        {"params": trained, "lr": conf["learning_rate"]},
        {"params": damping_parameters, "lr": conf["learning_rate"] * conf["damping_lr_scale"]},
    ])
    step = 0
    if checkpoint_path.exists():
        checkpoint = read_checkpoint(checkpoint_path)
        extractor_state, dampings = split_model_state(checkpoint, checkpoint_path)
        load_extractor_state(learner.extractor, extractor_state, checkpoint_path)
        learner.load_raw_dampings(dampings)
        optimizer.load_state_dict(checkpoint["train"]["optimizer"])
        step = checkpoint["step"]
        logger.info("Resuming from %s at step %d.", checkpoint_path, step)

    # Plain JSON types only (paths become strings): checkpoints are read back with weights_only=True.
    extractor_conf = learner.extractor.conf
    saved_conf = json.loads(json.dumps({"extractor": conf["extractor"], "train": conf, "extractor_conf":
                                        asdict(extractor_conf) if is_dataclass(extractor_conf) else extractor_conf},
                                       default=str))

    def save() -> None:
        write_checkpoint(checkpoint_path, learner.extractor, learner.raw_dampings(), conf=saved_conf,
                         step=step, train_state={"optimizer": optimizer.state_dict()})

    learner.train()
    learner.extractor.train(not frozen)
    progress = tqdm(total=conf["num_steps"], initial=step, desc="train", unit="step")
    skipped = 0
    while step < conf["num_steps"]:
        # One generator per step: a resumed run draws exactly what an uninterrupted one would.
        generator = torch.Generator().manual_seed(conf["seed"] * 1_000_003 + step)
        batch = [pairs[i] for i in torch.randperm(len(pairs), generator=generator)[:conf["pairs_per_step"]]]
        num = conf["hypotheses_per_pair"]
        T_init = [perturb_poses(pair.T_query, conf["init_max_t_m"] * torch.rand(num, generator=generator),
                                conf["init_max_R_deg"] * torch.rand(num, generator=generator), generator)
                  for pair in batch]
        # Train-mode BatchNorm updates its statistics in the forward pass: keep them to undo a skipped step.
        saved_buffers = {name: buffer.clone() for name, buffer in learner.named_buffers()}
        losses, final_errors = zip(*(reprojection_loss(pair, T, per_level, conf) for pair, T, per_level
                                     in zip(batch, T_init, learner(batch, T_init))))
        loss = torch.cat(losses).mean()
        optimizer.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
        step += 1
        if not torch.isfinite(loss) or not _finite_gradients(learner.parameters()):
            skipped += 1
            logger.warning("Step %d: non-finite loss or gradient (pairs %s), step skipped.",
                           step, [pair.name for pair in batch])
            with torch.no_grad():
                for name, buffer in learner.named_buffers():
                    buffer.copy_(saved_buffers[name])
        else:
            torch.nn.utils.clip_grad_norm_(learner.parameters(), conf["clip_grad"])
            optimizer.step()
        median_error = torch.cat(final_errors).median().item()
        progress.set_postfix(loss=f"{loss.item():.2f}", final_px=f"{median_error:.2f}", skipped=skipped)
        progress.update()
        if step % conf["checkpoint_every"] == 0 or step == conf["num_steps"]:
            save()
    progress.close()
    if not checkpoint_path.exists():  # nothing left to train: still leave a checkpoint behind
        save()
    return checkpoint_path


def export_weights(checkpoint: Path, destination: Path) -> Path:
    """A copy of a training checkpoint without the optimizer state: what gets shipped."""
    content = read_checkpoint(checkpoint)
    extractor_state, dampings = split_model_state(content, checkpoint)
    extractor = trainable_extractor(content["conf"]["extractor"], content["conf"].get("extractor_conf"))
    load_extractor_state(extractor, extractor_state, checkpoint)
    write_checkpoint(destination, extractor, dampings, conf=content["conf"], step=content["step"])
    return Path(destination)


def main(out_dir: Path, conf: dict | None = None) -> Path:
    """`pixloc train`: build the pairs described by conf["data"], then train."""
    conf = merge_conf(default_conf, conf)
    return train(training_pairs(conf), out_dir, conf)
