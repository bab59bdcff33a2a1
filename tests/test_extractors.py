"""Feature extractors: pyramid contract, determinism, PixLoc checkpoint layout and its errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pixloc_core.extractors import (
    DEFAULT, CheckpointError, available_extractors, build_unet, load_extractor,
)
from pixloc_core.extractors.base import STRIDES, widened
from bench import basin
from pixloc_core.extractors.checkpoint import write_checkpoint

HEIGHT, WIDTH = 100, 150  # deliberately not multiples of 16


def textured_images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: smooth blobs plus fine noise, i.e. texture at several scales."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, HEIGHT // 10, WIDTH // 10, generator=generator)
    coarse = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * torch.rand(batch, 3, HEIGHT, WIDTH, generator=generator)).clamp(0, 1)


def random_unet(name: str, seed: int = 0) -> torch.nn.Module:
    """A UNet with random weights AND non-trivial BatchNorm statistics (fresh ones are 0 / 1)."""
    torch.manual_seed(seed)
    extractor = build_unet(name)
    for module in extractor.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return extractor.eval()


def pixloc_checkpoint(extractor: torch.nn.Module, dampings_finest_first: torch.Tensor) -> dict:
    """A dict laid out exactly as PixLoc's checkpoint_best.tar (TwoViewRefiner state dict)."""
    model = {f"extractor.{key}": value for key, value in extractor.state_dict().items()}
    for index, const in enumerate(dampings_finest_first):
        model[f"optimizer.{index}.dampingnet.const"] = const
    return {"model": model, "epoch": 12, "conf": {"model": {"extractor": {"name": "unet", "encoder": "vgg16"}}}}


@pytest.fixture(scope="module")
def vgg16_checkpoint(tmp_path_factory) -> tuple:
    extractor = random_unet("unet-vgg16")
    dampings = torch.randn(3, 6)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_best.tar"
    torch.save(pixloc_checkpoint(extractor, dampings), path)
    return path, extractor, dampings


def extractors_under_test() -> dict:
    return {"classic": load_extractor("classic"), "intensity": load_extractor("intensity"),
            "unet-small": random_unet("unet-small"), "unet-vgg16": random_unet("unet-vgg16")}


@pytest.fixture(scope="module")
def pyramids() -> dict:
    images = textured_images()
    return {name: extractor.extract(images) for name, extractor in extractors_under_test().items()}


def test_registry():
    assert DEFAULT in available_extractors()
    assert {"classic", "intensity"} <= set(available_extractors())
    with pytest.raises(ValueError, match="unknown extractor 'sift'"):
        load_extractor("sift")
    with pytest.raises(ValueError, match="needs weights"):
        load_extractor("unet-vgg19")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_extractor("classic", sigmaa=2.0)
    assert load_extractor("classic", max_size=512).max_size == 512


@pytest.mark.parametrize("name", ["classic", "intensity", "unet-small", "unet-vgg16"])
def test_pyramid_contract(pyramids, name):
    pyramid = pyramids[name]
    assert [level.stride for level in pyramid] == list(STRIDES)
    for level in pyramid:
        size = (round(HEIGHT / level.stride), round(WIDTH / level.stride))
        assert level.features.shape[0] == 2 and level.features.shape[-2:] == size
        assert level.confidence.shape == (2, *size)
        torch.testing.assert_close(level.features.norm(dim=1), torch.ones(2, *size))
        assert (level.confidence > 0).all() and (level.confidence <= 1).all()
        assert torch.isfinite(level.features).all()


def test_unet_channels(pyramids):
    assert [level.features.shape[1] for level in pyramids["unet-vgg16"]] == [128, 128, 32]
    assert [level.features.shape[1] for level in pyramids["unet-small"]] == [16, 16, 16]


def test_classic_is_deterministic_and_textured(pyramids):
    again = load_extractor("classic").extract(textured_images())
    for level, repeated in zip(pyramids["classic"], again):
        assert torch.equal(level.features, repeated.features)
    # The confidence follows texture: a flat image is much less confident than a textured one.
    flat = load_extractor("classic").extract(torch.full((1, 3, HEIGHT, WIDTH), 0.5))
    assert flat[-1].confidence.max() < 0.01 < pyramids["classic"][-1].confidence.median()


@pytest.mark.parametrize("name", ["classic", "intensity"])
def test_weight_free_extractors_run_where_they_were_moved(name):
    """On a GPU worker `classic` once ran on the CPU: `extract` took the device of its (no) weights.
    The meta device stands in for a GPU here: a CPU image must be computed where the module is."""
    extractor = load_extractor(name).to("meta")
    assert all(level.features.device.type == "meta" for level in extractor.extract(textured_images()))
    assert extractor.extractor_id == load_extractor(name).extractor_id  # the buffer is not a weight


def test_classic_coarse_level_has_the_wider_basin(pyramids):
    """A shift of 16 image pixels barely changes the coarse features but decorrelates the fine ones."""
    def correlation_after_shift(level, cells: int) -> float:
        return (level.features[..., cells:] * level.features[..., :-cells]).sum(1).mean().item()

    coarse, _, fine = pyramids["classic"]
    assert correlation_after_shift(coarse, 1) > correlation_after_shift(fine, 16) + 0.2


def test_widened_level(pyramids):
    """The coarsest level averaged over (2 r + 1)^2 cells (fewer at the border), the features
    normalised again; the same on a single image as on the batch; smoother than the level itself."""
    level = pyramids["classic"][0]
    wide = widened(level, 1)
    assert wide.stride == level.stride and wide.features.shape == level.features.shape
    y, x = 2, 3  # an inner cell: the mean of its 3 x 3 neighbourhood
    window = level.features[:, :, y - 1:y + 2, x - 1:x + 2].mean((-2, -1))
    torch.testing.assert_close(wide.features[:, :, y, x], F.normalize(window, dim=1))
    corner = level.features[:, :, :2, :2].mean((-2, -1))  # the 2 x 2 cells of the window inside the image
    torch.testing.assert_close(wide.features[:, :, 0, 0], F.normalize(corner, dim=1))
    torch.testing.assert_close(wide.confidence[:, y, x], level.confidence[:, y - 1:y + 2, x - 1:x + 2].mean((-2, -1)))
    single = widened(level[1], 1)
    torch.testing.assert_close(single.features, wide.features[1])
    torch.testing.assert_close(single.confidence, wide.confidence[1])

    def correlation_after_shift(features: torch.Tensor) -> float:
        return (features[..., 1:] * features[..., :-1]).sum(1).mean().item()

    assert correlation_after_shift(widened(level, 3).features) > correlation_after_shift(level.features) + 0.05


def test_pixloc_checkpoint_round_trip(vgg16_checkpoint):
    path, original, dampings = vgg16_checkpoint
    loaded = load_extractor("unet-vgg16", checkpoint=path)
    images = textured_images(batch=1)
    for expected, actual in zip(original.extract(images), loaded.extract(images)):
        assert torch.equal(expected.features, actual.features)
        assert torch.equal(expected.confidence, actual.confidence)
    # Kept in PixLoc order (finest first): the aligner's load_dampings flips them.
    assert torch.equal(loaded.dampings, dampings)
    assert loaded.extractor_id == original.extractor_id


def test_own_checkpoint_round_trip_and_stable_id(tmp_path):
    extractor, dampings = random_unet("unet-small", seed=3), torch.randn(3, 6)
    path = tmp_path / "small.tar"
    write_checkpoint(path, extractor, dampings, conf={"extractor": "unet-small"}, step=7)
    loaded = load_extractor("unet-small", checkpoint=path)
    assert torch.equal(loaded.dampings, dampings)
    images = textured_images(batch=1)
    torch.testing.assert_close(loaded.extract(images)[-1].features, extractor.extract(images)[-1].features,
                               rtol=0, atol=0)
    # extractor_id is the feature store's key: it must not depend on the process.
    script = ("from pixloc_core.extractors import load_extractor; import sys; "
              "print(load_extractor('unet-small', checkpoint=sys.argv[1]).extractor_id, "
              "load_extractor('classic').extractor_id)")
    other = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    assert other.stdout.split() == [loaded.extractor_id, load_extractor("classic").extractor_id]
    assert loaded.extractor_id != random_unet("unet-small", seed=4).extractor_id


def test_broken_checkpoints(tmp_path, vgg16_checkpoint):
    path, extractor, dampings = vgg16_checkpoint
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated.tar: not a loadable torch checkpoint"):
        load_extractor("unet-vgg16", checkpoint=truncated)

    with pytest.raises(CheckpointError, match="missing.tar: checkpoint not found"):
        load_extractor("unet-vgg16", checkpoint=tmp_path / "missing.tar")

    pickled_code = tmp_path / "code.tar"
    torch.save({"model": {}, "hook": subprocess.CompletedProcess(["x"], 0)}, pickled_code)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_extractor("unet-vgg16", checkpoint=pickled_code)

    no_model = tmp_path / "no_model.tar"
    torch.save({"state_dict": {}}, no_model)
    with pytest.raises(CheckpointError, match="'model' state dict"):
        load_extractor("unet-vgg16", checkpoint=no_model)

    layout = pixloc_checkpoint(extractor, dampings)
    del layout["model"]["extractor.decoder.3.layers.1.running_var"]
    layout["model"]["extractor.head.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.tar"
    torch.save(layout, partial)
    with pytest.raises(CheckpointError, match=r"missing keys: extractor\.decoder\.3\.layers\.1\.running_var; "
                                              r"unexpected keys: extractor\.head\.weight"):
        load_extractor("unet-vgg16", checkpoint=partial)

    # VGG16 weights into the VGG19 network: the extra convolutions are missing.
    with pytest.raises(CheckpointError, match=r"missing keys: extractor\.encoder\.2\.7\.bias"):
        load_extractor("unet-vgg19", checkpoint=path)


def test_no_nan_checkpoint_is_written(tmp_path):
    extractor = random_unet("unet-small")
    with torch.no_grad():
        extractor.adaptation[0][0].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        write_checkpoint(tmp_path / "nan.tar", extractor, torch.zeros(3, 6), conf={})
    assert not (tmp_path / "nan.tar").exists()


def test_basin_benchmark_smoke(tmp_path):
    """CI-sized basin benchmark: the JSON keys, a plot, and small errors that converge."""
    report = basin.main(tmp_path / "basin.json", quick=True, extractors=["classic"])
    written = json.loads((tmp_path / "basin.json").read_text())
    assert written["extractors"].keys() == {"classic", "classic+wide3"}  # the coarsest level alone, a wide start
    for name, entry in written["extractors"].items():
        assert len(entry["bins"]) == 16 and entry["ms_per_image"] > 0
        assert set(entry["bins"][0]) >= {"t_m", "R_deg", "success_rate"}
        easiest = report["extractors"][name]["bins"][0]
        assert (easiest["t_m"], easiest["R_deg"]) == (0.3, 2.0) and easiest["success_rate"] >= 0.75, name
    assert written["extractors"]["classic+wide3"]["wide_cells"] == 3
    assert (tmp_path / "basin.png").stat().st_size > 0
