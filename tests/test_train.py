"""Learning from poses: the loss goes down, resumption is exact, NaN batches are skipped."""
from __future__ import annotations

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from pixloc_core import train
from pixloc_core.geometry import perturb_poses
from pixloc_core.extractors import CheckpointError, load_extractor
from pixloc_core.extractors.checkpoint import read_checkpoint

TINY = {
    "num_iterations": (2, 2, 2),
    "pairs_per_step": 2,
    "hypotheses_per_pair": 2,
    "checkpoint_every": 1000,
    "learning_rate": 3e-3,
}


@pytest.fixture(scope="module")
def pairs() -> list[train.PosedPair]:
    data = {**train.default_conf["data"], "width": 160, "height": 120, "num_points": 64}
    return train.synthetic_pairs(2, scene_seed=1000, conf=data)


def fixed_loss(extractor, dampings, pairs) -> float:
    """The training loss on fixed initial poses, without gradients."""
    conf = {**train.default_conf, **TINY}
    learner = train.PoseLearner(extractor, conf["num_iterations"]).eval()
    learner.load_raw_dampings(dampings)
    generator = torch.Generator().manual_seed(123)
    T_init = [perturb_poses(pair.T_query, torch.full((4,), 0.5), torch.full((4,), 3.0), generator)
              for pair in pairs]
    with torch.no_grad():
        losses = [train.reprojection_loss(pair, T, per_level, conf)[0]
                  for pair, T, per_level in zip(pairs, T_init, learner(pairs, T_init))]
    return torch.cat(losses).mean().item()


def test_pairs_share_visible_points(pairs):
    for pair in pairs:
        assert pair.images.shape == (2, 3, 120, 160)
        for camera, T in ((pair.reference_camera, pair.T_reference), (pair.query_camera, pair.T_query)):
            p2d, visible = camera.project(T.transform(pair.points3D))
            assert visible.all() and camera.in_image(p2d).all()


def test_training_reduces_the_loss_and_resumes_exactly(pairs, tmp_path):
    start = tmp_path / "start"
    train.train(pairs, start, {**TINY, "num_steps": 0})
    initial = load_extractor("unet-small", checkpoint=start / train.CHECKPOINT_NAME)
    initial_loss = fixed_loss(initial, initial.dampings, pairs)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train(pairs, straight, {**TINY, "num_steps": 8})
    train.train(pairs, resumed, {**TINY, "num_steps": 5})
    assert read_checkpoint(resumed / train.CHECKPOINT_NAME)["step"] == 5
    train.train(pairs, resumed, {**TINY, "num_steps": 8})  # continues from step 5
    assert read_checkpoint(resumed / train.CHECKPOINT_NAME)["step"] == 8

    trained = load_extractor("unet-small", checkpoint=straight / train.CHECKPOINT_NAME)
    again = load_extractor("unet-small", checkpoint=resumed / train.CHECKPOINT_NAME)
    assert trained.extractor_id == again.extractor_id  # same weights, bit for bit
    assert torch.equal(trained.dampings, again.dampings)
    assert not torch.equal(trained.dampings, initial.dampings)  # the dampings learn too
    assert fixed_loss(trained, trained.dampings, pairs) < 0.9 * initial_loss


def test_nan_batch_is_skipped(pairs, tmp_path, caplog):
    poisoned = [train.PosedPair(**{**vars(pair), "images": pair.images.clone()}) for pair in pairs]
    for pair in poisoned:
        pair.images[1, :, 10:20, 10:20] = float("nan")
    train.train(poisoned, tmp_path / "nan", {**TINY, "num_steps": 0})
    before = load_extractor("unet-small", checkpoint=tmp_path / "nan" / train.CHECKPOINT_NAME).extractor_id
    with caplog.at_level("WARNING"):
        train.train(poisoned, tmp_path / "nan", {**TINY, "num_steps": 2})
    assert "non-finite loss or gradient" in caplog.text
    checkpoint = read_checkpoint(tmp_path / "nan" / train.CHECKPOINT_NAME)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values() if value.is_floating_point())
    after = load_extractor("unet-small", checkpoint=tmp_path / "nan" / train.CHECKPOINT_NAME)
    assert after.extractor_id == before  # no update was applied


def test_colmap_model_pairs(pairs, tmp_path):
    """A COLMAP model of one synthetic pair gives back that pair: points, poses and images."""
    pair = pairs[0]
    (tmp_path / "images").mkdir()
    (tmp_path / "model").mkdir()
    model = pycolmap.Reconstruction()
    views = zip(("ref.png", "query.png"), pair.images, (pair.reference_camera, pair.query_camera),
                (pair.T_reference, pair.T_query))
    for image_id, (name, image, camera, T) in enumerate(views, start=1):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / name)
        model.add_camera_with_trivial_rig(camera.double().to_colmap(camera_id=image_id))
        p2d, _ = camera.project(T.transform(pair.points3D))
        keypoints = pycolmap.Point2DList([pycolmap.Point2D(xy) for xy in p2d.double().numpy()])
        model.add_image_with_trivial_frame(
            pycolmap.Image(name=name, camera_id=image_id, image_id=image_id, points2D=keypoints),
            T.double().to_colmap())
    for index, xyz in enumerate(pair.points3D.double().numpy()):
        track = pycolmap.Track()
        track.add_element(1, index)
        track.add_element(2, index)
        model.add_point3D(xyz, track)
    model.write(tmp_path / "model")

    data = {**train.default_conf["data"], "max_size": 160}
    loaded = {p.name: p for p in train.colmap_pairs(tmp_path / "model", tmp_path / "images", data)}
    query = loaded["query.png"]  # its reference is the other image
    torch.testing.assert_close(query.points3D, pair.points3D)
    torch.testing.assert_close(query.T_query.R, pair.T_query.R, atol=1e-5, rtol=0)
    torch.testing.assert_close(query.images, pair.images, atol=1 / 255, rtol=0)

    with pytest.raises(ValueError, match="cannot read COLMAP model"):
        train.colmap_pairs(tmp_path / "images", tmp_path / "images", data)


def test_alike_trains_only_its_confidences_and_the_dampings(pairs, tmp_path):
    """On a pretrained ALIKE the authors' network stays as shipped (weights and BatchNorm
    statistics); the confidence heads and the dampings learn, and the checkpoint loads by name
    with its own extractor id and its dampings."""
    train.train(pairs, tmp_path / "alike", {**TINY, "extractor": "alike-t", "num_steps": 4})
    checkpoint = tmp_path / "alike" / train.CHECKPOINT_NAME
    trained, shipped = load_extractor("alike-t", checkpoint=checkpoint), load_extractor("alike-t")
    assert trained.conf.confidence == "learned" and shipped.conf.confidence == "score"
    trained_state, shipped_state = trained.state_dict(), shipped.state_dict()
    assert set(trained_state) - set(shipped_state) == set(trained.head_state())
    assert all(torch.equal(trained_state[key], value) for key, value in shipped_state.items())
    assert any(head.weight.abs().sum() > 0 for head in trained.confidence_heads)
    assert trained.extractor_id != shipped.extractor_id
    assert trained.dampings.shape == (3, 6)
    assert not torch.equal(trained.dampings, train.PoseLearner(shipped, TINY["num_iterations"]).raw_dampings())

    pyramid = trained.extract(pairs[0].images)
    assert all(((level.confidence > 0) & (level.confidence < 1)).all() for level in pyramid)

    with pytest.raises(CheckpointError, match="a checkpoint of 'alike-t', not of 'alike-n'"):
        load_extractor("alike-n", checkpoint=checkpoint)
