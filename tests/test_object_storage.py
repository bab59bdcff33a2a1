"""Inputs and outputs in object storage (the moto S3 server on 127.0.0.1): images, text files,
maps and results read from and written to s3:// URLs like local paths, with one-line errors."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from jobs import map as map_job
from jobs.cli import main as cli_main
from jobs.results import ResultsWriter, read_results
from pixloc_core import files
from pixloc_core.exif import read_exif_prior
from pixloc_core.files import StorageError, Url
from pixloc_core.images import ImageReadError, image_size, list_images, read_image
from pixloc_core.io import read_poses, read_priors, read_query_list
from pixloc_core.map_io import OBSERVATIONS_FILE, SceneMap, load_map_index
from pixloc_core.mapping import cells

TINY = ["--blocks", "1x1", "--refs", "40", "--queries", "3", "--width", "160", "--height", "120", "--seed", "2"]


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    out = tmp_path_factory.mktemp("s3_scene") / "scene"
    assert cli_main(["synth", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def scene_in_bucket(tiny_scene, s3_bucket) -> Url:
    url = Url(f"s3://{s3_bucket}/datasets/street")
    files.copy_folder(tiny_scene, url)
    return url


def test_locations():
    url = files.location("s3://bucket/a/b/")
    assert isinstance(url, Url) and url == "s3://bucket/a/b" and url.name == "b" and url.parent == "s3://bucket/a"
    assert url / "c.jpg" == "s3://bucket/a/b/c.jpg" and (url / "c.jpg").key == "bucket/a/b/c.jpg"
    assert files.location("/tmp/x").name == "x" and not files.is_remote(files.location("/tmp/x"))
    with pytest.raises(ValueError, match="gs://b/x: unsupported location"):
        files.location("gs://b/x")


def test_files_round_trip_on_s3(s3_bucket):
    folder = Url(f"s3://{s3_bucket}/some/folder")
    files.write_text(folder / "a.txt", "hello")
    files.write_bytes(folder / "sub/b.bin", b"\x00\x01")
    assert files.read_text(folder / "a.txt") == "hello" and files.is_file(folder / "sub/b.bin")
    assert files.list_files(folder) == {"a.txt": 5, "sub/b.bin": 2}
    files.delete(folder / "a.txt")
    assert not files.exists(folder / "a.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files.list_files(Url(f"s3://{s3_bucket}/nothing/here"))


def test_the_local_copy_follows_rewrites_of_the_same_size(s3_bucket, tmp_path, monkeypatch):
    """Remote maps and models are read through a cached local copy. A map updated in place rewrites
    shards.json with new fingerprints of the same length: the copy must not keep the old one."""
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
    fetched = []
    read_bytes = files.read_bytes
    monkeypatch.setattr(files, "read_bytes", lambda place: fetched.append(place) or read_bytes(place))
    folder = Url(f"s3://{s3_bucket}/map")
    files.write_text(folder / "shards.json", '{"fingerprint": "aaaa"}')
    files.write_text(folder / "geo.json", "{}")
    assert (files.local_copy(folder) / "shards.json").read_text() == '{"fingerprint": "aaaa"}'
    assert len(fetched) == 2
    files.write_text(folder / "shards.json", '{"fingerprint": "bbbb"}')
    assert (files.local_copy(folder) / "shards.json").read_text() == '{"fingerprint": "bbbb"}'
    assert fetched[2:] == [folder / "shards.json"]  # the unchanged file is not fetched again
    files.local_copy(folder)
    assert len(fetched) == 3
    next((tmp_path / "cache").rglob("*.versions.json")).write_text("{half written")
    assert (files.local_copy(folder) / "shards.json").read_text() == '{"fingerprint": "bbbb"}'
    assert len(fetched) == 5  # a damaged record of the copy: every file fetched again


def large_geotagged_jpeg(icc_bytes: int) -> bytes:
    """A 1.5-megapixel noise JPEG (about 2 MB) with EXIF GPS and focal length, behind an APP2 (ICC
    profile) segment of `icc_bytes`."""
    import io

    import piexif
    from PIL import Image

    from pixloc_core.exif import camera_exif, gps_ifd

    pixels = np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    exif = {**camera_exif(1400.0, 1600, 1200, "Phone", "One"), "GPS": gps_ifd(55.7, 13.2, 20.0)}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, exif=piexif.dump(exif))
    icc = b"\xff\xe2" + (icc_bytes + 2).to_bytes(2, "big") + bytes(icc_bytes)
    return buffer.getvalue()[:2] + icc + buffer.getvalue()[2:]


@pytest.mark.parametrize("icc_bytes", [3000, 65000])  # the EXIF segment within the first 64 KB, or past them
def test_the_exif_of_a_photo_in_the_bucket_is_read_from_its_head(s3_bucket, tmp_path, monkeypatch, icc_bytes):
    """A map's EXIF pass reads GPS and focal length from the start of each photo, not the photo."""
    from pixloc_core.exif import read_exif_focal_px

    photo = large_geotagged_jpeg(icc_bytes)
    (tmp_path / "photo.jpg").write_bytes(photo)
    url = Url(f"s3://{s3_bucket}/photos/photo.jpg")
    files.write_bytes(url, photo)
    read = []
    read_head = files.read_head
    monkeypatch.setattr(files, "read_head", lambda place, size: read.append(size) or read_head(place, size))
    monkeypatch.setattr(files, "read_bytes", lambda place: pytest.fail(f"{place} read whole"))
    assert read_exif_prior(url) == read_exif_prior(tmp_path / "photo.jpg") is not None
    assert read_exif_focal_px(url, 1600, 1200) == read_exif_focal_px(tmp_path / "photo.jpg", 1600, 1200) > 0
    assert len(photo) > 1_000_000 and sum(read) < 2 * (icc_bytes + 70_000)


def test_an_unreachable_endpoint_is_one_line_naming_the_url(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(StorageError) as error:
        files.read_bytes(Url("s3://pixloc-test/queries/q_0000.jpg"))
    message = str(error.value)
    assert message.startswith("s3://pixloc-test/queries/q_0000.jpg: read failed after 5 attempts")
    assert "\n" not in message


def test_inputs_read_from_the_bucket_equal_the_local_ones(tiny_scene, scene_in_bucket):
    url = scene_in_bucket
    assert list_images(url / "queries") == list_images(tiny_scene / "queries") == [f"q_{i:04d}.jpg" for i in range(3)]
    assert read_priors(url / "priors.csv") == read_priors(tiny_scene / "priors.csv")
    assert read_query_list(url / "queries_with_intrinsics.txt") == read_query_list(
        tiny_scene / "queries_with_intrinsics.txt")
    remote_poses, local_poses = read_poses(url / "gt_queries.txt"), read_poses(tiny_scene / "gt_queries.txt")
    assert remote_poses.keys() == local_poses.keys()
    name = "q_0001.jpg"
    np.testing.assert_array_equal(read_image(url / "queries" / name), read_image(tiny_scene / "queries" / name))
    assert image_size(url / "queries" / name) == (160, 120)
    assert read_exif_prior(url / "queries" / name) == read_exif_prior(tiny_scene / "queries" / name)

    files.write_bytes(url / "queries/corrupt.jpg", b"\xff\xd8 not a JPEG")
    with pytest.raises(ImageReadError, match=f"^{url}/queries/corrupt.jpg: cannot decode image"):
        read_image(url / "queries/corrupt.jpg")
    with pytest.raises(ImageReadError, match=f"^{url}/queries/missing.jpg: image not found"):
        read_image(url / "queries/missing.jpg")


def test_map_from_and_to_the_bucket_equals_the_local_map(tiny_scene, scene_in_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
    conf = {"sift": {"max_num_features": 512}, "pairs": {"num_neighbors": 4}}
    local = map_job.build_map(tiny_scene / "mapping", tmp_path / "map", tiny_scene / "reference_model",
                              priors=read_priors(tiny_scene / "mapping_priors.csv"), conf=conf)
    url = scene_in_bucket
    map_job.build_map(url / "mapping", url / "map", url / "reference_model",
                      priors=read_priors(url / "mapping_priors.csv"), conf=conf)
    assert files.is_file(url / "map/manifest.json")
    remote = SceneMap.load(url / "map", with_descriptors=False)
    assert remote.fingerprint == local.fingerprint
    assert remote.reconstruction.num_points3D() == local.reconstruction.num_points3D()
    assert remote.manifest["images_dir"] == f"{url}/mapping"
    assert remote.descriptors is None and not (remote.path / "descriptors.npz").exists()

    # What the query workers of a cluster plan from is read from the bucket: a few small files,
    # nothing copied to the node (not the model, nor the mapping work files).
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "worker_cache"))
    index = load_map_index(url / "map")
    assert index.references.names == load_map_index(tmp_path / "map").references.names
    assert index.shards.cell_ids == local.shards.cell_ids and index.fingerprint == local.fingerprint
    assert not (tmp_path / "worker_cache").exists()

    # A remote map without its observation table (written before it) gets it derived and uploaded.
    files.delete(url / "map" / OBSERVATIONS_FILE)
    load_map_index(url / "map", with_observations=True)
    assert files.read_bytes(url / "map" / OBSERVATIONS_FILE) == (tmp_path / "map" / OBSERVATIONS_FILE).read_bytes()


def test_results_written_to_the_bucket(s3_bucket):
    out = Url(f"s3://{s3_bucket}/runs/results")
    writer = ResultsWriter(out, flush_every=1)
    writer.add({"name": "b.jpg", "success": False, "error": "no prior"})
    writer.add({"name": "a.jpg", "success": True, "qvec": [1.0, 0, 0, 0], "tvec": [0.0, 1, 2]})
    assert len(files.list_files(out / "parts")) == 2
    resumed = ResultsWriter(out, resume=True)
    assert resumed.completed() == {"a.jpg", "b.jpg"}
    table = resumed.close()
    assert table.column("name").to_pylist() == ["a.jpg", "b.jpg"]
    assert set(files.list_files(out)) == {"results.parquet", "poses.txt"}
    assert read_results(out).num_rows == 2
    assert read_poses(out / "poses.txt").keys() == {"a.jpg"}


def test_map_built_in_cells_in_the_bucket_equals_the_local_one(tiny_scene, scene_in_bucket, tmp_path, ray_cluster,
                                                              caplog):
    """Features, matches and cells of a distributed build read and written in the bucket (the work
    files of a cluster whose nodes share no disk), and a rerun that rebuilds only a removed cell."""
    conf = {"sift": {"max_num_features": 512}, "pairs": {"num_neighbors": 4},
            "shards": {"cell_size_m": 30.0, "halo_m": 10.0}}
    priors = read_priors(tiny_scene / "mapping_priors.csv")
    local = map_job.build_map_in_cells(tiny_scene / "mapping", tmp_path / "map", tiny_scene / "reference_model",
                                       priors, conf)
    url = scene_in_bucket
    remote = map_job.build_map_in_cells(url / "mapping", url / "map", url / "reference_model", priors, conf)
    assert len(local.shards.cell_ids) > 1 and not local.manifest["failed_cells"]
    assert remote.fingerprint == local.fingerprint
    assert SceneMap.load(url / "map", with_descriptors=False).fingerprint == local.fingerprint
    work = url / "map" / map_job.WORK_DIR
    stored = files.list_files(work)
    assert {f"features/{name}.parquet" for name in list_images(tiny_scene / "mapping")} <= set(stored)
    points = sorted(name for name in stored if name.endswith(cells.POINTS_FILE))
    assert len(points) == len(local.shards.cell_ids)

    files.delete(work / points[0])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cluster.mapping"):
        again = map_job.build_map_in_cells(url / "mapping", url / "map", url / "reference_model", priors, conf)
    assert again.fingerprint == local.fingerprint and files.is_file(work / points[0])
    num_images, num_cells = len(list_images(tiny_scene / "mapping")), len(points)
    assert f"features: {num_images} images, {num_images} already extracted" in caplog.text
    assert f"cells: {num_cells} cells, {num_cells - 1} already done" in caplog.text
