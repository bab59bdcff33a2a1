"""`pixloc features` on real Ray (the session's local cluster) with the default extractor, into a
local and an S3 (moto) store: contents, halo duplication, resume after an interrupted job,
refusal of a store of another extractor or map."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from cluster.runtime import init_ray
from pixloc_core.shards import ShardIndex
from cluster.store import (FEATURE_DTYPE, FORMAT_VERSION, MANIFEST_FILE, WIDE_LEVEL, XYZ_DTYPE, FeatureStore,
                           PartitionNotFound, StoreMismatchError, column_vectors, partition_dir)
from jobs import cli, features
from pixloc_core.extractors import DEFAULT, load_extractor
from pixloc_core.extractors.base import resize_longest_side, sample_level, widened
from pixloc_core.map_io import SceneMap

WIDTH, HEIGHT, FOCAL = 160, 120, 100.0
NUM_IMAGES = 6
# Cameras 0.5 m apart along x in 1.5 m cells: two cells of three images each, and a 0.3 m halo
# that holds the neighbour cell's nearest image.
SHARDS = {"cell_size_m": 1.5, "halo_m": 0.3}
CELLS = {"x+0000_y+0000": {"core": [1, 2, 3], "halo": [4]},
         "x+0001_y+0000": {"core": [4, 5, 6], "halo": [3]}}
CONF = {"workers": 1, "batch_size": 2}  # one actor: its start-up dominates these tiny jobs


def write_map(root: Path) -> tuple[Path, Path]:
    """A tiny map (cameras in a row looking at random points 4-6 m ahead; observations are the
    points' exact projections) and textured reference images."""
    rng = np.random.default_rng(0)
    map_dir, images_dir = root / "map", root / "images"
    images_dir.mkdir(parents=True)
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
        camera_id=1, model="PINHOLE", width=WIDTH, height=HEIGHT, params=[FOCAL, FOCAL, WIDTH / 2, HEIGHT / 2]))
    points = rng.uniform([-2.0, -2.0, 4.0], [2.0 + 0.5 * NUM_IMAGES, 2.0, 6.0], (400, 3))
    tracks = [pycolmap.Track() for _ in points]
    centers = {}
    for image_id in range(1, NUM_IMAGES + 1):
        center = np.array([0.5 * image_id - 0.25, 0.0, 0.0])
        p_cam = points - center
        xy = FOCAL * p_cam[:, :2] / p_cam[:, 2:] + [WIDTH / 2, HEIGHT / 2]
        visible = np.flatnonzero((xy >= 0).all(1) & (xy < [WIDTH, HEIGHT]).all(1))
        name = f"ref_{image_id}.png"
        centers[name] = center
        reconstruction.add_image_with_trivial_frame(
            pycolmap.Image(name=name, camera_id=1, image_id=image_id,
                           points2D=[pycolmap.Point2D(xy[i]) for i in visible]),
            pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), -center))
        for point2D_index, point_index in enumerate(visible):
            tracks[point_index].add_element(image_id, point2D_index)
        texture = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
        Image.fromarray(texture).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR).save(images_dir / name)
    for xyz, track in zip(points, tracks):
        if track.length() >= 2:
            reconstruction.add_point3D(xyz, track)
    shards = ShardIndex.build(centers, SHARDS)
    assert {cell: shards.images_of(cell) for cell in shards.cell_ids} == {
        cell: [f"ref_{i}.png" for i in members["core"] + members["halo"]] for cell, members in CELLS.items()}
    SceneMap(reconstruction, shards=shards).save(map_dir, "test", images_dir, skipped=[])
    return map_dir, images_dir


@pytest.fixture(scope="module")
def tiny_map(tmp_path_factory) -> tuple[Path, Path]:
    return write_map(tmp_path_factory.mktemp("tiny_map"))


def observations(reconstruction: pycolmap.Reconstruction, image_ids: list[int]) -> dict[tuple[int, int], np.ndarray]:
    """(point3D_id, image_id) -> observed pixel, for the given images."""
    pixels = {}
    for image_id in image_ids:
        image = reconstruction.images[image_id]
        for point2D in image.points2D:
            if point2D.has_point3D():
                pixels[point2D.point3D_id, image_id] = point2D.xy
    return pixels


def test_job_writes_every_observation_into_each_cell_of_its_image(ray_cluster, tiny_map, tmp_path, monkeypatch):
    map_dir, images_dir = tiny_map
    store_url = str(tmp_path / "store")
    # The driver plans from the map's compact tables: it never reads the model (the 3D points).
    monkeypatch.setattr(SceneMap, "load", lambda *args, **kwargs: pytest.fail("the driver read the model"))
    assert cli.main(["features", "--map", str(map_dir), "--images", str(images_dir), "--store", store_url,
                     "--workers", "2"]) == 0
    monkeypatch.undo()

    reconstruction = pycolmap.Reconstruction(map_dir / "model")
    extractor = load_extractor(DEFAULT)  # what a store is made with unless told otherwise
    fingerprint = SceneMap.load(map_dir).fingerprint
    store = FeatureStore.open(store_url, extractor_id=extractor.extractor_id, map_fingerprint=fingerprint)
    assert store.info.strides == (16, 4, 1) and store.info.wide_cells == features.NEW_STORE_WIDE_CELLS
    for cell, members in CELLS.items():
        expected = observations(reconstruction, members["core"] + members["halo"])
        for level in [0, 1, 2, WIDE_LEVEL]:
            store.verify(cell, level)
            table = store.load_table(cell, level)
            keys = list(zip(table.column("point3D_id").to_pylist(), table.column("image_id").to_pylist()))
            assert sorted(keys) == sorted(expected)  # each observation once, halo images included
            xyz = column_vectors(table.column("xyz"), XYZ_DTYPE)
            np.testing.assert_array_equal(xyz, [reconstruction.points3D[p].xyz for p, _ in keys])

    # The stored features are those of the extractor at the observed pixels (float16 precision).
    image_id = 3
    rgb = np.asarray(Image.open(images_dir / "ref_3.png").convert("RGB"))
    pyramid = extractor.extract(resize_longest_side(rgb, extractor.max_size)[0][None])
    levels = {2: pyramid[2][0], WIDE_LEVEL: widened(pyramid[0][0], features.NEW_STORE_WIDE_CELLS)}
    for cell, (level, feature_map) in itertools.product(CELLS, levels.items()):
        table = store.load_table(cell, level, image_ids=[image_id])
        pixels = observations(reconstruction, [image_id])
        p2d = torch.tensor(np.array([pixels[p, image_id] for p in table.column("point3D_id").to_pylist()]))
        expected_features, expected_confidence = sample_level(feature_map, p2d.float(), torch.tensor([WIDTH, HEIGHT]))
        stored = column_vectors(table.column("feature"), FEATURE_DTYPE).astype(np.float32)
        np.testing.assert_allclose(stored, expected_features.numpy(), atol=2e-3)
        np.testing.assert_allclose(table.column("confidence").to_numpy(), expected_confidence.numpy(), rtol=1e-6)


def test_a_failed_job_publishes_no_incomplete_cell_and_resumes(ray_cluster, tiny_map, tmp_path):
    map_dir, images_dir = tiny_map
    broken_images = tmp_path / "images"
    broken_images.mkdir()
    for path in images_dir.iterdir():
        (broken_images / path.name).write_bytes(path.read_bytes())
    (broken_images / "ref_6.png").write_bytes(b"not a png")
    store_url = str(tmp_path / "store")
    with pytest.raises(features.ReferenceImageError, match="1 reference image.*ref_6.png: cannot decode"):
        features.main(map_dir, broken_images, store_url, CONF)
    store = FeatureStore.open(store_url)
    with pytest.raises(PartitionNotFound):  # image 6 never got committed
        store.load_table("x+0001_y+0000", 0)
    store.verify("x+0000_y+0000", 0)  # the other cell is complete and visible
    committed = {image_id for commit in store.commits() for image_id in commit.image_ids}
    assert committed == {1, 2, 3, 4, 5}

    (broken_images / "ref_6.png").write_bytes((images_dir / "ref_6.png").read_bytes())
    resumed = features.main(map_dir, broken_images, store_url, CONF)
    assert resumed["extracted"] == NUM_IMAGES - len(committed)
    assert resumed["skipped"] == len(committed)
    reconstruction = pycolmap.Reconstruction(map_dir / "model")
    for cell, members in CELLS.items():
        store.verify(cell, 0)
        table = store.load_table(cell, 0, ["point3D_id", "image_id"])
        keys = zip(table.column("point3D_id").to_pylist(), table.column("image_id").to_pylist())
        assert sorted(keys) == sorted(observations(reconstruction, members["core"] + members["halo"]))
    assert features.main(map_dir, broken_images, store_url, CONF)["extracted"] == 0


def test_s3_store_with_one_aggregated_row_per_point(ray_cluster, tiny_map, s3_bucket):
    map_dir, images_dir = tiny_map
    store_url = f"s3://{s3_bucket}/features/tiny"
    stats = features.main(map_dir, images_dir, store_url, {**CONF, "aggregate": True})
    assert stats["extracted"] == NUM_IMAGES
    reconstruction = pycolmap.Reconstruction(map_dir / "model")
    store = FeatureStore.open(store_url, map_fingerprint=SceneMap.load(map_dir).fingerprint)
    assert store.info.aggregated
    for cell, members in CELLS.items():
        points = {point3D_id for point3D_id, _ in observations(reconstruction, members["core"] + members["halo"])}
        reference = store.load_cell(cell, 0)
        assert reference.points3D.shape == (len(points), 3)
        assert torch.allclose(reference.features.norm(dim=1), torch.ones(len(points)), atol=2e-3)


def test_refuses_to_mix_extractors_or_maps_in_one_store(tiny_map, tmp_path):
    map_dir, images_dir = tiny_map
    store_url = str(tmp_path / "store")
    classic_id = load_extractor("classic").extractor_id
    intensity_id = load_extractor("intensity").extractor_id
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "store.json").write_text(json.dumps({
        "extractor_id": classic_id, "map_fingerprint": "b" * 64, "strides": [16, 4, 1],
        "channels": [1, 1, 1], "aggregated": False, "format_version": FORMAT_VERSION}))
    fingerprint = SceneMap.load(map_dir).fingerprint
    with pytest.raises(StoreMismatchError, match=f"expected {fingerprint}, found {'b' * 64}"):
        features.main(map_dir, images_dir, store_url, {**CONF, "extractor": "classic"})
    with pytest.raises(StoreMismatchError, match=f"expected {intensity_id}, found {classic_id}"):
        features.main(map_dir, images_dir, store_url, {**CONF, "extractor": "intensity"})


def test_a_store_keeps_its_wide_level_setting(ray_cluster, tiny_map, tmp_path):
    """A store made before the wide level (store.json without wide_cells) is filled on as it is by
    default; asking for the wide level there is refused, not half added."""
    map_dir, images_dir = tiny_map
    store_url = str(tmp_path / "store")
    features.main(map_dir, images_dir, store_url, {**CONF, "wide_cells": 0})
    info_file = tmp_path / "store" / "store.json"
    info = json.loads(info_file.read_text())
    assert info.pop("wide_cells") == 0
    info_file.write_text(json.dumps(info))  # as written before the field existed
    fingerprint = SceneMap.load(map_dir).fingerprint
    store = FeatureStore.open(store_url, map_fingerprint=fingerprint)
    assert store.info.wide_cells == 0 and WIDE_LEVEL not in store.info.levels()
    assert features.main(map_dir, images_dir, store_url, CONF)["extracted"] == 0  # every cell current
    with pytest.raises(PartitionNotFound):
        store.load_cell(next(iter(CELLS)), WIDE_LEVEL)
    with pytest.raises(StoreMismatchError, match="store written with other settings"):
        features.main(map_dir, images_dir, store_url, {**CONF, "wide_cells": 3})


def test_a_store_keeps_its_extractor(ray_cluster, tiny_map, tmp_path):
    """A job that names no extractor fills an existing store on with the store's own: a store made
    before the default changed stays what it is, instead of being refused as another extractor's."""
    map_dir, images_dir = tiny_map
    store_url = str(tmp_path / "store")
    features.main(map_dir, images_dir, store_url, {**CONF, "extractor": "classic"})
    store = FeatureStore.open(store_url, extractor_id=load_extractor("classic").extractor_id)
    (tmp_path / "store" / store.manifest("x+0000_y+0000", 2)["files"][0]["path"]).unlink()  # to recompute
    assert features.main(map_dir, images_dir, store_url, CONF)["partitions_repaired"] == 1
    store.verify("x+0000_y+0000", 2)
    assert FeatureStore.open(store_url).info.extractor_name == "classic" != DEFAULT


def test_init_ray_leaves_a_ray_it_did_not_start_running(ray_cluster):
    with init_ray(num_cpus=1) as session:
        assert not session.started
    assert ray_cluster.is_initialized() and ray_cluster.cluster_resources()["CPU"] == 2


def test_cli_reports_missing_reference_images_in_one_line(tiny_map, tmp_path, capsys):
    map_dir, _ = tiny_map
    assert cli.main(["features", "--map", str(map_dir), "--images", str(tmp_path), "--store",
                     str(tmp_path / "store")]) == 1
    assert capsys.readouterr().err == (f"pixloc features: {tmp_path}: 6 reference images of {map_dir} not found, "
                                       "e.g. ref_1.png, ref_2.png, ref_3.png\n")
    # Nothing was computed: no store.json that would refuse a rerun with another extractor.
    assert not FeatureStore.exists(str(tmp_path / "store"))


def test_a_rerun_recomputes_exactly_the_damaged_partitions(ray_cluster, tiny_map, tmp_path):
    map_dir, images_dir = tiny_map
    store_url = str(tmp_path / "store")
    features.main(map_dir, images_dir, store_url, CONF)
    store = FeatureStore.open(store_url)
    expected = {(cell, level): store.load_table(cell, level).sort_by([("image_id", "ascending"),
                                                                      ("point3D_id", "ascending")])
                for cell in CELLS for level in range(3)}
    manifests = {partition: store.manifest(*partition) for partition in expected}
    manifest_files = {partition: tmp_path / "store" / partition_dir(*partition) / MANIFEST_FILE for partition in expected}
    written = {partition: path.stat().st_mtime_ns for partition, path in manifest_files.items()}
    deleted = tmp_path / "store" / manifests["x+0000_y+0000", 2]["files"][0]["path"]
    deleted.unlink()
    flipped = tmp_path / "store" / manifests["x+0001_y+0000", 1]["files"][0]["path"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 1
    flipped.write_bytes(bytes(data))

    # Without --repair only the missing file is seen (a flipped bit keeps the size).
    assert features.main(map_dir, images_dir, store_url, CONF)["partitions_repaired"] == 1
    assert features.main(map_dir, images_dir, store_url, {**CONF, "repair": True})["partitions_repaired"] == 1
    assert features.main(map_dir, images_dir, store_url, {**CONF, "repair": True})["partitions_repaired"] == 0
    for partition, table in expected.items():
        store.verify(*partition)
        repaired = store.load_table(*partition).sort_by([("image_id", "ascending"), ("point3D_id", "ascending")])
        assert repaired.equals(table)
        rewritten = partition in (("x+0000_y+0000", 2), ("x+0001_y+0000", 1))
        assert (manifest_files[partition].stat().st_mtime_ns != written[partition]) == rewritten
