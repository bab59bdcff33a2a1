"""Inputs and outputs by location: a local path or an `s3://bucket/key` URL, one fsspec code path.

Every job's DIR, MAP and FILE argument is a `Location`: a `pathlib.Path` on the local disk, or a
`Url` (a str that joins and names itself like a Path: `url / "q_0001.jpg"`, `url.name`), so that
code written against paths also walks a bucket. Whole-file operations only, retried with
exponential backoff on transient errors (connection refused/reset, timeouts, throttling, 5xx);
after the last attempt a `StorageError` names the location and the cause on one line. Local writes
are atomic (written beside the target, then renamed); an S3 object appears once its PUT completes.

S3 endpoints and credentials come from the usual AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ... or an instance profile), so Ray workers configured like the driver read
the same bucket: photos are read straight from it, never synced to the workers.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TypeVar, Union

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")
S3_SCHEME = "s3://"
CACHE_ENV = "PIXLOC_CACHE_DIR"  # where remote maps are copied for pycolmap; default ~/.cache/pixloc

# Errors that retrying cannot fix: the caller gets them unchanged.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


class StorageError(RuntimeError):
    """A storage operation that still failed after all retries."""


class StorageAccessDenied(StorageError, PermissionError):
    """Credentials missing or refused: retrying cannot help, the message names the URL."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff_s: float = 0.2  # wait before the first retry, doubled after each one
    max_backoff_s: float = 5.0


def is_access_denied(error: BaseException) -> bool:
    if isinstance(error, PermissionError):
        return True
    if "botocore" not in sys.modules:  # no S3 client was ever made, so no credential error
        return False
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    return isinstance(error, (NoCredentialsError, PartialCredentialsError))


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def is_transient(error: BaseException) -> bool:
    # A full disk stays full: the caller reports it with the path.
    if isinstance(error, PERMANENT_ERRORS) or is_access_denied(error) or is_disk_full(error):
        return False
    from botocore.exceptions import BotoCoreError  # s3fs's dependency; imported only when S3 is used

    # s3fs turns throttling and 5xx answers into OSError; connection failures stay botocore errors.
    return isinstance(error, (OSError, TimeoutError, ConnectionError, BotoCoreError))


def retried(operation: str, where: str, call: Callable[[], T], retry: RetryPolicy = RetryPolicy()) -> T:
    """call(), retried on transient errors; StorageError('WHERE: OPERATION failed after N attempts: CAUSE')."""
    delay = retry.backoff_s
    for attempt in range(1, retry.attempts + 1):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classified just below
            cause = " ".join(f"{type(error).__name__}: {error}".split())
            if is_access_denied(error):
                raise StorageAccessDenied(f"{where}: {operation} refused, check the credentials "
                                          f"(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...): {cause}") from error
            if not is_transient(error):
                raise
            if attempt == retry.attempts:
                raise StorageError(f"{where}: {operation} failed after {attempt} attempts: {cause}") from error
            logger.warning("%s: %s failed (attempt %d/%d, retrying in %.1f s): %s", where, operation, attempt,
                           retry.attempts, delay, cause)
            time.sleep(delay)
            delay = min(2 * delay, retry.max_backoff_s)
    raise AssertionError("unreachable: RetryPolicy.attempts must be >= 1")


class Url(str):
    """An `s3://bucket/key` URL with the few Path operations the jobs use (no trailing slash)."""

    def __new__(cls, text: str):
        if not text.startswith(S3_SCHEME) or len(text.rstrip("/")) <= len(S3_SCHEME):
            raise ValueError(f"{text}: not an s3://bucket[/key] URL")
        return super().__new__(cls, text.rstrip("/"))

    def __truediv__(self, relative: str | os.PathLike) -> Url:
        return Url(f"{self}/{os.fspath(relative).strip('/')}")

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Url:
        return Url(self.rsplit("/", 1)[0])

    def relative_to(self, folder: str) -> PurePosixPath:
        prefix = f"{folder.rstrip('/')}/"
        if not self.startswith(prefix):
            raise ValueError(f"{self} is not under {folder}")
        return PurePosixPath(self.removeprefix(prefix))

    @property
    def key(self) -> str:
        """bucket/key, the path inside the S3 filesystem."""
        return self.removeprefix(S3_SCHEME)


Location = Union[Path, Url]


def location(text: str | os.PathLike) -> Location:
    """A Url for `s3://...`, else a local Path (also the argparse type of every DIR/FILE flag)."""
    if isinstance(text, (Path, Url)):
        return text
    text = os.fspath(text)
    if text.startswith(S3_SCHEME):
        return Url(text)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"{text}: unsupported location (expected a local path or s3://bucket/prefix)")
    return Path(text.removeprefix("file://")).expanduser()


def absolute(place: str | os.PathLike) -> str:
    """The location as a string that names the same file from any process on any node."""
    place = location(place)
    return str(place.resolve()) if isinstance(place, Path) else place


def is_remote(place: str | os.PathLike) -> bool:
    return isinstance(place, Url) or os.fspath(place).startswith(S3_SCHEME)


def s3_filesystem() -> fsspec.AbstractFileSystem:
    """A fresh S3 filesystem: one retry policy (ours, logged and tested) rather than three stacked
    ones (botocore, s3fs, ours); listings are never cached because other processes add files."""
    filesystem = fsspec.filesystem(
        "s3", skip_instance_cache=True, use_listings_cache=False,
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 60})
    filesystem.retries = 1
    return filesystem


@lru_cache(maxsize=4)
def _shared_s3(endpoint: str | None) -> fsspec.AbstractFileSystem:
    return s3_filesystem()


def _filesystem_and_path(place: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    place = location(place)
    if isinstance(place, Url):
        return _shared_s3(os.environ.get("AWS_ENDPOINT_URL")), place.key
    return LocalFileSystem(), str(place)


def _on(operation: str, place: Location, call: Callable[[fsspec.AbstractFileSystem, str], T]) -> T:
    filesystem, path = _filesystem_and_path(place)
    return retried(operation, str(place), lambda: call(filesystem, path))


def read_bytes(place: Location) -> bytes:
    return _on("read", place, lambda fs, path: fs.cat_file(path))


def arrow_buffer(data: bytes) -> pa.Buffer:
    """`data` copied into memory that Arrow owns, for Arrow's readers. A reader's threads may drop
    the last reference to its input after the interpreter has begun to exit; on Python's bytes
    that takes the GIL there and aborts the process (apache/arrow#49942, still seen with pyarrow
    26.0.1: about 1 exit in 30 right after a threaded read)."""
    sink = pa.BufferOutputStream()
    sink.write(data)
    return sink.getvalue()


def read_arrow_buffer(place: Location) -> pa.Buffer:
    return arrow_buffer(read_bytes(place))


def read_parquet(place: Location, row_groups: Callable[[pq.FileMetaData], list[int]]) -> pa.Table:
    """The row groups of a Parquet file that `row_groups` picks from its footer (none: the empty
    table, with the schema's metadata): on S3 ranged reads of those, not the whole file."""
    def read(filesystem: fsspec.AbstractFileSystem, path: str) -> pa.Table:
        with filesystem.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            groups = row_groups(parquet.metadata)
            if not groups:
                return parquet.schema_arrow.empty_table()
            return parquet.read_row_groups(groups, use_threads=False)  # see arrow_buffer
    return _on("read", place, read)


def read_head(place: Location, size: int) -> bytes:
    """The first `size` bytes (fewer when the file is shorter): one ranged GET on S3."""
    return _on("read", place, lambda fs, path: fs.cat_file(path, start=0, end=size))


def read_text(place: Location) -> str:
    return read_bytes(place).decode()


def write_bytes(place: Location, data: bytes) -> None:
    place = location(place)
    if isinstance(place, Url):
        _on("write", place, lambda fs, path: fs.pipe_file(path, data))
        return
    write_local_atomically(place, data)


def write_local_atomically(path: Path, data: bytes) -> None:
    """Written beside the target, then renamed: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        staging.write_bytes(data)
        os.replace(staging, path)
    except OSError as error:
        if error.filename is None and error.errno is not None:  # some writers omit it (a full disk)
            raise OSError(error.errno, os.strerror(error.errno), str(path)) from None
        raise
    finally:
        staging.unlink(missing_ok=True)


def write_text(place: Location, text: str) -> None:
    write_bytes(place, text.encode())


def exists(place: Location) -> bool:
    return _on("stat", place, lambda fs, path: fs.exists(path))


def is_file(place: Location) -> bool:
    return _on("stat", place, lambda fs, path: fs.isfile(path))


def delete(place: Location) -> None:
    _on("delete", place, lambda fs, path: fs.rm_file(path))


def move(source: Location, target: Location) -> None:
    """Rename within one filesystem (on S3 a copy, then a delete)."""
    if isinstance(location(source), Path):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    _on("move", source, lambda fs, path: fs.mv(path, _filesystem_and_path(target)[1]))


def delete_folder(folder: Location) -> None:
    """`folder` and everything under it; nothing when it does not exist."""
    if exists(folder):
        _on("delete", folder, lambda fs, path: fs.rm(path, recursive=True))


def list_files(folder: Location) -> dict[str, int]:
    """{relative posix name: size} of every file under `folder` (subfolders included); raises
    FileNotFoundError when it does not exist (an empty S3 prefix does not exist either)."""
    return {name: int(entry["size"]) for name, entry in _file_entries(folder).items()}


def _file_entries(folder: Location) -> dict[str, dict]:
    """{relative posix name: the filesystem's details (size, ETag or mtime, ...)}, sorted by name."""
    def walk(filesystem: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
        if not filesystem.isdir(path):
            raise FileNotFoundError(f"{folder}: directory does not exist")
        prefix = filesystem._strip_protocol(path).rstrip("/") + "/"  # absolute, as find() answers
        entries = filesystem.find(path, detail=True)
        return {name.removeprefix(prefix): entry for name, entry in entries.items() if entry["type"] == "file"}
    return dict(sorted(_on("list", folder, walk).items()))


def _version(entry: dict) -> str:
    """What changes when a listed S3 object is rewritten (the only remote kind `location` accepts):
    its ETag, a hash of the content, with the size."""
    return f"{entry['size']}:{entry.get('ETag')}"


def local_copy(folder: Location, skip: Callable[[str], bool] = lambda name: False) -> Path:
    """A local directory with the files of `folder` (for readers that need the disk, as pycolmap):
    a local folder as it is; a remote one copied into the cache (PIXLOC_CACHE_DIR), fetching only
    the files that changed since the last copy, each one renamed into place once complete.

    Changed means another version in the listing, not another size: a map updated in place rewrites
    shards.json with new fingerprints of the same length."""
    folder = location(folder)
    if not isinstance(folder, Url):
        return folder
    cache_root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pixloc")
    target = cache_root / hashlib.sha256(folder.encode()).hexdigest()[:16] / folder.name
    versions_file = target.with_name(f"{folder.name}.versions.json")  # beside the copy, not in it
    try:
        copied = json.loads(versions_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # no copy yet, or a damaged record: fetch again
        copied = {}
    wanted = {name: _version(entry) for name, entry in _file_entries(folder).items() if not skip(name)}
    fetched = 0
    for name, version in wanted.items():
        if copied.get(name) != version or not (target / name).is_file():
            write_bytes(target / name, read_bytes(folder / name))
            copied[name] = version
            fetched += 1
    if fetched:
        write_local_atomically(versions_file, json.dumps(copied, sort_keys=True).encode())
    logger.debug("%s: %d files in the local copy %s, %d fetched", folder, len(wanted), target, fetched)
    return target


def local_files(folder: Location, names: Iterable[str], target: Path) -> Path:
    """A local folder with the files `names` of `folder` (for readers that need the disk, as
    pycolmap, of a few files: one cell's images): a local folder as it is; from a remote one, copied
    under `target`, which the caller removes."""
    folder = location(folder)
    if not isinstance(folder, Url):
        return folder
    for name in names:
        write_bytes(target / name, read_bytes(folder / name))
    return target


def copy_folder(local: Path, destination: Location) -> None:
    """Every file under the local folder `local` to `destination` (a bucket prefix or another local
    folder), the manifest-like files last: a reader that sees `manifest.json` sees the whole folder."""
    names = sorted(path.relative_to(local).as_posix() for path in Path(local).rglob("*") if path.is_file())
    for name in sorted(names, key=lambda name: name.endswith("manifest.json")):
        write_bytes(destination / name, (Path(local) / name).read_bytes())


def output_folder(destination: Location) -> tuple[Path, Callable[[], None]]:
    """A local folder to write into and a `publish()` that copies it to `destination` when that
    is remote (for writers that need the disk, as pycolmap); for a local destination, itself."""
    destination = location(destination)
    if not isinstance(destination, Url):
        return destination, lambda: None
    staging = Path(tempfile.mkdtemp(prefix="pixloc_out_"))

    def publish() -> None:
        copy_folder(staging, destination)
        shutil.rmtree(staging)
    return staging, publish
