"""Ray start-up: a local Ray started in-process by default, or an existing cluster.

    with init_ray(args.address, num_cpus=args.workers):
        ...

`address` is None (start a local Ray inside this process), "auto" (the cluster this machine
belongs to, e.g. under `ray job submit`) or "ray://head:10001" (Ray Client). The context only shuts
down a Ray that it started, so jobs can run inside tests or notebooks that already hold one.
"""
from __future__ import annotations

import ctypes
import logging
import os
import resource

import ray

logger = logging.getLogger(__name__)

# No telemetry, and no auth token written to ~/.ray (a local Ray needs none).
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
# A local Ray otherwise listens on, and advertises, the machine's external address.
LOCAL_RAY_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class RaySession:
    """The Ray this process uses; `shutdown` (or leaving the `with` block) stops it only if
    `init_ray` started it."""

    def __init__(self, started: bool):
        self.started = started

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             progress_bars: bool = False) -> RaySession:
    """Connect to (or start) Ray; resources only apply to a local Ray."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        logger.debug("using the Ray this process already holds")
        started = False
    else:
        if address is None:
            for key, value in LOCAL_RAY_ENVIRONMENT.items():
                os.environ.setdefault(key, value)
            start_local_ray(num_cpus, num_gpus)
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
        logger.info("Ray: %s", {key: value for key, value in ray.cluster_resources().items()
                                if key in ("CPU", "GPU", "memory")})
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.print_on_execution_start = progress_bars
    return RaySession(started)


def start_local_ray(num_cpus: int | None, num_gpus: int | None, attempts: int = 3) -> None:
    """A new Ray of our own ("local": even where another job's Ray left /tmp/ray/ray_current_cluster).
    Ray gives its raylet a fixed 30 s to register; on a loaded machine that deadline is missed
    now and then, and a second start usually succeeds."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     log_to_driver=False)
            return
        except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception for this deadline
            if "timed out during startup" not in str(error) or attempt == attempts:
                raise
            logger.warning("Ray start-up timed out (attempt %d/%d, the machine is loaded): starting again",
                           attempt, attempts)
            ray.shutdown()


def set_torch_threads() -> int:
    """Inside a Ray task or actor: use as many torch threads as CPUs Ray assigned to it (Ray sets
    OMP_NUM_THREADS once per worker process, which is reused across tasks of other sizes)."""
    import torch

    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    return threads


def gpus_per_worker(conf: dict) -> float:
    """conf["gpus_per_worker"], or None: the cluster's GPUs shared among conf["workers"]."""
    if conf.get("gpus_per_worker") is not None:
        return conf["gpus_per_worker"]
    return min(1.0, ray.cluster_resources().get("GPU", 0) / conf["workers"])


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now (from /proc/self/statm), in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_freed_memory() -> None:
    """Hand freed memory back to the OS, so that resident memory says what is in use: Arrow's pool
    and glibc's malloc keep freed blocks otherwise."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator keeps what it keeps
        pass
