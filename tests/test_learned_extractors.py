"""ALIKE and XFeat: shapes, known values (wrong layer order fails), determinism, matching on a
shifted image, weights-file errors, and (with onnxruntime) the whole maps against the ONNX graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixloc_core.extractors import CheckpointError, available_extractors, load_extractor
from pixloc_core.extractors.alike import VARIANTS
from pixloc_core.mapping.matching import match_descriptors
from pixloc_core.train import synthetic_pairs

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LEARNED = [*VARIANTS, "xfeat"]
ONNX = Path(__file__).resolve().parents[2] / "shared" / "weights" / "xfeat" / "xfeat_lighterglue.onnx"


@pytest.fixture(scope="module")
def fixture() -> dict:
    with np.load(FIXTURES / "learned_features.npz") as data:
        return dict(data)


def upsampled(image: np.ndarray, factor: int) -> torch.Tensor:
    """As tests/fixtures/make_learned_features.py feeds the networks."""
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(tensor, scale_factor=factor, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def extractors() -> dict:
    return {name: load_extractor(name) for name in LEARNED}


def test_registered_and_shipped(extractors):
    assert set(LEARNED) <= set(available_extractors())
    ids = {extractor.extractor_id for extractor in extractors.values()}
    assert len(ids) == len(LEARNED) and all(i.split("-")[0] in ("alike", "xfeat") for i in ids)
    # The config is part of the id: a store of other pyramid settings is never mixed in.
    assert load_extractor("alike-t", coarse="encoder").extractor_id != extractors["alike-t"].extractor_id


@pytest.mark.parametrize("name", LEARNED)
def test_pyramid_contract(extractors, name):
    height, width = 100, 150  # not multiples of 32: padded inside, cropped back
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    pyramid = extractors[name].extract(images)
    expected_strides = [16, 8, 4] if name == "xfeat" else [16, 4, 1]
    assert [level.stride for level in pyramid] == expected_strides
    for level in pyramid:
        size = (round(height / level.stride), round(width / level.stride))
        assert level.features.shape[0] == 2 and level.features.shape[-2:] == size
        assert level.confidence.shape == (2, *size)
        torch.testing.assert_close(level.features.norm(dim=1), torch.ones(2, *size))
        assert (level.confidence > 0).all() and (level.confidence <= 1).all()
    channels = 64 if name == "xfeat" else VARIANTS[name].dim
    assert pyramid[-1].features.shape[1] == channels
    keypoints = extractors[name].keypoints(images[:1])[0]
    assert keypoints.xy.shape[1] == 2 and keypoints.descriptors.shape == (len(keypoints.xy), channels)
    assert (keypoints.xy >= 0).all() and (keypoints.xy <= torch.tensor([width, height])).all()
    torch.testing.assert_close(keypoints.descriptors.norm(dim=1), torch.ones(len(keypoints.xy)))


def test_encoder_coarse_level():
    pyramid = load_extractor("alike-n", coarse="encoder").extract(torch.rand(1, 3, 64, 96))
    assert pyramid[0].features.shape[1] == VARIANTS["alike-n"].dim // 2  # stride-8 and stride-32 features


def test_coarse_levels_pooled(extractors, fixture):
    """The stride-1 map area-averaged to each coarse level; the finest as the network gives it."""
    images = upsampled(fixture["image"], 2)
    extractor = extractors["alike-t"]
    assert extractor.conf.coarse == "pooled"
    *coarse, finest = extractor.extract(images)
    descriptors = extractor.dense(images).descriptors
    for level in coarse:
        area_averaged = F.interpolate(descriptors, size=level.features.shape[-2:], mode="area")
        torch.testing.assert_close(level.features, F.normalize(area_averaged, dim=1))
    torch.testing.assert_close(finest.features, descriptors)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_alike_known_values(extractors, fixture, name):
    x, y = torch.from_numpy(fixture["alike_pixels"]).T
    output = extractors[name].dense(upsampled(fixture["image"], 2))
    torch.testing.assert_close(output.descriptors[0][:, y, x].T, torch.from_numpy(fixture[f"{name}_descriptors"]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(output.scores[0, y, x], torch.from_numpy(fixture[f"{name}_scores"]), atol=1e-4, rtol=0)


def test_xfeat_matches_the_onnx_export(extractors, fixture):
    """The fixture values were computed by onnxruntime with the original ONNX graph."""
    x, y = torch.from_numpy(fixture["xfeat_cells"]).T
    with torch.no_grad():
        output = extractors["xfeat"].dense(upsampled(fixture["image"], 4))
    torch.testing.assert_close(output.descriptors[0][:, y, x].T, torch.from_numpy(fixture["xfeat_descriptors"]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(output.reliability[0, y, x], torch.from_numpy(fixture["xfeat_reliability"]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(output.keypoint_logits[0][:, y, x].T, torch.from_numpy(fixture["xfeat_logits"]),
                               atol=2e-3, rtol=1e-4)


def test_xfeat_whole_maps_against_onnxruntime(extractors):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    if not ONNX.is_file():
        pytest.skip(f"{ONNX} not found")
    model = onnx.load(str(ONNX))
    names = ("div", "sigmoid")  # the export's normalised descriptors and reliability
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.rand(1, 3, 480, 640, generator=torch.Generator().manual_seed(1))
    descriptors, reliability = session.run(list(names), {"image0": images.numpy(), "image1": images.numpy()})
    with torch.no_grad():
        output = extractors["xfeat"].dense(images)
    torch.testing.assert_close(output.descriptors, torch.from_numpy(descriptors[:1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(output.reliability, torch.from_numpy(reliability[:1, 0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["alike-t", "xfeat"])
def test_deterministic(extractors, fixture, name):
    images = upsampled(fixture["image"], 2)
    first, second = extractors[name].extract(images), extractors[name].extract(images)
    for a, b in zip(first, second):
        assert torch.equal(a.features, b.features) and torch.equal(a.confidence, b.confidence)


@pytest.mark.parametrize("name", ["alike-t", "xfeat"])
def test_one_pass_gives_the_pyramid_and_the_keypoints(extractors, fixture, name):
    images = upsampled(fixture["image"], 2)
    pyramid, (keypoints,) = extractors[name].extract_with_keypoints(images)
    for together, alone in zip(pyramid, extractors[name].extract(images)):
        assert torch.equal(together.features, alone.features) and torch.equal(together.confidence, alone.confidence)
    alone = extractors[name].keypoints(images)[0]
    assert len(keypoints.xy) > 10 and torch.equal(keypoints.xy, alone.xy)
    assert torch.equal(keypoints.descriptors, alone.descriptors)


@pytest.fixture(scope="module")
def street_image() -> torch.Tensor:
    conf = {"width": 320, "height": 240, "num_points": 64, "max_baseline_m": 1.0, "max_rotation_deg": 1.0}
    return synthetic_pairs(1, 0, conf)[0].images[:1]


@pytest.mark.parametrize("name", ["alike-t", "alike-n", "xfeat"])
def test_keypoints_match_across_a_shift(extractors, street_image, name):
    """Two crops of one image shifted by (24, 8) px: mutual nearest-neighbour matches of the
    keypoint descriptors land within 2 px of the true shift (a wrong channel order or head fails)."""
    dx, dy = 24, 8
    first, second = street_image[..., dy:, :-dx], street_image[..., :-dy, dx:]
    keypoints0, keypoints1 = extractors[name].keypoints(first)[0], extractors[name].keypoints(second)[0]
    matches = match_descriptors(keypoints0.descriptors, keypoints1.descriptors, ratio_threshold=1.0, mutual=True)
    expected = keypoints0.xy[matches[:, 0]] + torch.tensor([-dx, dy])
    error = (keypoints1.xy[matches[:, 1]] - expected).norm(dim=1)
    assert len(matches) >= 40
    assert (error < 2).float().mean() >= 0.9


@pytest.mark.parametrize("name", ["alike-n", "xfeat"])
def test_missing_or_corrupt_weights(tmp_path, name):
    missing = tmp_path / "missing.pth"
    with pytest.raises(CheckpointError, match=r"missing\.pth: weights file not found"):
        load_extractor(name, checkpoint=missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file" * 10)
    with pytest.raises(CheckpointError, match=r"corrupt\.pth: not a loadable torch weights file") as error:
        load_extractor(name, checkpoint=corrupt)
    assert "\n" not in str(error.value)
    other = tmp_path / "other.pth"  # a valid file of another network
    torch.save(load_extractor("alike-t").state_dict(), other)
    if name != "alike-t":
        with pytest.raises(CheckpointError, match=r"other\.pth: checkpoint does not fit"):
            load_extractor(name, checkpoint=other)


def test_benchmark_extractor_specs(tmp_path):
    """The benchmarks' names of extractors: config overrides, or a checkpoint labelled by its folder."""
    from bench import ExtractorSpec

    spec = ExtractorSpec.parse("alike-t:coarse=encoder,min_confidence=0.1")
    assert spec.label == "alike-t:coarse=encoder,min_confidence=0.1"
    extractor = spec.load()
    assert (extractor.conf.coarse, extractor.conf.min_confidence) == ("encoder", 0.1)
    assert ExtractorSpec.parse("xfeat").label == "xfeat"
    trained = ExtractorSpec.parse(f"alike-n={tmp_path / 'train-lund' / 'checkpoint_last.tar'}")
    assert trained.label == "alike-n=train-lund"
    assert trained.cli_args() == ["--extractor", "alike-n", "--checkpoint", str(tmp_path / "train-lund" / "checkpoint_last.tar")]
