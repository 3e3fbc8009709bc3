"""What every worker process keeps: the model on its device, opened arrays, a tuned allocator.

Per-process state lives here and nowhere else: :class:`ModelPlugin` loads the model once per
worker (also on workers that join or restart mid-run) and builds its encode kernel on the
worker's device; :func:`cached` keeps opened readers and writers for the tasks of one process.
The serial path (no cluster) uses the same functions in the calling process. Several task
threads of one worker share all of it, so every cache is guarded by a lock.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from distributed import WorkerPlugin

from xpbatch.errors import ModelMismatchError

if TYPE_CHECKING:
    import torch
    from distributed import Worker

    from xpbatch.model.trained import TrainedModel

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MODELS: dict[str, tuple[TrainedModel, torch.device]] = {}
"""Model key -> (model on its device, device), filled by :class:`ModelPlugin`."""
_OPEN: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
"""(kind, path + store id or run id) -> opened reader or writer; least recent evicted. The id
keeps a long-lived worker from reusing arrays of an earlier store or catalogue at the same path."""
_MAX_OPEN = 8


_OPEN_LOCK = threading.Lock()  # workers with several threads share the caches


def cached(key: tuple[str, str], make: Callable[[], T]) -> T:
    """An object opened once per process and key (zarr arrays are cheap but not free)."""
    with _OPEN_LOCK:
        if key in _OPEN:
            _OPEN.move_to_end(key)
        else:
            _OPEN[key] = make()
            while len(_OPEN) > _MAX_OPEN:
                _OPEN.popitem(last=False)
        return _OPEN[key]  # type: ignore[no-any-return]


def device_name(device: torch.device) -> str:
    """'cpu', or 'cuda:0 (NVIDIA H200)': what a chunk was encoded on, for the catalogue."""
    import torch

    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"


def on_dask_cuda_worker(worker: Worker) -> bool:
    """Whether dask-cuda started ``worker`` (its plugins or its data store come from it)."""
    owners = [*worker.plugins.values(), worker.data]
    return any(type(o).__module__.startswith("dask_cuda") for o in owners)


def install_model(
    key: str, model: TrainedModel, device: str, *, on_dask_cuda: bool = False
) -> None:
    """Put ``model`` on this process's device (its kernel built once) under ``key``."""
    from xpbatch.encode.kernel import kernel_for
    from xpbatch.model.device import resolve_device

    where = resolve_device(device, on_dask_cuda=on_dask_cuda)
    kernel_for(model, where)
    _MODELS[key] = (model, where)


def installed_model(key: str) -> tuple[TrainedModel, torch.device] | None:
    """The model installed under ``key`` in this process and its device, or None."""
    return _MODELS.get(key)


MALLOC_MMAP_THRESHOLD = 32 * 2**20
"""Allocations below this come from the reusable heap (glibc's largest allowed value)."""
MALLOC_TRIM_THRESHOLD = 64 * 2**20
"""Free heap kept for the next chunk instead of being returned to the system."""


def tune_malloc() -> bool:
    """Let a worker reuse freed memory between batches instead of mapping it anew each time.

    distributed's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins
    glibc's mmap threshold at 128 KiB: every MB-sized temporary of the encode kernel is then
    mapped, page-faulted and unmapped again. Measured on 1M mock spectra with 2 workers, that
    cost 11 s of system time against 1-2 s with these settings, and doubled the wall time.
    Memory stays flat: at most :data:`MALLOC_TRIM_THRESHOLD` of free heap is kept. Only glibc
    (Linux) has ``mallopt``; elsewhere this does nothing and returns False.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mmap_ok = libc.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
    trim_ok = libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)
    return bool(mmap_ok and trim_ok)


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker (also on workers that join or restart mid-run).

    Carries the model file's path (a shared filesystem, like the catalogue's) or, for a model
    that exists only in memory, the model itself: either way it crosses the network once per
    worker instead of once per task. Sets one torch thread per task thread and tunes the
    worker's allocator (:func:`tune_malloc`).
    """

    def __init__(
        self,
        key: str,
        *,
        path: str | None = None,
        model: TrainedModel | None = None,
        device: str = "auto",
    ) -> None:
        self.key, self.path, self.model, self.device = key, path, model, device

    def setup(self, worker: Worker) -> None:
        """Load the model on ``worker``; one torch thread per task thread; tune the allocator."""
        import torch

        # Task threads run chunks side by side (each its own torch op at a time), so an op
        # using more threads would only oversubscribe the worker's cores.
        torch.set_num_threads(1)
        tune_malloc()
        self.load(on_dask_cuda=on_dask_cuda_worker(worker))
        logger.info("worker %s loaded model %s", worker.address, self.key[:16])

    def load(self, *, on_dask_cuda: bool = False) -> None:
        """Load the model into this process (also the fallback of a worker without the plugin)."""
        from xpbatch.model.files import load_model

        model = self.model if self.model is not None else load_model(str(self.path))
        if model.content_hash != self.key:
            raise ModelMismatchError(
                f"model file {self.path} has hash {model.content_hash[:16]}…, the run uses "
                f"{self.key[:16]}…: the file changed during the run"
            )
        install_model(self.key, model, self.device, on_dask_cuda=on_dask_cuda)

    def teardown(self, worker: Worker) -> None:
        """Free the model."""
        _MODELS.pop(self.key, None)
