"""The Parquet feature store on a local disk and on S3 (moto on 127.0.0.1): round trip, commit
protocol (only published files are visible), identity checks, and S3 faults."""
from __future__ import annotations

import socket
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from cluster.filesystem import RetryPolicy, Storage, StorageError
from cluster.store import (FEATURE_DTYPE, MANIFEST_FILE, Commit, DamagedPartition, FeatureStore, PartitionNotFound,
                           PartitionPublisher, StoreInfo, StoreMismatchError, aggregate_observations, batch_key,
                           column_vectors, observation_table, partition_dir)

CHANNELS = (8, 4, 2)
CONTENT = "1" * 64  # the fingerprint of the content of the cells the tests publish
FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01)


def make_info(aggregated: bool = False) -> StoreInfo:
    return StoreInfo("test-extractor-abc", "f" * 64, (16, 4, 1), CHANNELS, aggregated)


def random_observations(rng: np.random.Generator, image_id: int, point3D_ids: np.ndarray, channels: int):
    features = rng.normal(size=(len(point3D_ids), channels))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    xyz = point3D_ids[:, None] * np.array([1.0, 2.0, 3.0])  # a point's position follows from its id
    return observation_table(point3D_ids, np.full(len(point3D_ids), image_id), xyz, features,
                             rng.uniform(0.1, 1, len(point3D_ids)))


def write_batch(store: FeatureStore, image_ids: list[int], cell: str, rng: np.random.Generator) -> Commit:
    """What a worker does for a batch of images, image i observing points 10*i .. 10*i+14, so that
    neighbouring ids share 5 points; every level."""
    key = batch_key(image_ids)
    parts = []
    for level, channels in enumerate(CHANNELS):
        tables = [random_observations(rng, i, np.arange(10 * i, 10 * i + 15), channels) for i in image_ids]
        parts.append(store.write_part(cell, level, key, pa.concat_tables(tables)))
    return Commit(key, image_ids, parts)


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/stores/one"


def test_round_trip_and_only_published_files_are_visible(store_url):
    rng = np.random.default_rng(0)
    store = FeatureStore.create(store_url, make_info())
    first, second = write_batch(store, [1, 2], "x+0000_y+0000", rng), write_batch(store, [3], "x+0000_y+0000", rng)
    for commit in (first, second):
        store.commit(commit)
    with pytest.raises(PartitionNotFound, match="x\\+0000_y\\+0000"):
        store.load_cell("x+0000_y+0000", 0)  # written and committed, but not yet published

    for level in range(3):
        store.publish("x+0000_y+0000", level, [p for c in (first, second) for p in c.parts if p.level == level],
                      CONTENT)
    # A worker of a later, killed job left a file in the partition: readers never see it.
    orphan = write_batch(store, [4], "x+0000_y+0000", rng)

    reader = FeatureStore.open(store_url, extractor_id="test-extractor-abc", map_fingerprint="f" * 64)
    assert {c.key for c in reader.commits()} == {first.key, second.key}
    for level, channels in enumerate(CHANNELS):
        reader.verify("x+0000_y+0000", level)
        table = reader.load_table("x+0000_y+0000", level)
        assert sorted(set(table.column("image_id").to_pylist())) == [1, 2, 3]
        reference = reader.load_cell("x+0000_y+0000", level)
        assert reference.points3D.shape == (45, 3) and reference.points3D.dtype == torch.float64
        assert reference.features.shape == (45, channels) and reference.features.dtype == torch.float32
        assert reference.confidence.shape == (45,)
        ids = torch.from_numpy(table.column("point3D_id").to_numpy()).double()
        assert torch.equal(reference.points3D, ids[:, None] * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        # float16 storage: unit vectors survive to about 1e-3.
        assert torch.allclose(reference.features.norm(dim=1), torch.ones(45), atol=2e-3)
    reference, observers = reader.load_cell_with_image_ids("x+0000_y+0000", 0)
    offsets = reference.points3D[:, 0].numpy() - 10 * observers  # image i observes points 10*i .. 10*i+14
    assert ((offsets >= 0) & (offsets < 15)).all() and sorted(set(observers)) == [1, 2, 3]
    only_image_2 = reader.load_cell("x+0000_y+0000", 1, image_ids=[2])
    assert only_image_2.points3D[:, 0].tolist() == list(range(20, 35))
    assert orphan.parts[0].path not in {p["path"] for p in reader.manifest("x+0000_y+0000", 0)["files"]}


def published_file(store: FeatureStore, cell: str, level: int) -> str:
    [part] = store.manifest(cell, level)["files"]
    return part["path"]


def test_a_published_partition_is_one_file_and_its_part_files_are_gone(tmp_path):
    store = FeatureStore.create(str(tmp_path / "store"), make_info())
    rng = np.random.default_rng(4)
    commits = [write_batch(store, [1], "c", rng), write_batch(store, [2, 3], "c", rng)]
    parts = [part for commit in commits for part in commit.parts if part.level == 0]
    written = pa.concat_tables([pq.read_table(tmp_path / "store" / part.path) for part in sorted(parts, key=str)])
    store.publish("c", 0, parts, CONTENT)
    path = published_file(store, "c", 0)
    assert path.startswith("cell=c/level=0/part-merged-")
    assert [p.name for p in (tmp_path / "store/cell=c/level=0").glob("*.parquet")] == [path.rsplit("/", 1)[1]]
    merged = store.load_table("c", 0)
    assert merged.equals(written) and merged.schema.field("feature").metadata == {b"dtype": b"<f2", b"width": b"8"}


def test_a_rerun_publishes_the_levels_a_stopped_run_left_unpublished(tmp_path):
    store = FeatureStore.create(str(tmp_path / "store"), make_info())
    commit = write_batch(store, [1, 2], "c", np.random.default_rng(5))
    store.commit(commit)
    store.publish("c", 0, [part for part in commit.parts if part.level == 0], CONTENT)  # stopped here
    rerun = PartitionPublisher(store, {"c": [1, 2]}, {"c": CONTENT}, store.info.map_fingerprint)
    for found in store.commits():
        rerun.record(found)
    rerun.publish_unpublished()  # level 0's part file is gone; it must not be read again
    assert all(store.is_published("c", level) for level in range(3))
    assert [store.load_table("c", level).num_rows for level in range(3)] == [30, 30, 30]


def test_a_store_follows_its_map_through_an_update(tmp_path):
    """Cell a kept its content in the update, cell b changed: a's partitions stay current, b's
    and the old map's commits do not count, and the store names the new map only when told."""
    url, rng = str(tmp_path / "store"), np.random.default_rng(6)
    old, new = make_info(), replace(make_info(), map_fingerprint="e" * 64)
    store = FeatureStore.create(url, old)
    for cell, image_ids in (("a", [1, 2]), ("b", [3])):
        commit = write_batch(store, image_ids, cell, rng)
        store.commit(commit)
        for level in range(3):
            store.publish(cell, level, [part for part in commit.parts if part.level == level], f"{cell}-before")

    with pytest.raises(StoreMismatchError, match=f"store of another map: expected {'e' * 64}, found {'f' * 64}"):
        FeatureStore.create(url, new)  # not an earlier version of this map
    following = FeatureStore.create(url, new, earlier_maps=[old.map_fingerprint])
    assert following.info == old  # until every cell is current
    assert following.is_current("a", 0, "a-before", new.map_fingerprint)
    assert not following.is_current("b", 0, "b-after", new.map_fingerprint)
    assert following.commits(new.map_fingerprint) == [] and len(following.commits(old.map_fingerprint)) == 2
    with pytest.raises(StoreMismatchError):
        FeatureStore.open(url, map_fingerprint=new.map_fingerprint)

    following.adopt_map(new.map_fingerprint)
    assert FeatureStore.open(url, map_fingerprint=new.map_fingerprint).info == new
    assert following.commits() == []  # the old map's commits are gone; its current partitions stay
    assert following.load_table("a", 0).num_rows == 30


def test_a_partition_published_before_cell_fingerprints_is_current_only_for_its_map(tmp_path):
    store = FeatureStore.create(str(tmp_path / "store"), make_info())
    commit = write_batch(store, [1], "c", np.random.default_rng(7))
    store.publish("c", 0, [part for part in commit.parts if part.level == 0], CONTENT)
    manifest = store.manifest("c", 0)
    del manifest["cell_fingerprint"]
    store.storage.write_json(f"{partition_dir('c', 0)}/{MANIFEST_FILE}", manifest)
    assert store.is_current("c", 0, "any", store.info.map_fingerprint)
    assert not store.is_current("c", 0, "any", "e" * 64)
    assert not store.is_current("c", 1, CONTENT, store.info.map_fingerprint)  # not published


def test_refuses_a_store_of_another_extractor_or_map(tmp_path):
    url = str(tmp_path / "store")
    FeatureStore.create(url, make_info())
    with pytest.raises(StoreMismatchError, match="expected other-extractor-123, found test-extractor-abc"):
        FeatureStore.open(url, extractor_id="other-extractor-123")
    with pytest.raises(StoreMismatchError, match=f"expected {'e' * 64}, found {'f' * 64}"):
        FeatureStore.open(url, extractor_id="test-extractor-abc", map_fingerprint="e" * 64)
    with pytest.raises(StoreMismatchError, match="other settings"):
        FeatureStore.create(url, make_info(aggregated=True))
    with pytest.raises(FileNotFoundError, match="no feature store here"):
        FeatureStore.open(str(tmp_path / "elsewhere"))


def test_verify_detects_a_modified_file(tmp_path):
    store = FeatureStore.create(str(tmp_path / "store"), make_info())
    commit = write_batch(store, [1], "c", np.random.default_rng(1))
    store.publish("c", 0, [commit.parts[0]], CONTENT)
    path = tmp_path / "store" / published_file(store, "c", 0)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="checksum differs"):
        store.verify("c", 0)


def test_aggregation_is_the_confidence_weighted_mean_per_point():
    features = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    table = observation_table(np.array([7, 7, 9]), np.array([1, 2, 1]), np.array([[7.0] * 3, [7.0] * 3, [9.0] * 3]),
                              features, np.array([0.75, 0.25, 0.5]))
    aggregated = aggregate_observations(table)
    assert aggregated.column("point3D_id").to_pylist() == [7, 9]
    assert aggregated.column("num_observations").to_pylist() == [2, 1]
    expected = np.array([[0.75, 0.25], [0.6, 0.8]])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    stored = column_vectors(aggregated.column("feature"), FEATURE_DTYPE).astype(np.float64)
    np.testing.assert_allclose(stored, expected, atol=1e-3)
    np.testing.assert_allclose(aggregated.column("confidence").to_numpy(), [0.5, 0.5])


def test_aggregated_store_publishes_one_row_per_point(tmp_path):
    store = FeatureStore.create(str(tmp_path / "store"), make_info(aggregated=True))
    rng = np.random.default_rng(2)
    commits = [write_batch(store, [1, 2], "c", rng), write_batch(store, [3], "c", rng)]
    store.publish("c", 2, [p for c in commits for p in c.parts if p.level == 2], CONTENT)
    assert store.manifest("c", 2)["rows"] == 35  # 45 observations of points 10..44
    reference = store.load_cell("c", 2)
    assert sorted(reference.points3D[:, 0].tolist()) == list(range(10, 45))
    with pytest.raises(ValueError, match="aggregated store has no per-image rows"):
        store.load_cell("c", 2, image_ids=[1])


def test_batch_file_names_depend_only_on_the_set_of_images():
    assert batch_key([2, 1]) == batch_key([1, 2]) != batch_key([1, 2, 3])


class ThrottledS3FileSystem(s3fs.S3FileSystem):
    """The real S3 client (against moto) whose first `failures` uploads are answered as S3
    answers when throttling: SlowDown, as s3fs reports it."""

    cachable = False  # fsspec would otherwise hand out one shared, already-counting instance

    def __init__(self, failures: int):
        super().__init__(use_listings_cache=False)
        self.failures = failures
        self.uploads = 0

    async def _pipe_file(self, path, data, **kwargs):
        self.uploads += 1
        if self.uploads <= self.failures:
            response = {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}
            raise translate_boto_error(ClientError(response, "PutObject"))
        return await super()._pipe_file(path, data, **kwargs)


def test_transient_s3_errors_are_retried(s3_bucket):
    url = f"s3://{s3_bucket}/stores/throttled"
    filesystem = ThrottledS3FileSystem(failures=2)
    FeatureStore.create(url, make_info(), storage=Storage(url, FAST_RETRY, filesystem))
    assert filesystem.uploads == 3  # two refusals, then the write went through
    assert FeatureStore.open(url).info == make_info()


def test_persistent_s3_errors_end_in_a_clear_error(s3_bucket):
    url = f"s3://{s3_bucket}/stores/throttled"
    filesystem = ThrottledS3FileSystem(failures=100)
    with pytest.raises(StorageError) as error:
        FeatureStore.create(url, make_info(), storage=Storage(url, FAST_RETRY, filesystem))
    message = str(error.value)
    assert f"{url}/store.json: write failed after 3 attempts" in message and "\n" not in message
    assert filesystem.uploads == 3


def test_unreachable_s3_endpoint_names_the_store(s3_server, monkeypatch):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    url = "s3://pixloc-test/stores/unreachable"
    with pytest.raises(StorageError, match=f"{url}/store.json: read failed after 3 attempts: EndpointConnectionError"):
        FeatureStore.open(url, retry=FAST_RETRY)


def test_rejects_unsupported_urls():
    with pytest.raises(ValueError, match="gs://bucket/x: unsupported storage URL"):
        Storage("gs://bucket/x")


def published_store(tmp_path) -> tuple[FeatureStore, Commit]:
    store = FeatureStore.create(str(tmp_path / "store"), make_info())
    commit = write_batch(store, [1, 2], "c", np.random.default_rng(3))
    for level in range(3):
        store.publish("c", level, [part for part in commit.parts if part.level == level], CONTENT)
    return store, commit


@pytest.mark.parametrize("damage, reason", [
    ("flip", "checksum differs from the manifest"),
    ("truncate", "[0-9]+ bytes, the manifest says [0-9]+"),
    ("delete", "file missing"),
])
def test_a_damaged_file_is_refused_on_load_naming_it(tmp_path, damage, reason):
    store, commit = published_store(tmp_path)
    damaged = published_file(store, "c", 1)
    path = tmp_path / "store" / damaged
    data = path.read_bytes()
    if damage == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1:])
    elif damage == "truncate":
        path.write_bytes(data[:-10])
    else:
        path.unlink()
    with pytest.raises(DamagedPartition, match=f"store damaged: {store.url}/{damaged}: {reason}"):
        store.load_cell("c", 1)
    store.load_cell("c", 0)  # the other partitions are intact
    partitions = [("c", level) for level in range(3)]
    found = store.damaged_partitions(partitions, checksums=True)
    assert list(found) == [("c", 1)] and damaged in found["c", 1]
    # Without checksums only what a listing shows: a flipped bit keeps the size.
    assert list(store.damaged_partitions(partitions)) == ([] if damage == "flip" else [("c", 1)])
