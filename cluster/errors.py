"""What went wrong, in one line, and whose fault it is.

A failure is either caused by the input (a corrupt image, no prior, a prior outside the map, a bad
camera: rerunning cannot help, so the query is done) or by the infrastructure (the store
unreachable or damaged, a disk full, a crashed process: `--resume` retries it). `describe` walks
the chain of causes, Ray's wrappers included, to the root cause and renders it on one line
without ANSI colours or process ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pixloc_core.files import StorageAccessDenied, StorageError, is_disk_full

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROCESS_IDS = re.compile(r"\s*\((pid|ip|actor_id|task_id)=[^)]*\)")


class DamagedPartition(ValueError):
    """A published partition of the feature store whose file is missing or differs from its manifest."""


@dataclass(frozen=True)
class Failure:
    message: str  # the root cause, one line
    retryable: bool  # caused by the infrastructure: retried by --resume


def root_cause(error: BaseException) -> BaseException:
    """The innermost error: through Ray's task and actor errors and explicit `raise ... from`."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None)  # ray.exceptions.RayTaskError, which also subclasses its cause
        if isinstance(inner, BaseException):
            error = inner
            continue
        if isinstance(error, StorageError | DamagedPartition):
            break  # our own errors already say what and where
        # raised `from` an error, else while handling one (Ray Data's UDF errors do the latter)
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    return error


def one_line(text: str) -> str:
    text = _PROCESS_IDS.sub("", _ANSI.sub("", text))
    return " ".join(text.split())


def describe(error: BaseException) -> str:
    """The root cause of `error` on one line, with the file or URL it concerns."""
    cause = root_cause(error)
    if is_disk_full(cause):
        return f"disk full: {cause.filename or 'writing'}: {cause.strerror}"
    if isinstance(cause, StorageError) and not isinstance(cause, StorageAccessDenied):
        return "store unreachable: " + one_line(str(cause))
    if _is_ray_error(cause) and "died" in str(cause).lower():
        return "worker process crashed: " + one_line(str(cause).splitlines()[0])
    text = str(cause) or type(cause).__name__
    if isinstance(cause, (ConnectionError, TimeoutError)) or type(cause).__module__.startswith("botocore"):
        text = f"{type(cause).__name__}: {text}"
    return one_line(text)


def classify(error: BaseException) -> Failure:
    """A per-query failure: its one-line message and whether --resume should retry it."""
    cause = root_cause(error)
    retryable = (isinstance(cause, (StorageError, DamagedPartition, ConnectionError, TimeoutError, MemoryError))
                 or is_disk_full(cause) or _is_ray_error(cause))
    return Failure(describe(error), retryable)


def _is_ray_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("ray.")
