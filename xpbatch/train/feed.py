"""How the training rows reach the device, batch by batch.

:class:`ResidentRows`: the standardised rows are loaded once as tensors on the device; each epoch
shuffles indices on the device with ``torch.randperm`` (no host round trip per batch).
:class:`StreamedRows`: when they do not fit, each epoch reads the store chunks in a seeded random
order, ``shuffle_chunks`` at a time, shuffles the rows of those chunks together and copies the
block to the device in one transfer; a background thread reads and standardises the next block
while the device trains on the current one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xpbatch.model.trained import Normalisation, standardise
from xpbatch.train.data import Batch, RowBlock, iter_blocks

if TYPE_CHECKING:
    import xarray as xr


def _drop_single(n_rows: int, batch_size: int) -> int:
    """Rows to use per epoch: a last batch of a single row is skipped (BatchNorm needs two)."""
    return n_rows - 1 if n_rows % batch_size == 1 and n_rows > 1 else n_rows


class ResidentRows:
    """Standardised rows held on the device for the whole run.

    Parameters
    ----------
    x, x_err
        (rows, input) float32 tensors on the device.
    valid
        (rows, input) bool tensor, or None when every coefficient is valid.
    """

    placement = "device"

    def __init__(self, x: torch.Tensor, x_err: torch.Tensor, valid: torch.Tensor | None) -> None:
        self.x, self.x_err, self.valid = x, x_err, valid
        self.n_rows = int(x.shape[0])

    @classmethod
    def load(
        cls,
        ds: xr.Dataset,
        positions: np.ndarray,
        chunks: list[tuple[int, int]],
        normalisation: Normalisation,
        device: torch.device,
    ) -> ResidentRows:
        """Read and standardise the rows chunk by chunk into host arrays, then copy them once."""
        n, n_in = positions.size, normalisation.mean.size
        x = np.empty((n, n_in), np.float32)
        x_err = np.empty((n, n_in), np.float32)
        valid = np.empty((n, n_in), bool)
        done = 0
        for block in iter_blocks(ds, positions, chunks):
            inp = standardise(
                block.coefficients, block.coefficient_errors, block.phot_g_mean_flux, normalisation
            )
            rows = slice(done, done + block.positions.size)
            x[rows], x_err[rows], valid[rows] = inp.x, inp.x_err, inp.valid
            done += block.positions.size
        return cls(
            torch.from_numpy(x).to(device),
            torch.from_numpy(x_err).to(device),
            None if valid.all() else torch.from_numpy(valid).to(device),
        )

    def _take(self, index: torch.Tensor | slice) -> Batch:
        valid = None if self.valid is None else self.valid[index]
        return self.x[index], self.x_err[index], valid

    def shuffled_batches(
        self, batch_size: int, *, seed: int, generator: torch.Generator
    ) -> Iterator[Batch]:
        """One epoch: a permutation drawn on the device, then gathers of ``batch_size`` rows."""
        del seed  # the generator, seeded for this epoch, draws the permutation
        n = _drop_single(self.n_rows, batch_size)
        perm = torch.randperm(self.n_rows, generator=generator, device=self.x.device)[:n]
        for start in range(0, n, batch_size):
            yield self._take(perm[start : start + batch_size])

    def ordered_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every row in store order (validation, latent statistics)."""
        for start in range(0, self.n_rows, batch_size):
            yield self._take(slice(start, start + batch_size))


class StreamedRows:
    """Rows read from the store every epoch, in shuffled blocks of chunks, prefetched."""

    placement = "stream"

    def __init__(
        self,
        ds: xr.Dataset,
        positions: np.ndarray,
        chunks: list[tuple[int, int]],
        normalisation: Normalisation,
        device: torch.device,
        *,
        shuffle_chunks: int,
        prefetch: int = 2,
    ) -> None:
        self.ds, self.positions, self.chunks = ds, positions, chunks
        self.normalisation, self.device = normalisation, device
        self.shuffle_chunks, self.prefetch = shuffle_chunks, prefetch
        self.n_rows = int(positions.size)
        self._pin = device.type == "cuda"

    def _standardised_block(self, blocks: list[RowBlock], rng: np.random.Generator | None) -> Batch:
        """Standardise some chunks' rows together, shuffle them, as (pinned) host tensors."""
        inp = standardise(
            np.concatenate([b.coefficients for b in blocks]),
            np.concatenate([b.coefficient_errors for b in blocks]),
            np.concatenate([b.phot_g_mean_flux for b in blocks]),
            self.normalisation,
        )
        order = rng.permutation(inp.x.shape[0]) if rng is not None else slice(None)
        x, x_err, valid = (self._host(a[order]) for a in (inp.x, inp.x_err, inp.valid))
        return x, x_err, None if bool(valid.all()) else valid

    def _host(self, array: np.ndarray) -> torch.Tensor:
        """A host tensor, pinned when it goes to a CUDA device (asynchronous copies)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.pin_memory() if self._pin else tensor

    def _host_blocks(self, rng: np.random.Generator | None) -> Iterator[Batch]:
        """Standardised blocks in the epoch's order (chunk order shuffled when rng is given)."""
        order = rng.permutation(len(self.chunks)) if rng is not None else None
        pending: list[RowBlock] = []
        for block in iter_blocks(self.ds, self.positions, self.chunks, order):
            pending.append(block)
            if len(pending) == self.shuffle_chunks:
                yield self._standardised_block(pending, rng)
                pending = []
        if pending:
            yield self._standardised_block(pending, rng)

    def _device_blocks(self, rng: np.random.Generator | None) -> Iterator[Batch]:
        """The host blocks, produced by a background thread, copied to the device."""
        for x, x_err, valid in _prefetched(self._host_blocks(rng), self.prefetch):
            to = {"device": self.device, "non_blocking": self._pin}
            yield x.to(**to), x_err.to(**to), None if valid is None else valid.to(**to)

    def _batches(self, batch_size: int, rng: np.random.Generator | None) -> Iterator[Batch]:
        """Cut the device blocks into batches, carrying the remainder into the next block."""
        n = _drop_single(self.n_rows, batch_size) if rng is not None else self.n_rows
        carry: list[Batch] = []
        emitted = 0
        for block in self._device_blocks(rng):
            parts = [*carry, block]
            x = torch.cat([p[0] for p in parts])
            x_err = torch.cat([p[1] for p in parts])
            valid = _cat_valid([p[2] for p in parts], [p[0].shape[0] for p in parts])
            rows = x.shape[0]
            full = rows - rows % batch_size
            for start in range(0, full, batch_size):
                stop = start + batch_size
                yield x[start:stop], x_err[start:stop], None if valid is None else valid[start:stop]
            emitted += full
            carry = [(x[full:], x_err[full:], None if valid is None else valid[full:])]
        if carry and emitted < n:
            x, x_err, valid = carry[0]
            rows = n - emitted
            yield x[:rows], x_err[:rows], None if valid is None else valid[:rows]

    def shuffled_batches(
        self, batch_size: int, *, seed: int, generator: torch.Generator
    ) -> Iterator[Batch]:
        """One epoch in a shuffle drawn from ``seed`` (chunk order and rows within blocks)."""
        del generator  # the shuffle is drawn on the host, from the epoch's seed
        return self._batches(batch_size, np.random.default_rng(seed))

    def ordered_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every row in store order (validation, latent statistics)."""
        return self._batches(batch_size, None)


def _cat_valid(parts: list[torch.Tensor | None], rows: list[int]) -> torch.Tensor | None:
    """Concatenate masks where None stands for all valid; None when every part is None."""
    like = next((p for p in parts if p is not None), None)
    if like is None:
        return None
    ones = [torch.ones((n, like.shape[1]), dtype=torch.bool, device=like.device) for n in rows]
    return torch.cat([o if p is None else p for p, o in zip(parts, ones, strict=True)])


_DONE = object()


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` items ahead of the consumer.

    Errors in the thread are re-raised here; when the consumer stops early (an exception, Ctrl-C)
    the thread is told to stop and is joined.
    """
    out: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            out.put(e)

    thread = threading.Thread(target=produce, name="xpbatch-train-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                out.get(timeout=0.1)
        thread.join()
