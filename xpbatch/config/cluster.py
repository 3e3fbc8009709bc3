"""Which Dask cluster a stage runs on (``--cluster``, ``--scheduler-file``, ...)."""

from __future__ import annotations

import dataclasses

from xpbatch.errors import ConfigError

CLUSTER_LOCAL_CUDA = "local-cuda"
GPU_THREADS_PER_WORKER = 8
"""Chunk tasks at once on one GPU worker. The GPU's share of a spectrum is far smaller than the
host's (read and decompress the inputs, pack and copy, compress and write the outputs, verify),
much of it in zarr and numcodecs outside the GIL, so several threads overlap one chunk's device
work with the others' I/O; more only adds memory (each thread holds up to two chunks)."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Which Dask cluster a stage runs on (shared by ``ingest`` and ``encode-catalog``)."""

    cluster: str | None = None
    """Omit (None) for a LocalCluster of worker processes on this machine; 'local-cuda' for
    dask-cuda's LocalCUDACluster, one worker per GPU; or the address of a running scheduler
    ('tcp://host:8786')."""
    scheduler_file: str | None = None
    """Connect to the scheduler described by this file, written by 'dask scheduler
    --scheduler-file' (Slurm, a shared filesystem)."""
    n_workers: int | None = None
    """Worker processes of a LocalCluster; default one per core."""
    threads_per_worker: int | None = None
    """Threads (chunk tasks at once) per worker of a local cluster; default 1 on CPU workers
    (one per core) and xpbatch.config.GPU_THREADS_PER_WORKER on 'local-cuda' GPU workers. Each
    task thread uses one torch thread."""
    memory_limit: str = "auto"
    """Memory limit per LocalCluster worker ('auto' divides the machine's memory)."""
    dashboard_address: str = "127.0.0.1:8787"
    """Where a LocalCluster's dashboard listens; localhost unless asked otherwise (':0' for
    any free port)."""

    def __post_init__(self) -> None:
        if self.cluster is not None and self.scheduler_file is not None:
            raise ConfigError("give either --cluster or --scheduler-file, not both")
        if self.cluster is not None and not (
            self.cluster == CLUSTER_LOCAL_CUDA or self.cluster.startswith(("tcp://", "tls://"))
        ):
            raise ConfigError(
                f"--cluster must be omitted (local CPU cluster), {CLUSTER_LOCAL_CUDA!r} or a "
                f"scheduler address like 'tcp://host:8786', got {self.cluster!r}"
            )
        if self.n_workers is not None and self.n_workers < 1:
            raise ConfigError(f"n_workers must be at least 1, got {self.n_workers}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ConfigError(
                f"threads_per_worker must be at least 1, got {self.threads_per_worker}"
            )
