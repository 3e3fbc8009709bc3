"""The pure encode kernel: one input chunk in, its output rows out; or any arrays in memory.

No I/O and no cluster: :func:`encode_chunk` runs the same in a test, a notebook and a Dask
worker (the rechunker habit); :func:`encode_arrays` is the same kernel on arrays in physical
units (numpy in, numpy out), for notebooks. Reading the input chunk and writing the result are
:mod:`xpbatch.encode.stage`'s and :mod:`xpbatch.catalog.writer`'s business.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from xpbatch import schema
from xpbatch.config import EncodeConfig
from xpbatch.encode import cpu as encode_cpu
from xpbatch.encode.mc import MonteCarlo, chunk_correlations, mc_outputs
from xpbatch.encode.outputs import (
    PASSTHROUGH_VARIABLES,
    Chunk,
    check_chunk,
    empty_outputs,
    output_variables,
)
from xpbatch.errors import InputShapeError
from xpbatch.model.density import score_rows, score_terms
from xpbatch.model.network import reconstruction_rmse
from xpbatch.model.trained import TrainedModel, check_shapes
from xpbatch.schema import CatalogFlag
from xpbatch.store.input_recipe import FLOAT32_TINY, recipe_rows

DEFAULT_BATCH_SIZE = EncodeConfig.batch_size
"""Rows per forward pass (its home: the EncodeConfig field). Every pass is padded to exactly this
many rows, so the same kernels run whatever the chunk size (results then agree to float32
round-off; the same chunking gives the same bytes)."""

BATCHES_PER_BLOCK = 8
"""The kernel works through a chunk in blocks of this many forward passes, so its temporaries
(host and device) are bounded by the block, not the chunk (memory flat in chunk size). Blocks
are whole batches, so results stay bitwise identical to one call on the chunk."""


class EncodeKernel:
    """The encode recipe of one model as torch operations on one device, in float32.

    Built once per model and device (the network moves to the device here, once); safe to share
    between threads: each thread gets its own pinned staging buffers and CUDA stream, so the
    device work of one task overlaps the reads, writes and host copies of the others.

    Per block of rows: the inputs go to the device in one copy (``[c | e | g]`` packed from
    pinned memory on CUDA; zero-copy views on the CPU), the input recipe, the forward passes and
    the outputs run there, and the stored outputs come back in one packed copy. Only the outputs
    asked for are computed.

    On the CPU the steps around the network run by default as fused per-row loops
    (:mod:`xpbatch.encode.cpu`, ``fused=True``), batch by batch, straight into the output
    arrays: the same float32 arithmetic at a fraction of the cost of whole-array operations.
    """

    def __init__(
        self, model: TrainedModel, device: str | torch.device = "cpu", *, fused: bool = True
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.fused = fused and self.device.type == "cpu"
        self.network = model.network.to(self.device)
        self.network.eval()

        def constant(values: np.ndarray | None) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, np.float32), device=self.device)

        self.mean = constant(model.normalisation.mean)  # (input,)
        self.std = constant(model.normalisation.std)  # (input,)
        self._mean_np = model.normalisation.mean  # float32 host copies for the fused path
        self._std_np = model.normalisation.std
        assert model.density is not None  # TrainedModel puts the prior there when none was fitted
        self.density = model.density
        self._score_terms = score_terms(model.density)  # the fused path's scoring arguments
        self.n_in = model.config.input_dim
        self.n_bp = self.n_in // 2
        self._local = threading.local()

    @property
    def on_cuda(self) -> bool:
        """Whether the device is a CUDA GPU (pinned memory and streams are used)."""
        return self.device.type == "cuda"

    def widths(self, names: Sequence[str]) -> dict[str, int]:
        """Columns per row of each kernel output (name -> width)."""
        latent = self.model.config.latent_dim
        known = {
            schema.LATENT_MEAN: latent,
            schema.LATENT_STD: latent,
            schema.SCATTER: self.n_in,
            schema.RMSE: 1,
            schema.FLAGS: 1,
            schema.RECONSTRUCTION: self.n_in,
            schema.ANOMALY_SCORE: 1,
        }
        return {name: known[name] for name in names}

    def run(
        self,
        coefficients: np.ndarray,
        coefficient_errors: np.ndarray,
        phot_g_mean_flux: np.ndarray,
        out: Mapping[str, np.ndarray],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        """Encode one block of rows into the host arrays ``out`` (name -> (rows, ...) array).

        ``out``'s keys choose what is computed (see :meth:`widths`); ``flags`` receives the
        CatalogFlag bits found in the input and the model's (not the membership bits).
        """
        n_rows = len(phot_g_mean_flux)
        if n_rows == 0:
            return
        if self.fused:
            with torch.inference_mode():
                self._run_fused(coefficients, coefficient_errors, phot_g_mean_flux, out, batch_size)
            return
        names = list(out)
        with torch.inference_mode(), self._stream():
            c, e, g = self._to_device(coefficients, coefficient_errors, phot_g_mean_flux)
            results = self._compute(c, e, g, names, batch_size)
            self._to_host(results, out)

    # --- the CPU's fused path ---------------------------------------------------------------------
    def _run_fused(
        self,
        c: np.ndarray,
        e: np.ndarray,
        g: np.ndarray,
        out: Mapping[str, np.ndarray],
        batch_size: int,
    ) -> None:
        """Batch by batch: recipe loop, padded forward pass, output loop into ``out``."""
        n_rows = len(g)
        x, x_err, valid, g32 = self._fused_buffers(batch_size)
        unused, no_score = np.empty((0, 0), np.float32), np.empty(0, np.float32)
        flags = out.get(schema.FLAGS)
        if flags is None:
            flags = np.empty(n_rows, np.uint16)
        rmse = out.get(schema.RMSE)
        if rmse is None:  # the anomaly score and LATENT_OUTLIER need it
            rmse = np.empty(n_rows, np.float32)

        def target(name: str, rows: slice) -> np.ndarray:
            return out[name][rows] if name in out else unused

        for start in range(0, n_rows, batch_size):
            rows = slice(start, min(start + batch_size, n_rows))
            n = rows.stop - rows.start
            recipe_rows(
                c[rows], e[rows], g[rows], self._mean_np, self._std_np, self.n_bp,
                x[:n], x_err[:n], valid[:n], g32[:n], flags[rows],
            )  # fmt: skip
            x[n:] = 0  # padding rows: the kernels of a full batch, results dropped
            result = self.network(torch.from_numpy(x))  # (batch_size, ...) views, no copies
            encode_cpu.output_rows(
                x[:n], x_err[:n], valid[:n], g32[:n],
                result.mu[:n].numpy(), result.log_var[:n].numpy(),
                result.xhat[:n].numpy(), result.shat[:n].numpy(),
                self._mean_np, self._std_np,
                target(schema.LATENT_MEAN, rows), target(schema.LATENT_STD, rows),
                target(schema.SCATTER, rows), target(schema.RECONSTRUCTION, rows),
                rmse[rows], flags[rows],
            )  # fmt: skip
            score_rows(
                result.mu[:n].numpy(), rmse[rows], *self._score_terms,
                out[schema.ANOMALY_SCORE][rows] if schema.ANOMALY_SCORE in out else no_score,
                flags[rows],
            )  # fmt: skip

    def _fused_buffers(self, batch_size: int) -> tuple[np.ndarray, ...]:
        """This thread's x, x_err, valid (batch_size, input) and g32 (batch_size,) buffers."""
        buffers: tuple[np.ndarray, ...] | None = getattr(self._local, "fused", None)
        if buffers is None or len(buffers[0]) != batch_size:
            shape = (batch_size, self.n_in)
            buffers = (
                np.zeros(shape, np.float32),
                np.empty(shape, np.float32),
                np.empty(shape, np.bool_),
                np.empty(batch_size, np.float32),
            )
            self._local.fused = buffers
        return buffers

    # --- the torch path (any device) ----------------------------------------------------------
    def _stream(self) -> contextlib.AbstractContextManager[object]:
        """This thread's CUDA stream (a no-op context on the CPU)."""
        if not self.on_cuda:
            return contextlib.nullcontext()
        if getattr(self._local, "stream", None) is None:
            self._local.stream = torch.cuda.Stream(device=self.device)
        return torch.cuda.stream(self._local.stream)

    def _staging(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        """This thread's pinned host buffer ``name``, grown as needed; ``shape`` rows of it."""
        buffer: torch.Tensor | None = getattr(self._local, name, None)
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1] != shape[1]:
            buffer = torch.empty(shape, dtype=torch.float32, pin_memory=True)
            setattr(self._local, name, buffer)
        return buffer[: shape[0]]

    def _to_device(
        self, c: np.ndarray, e: np.ndarray, g: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, input), (rows, input), (rows,) float32 tensors on the device.

        G flux is rounded to float32 here; a flux outside float32's normal range (no real
        source has one) is then treated as missing by :meth:`_recipe`.
        """
        n = len(g)
        with np.errstate(over="ignore"):  # beyond float32: inf, a missing flux
            g = np.asarray(g, np.float32)
        if not self.on_cuda:  # views of the caller's arrays where dtypes allow (no copy)
            return (
                torch.from_numpy(np.ascontiguousarray(c, np.float32)),
                torch.from_numpy(np.ascontiguousarray(e, np.float32)),
                torch.from_numpy(g),
            )
        packed = self._staging("inputs", (n, 2 * self.n_in + 1))  # (rows, c | e | g)
        host = packed.numpy()
        host[:, : self.n_in] = c
        host[:, self.n_in : 2 * self.n_in] = e
        host[:, -1] = g
        on_device = packed.to(self.device, non_blocking=True)  # the block's one H2D copy
        return (
            on_device[:, : self.n_in],
            on_device[:, self.n_in : 2 * self.n_in],
            on_device[:, -1],
        )

    def _recipe(
        self, c: torch.Tensor, e: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, x_err (rows, input), valid (rows, input) and flags (rows,) int32: the torch form
        of the input recipe, :func:`xpbatch.store.input_recipe.recipe_rows` (tested equal)."""
        g_ok = torch.isfinite(g) & (g >= _FLOAT32_TINY)  # (rows,)
        valid = torch.isfinite(c) & torch.isfinite(e) & (e > 0)  # (rows, input)
        flags = torch.where(g_ok, 0, int(CatalogFlag.G_FLUX_MISSING)).to(torch.int32)
        bands = (
            (slice(0, self.n_bp), int(CatalogFlag.BP_MISSING)),
            (slice(self.n_bp, None), int(CatalogFlag.RP_MISSING)),
        )
        for columns, missing_bit in bands:
            missing = torch.isnan(c[:, columns]).all(dim=1)  # (rows,)
            broken = ~missing & ~valid[:, columns].all(dim=1)
            flags |= missing.int() * missing_bit | broken.int() * int(CatalogFlag.NON_FINITE)
        encodable = g_ok & valid.any(dim=1)  # (rows,)
        flags |= (~encodable).int() * int(CatalogFlag.NOT_ENCODED)
        g_safe = torch.where(g_ok, g, 1.0)[:, None]  # (rows, 1)
        usable = valid & encodable[:, None]
        x = torch.where(usable, (c / g_safe - self.mean) / self.std, 0.0)
        x_err = torch.where(valid, e / g_safe / self.std, 1.0)
        return x, x_err, valid, flags

    def _forward(self, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
        """mu, log_var (rows, latent), xhat, shat (rows, input) of padded passes of batch_size."""
        n_rows = x.shape[0]
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for start in range(0, n_rows, batch_size):
            batch = x[start : start + batch_size]
            n = batch.shape[0]
            if n < batch_size:  # only the last pass is padded, so kernels never change shape
                batch = torch.cat([batch, batch.new_zeros(batch_size - n, self.n_in)])
            out = self.network(batch)  # (batch_size, ...)
            for part, value in zip(parts, (out.mu, out.log_var, out.xhat, out.shat), strict=True):
                part.append(value[:n])
        return tuple(p[0] if len(p) == 1 else torch.cat(p) for p in parts)

    def _compute(
        self,
        c: torch.Tensor,
        e: torch.Tensor,
        g: torch.Tensor,
        names: Sequence[str],
        batch_size: int,
    ) -> dict[str, torch.Tensor]:
        """The outputs ``names`` (rows, width) float32 on the device; NaN where not encoded."""
        x, x_err, valid, flags = self._recipe(c, e, g)
        mu, log_var, xhat, shat = self._forward(x, batch_size)
        dead = ((flags & int(CatalogFlag.NOT_ENCODED)) != 0)[:, None]  # (rows, 1)
        nan = torch.tensor(float("nan"), device=self.device)
        g_col = g[:, None]
        rmse = reconstruction_rmse(x, xhat, x_err, valid)  # (rows,)
        score = self._score(mu, rmse, dead[:, 0])  # (rows,), NaN where not encoded
        # One line per output; each is computed only when it will be stored.
        make: dict[str, Callable[[], torch.Tensor]] = {
            schema.LATENT_MEAN: lambda: mu,
            schema.LATENT_STD: lambda: torch.exp(0.5 * log_var),
            schema.SCATTER: lambda: shat * self.std * g_col,
            schema.RECONSTRUCTION: lambda: (xhat * self.std + self.mean) * g_col,
            schema.RMSE: lambda: rmse[:, None],
            schema.FLAGS: lambda: (flags | self._outlier_bits(score))[:, None].float(),
            schema.ANOMALY_SCORE: lambda: score[:, None],
        }
        results = {}
        for name in names:
            value = make[name]()
            results[name] = value if name == schema.FLAGS else torch.where(dead, nan, value)
        return results

    def _score(self, mu: torch.Tensor, rmse: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """(rows,) float32 anomaly score (:mod:`xpbatch.model.density`), NaN on rows not encoded."""
        score = self.density.score(mu, rmse).float()
        return torch.where(dead, torch.nan, score)

    def _outlier_bits(self, score: torch.Tensor) -> torch.Tensor:
        """(rows,) int32 LATENT_OUTLIER bits: a score above the training set's threshold."""
        return (score > self.density.threshold).int() * int(CatalogFlag.LATENT_OUTLIER)

    def _to_host(self, results: Mapping[str, torch.Tensor], out: Mapping[str, np.ndarray]) -> None:
        """Copy the outputs into the host arrays: directly on the CPU, one packed copy on CUDA."""
        if self.on_cuda:
            packed = torch.cat([results[name] for name in out], dim=1)  # (rows, sum of widths)
            host = self._staging("outputs", tuple(packed.shape))  # type: ignore[arg-type]
            host.copy_(packed, non_blocking=True)  # the block's one D2H copy
            torch.cuda.current_stream(self.device).synchronize()
            columns = host.numpy()
            start = 0
            for name, array in out.items():
                width = results[name].shape[1]
                _store(array, columns[:, start : start + width])
                start += width
            return
        for name, array in out.items():
            _store(array, results[name].numpy())


_FLOAT32_TINY = float(FLOAT32_TINY)


def _store(array: np.ndarray, columns: np.ndarray) -> None:
    """Copy (rows, width) float32 columns into a (rows,) or (rows, width) output array."""
    if array.ndim == 1:
        columns = columns[:, 0]
    if array.dtype.kind == "u":  # flags travel as exact small floats
        array[:] = columns.astype(array.dtype)
    else:
        array[:] = columns


_KERNELS: collections.OrderedDict[tuple[int, str], EncodeKernel] = collections.OrderedDict()
"""(id of the model, device) -> its kernel; a few recent ones (each holds its model, so the id
cannot be reused while the entry lives)."""
_MAX_KERNELS = 4
_KERNELS_LOCK = threading.Lock()


def kernel_for(model: TrainedModel, device: str | torch.device = "cpu") -> EncodeKernel:
    """The :class:`EncodeKernel` of ``model`` on ``device``, built once and then reused."""
    key = (id(model), str(torch.device(device)))
    with _KERNELS_LOCK:
        if key in _KERNELS:
            _KERNELS.move_to_end(key)
        else:
            _KERNELS[key] = EncodeKernel(model, device)
            while len(_KERNELS) > _MAX_KERNELS:
                _KERNELS.popitem(last=False)
        return _KERNELS[key]


def encode_rows(
    kernel: EncodeKernel,
    coefficients: np.ndarray,
    coefficient_errors: np.ndarray,
    phot_g_mean_flux: np.ndarray,
    out: Mapping[str, np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> None:
    """Run ``kernel`` over any number of rows block by block, into the host arrays ``out``."""
    if batch_size < 1:
        raise InputShapeError(f"batch_size must be at least 1, got {batch_size}")
    block = batch_size * BATCHES_PER_BLOCK
    for start in range(0, len(phot_g_mean_flux), block):
        rows = slice(start, start + block)
        kernel.run(
            coefficients[rows],
            coefficient_errors[rows],
            phot_g_mean_flux[rows],
            {name: array[rows] for name, array in out.items()},
            batch_size=batch_size,
        )


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    """Outputs of :func:`encode_arrays`; NaN on rows flagged NOT_ENCODED."""

    latent_mean: np.ndarray  # (rows, latent) float32, posterior mean
    latent_std: np.ndarray  # (rows, latent) float32, exp(log_var / 2)
    reconstruction: np.ndarray  # (rows, input) float32, e-/s (input units)
    scatter: np.ndarray  # (rows, input) float32, e-/s (input units)
    rmse: np.ndarray  # (rows,) float32, sqrt(mean over valid j of ((x - xhat) / x_err)^2)
    flags: np.ndarray  # (rows,) uint16 CatalogFlag bits
    anomaly_score: np.ndarray  # (rows,) float32, -log p(latent mean), nats (xpbatch.model.density)
    latent_mean_mc: np.ndarray | None = None  # (rows, latent) float32, with ``mc`` (encode.mc)
    latent_std_mc: np.ndarray | None = None  # (rows, latent) float32, with ``mc``


def encode_arrays(
    model: TrainedModel,
    coefficients: np.ndarray,
    coefficient_errors: np.ndarray,
    phot_g_mean_flux: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    mc: MonteCarlo | None = None,
    source_id: np.ndarray | None = None,
    correlations: tuple[np.ndarray, np.ndarray] | None = None,
) -> EncodeResult:
    """Encode spectra given in physical units (e-/s) with ``model``, deterministically.

    Parameters
    ----------
    model
        The trained scatter VAE.
    coefficients, coefficient_errors
        (rows, 110) arrays, BP 0-54 then RP 0-54, in e-/s as in DR3. NaN marks a missing
        value (e.g. a missing band); such coefficients are ignored.
    phot_g_mean_flux
        (rows,) G-band mean flux in e-/s; rows where it is missing or not positive are
        flagged G_FLUX_MISSING and NOT_ENCODED, and their outputs are NaN.
    batch_size
        Rows per forward pass; each pass is padded to this size so results depend on how
        rows are grouped into chunks only at float32 round-off.
    device
        Torch device for the forward pass.
    mc, source_id, correlations
        Also the Monte-Carlo latents (:mod:`xpbatch.encode.mc`): the draws, each row's
        source_id (seeds its draws; default 0, 1, ...) and, for a full covariance, the packed
        (BP, RP) correlations, (rows, 1485) each.

    Returns
    -------
    EncodeResult
        Posterior mean and std of the latents; reconstruction and scatter converted back to
        e-/s; RMSE = sqrt(mean_j ((x_j - xhat_j) / sigma_j)^2) over the valid coefficients
        (a unitless, error-weighted residual); CatalogFlag bits; the anomaly score.

    Examples
    --------
    >>> import numpy as np
    >>> from xpbatch.model.trained import TrainedModel
    >>> model = TrainedModel.untrained()
    >>> out = encode_arrays(model, np.ones((2, 110)), np.full((2, 110), 0.1), np.ones(2))
    >>> out.latent_mean.shape, out.scatter.shape, out.rmse.shape
    ((2, 6), (2, 110), (2,))
    >>> r = encode_arrays(model, np.zeros((1, 110)), np.ones((1, 110)), np.array([-1.0]))
    >>> bool(r.flags[0] & 256), bool(np.isnan(r.rmse[0]))  # NOT_ENCODED, NaN output
    (True, True)
    """
    c = np.asarray(coefficients)
    e = np.asarray(coefficient_errors)
    g = np.asarray(phot_g_mean_flux)
    check_shapes(c, e, g, model.config.input_dim)
    n_rows, n_in = c.shape
    latent = model.config.latent_dim
    result = EncodeResult(
        latent_mean=np.empty((n_rows, latent), np.float32),
        latent_std=np.empty((n_rows, latent), np.float32),
        reconstruction=np.empty((n_rows, n_in), np.float32),
        scatter=np.empty((n_rows, n_in), np.float32),
        rmse=np.empty(n_rows, np.float32),
        flags=np.empty(n_rows, np.uint16),
        anomaly_score=np.empty(n_rows, np.float32),
    )
    outputs = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    kernel = kernel_for(model, device)
    encode_rows(
        kernel, c, e, g, {k: v for k, v in outputs.items() if v is not None}, batch_size=batch_size
    )
    if mc is None:
        return result
    ids = np.arange(n_rows) if source_id is None else np.asarray(source_id, np.int64)
    drawn = mc_outputs(kernel, c, e, g, ids, correlations, mc=mc, batch_size=batch_size)
    return dataclasses.replace(result, **drawn)


def encode_chunk(
    model: TrainedModel,
    chunk: Chunk,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    with_reconstruction: bool = False,
    mc: MonteCarlo | None = None,
) -> dict[str, np.ndarray]:
    """Encode the rows of one input chunk into the catalogue's variables.

    Parameters
    ----------
    model
        The trained scatter VAE.
    chunk
        ``source_id`` (n,), ``coefficients`` and ``coefficient_errors`` (n, 110) in e-/s,
        ``phot_g_mean_flux`` (n,) and ``input_flags`` (n,) uint8, as stored.
    batch_size
        Rows per forward pass (padded, so results do not depend on the chunking).
    device
        Torch device of the forward pass.
    with_reconstruction
        Also return the decoder's reconstruction in e-/s.
    mc
        Also the Monte-Carlo latents (:mod:`xpbatch.encode.mc`); a full covariance reads the
        chunk's packed correlations.

    Returns
    -------
    dict of numpy.ndarray
        The names of :func:`output_variables`: ``source_id`` (copied), ``latent_mean`` and
        ``latent_std`` (n, latent) float32, ``scatter`` (n, 110) float32 in e-/s, ``rmse`` (n,)
        float32, ``flags`` (n,) uint16 = the store's input flags in the low byte, the model's
        flags and the training/validation membership bits, and ``anomaly_score`` (n,) float32
        (:mod:`xpbatch.model.density`). Rows flagged NOT_ENCODED are NaN.
        ``ra`` and ``dec`` are copied when the chunk has them.

    Examples
    --------
    >>> import numpy as np
    >>> from xpbatch.model.trained import TrainedModel
    >>> chunk = {"source_id": np.array([7, 9]), "coefficients": np.ones((2, 110), np.float32),
    ...          "coefficient_errors": np.full((2, 110), 0.1, np.float32),
    ...          "phot_g_mean_flux": np.array([1.0, np.nan]),
    ...          "input_flags": np.array([0, 4], np.uint8)}
    >>> out = encode_chunk(TrainedModel.untrained(), chunk)
    >>> out["latent_mean"].shape, int(out["flags"][1])  # G_FLUX_MISSING | NOT_ENCODED
    ((2, 6), 260)
    """
    n_rows = check_chunk(chunk)
    names = output_variables(with_reconstruction=with_reconstruction)
    out = empty_outputs(model, n_rows, names)
    kernel = kernel_for(model, device)
    encode_rows(
        kernel,
        chunk[schema.COEFFICIENTS],
        chunk[schema.COEFFICIENT_ERRORS],
        chunk[schema.PHOT_G_MEAN_FLUX],
        {name: out[name] for name in names[1:]},
        batch_size=batch_size,
    )
    source_id = np.asarray(chunk[schema.SOURCE_ID], np.int64)
    out[schema.SOURCE_ID][:] = source_id
    # The low byte repeats the store's InputFlag bits (some, like G_FLUX_FROM_MAG, are known
    # only to the store); the high byte holds the model's own bits.
    out[schema.FLAGS] |= np.asarray(chunk[schema.INPUT_FLAGS]).astype(np.uint16)
    out[schema.FLAGS] |= model.training_membership(source_id)
    for name in PASSTHROUGH_VARIABLES:
        if name in chunk:
            out[name] = np.array(chunk[name], np.float64)  # (n,)
    if mc is not None:
        c, e = chunk[schema.COEFFICIENTS], chunk[schema.COEFFICIENT_ERRORS]
        g = chunk[schema.PHOT_G_MEAN_FLUX]
        correlations = chunk_correlations(chunk, mc)
        out |= mc_outputs(kernel, c, e, g, source_id, correlations, mc=mc, batch_size=batch_size)
    return out
