"""A storage root, a local directory or `s3://bucket/prefix`, behind one fsspec code path.

Every operation is a whole file (the store never appends), retried with exponential backoff on
transient errors (connection refused/reset, timeouts, throttling, 5xx); after the last attempt a
`StorageError` names the URL and the cause on one line. Writes are atomic: a local file is written
beside its target and renamed, and an S3 object appears only once its single PUT has completed.

S3 endpoints and credentials come from the usual AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...), so that Ray workers configured like the driver reach the same bucket.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import fsspec
import pyarrow as pa
import pyarrow.dataset as pa_dataset
import pyarrow.fs as pa_fs
import s3fs
from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
    return isinstance(error, (PermissionError, NoCredentialsError, PartialCredentialsError))


def is_transient(error: BaseException) -> bool:
    if isinstance(error, PERMANENT_ERRORS) or is_access_denied(error):
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return False  # a full disk stays full; the caller reports it with the path
    # s3fs turns throttling and 5xx answers into OSError; connection failures stay botocore errors.
    return isinstance(error, (OSError, TimeoutError, ConnectionError, BotoCoreError))


def root_path(url: str) -> str:
    """The path of a storage URL inside its filesystem."""
    if url.startswith("s3://"):
        return url.removeprefix("s3://").rstrip("/")
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"{url}: unsupported storage URL (expected a local path or s3://bucket/prefix)")
    return str(Path(url.removeprefix("file://")).expanduser().resolve())


def make_filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of a URL (a plain path means the local disk)."""
    root_path(url)  # rejects unsupported schemes
    if url.startswith("s3://"):
        # One retry policy (ours, logged and tested) rather than three stacked ones (botocore,
        # s3fs, ours); listings are never cached because other processes add files.
        filesystem = s3fs.S3FileSystem(
            skip_instance_cache=True, use_listings_cache=False,
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 60})
        filesystem.retries = 1
        return filesystem
    return LocalFileSystem()


class Storage:
    """Whole-file, retried operations on paths relative to a root URL."""

    def __init__(self, url: str, retry: RetryPolicy = RetryPolicy(),
                 filesystem: fsspec.AbstractFileSystem | None = None):
        self.root = root_path(url)
        # Absolute, so that workers in other directories (or on other machines) find the same store.
        self.url = url.rstrip("/") if url.startswith("s3://") else self.root
        self.retry = retry
        self.filesystem = filesystem or make_filesystem(self.url)
        self.is_local = isinstance(self.filesystem, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def _retried(self, operation: str, relative: str, call: Callable[[], T]) -> T:
        delay = self.retry.backoff_s
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return call()
            except Exception as error:  # noqa: BLE001 - classified just below
                cause = " ".join(f"{type(error).__name__}: {error}".split())
                if is_access_denied(error):
                    raise StorageAccessDenied(f"{self.url}/{relative}: {operation} refused, check the credentials "
                                              f"(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...): {cause}") from error
                if not is_transient(error):
                    raise
                if attempt == self.retry.attempts:
                    raise StorageError(f"{self.url}/{relative}: {operation} failed after "
                                       f"{attempt} attempts: {cause}") from error
                logger.warning("%s/%s: %s failed (attempt %d/%d, retrying in %.1f s): %s", self.url,
                               relative, operation, attempt, self.retry.attempts, delay, cause)
                time.sleep(delay)
                delay = min(2 * delay, self.retry.max_backoff_s)
        raise AssertionError("unreachable: RetryPolicy.attempts must be >= 1")

    def put_bytes(self, relative: str, data: bytes) -> None:
        self._retried("write", relative, lambda: self._put_atomic(self.path(relative), data))

    def _put_atomic(self, path: str, data: bytes) -> None:
        if not self.is_local:
            self.filesystem.pipe_file(path, data)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            staging.write_bytes(data)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)

    def get_bytes(self, relative: str) -> bytes:
        return self._retried("read", relative, lambda: self.filesystem.cat_file(self.path(relative)))

    def get_many(self, relatives: list[str]) -> dict[str, bytes]:
        """Several files in one call (concurrent requests on S3)."""
        if not relatives:
            return {}
        paths = {self.path(relative): relative for relative in relatives}
        contents = self._retried("read", f"{{{len(paths)} files}}",
                                 lambda: self.filesystem.cat(list(paths), on_error="raise"))
        return {paths[path]: data for path, data in contents.items()}

    def exists(self, relative: str) -> bool:
        return self._retried("stat", relative, lambda: self.filesystem.exists(self.path(relative)))

    def list_files(self, relative_dir: str) -> list[str]:
        """Relative paths of the files directly in a folder; empty when it does not exist."""
        return sorted(self.file_sizes(relative_dir))

    def file_sizes(self, relative_dir: str) -> dict[str, int]:
        """Relative path -> size in bytes of the files directly in a folder (one listing)."""
        def list_folder() -> list[dict]:
            try:
                entries = self.filesystem.ls(self.path(relative_dir), detail=True)
            except FileNotFoundError:
                return []
            return [entry for entry in entries if entry["type"] == "file"]

        entries = self._retried("list", relative_dir, list_folder)
        return {f"{relative_dir}/{entry['name'].rsplit('/', 1)[-1]}": int(entry["size"]) for entry in entries}

    def delete(self, relative: str) -> None:
        self._retried("delete", relative, lambda: self.filesystem.rm_file(self.path(relative)))

    def read_json(self, relative: str) -> dict:
        return json.loads(self.get_bytes(relative))

    def write_json(self, relative: str, content: dict) -> None:
        self.put_bytes(relative, json.dumps(content, indent=1, sort_keys=True).encode())

    def read_parquet(self, relatives: list[str], columns: list[str],
                     row_filter: pa_dataset.Expression | None = None) -> pa.Table:
        """One pyarrow dataset read over several Parquet files."""
        arrow_filesystem = (pa_fs.LocalFileSystem() if self.is_local
                            else pa_fs.PyFileSystem(pa_fs.FSSpecHandler(self.filesystem)))
        paths = [self.path(relative) for relative in relatives]
        return self._retried(
            "read", relatives[0] if len(relatives) == 1 else f"{{{len(relatives)} files}}",
            lambda: pa_dataset.dataset(paths, format="parquet", filesystem=arrow_filesystem)
            .to_table(columns=columns, filter=row_filter))
