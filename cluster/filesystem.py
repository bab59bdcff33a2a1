"""A storage root, a local directory or `s3://bucket/prefix`, behind one fsspec code path.

Every operation is a whole file (the store never appends), retried with exponential backoff on
transient errors (connection refused/reset, timeouts, throttling, 5xx); after the last attempt a
`StorageError` names the URL and the cause on one line. Writes are atomic: a local file is written
beside its target and renamed, and an S3 object appears only once its single PUT has completed.

S3 endpoints and credentials come from the usual AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...), so that Ray workers configured like the driver reach the same bucket.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

# One retry policy and one error type for the store and every other input and output.
from pixloc_core.files import (RetryPolicy, StorageAccessDenied, StorageError, is_transient, retried,
                               s3_filesystem, write_local_atomically)

__all__ = ["RetryPolicy", "Storage", "StorageAccessDenied", "StorageError", "is_transient", "make_filesystem",
           "root_path"]

T = TypeVar("T")


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
        return s3_filesystem()
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
        return retried(operation, f"{self.url}/{relative}", call, self.retry)

    def put_bytes(self, relative: str, data: bytes) -> None:
        self._retried("write", relative, lambda: self._put_atomic(self.path(relative), data))

    def _put_atomic(self, path: str, data: bytes) -> None:
        if self.is_local:
            write_local_atomically(Path(path), data)
        else:
            self.filesystem.pipe_file(path, data)

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
