"""Faults in the middle of a localization job: the S3 endpoint cut by stopping a TCP proxy in
front of moto (rows retryable, exit code 1, `--resume` completes the job), and the exactly-once
soak (150+ queries, ~10 % corrupt, a shard actor killed midway); per-query planning errors as
rows, and Ctrl-C."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import s3fs
from PIL import Image

from jobs import features as features_job
from jobs import localize as localize_job
from jobs import map as map_job
from jobs.results import read_results
from pixloc_core.io import read_poses, read_priors, read_query_list, write_priors, write_query_list
from pixloc_core.synthetic import dataset

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "pixloc-faults"


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `stop` refuses new connections and cuts open ones,
    as an endpoint that goes down does."""

    def __init__(self, target_port: int, port: int = 0):
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.running = False
        self.server.close()
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def s3_scene(tmp_path_factory, ray_cluster, s3_server) -> dict:
    """A 320x240 street (40 references, 6 queries), its map, and its store in a moto bucket."""
    root = tmp_path_factory.mktemp("faults")
    scene = dataset.main(root / "scene", {"num_refs": 40, "num_queries": 6, "width": 320, "height": 240})
    map_job.build_map(scene / "mapping", root / "map", reference_model=scene / "reference_model",
                      priors=read_priors(scene / "mapping_priors.csv"),
                      conf={"sift": {"max_num_features": 1024}, "pairs": {"num_neighbors": 5}})
    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir(BUCKET)
    store = f"s3://{BUCKET}/store"
    features_job.main(root / "map", scene / "mapping", store, conf={"workers": 2, "extractor": "classic"})
    return {"root": root, "scene": scene, "map": root / "map", "store": store}


def pixloc_process(arguments: list[str], endpoint: str) -> subprocess.Popen:
    """`pixloc ...` in its own process, with its own local Ray, reaching S3 at `endpoint`."""
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    with sigint_not_ignored():
        return subprocess.Popen([sys.executable, "-m", "jobs.cli", *arguments], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def sigint_not_ignored():
    """Children started inside do not inherit an ignored SIGINT. A non-interactive shell ignores
    SIGINT in what it starts in the background (`make test &`: POSIX), every process below
    inherits that, and Python keeps it: the Ctrl-C test's job then ignored the signal and ran to
    its end (exit 0), as in every fresh-clone run of the suite started that way. A handler of
    this process, unlike SIG_IGN, is reset to the default when a child starts its program, and
    Python turns the default into KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_endpoint_cut_midway_leaves_retryable_rows_that_resume_completes(s3_scene, s3_server, tmp_path):
    scene, out = s3_scene["scene"], tmp_path / "out"
    moto_port = int(s3_server.rsplit(":", 1)[1])
    proxy = TcpProxy(moto_port)
    arguments = ["localize", "--map", str(s3_scene["map"]), "--store", s3_scene["store"],
                 "--queries", str(scene / "queries"), "--out", str(out), "--priors", str(scene / "priors.csv"),
                 "--query-list", str(scene / "queries_with_intrinsics.txt"), "--workers", "1",
                 # one query per call and one row per part file; a shard keeps only the cell in use, so
                 # queries in other cells must read the store again, through the proxy
                 "--conf", "flush_every=1", "queries_per_call=1", "shard.cache_mb=0"]
    job = pixloc_process(arguments, f"http://127.0.0.1:{proxy.port}")
    while job.poll() is None and not list((out / "parts").glob("part-*.parquet")):
        time.sleep(0.2)  # waiting for the first row, not a timed assertion
    proxy.stop()
    _, stderr = job.communicate()
    assert job.returncode == 1, stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("pixloc localize: ") and "queries failed for reasons outside their input" in message
    assert "store unreachable: s3://pixloc-faults/store/cell=" in message and "rerun with --resume" in message
    rows = read_results(out).to_pylist()
    assert len(rows) == 6
    retryable = [row for row in rows if row["retryable"]]
    assert retryable and all(row["error"].startswith("store unreachable: s3://pixloc-faults/store/")
                             and "\x1b" not in row["error"] and "pid=" not in row["error"] for row in retryable), \
        "\n".join(row["error"] for row in retryable)
    done = {row["name"] for row in rows if not row["retryable"]}

    proxy = TcpProxy(moto_port, proxy.port)  # the endpoint is back
    job = pixloc_process([*arguments, "--resume"], f"http://127.0.0.1:{proxy.port}")
    _, stderr = job.communicate()
    proxy.stop()
    assert job.returncode == 0, stderr
    resumed = read_results(out).to_pylist()
    assert sorted(row["name"] for row in resumed) == sorted(row["name"] for row in rows)
    assert not any(row["retryable"] for row in resumed)
    assert {row["name"] for row in resumed if row["success"]} >= {row["name"] for row in rows if row["success"]}
    assert done <= {row["name"] for row in resumed}


def test_exactly_once_soak_with_corrupt_images_and_a_killed_actor(s3_scene, tmp_path):
    """60 queries at 160x120 (copies of the 6, their cameras rescaled from the 320x240 query
    list), 6 of them corrupt; the first shard actor to answer is killed: every query gets one row."""
    scene = s3_scene["scene"]
    queries = tmp_path / "queries"
    queries.mkdir()
    intrinsics = read_query_list(scene / "queries_with_intrinsics.txt")
    priors = read_priors(scene / "priors.csv")
    names = sorted(intrinsics)
    soak_list, soak_priors = {}, {}
    for index in range(60):
        source = names[index % len(names)]
        name = f"batch{index // 50}/q{index:03d}.jpg"  # subfolders: names are relative paths
        (queries / name).parent.mkdir(exist_ok=True)
        if index % 10 == 3:
            (queries / name).write_bytes(b"\xff\xd8\xff corrupt")
        else:
            Image.open(scene / "queries" / source).resize((160, 120)).save(queries / name)
        soak_list[name], soak_priors[name] = intrinsics[source], priors[source]
    write_query_list(tmp_path / "list.txt", soak_list)
    write_priors(tmp_path / "priors.csv", soak_priors)
    killed = []

    def kill_the_first_shard(row: dict) -> None:
        if row["cell"] and not killed:
            name = next(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                        if actor["name"].startswith("shard-"))
            killed.append(name)
            ray.kill(ray.get_actor(name, namespace="pixloc"), no_restart=False)

    results = localize_job.main(s3_scene["map"], s3_scene["store"], queries, tmp_path / "out",
                                query_list=tmp_path / "list.txt", priors=tmp_path / "priors.csv",
                                conf={"method": "dense", "workers": 2}, on_result=kill_the_first_shard)
    assert killed
    table = pq.read_table(results).to_pylist()
    assert sorted(row["name"] for row in table) == sorted(soak_list)
    corrupt = [row for row in table if int(row["name"][-7:-4]) % 10 == 3]
    assert len(corrupt) == 6 and all("cannot decode" in row["error"] and not row["retryable"] for row in corrupt)
    assert not any(row["retryable"] for row in table)
    rescaled = [row for row in table if row not in corrupt]
    assert all(row["note"].startswith("camera rescaled by 0.5") for row in rescaled)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels (a decompression bomb for PIL) and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


def test_planning_errors_are_rows_and_names_keep_their_folders(s3_scene, tmp_path):
    """Without a query list (intrinsics from EXIF): a decompression bomb and a name with a space
    are failure rows; two photos with the same file name in two folders are two queries."""
    scene = s3_scene["scene"]
    queries = tmp_path / "queries"
    source = sorted((scene / "queries").iterdir())[0]
    for name in ("sub1/same.jpg", "sub2/same.jpg", "with space.jpg"):
        (queries / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, queries / name)
    _png_header_only(queries / "bomb.png", 30000, 30000)
    prior = read_priors(scene / "priors.csv")[source.name]
    write_priors(tmp_path / "priors.csv", {name: prior for name in
                                           ("sub1/same.jpg", "sub2/same.jpg", "with space.jpg", "bomb.png")})

    results = localize_job.main(s3_scene["map"], s3_scene["store"], queries, tmp_path / "out",
                                priors=tmp_path / "priors.csv", conf={"method": "sparse", "workers": 2})
    rows = {row["name"]: row for row in pq.read_table(results).to_pylist()}
    assert sorted(rows) == ["bomb.png", "sub1/same.jpg", "sub2/same.jpg", "with space.jpg"]
    assert "bomb.png: cannot decode image" in rows["bomb.png"]["error"]
    assert "contains whitespace" in rows["with space.jpg"]["error"]
    assert not any(row["retryable"] for row in rows.values())
    assert rows["sub1/same.jpg"]["success"] == rows["sub2/same.jpg"]["success"]
    assert set(read_poses(tmp_path / "out" / "poses.txt")) == {name for name, row in rows.items() if row["success"]}


FINALIZER_INTERRUPTED = """
import contextlib, os, signal, sys, time
from jobs.cli import interrupts_kept

class Reference:  # like the object references a Ray driver drops all the time
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(10000))  # the signal is handled here, inside the finalizer

block = interrupts_kept() if sys.argv[1] == "kept" else contextlib.nullcontext()
try:
    with block:
        Reference()
        time.sleep(1.0)
    print("ran to its end")
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("mode, expected", [("kept", "interrupted"), ("plain", "ran to its end")])
def test_ctrl_c_in_a_finalizer_is_not_lost(mode, expected):
    """Python drops a KeyboardInterrupt raised inside a __del__ (the plain case: the job would run
    on to its end); the CLI raises it again outside (jobs.cli.interrupts_kept)."""
    with sigint_not_ignored():
        done = subprocess.run([sys.executable, "-c", FINALIZER_INTERRUPTED, mode], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    assert done.stdout.strip() == expected, done.stderr


def test_ctrl_c_saves_the_rows_and_says_how_to_resume(s3_scene, s3_server, tmp_path):
    """Interrupted once its first row is saved; the scene's queries are listed four times (as
    symlinks in four folders) so that the job is still running when the signal arrives: with the
    six queries alone it often finished first. The job must not inherit an ignored SIGINT
    (pixloc_process, sigint_not_ignored)."""
    scene, out = s3_scene["scene"], tmp_path / "out"
    listed, priors = read_query_list(scene / "queries_with_intrinsics.txt"), read_priors(scene / "priors.csv")
    queries, copies = tmp_path / "queries", [f"copy{index}" for index in range(4)]
    for copy in copies:
        (queries / copy).mkdir(parents=True)
        for name in listed:
            (queries / copy / name).symlink_to(scene / "queries" / name)
    write_query_list(tmp_path / "queries.txt", {f"{copy}/{name}": intrinsics for copy in copies
                                                for name, intrinsics in listed.items()})
    write_priors(tmp_path / "priors.csv", {f"{copy}/{name}": priors[name] for copy in copies for name in listed})
    arguments = ["localize", "--map", str(s3_scene["map"]), "--store", s3_scene["store"],
                 "--queries", str(queries), "--out", str(out), "--priors", str(tmp_path / "priors.csv"),
                 "--query-list", str(tmp_path / "queries.txt"), "--workers", "1",
                 "--conf", "flush_every=1", "queries_per_call=1"]
    job = pixloc_process(arguments, s3_server)
    while job.poll() is None and not list((out / "parts").glob("part-*.parquet")):
        time.sleep(0.05)  # waiting for the first row, not a timed assertion
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate()
    assert job.returncode == 130, stderr
    saved = read_results(out).num_rows
    assert 0 < saved < 4 * len(listed)
    assert stderr.strip().splitlines()[-1] == (f"pixloc localize: interrupted: {saved} rows saved in {out}, "
                                               "rerun with --resume")
    assert "Traceback" not in stderr
    job = pixloc_process([*arguments, "--resume"], s3_server)
    _, stderr = job.communicate()
    assert job.returncode == 0, stderr
    assert read_results(out).num_rows == 4 * len(listed)
