"""Monte-Carlo latents: each spectrum's measurement noise propagated through the encoder.

For every row, K realisations of its standardised coefficients are drawn from its measurement
covariance, ``x_k = x + diag(x_err) L z_k`` with ``L`` the Cholesky factor of each band's
correlation matrix (the identity for a diagonal covariance) and ``z_k`` standard normal; the
encoder runs on all of them and the mean and standard deviation of the K posterior means are
stored (``latent_mean_mc``, ``latent_std_mc``). Missing or broken coefficients get no noise, as
they get no weight in the plain encode.

Deterministic and the same on every device: a row's normals come from its own counter-based
generator, SplitMix64 keyed by (seed, source_id) with Box-Muller, drawn on the host by
:func:`standard_normals`; the correlation factors are computed on the host too
(:func:`correlation_factors`), and the K means are reduced on the host (:func:`reduce_draws`). So
the CPU and GPU paths differ only in the matrix products and the encoder, at float32 round-off,
and a resumed or re-chunked run draws the same numbers for every row.

Memory is flat in K: rows go through in passes of ``batch_size // K`` rows, so one pass holds
``batch_size`` draws (the same forward-pass size as the plain encode), never K copies of a chunk;
the factors are expanded per pass from the packed correlations. Only the encoder runs: the
latent means need no decoder.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numba
import numpy as np
import torch

from xpbatch import schema
from xpbatch.config import EncodeConfig
from xpbatch.errors import ConfigError, InputShapeError
from xpbatch.schema import CatalogFlag
from xpbatch.store.input_recipe import recipe_rows

if TYPE_CHECKING:
    from xpbatch.encode.kernel import EncodeKernel

MC_OUTPUTS = (schema.LATENT_MEAN_MC, schema.LATENT_STD_MC)
"""The catalogue variables of the Monte-Carlo latents, (rows, latent) float32 each."""
SHRINKAGE = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)
"""A band's correlation matrix R that is not positive definite (DR3 stores rounded values) is
replaced by (1 - s) R + s I, with the first s here that makes it so (s = 1: diagonal)."""

_NOT_ENCODED = np.uint16(CatalogFlag.NOT_ENCODED)


@dataclasses.dataclass(frozen=True)
class MonteCarlo:
    """How the Monte-Carlo latents are drawn (the kernel's option; the CLI's is EncodeConfig).

    Examples
    --------
    >>> import numpy as np
    >>> from xpbatch.encode.kernel import encode_arrays
    >>> from xpbatch.model.trained import TrainedModel
    >>> out = encode_arrays(TrainedModel.untrained(), np.ones((2, 110)), np.full((2, 110), 0.1),
    ...                     np.ones(2), mc=MonteCarlo(8, seed=1), source_id=np.array([7, 9]))
    >>> out.latent_mean_mc.shape, bool((out.latent_std_mc > 0).all())
    ((2, 6), True)
    >>> MonteCarlo(8, seed=1).options()
    {'mc_samples': 8, 'mc_seed': 1, 'mc_covariance': 'diagonal'}
    """

    samples: int
    """Draws per spectrum K (at least 2)."""
    seed: int = 0
    """A row's draws depend on (seed, source_id) alone."""
    covariance: Literal["full", "diagonal"] = "diagonal"
    """'full': errors and the packed correlations (the chunk must carry them); 'diagonal':
    the errors alone."""

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"Monte-Carlo latents need at least 2 draws, got {self.samples}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"the Monte-Carlo seed must be in [0, 2**63), got {self.seed}")
        if self.covariance not in schema.MC_COVARIANCES:
            raise ConfigError(
                f"covariance must be one of {', '.join(schema.MC_COVARIANCES)}, got "
                f"{self.covariance!r}"
            )

    def options(self) -> dict[str, int | str]:
        """The catalogue's record of these draws (keys of ``options``, in the fingerprint)."""
        return {
            schema.MC_OPTION_SAMPLES: self.samples,
            schema.MC_OPTION_SEED: self.seed,
            schema.MC_OPTION_COVARIANCE: self.covariance,
        }

    @classmethod
    def of_run(cls, config: EncodeConfig, store_attrs: Mapping[str, Any]) -> MonteCarlo | None:
        """A run's draws (None without ``mc_samples``), its 'auto' covariance resolved: full when
        the store carries correlations. A full one asked of a store without is a ConfigError."""
        if not config.mc_samples:
            return None
        has_correlations = store_attrs.get(schema.STORE_ATTR_WITH_CORRELATIONS) is True
        covariance = config.mc_covariance
        if covariance == "auto":
            covariance = "full" if has_correlations else "diagonal"
        if covariance == "full" and not has_correlations:
            raise ConfigError(
                "--mc-covariance full draws from the store's packed correlations, but this "
                "store has none: ingest with --with-correlations, or use --mc-covariance diagonal"
            )
        return cls(config.mc_samples, seed=config.mc_seed, covariance=covariance)

    def store_variables(self) -> tuple[str, ...]:
        """The store variables the draws read besides the encode's (the correlations)."""
        if self.covariance == "diagonal":
            return ()
        return tuple(schema.correlations_name(band) for band in schema.BANDS)

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> MonteCarlo | None:
        """Inverse of :meth:`options`; None for a catalogue without Monte-Carlo latents."""
        if schema.MC_OPTION_SAMPLES not in options:
            return None
        return cls(
            int(options[schema.MC_OPTION_SAMPLES]),  # type: ignore[call-overload]
            seed=int(options[schema.MC_OPTION_SEED]),  # type: ignore[call-overload]
            covariance=options[schema.MC_OPTION_COVARIANCE],  # type: ignore[arg-type]
        )


# --- the host's parts: draws, factors, reduction ---------------------------------------------
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (golden ratio)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@numba.njit(cache=True, nogil=True)
def _mix(z: np.uint64) -> np.uint64:
    """SplitMix64's output function (a bijection of 64-bit words)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def standard_normals(source_id: np.ndarray, seed: int, out: np.ndarray) -> None:
    """Fill ``out`` (rows, n) float32 with each row's own standard normals.

    Row r's stream is SplitMix64 started at ``mix(mix(seed + gamma) ^ source_id[r])``; its j-th
    64-bit output gives two 24-bit uniforms and, by Box-Muller, values j and n/2 + j. The
    logarithms and sines run as numpy's vectorised float32 functions.
    """
    rows, n = out.shape
    if n % 2:  # an odd width: draw one more and drop it
        padded = np.empty((rows, n + 1), np.float32)
        standard_normals(source_id, seed, padded)
        out[:] = padded[:, :n]
        return
    half = n // 2
    radius, angle = np.empty((rows, half), np.float32), out[:, half:]
    _uniforms(np.asarray(source_id, np.int64), seed, radius, angle)
    np.log(radius, out=radius)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    np.multiply(np.cos(angle), radius, out=out[:, :half])
    np.sin(angle, out=angle)
    angle *= radius


@numba.njit(cache=True, nogil=True)
def _uniforms(source_id: np.ndarray, seed: int, u: np.ndarray, angle: np.ndarray) -> None:
    """Box-Muller's inputs of :func:`standard_normals`: u in (0, 1) and angle in [0, 2 pi)."""
    two_pi = np.float32(2.0 * np.pi / 16777216.0)
    scale, offset = np.float32(1.0 / 16777216.0), np.float32(0.5)
    key = _mix(np.uint64(seed) + _GAMMA)
    for r in range(u.shape[0]):
        state = _mix(key ^ np.uint64(source_id[r]))
        for j in range(u.shape[1]):
            z = _mix(state + np.uint64(j + 1) * _GAMMA)
            u[r, j] = (np.float32(np.uint32(z >> np.uint64(40))) + offset) * scale
            angle[r, j] = np.float32(np.uint32(z & np.uint64(0xFFFFFF))) * two_pi


@numba.njit(cache=True, nogil=True)
def correlation_factors(packed: np.ndarray, out: np.ndarray) -> int:
    """Cholesky factors ``L`` (rows, n, n) float32, lower triangular, of packed correlations.

    ``packed`` (rows, n(n-1)/2) holds each strictly lower triangle row-major, as DR3 stores it
    (``numpy.tril_indices(n, k=-1)``). A row with a non-finite value (a missing band) gets the
    identity; a matrix that is not positive definite is shrunk towards it (:data:`SHRINKAGE`).
    Returns the number of rows that needed shrinking.
    """
    n = out.shape[1]
    shrunk = 0
    for r in range(out.shape[0]):
        factor = out[r]
        finite = True
        for i in range(packed.shape[1]):
            if not np.isfinite(packed[r, i]):
                finite = False
                break
        done = False
        for step in range(len(SHRINKAGE) if finite else 0):
            done = _cholesky(packed[r], np.float32(1.0 - SHRINKAGE[step]), factor)
            if done:
                shrunk += 1 if step > 0 else 0
                break
        if not done:
            factor[:, :] = 0.0
            for i in range(n):
                factor[i, i] = 1.0
    return shrunk


@numba.njit(cache=True, nogil=True, fastmath=True)
def _cholesky(packed: np.ndarray, keep: np.float32, factor: np.ndarray) -> bool:
    """``factor`` = the Cholesky factor of the correlation matrix with off-diagonal
    ``keep * packed``, row by row (dot products of rows, vectorised); False if not PD."""
    n = factor.shape[0]
    k = 0
    for i in range(n):
        row = factor[i]
        for j in range(i):
            s = keep * packed[k]
            k += 1
            other = factor[j]
            for m in range(j):
                s -= row[m] * other[m]
            row[j] = s / other[j]
        s = np.float32(1.0)
        for m in range(i):
            s -= row[m] * row[m]
        if not s > 1e-6:
            return False
        row[i] = np.sqrt(s)
        row[i + 1 :] = 0.0
    return True


@numba.njit(cache=True, nogil=True)
def reduce_draws(
    mu: np.ndarray,  # (rows * K, latent) float32: the posterior means of every draw
    flags: np.ndarray,  # (rows,) uint16: NOT_ENCODED rows are left NaN
    mean: np.ndarray,  # out (rows, latent) float32
    std: np.ndarray,  # out (rows, latent) float32, ddof=1
) -> None:
    """Mean and standard deviation over each row's K draws, in float64, in a fixed order."""
    rows, latent = mean.shape
    k_draws = mu.shape[0] // max(rows, 1)
    for i in range(rows):
        dead = (flags[i] & _NOT_ENCODED) != 0
        for d in range(latent):
            total = 0.0
            for k in range(k_draws):
                total += mu[i * k_draws + k, d]
            m = total / k_draws
            sq = 0.0
            for k in range(k_draws):
                v = mu[i * k_draws + k, d] - m
                sq += v * v
            mean[i, d] = np.nan if dead else m
            std[i, d] = np.nan if dead else np.sqrt(sq / (k_draws - 1))


# --- the kernel ---------------------------------------------------------------------------------
class MonteCarloKernel:
    """The Monte-Carlo latents of one :class:`~xpbatch.encode.kernel.EncodeKernel`'s model.

    Uses that kernel's device, network and input recipe: the fused numba recipe on its CPU path,
    the torch one otherwise. Thread-safe like it (each thread has its own host buffers).
    """

    def __init__(self, kernel: EncodeKernel) -> None:
        self.kernel = kernel
        self.n_in, self.n_bp = kernel.n_in, kernel.n_bp
        self.latent = kernel.model.config.latent_dim
        self._local = threading.local()

    def run(
        self,
        coefficients: np.ndarray,
        coefficient_errors: np.ndarray,
        phot_g_mean_flux: np.ndarray,
        source_id: np.ndarray,
        correlations: tuple[np.ndarray, np.ndarray] | None,
        out: Mapping[str, np.ndarray],
        *,
        mc: MonteCarlo,
        batch_size: int,
    ) -> None:
        """Fill ``out``'s :data:`MC_OUTPUTS` (rows, latent) for any number of rows.

        ``correlations`` (BP, RP packed, (rows, n(n-1)/2) each) is needed for a full covariance.
        """
        if batch_size < 1:
            raise InputShapeError(f"batch_size must be at least 1, got {batch_size}")
        n_rows = len(phot_g_mean_flux)
        self._check_correlations(correlations, mc, n_rows)
        per_pass = max(1, batch_size // mc.samples)  # rows per forward pass
        pass_rows = max(batch_size, mc.samples)  # draws per pass, padded: kernels never change
        mean, std = out[schema.LATENT_MEAN_MC], out[schema.LATENT_STD_MC]
        with torch.inference_mode():
            for start in range(0, n_rows, per_pass):
                rows = slice(start, min(start + per_pass, n_rows))
                corr = (
                    None if correlations is None else (correlations[0][rows], correlations[1][rows])
                )
                mu, flags = self._pass(
                    coefficients[rows], coefficient_errors[rows], phot_g_mean_flux[rows],
                    np.asarray(source_id[rows], np.int64), corr, mc, pass_rows,
                )  # fmt: skip
                reduce_draws(mu, flags, mean[rows], std[rows])

    def _check_correlations(
        self, correlations: tuple[np.ndarray, np.ndarray] | None, mc: MonteCarlo, n_rows: int
    ) -> None:
        """An InputShapeError unless a full covariance has (rows, m(m-1)/2) correlations per band
        and a diagonal one none."""
        if correlations is None and mc.covariance == "full":
            raise InputShapeError(
                "a full covariance draws from the packed correlations; pass them (BP, RP), or "
                "draw from the diagonal one (MonteCarlo(..., covariance='diagonal'))"
            )
        if correlations is not None and mc.covariance == "diagonal":
            raise InputShapeError(
                "correlations were given for a diagonal covariance; pass "
                "MonteCarlo(..., covariance='full') to use them, or leave them out"
            )
        for band, packed in zip(self._bands(), correlations or (), strict=True):
            m = band.stop - band.start
            if np.shape(packed) != (n_rows, m * (m - 1) // 2):
                raise InputShapeError(
                    f"packed correlations must be ({n_rows}, {m * (m - 1) // 2}) per band (the "
                    f"strict lower triangle of {m} x {m}), got {np.shape(packed)}"
                )

    def _pass(
        self,
        c: np.ndarray,
        e: np.ndarray,
        g: np.ndarray,
        source_id: np.ndarray,
        correlations: tuple[np.ndarray, np.ndarray] | None,
        mc: MonteCarlo,
        pass_rows: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (rows * K, latent) posterior means of one pass's draws and the rows' flags."""
        n, k_draws = len(g), mc.samples
        device = self.kernel.device
        x, scale, flags = self._recipe(c, e, g)  # (n, input) x2 on the device, (n,) host
        z = self._buffer("z", (pass_rows, self.n_in))
        standard_normals(source_id, mc.seed, z[: n * k_draws].reshape(n, k_draws * self.n_in))
        noise = torch.from_numpy(z[: n * k_draws]).to(device).view(n, k_draws, self.n_in)
        if correlations is not None:
            noise = torch.cat(
                [
                    # (n, K, band) @ (n, band, band): every draw z becomes (L z).T
                    torch.bmm(noise[..., band], self._factors(packed, band, n).transpose(1, 2))
                    for band, packed in zip(self._bands(), correlations, strict=True)
                ],
                dim=2,
            )
        draws = torch.addcmul(x[:, None, :], scale[:, None, :], noise)  # (n, K, input)
        batch = draws.reshape(n * k_draws, self.n_in)
        if n * k_draws < pass_rows:  # padding rows: the kernels of a full pass, results dropped
            batch = torch.cat([batch, batch.new_zeros(pass_rows - n * k_draws, self.n_in)])
        mu, _ = self.kernel.network.encode(batch)  # (pass_rows, latent)
        return mu[: n * k_draws].float().cpu().numpy(), flags

    def _bands(self) -> tuple[slice, slice]:
        return slice(0, self.n_bp), slice(self.n_bp, self.n_in)

    def _factors(self, packed: np.ndarray, band: slice, n: int) -> torch.Tensor:
        """(n, m, m) Cholesky factors ``L`` of one band's correlations, on the device."""
        m = band.stop - band.start
        factors = self._buffer(f"factors{band.start}", (n, m, m))
        correlation_factors(np.ascontiguousarray(packed), factors)
        return torch.from_numpy(factors).to(self.kernel.device)

    def _recipe(
        self, c: np.ndarray, e: np.ndarray, g: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """x and the noise scale (rows, input) on the device (x_err where usable, else 0), and
        the rows' CatalogFlag bits (host): the kernel's input recipe."""
        kernel = self.kernel
        if kernel.fused:
            n = len(g)
            x = self._buffer("x", (n, self.n_in))
            x_err = self._buffer("x_err", (n, self.n_in))
            valid = np.empty((n, self.n_in), np.bool_)
            g32, flags = np.empty(n, np.float32), np.zeros(n, np.uint16)
            recipe_rows(
                c, e, g, kernel._mean_np, kernel._std_np, self.n_bp, x, x_err, valid, g32, flags
            )
            dead = (flags & _NOT_ENCODED) != 0
            scale = np.where(valid & ~dead[:, None], x_err, np.float32(0))
            return torch.from_numpy(x), torch.from_numpy(scale), flags
        c_d, e_d, g_d = kernel._to_device(c, e, g)
        x_d, x_err_d, valid_d, flags_d = kernel._recipe(c_d, e_d, g_d)
        dead_d = (flags_d & int(CatalogFlag.NOT_ENCODED)) != 0
        scale_d = torch.where(valid_d & ~dead_d[:, None], x_err_d, 0.0)
        return x_d, scale_d, flags_d.cpu().numpy().astype(np.uint16)

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """This thread's float32 host buffer ``name``, grown as needed; ``shape`` of it."""
        size = int(np.prod(shape))
        buffer: np.ndarray | None = getattr(self._local, name, None)
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, np.float32)
            setattr(self._local, name, buffer)
        return buffer[:size].reshape(shape)


def mc_outputs(
    kernel: EncodeKernel,
    coefficients: np.ndarray,
    coefficient_errors: np.ndarray,
    phot_g_mean_flux: np.ndarray,
    source_id: np.ndarray,
    correlations: tuple[np.ndarray, np.ndarray] | None,
    *,
    mc: MonteCarlo,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """The :data:`MC_OUTPUTS` of some rows, (rows, latent) float32, NaN where not encoded."""
    n_rows, latent = len(phot_g_mean_flux), kernel.model.config.latent_dim
    out = {name: np.empty((n_rows, latent), np.float32) for name in MC_OUTPUTS}
    MonteCarloKernel(kernel).run(
        coefficients, coefficient_errors, phot_g_mean_flux, source_id, correlations, out,
        mc=mc, batch_size=batch_size,
    )  # fmt: skip
    return out


def chunk_correlations(
    chunk: Mapping[str, np.ndarray], mc: MonteCarlo
) -> tuple[np.ndarray, np.ndarray] | None:
    """The chunk's packed (BP, RP) correlations for a full covariance; None for a diagonal one."""
    if mc.covariance == "diagonal":
        return None
    names = mc.store_variables()
    missing = [name for name in names if name not in chunk]
    if missing:
        raise InputShapeError(
            f"Monte-Carlo latents with a full covariance need {', '.join(names)}; the chunk has "
            f"no {', '.join(missing)}: ingest with --with-correlations, or draw from the "
            "diagonal covariance (--mc-covariance diagonal)"
        )
    bp, rp = (np.asarray(chunk[name], np.float32) for name in names)
    return bp, rp
