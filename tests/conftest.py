"""Session fixtures: real local Ray, real moto S3 server on 127.0.0.1, the shared real data."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skipped when absent, except under CI where its absence is a failure."""
    if not SHARED_DATA.is_dir():
        message = f"real data not found at {SHARED_DATA} (see DEVELOPERS.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def lund_map(shared_data, tmp_path_factory) -> Path:
    """The map a user builds of Lund's 29 photos, `pixloc map --gps-from-exif --max-image-size 800`
    (one SfM, georegistered to the EXIF GPS; SIFT at 800 px keeps CI fast): built once for the
    tests that read it."""
    from jobs.cli import main as cli_main

    map_dir = tmp_path_factory.mktemp("lund") / "map"
    images = shared_data / "opensfm" / "lund" / "images"
    assert cli_main(["map", "--images", str(images), "--out", str(map_dir), "--gps-from-exif",
                     "--max-image-size", "800"]) == 0
    return map_dir


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; its endpoint and fake credentials are exported in the
    environment so that s3fs in this process and in Ray workers started later both reach it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test (moto state is reset first)."""
    import requests
    import s3fs

    requests.post(f"{s3_server}/moto-api/reset", timeout=10)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir("pixloc-test")
    return "pixloc-test"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster per test session (2 CPUs), started after the S3 endpoint is in the
    environment so that workers inherit it."""
    import ray

    # address="local": a new cluster even when a `ray start` of another job left
    # /tmp/ray/ray_current_cluster behind (a plain ray.init() would try to join it).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
