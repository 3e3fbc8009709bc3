"""The rows of a mock catalogue, block by block: spectra observed, noise, DR3 scalars, defects.

Repeats (``MockConfig.repeats`` > 1): consecutive rows of a block form groups that are one
star, with the star's labels, spectrum, errors and correlation template, each row with its own
noise, defects, DR3 scalars and source_id; the labels' ``star_id`` is the source_id of the
group's first row (each row's own source_id without repeats).

Determinism: rows are generated in blocks of :data:`BLOCK_ROWS` rows, block ``k`` from its own
random stream ``numpy.random.default_rng([seed, k])`` drawn in a fixed order. A row therefore
depends only on ``(n, seed, config, row index)``: any chunking of the output (store chunks, bulk
files) gives the same rows, and any range of rows can be generated on its own. On one machine
the output is bitwise reproducible; another CPU or BLAS may round a few float32 values the other
way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from xpbatch import dr3, schema
from xpbatch.config import MockConfig
from xpbatch.errors import ConfigError, InputShapeError
from xpbatch.mock.instrument import (
    N_CORRELATION_TEMPLATES,
    coefficient_errors,
    correlated_noise,
    g_flux_error,
    observe,
    packed_correlations,
    project,
)
from xpbatch.mock.labels import LABEL_COLUMNS
from xpbatch.mock.populations import RARE_STREAM, draw_population, rare_photons
from xpbatch.mock.sky import positions, row_bounds, sky_pixels, source_ids
from xpbatch.mock.spectra import draw_labels, g_flux_from_mag
from xpbatch.schema import G_ZERO_POINT_MAG, N_BP, N_RP
from xpbatch.storage.partitions import N_PIXELS
from xpbatch.store.xp_store import INT_MISSING

BLOCK_ROWS = 4096
"""Rows per random stream. Fixed forever: changing it changes every mock catalogue."""
MAX_ROWS = 10**12
"""Most rows a mock catalogue can have (ids stay unique far beyond DR3's 2.2e8)."""
SOLUTION_ID = 4545469030156206080  # the DR3 value seen in real rows


@dataclass(frozen=True)
class MockRows:
    """Consecutive rows of a mock catalogue: the store's columns, DR3 extras and the labels."""

    source_id: np.ndarray  # (rows,) int64, ascending
    coefficients: np.ndarray  # (rows, 110) float32, NaN for a missing band
    coefficient_errors: np.ndarray  # (rows, 110) float32
    phot_g_mean_flux: np.ndarray  # (rows,) float64, NaN where missing
    phot_g_mean_flux_error: np.ndarray  # (rows,) float32
    phot_g_mean_mag: np.ndarray  # (rows,) float32
    ra: np.ndarray  # (rows,) float64 degrees, inside the level-12 pixel of source_id
    dec: np.ndarray  # (rows,) float64 degrees
    correlation_template: np.ndarray  # (rows, 2) int64: template of BP, RP
    scalars: dict[str, np.ndarray]  # every schema.DR3_SCALARS column; -1 / NaN for a missing band
    labels: dict[str, np.ndarray]  # LABEL_COLUMNS

    def __len__(self) -> int:
        """The number of rows."""
        return len(self.source_id)

    def take(self, rows: slice) -> MockRows:
        """The rows ``rows`` (views, not copies)."""
        return MockRows.concat([self], lambda arrays: arrays[0][rows])

    @staticmethod
    def concat(
        parts: list[MockRows], combine: Callable[[list[np.ndarray]], np.ndarray] = np.concatenate
    ) -> MockRows:
        """The rows of ``parts`` one after the other (or ``combine`` applied column by column)."""
        columns: dict[str, Any] = {}
        for field in dataclasses.fields(MockRows):
            values = [getattr(part, field.name) for part in parts]
            if isinstance(values[0], dict):
                columns[field.name] = {k: combine([v[k] for v in values]) for k in values[0]}
            else:
                columns[field.name] = combine(values)
        return MockRows(**columns)

    def correlations(self, band: str) -> np.ndarray:
        """(rows, 1485) float32 packed correlations of one band; NaN where the band is missing."""
        out = packed_correlations(band)[self.correlation_template[:, schema.BANDS.index(band)]]
        out[self.scalars[f"{band}_n_parameters"] < 0] = np.nan
        return out

    def labels_table(self) -> pa.Table:
        """The labels as an Arrow table keyed by ``source_id``."""
        columns = {"source_id": self.source_id}
        for name in LABEL_COLUMNS:
            value = self.labels[name]
            columns[name] = value if value.dtype.kind in "bi" else value.astype(np.float32)
        return pa.table(columns)


_SPECTRUM_BATCH = 1024  # rows per spectrum computation, to keep temporary arrays small


@functools.lru_cache(maxsize=1)  # consecutive ranges (store chunks) reuse the last block
def block(seed: int, index: int, n: int, config: MockConfig) -> MockRows:
    """Block ``index`` (BLOCK_ROWS rows, some past ``n`` in the last block) of a catalogue.

    Every random number comes from this block's own stream, drawn for all rows in a fixed order,
    so the block is the same whichever rows of it are used.
    """
    rng = np.random.default_rng([seed, index])
    size = BLOCK_ROWS
    rows = index * BLOCK_ROWS + np.arange(size, dtype=np.int64)
    bounds = row_bounds(n)
    pixel = np.minimum(np.searchsorted(bounds, rows, side="right"), N_PIXELS - 1)
    labels = draw_labels(rng, size, sky_pixels().sin_b[pixel], config)
    labels["population"] = draw_population(seed, index, size, config)
    g_true = g_flux_from_mag(labels["g_mag"])
    n_transits = np.round(15.0 + rng.gamma(2.5, 16.0, size)).astype(np.int64)

    true = np.empty((size, N_BP + N_RP))
    band_flux = np.empty((size, 2))
    for start in range(0, size, _SPECTRUM_BATCH):
        part = slice(start, start + _SPECTRUM_BATCH)
        true[part], band_flux[part] = observe({k: v[part] for k, v in labels.items()}, g_true[part])
    rare = np.flatnonzero(labels["population"])
    if rare.size:
        rare_rng = np.random.default_rng([seed, index, RARE_STREAM, 1])
        rare_labels = {k: v[rare] for k, v in labels.items()}
        photons = rare_photons(rare_rng, rare_labels, labels["population"][rare])
        true[rare], band_flux[rare] = project(photons, g_true[rare])
        for name, values in rare_labels.items():
            labels[name][rare] = values
    errors = coefficient_errors(band_flux, n_transits, np.exp(rng.normal(0.0, 0.15, true.shape)))
    template = rng.integers(0, N_CORRELATION_TEMPLATES, (size, 2))
    star = star_rows(size, config.repeats)
    if config.repeats > 1:  # a repeat is its star's row but for the noise drawn below
        labels = {name: values[star] for name, values in labels.items()}
        g_true, n_transits, true = g_true[star], n_transits[star], true[star]
        errors, template = errors[star], template[star]
    z = rng.standard_normal(true.shape)
    noise = np.concatenate(
        [
            correlated_noise(z[:, :N_BP], template[:, 0], "bp"),
            correlated_noise(z[:, N_BP:], template[:, 1], "rp"),
        ],
        axis=1,
    )
    g_error = g_flux_error(g_true, n_transits)
    g_noise = rng.standard_normal(size) * g_error
    if config.add_noise:
        true += noise * errors
        g_true = np.maximum(g_true + g_noise, 0.5 * g_true)
    coefficients = true.astype(np.float32)
    errors32 = errors.astype(np.float32)
    g_flux = g_true
    g_mag = (G_ZERO_POINT_MAG - 2.5 * np.log10(g_flux)).astype(np.float32)
    g_error32 = g_error.astype(np.float32)

    scalars = _dr3_scalars(rng, n_transits)
    _apply_defects(rng, config, coefficients, errors32, scalars, (g_flux, g_mag, g_error32))

    source_id = source_ids(rows, pixel, bounds, rng.random(size))
    ra, dec = positions(source_id, rng)  # drawn last: the earlier draws stay as they were
    labels["star_id"] = source_id[star]
    block = MockRows(
        source_id=source_id,
        coefficients=coefficients,
        coefficient_errors=errors32,
        phot_g_mean_flux=g_flux,
        phot_g_mean_flux_error=g_error32,
        phot_g_mean_mag=g_mag,
        ra=ra,
        dec=dec,
        correlation_template=template,
        scalars=scalars,
        labels=labels,
    )
    for field in dataclasses.fields(block):  # cached: callers get views and must not modify them
        value = getattr(block, field.name)
        for array in value.values() if isinstance(value, dict) else [value]:
            array.setflags(write=False)
    return block


def star_rows(size: int, repeats: int) -> np.ndarray:
    """(size,) the block row whose star each block row observes: groups of ``repeats`` rows.

    Groups never cross a block (each block draws its own stars), so when ``repeats`` does not
    divide BLOCK_ROWS the last group of a block is shorter, as is the catalogue's last group.
    """
    rows = np.arange(size)
    return rows - rows % repeats


_SAMPLES_PER_TRANSIT = 60


def _dr3_scalars(rng: np.random.Generator, n_transits: np.ndarray) -> dict[str, np.ndarray]:
    """Plausible values of every DR3 scalar column (schema.DR3_SCALARS) for both bands."""
    size = len(n_transits)
    out: dict[str, np.ndarray] = {"solution_id": np.full(size, SOLUTION_ID, dtype=np.int64)}
    for band, basis_function_id in dr3.BASIS_FUNCTION_ID.items():
        n_coeff = dr3.N_COEFFICIENTS[band]
        samples = n_transits * _SAMPLES_PER_TRANSIT
        n_measurements = samples - rng.binomial(samples, 0.03)
        rejected = rng.binomial(n_measurements, rng.uniform(0.002, 0.02, size))
        standard_deviation = 1.0 + rng.gamma(2.0, 0.04, size)
        dof = n_measurements - n_coeff
        relevant = np.clip(np.round(rng.normal(48.0, 4.0, size)), 30, n_coeff)
        out.update(
            {
                f"{band}_basis_function_id": np.full(size, basis_function_id, dtype=np.int16),
                f"{band}_degrees_of_freedom": dof.astype(np.int16),
                f"{band}_n_parameters": np.full(size, n_coeff, dtype=np.int16),
                f"{band}_n_measurements": n_measurements.astype(np.int16),
                f"{band}_n_rejected_measurements": rejected.astype(np.int16),
                f"{band}_standard_deviation": standard_deviation.astype(np.float32),
                # DR3: standard_deviation = sqrt(chi_squared / degrees_of_freedom)
                f"{band}_chi_squared": (dof * standard_deviation**2).astype(np.float32),
                f"{band}_n_relevant_bases": relevant.astype(np.int16),
                f"{band}_relative_shrinking": (1.0 - rng.exponential(2e-5, size)).astype(
                    np.float32
                ),
            }
        )
    return out


def _apply_defects(
    rng: np.random.Generator,
    config: MockConfig,
    coefficients: np.ndarray,
    errors: np.ndarray,
    scalars: dict[str, np.ndarray],
    g_columns: tuple[np.ndarray, ...],
) -> None:
    """Give the configured fractions of rows a missing band, a non-finite value or no G flux.

    The defects are exclusive: a row has at most one. Non-finite rows get a NaN coefficient, an
    infinite coefficient or a zero error (one each in three), at a random place.
    """
    size = len(coefficients)
    u = rng.random(size)
    kind = rng.integers(0, 3, size)
    column = rng.integers(0, N_BP + N_RP, size)
    cuts = np.cumsum(
        [
            config.bp_missing_fraction,
            config.rp_missing_fraction,
            config.non_finite_fraction,
            config.g_flux_missing_fraction,
        ]
    )
    defect = np.searchsorted(cuts, u, side="right")  # 0 BP, 1 RP, 2 non-finite, 3 G, 4 none
    for band, columns in (("bp", slice(0, N_BP)), ("rp", slice(N_BP, None))):
        rows = defect == schema.BANDS.index(band)
        coefficients[rows, columns] = np.nan
        errors[rows, columns] = np.nan
        for name, value in scalars.items():
            if name.startswith(band + "_"):
                value[rows] = INT_MISSING if value.dtype.kind == "i" else np.nan
    bad = defect == 2
    coefficients[bad & (kind == 0), column[bad & (kind == 0)]] = np.nan
    coefficients[bad & (kind == 1), column[bad & (kind == 1)]] = np.inf
    errors[bad & (kind == 2), column[bad & (kind == 2)]] = 0.0
    for value in g_columns:
        value[defect == 3] = np.nan


def mock_rows(
    n: int, start: int, stop: int, *, seed: int = 0, config: MockConfig | None = None
) -> MockRows:
    """Rows ``start:stop`` of the ``n``-row mock catalogue with this seed and configuration.

    Any range can be generated on its own: the result never depends on how the catalogue is cut.

    Examples
    --------
    >>> rows = mock_rows(1000, 0, 10, seed=1)
    >>> rows.coefficients.shape
    (10, 110)
    """
    config = config or MockConfig()
    check_size(n, seed)
    if not 0 <= start <= stop <= n:
        raise InputShapeError(f"rows {start}:{stop} are outside the mock catalogue's {n} rows")
    if start == stop:
        return block(seed, 0, n, config).take(slice(0, 0))
    parts = [block(seed, index, n, config).take(part) for index, part in _block_parts(start, stop)]
    return parts[0] if len(parts) == 1 else MockRows.concat(parts)


def check_size(n: int, seed: int) -> None:
    """Raise ConfigError unless n and seed make a mock catalogue."""
    if n < 1:
        raise ConfigError(f"a mock catalogue needs at least 1 row, got n={n}")
    if n > MAX_ROWS:
        raise ConfigError(f"n={n} is more than the {MAX_ROWS} rows a mock catalogue can hold")
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")


def row_batches(
    n: int, start: int, stop: int, *, seed: int, config: MockConfig, batch_rows: int
) -> Iterator[MockRows]:
    """Rows ``start:stop`` in batches of at most ``batch_rows`` rows, each block generated once."""
    for index, part in _block_parts(start, stop):
        rows = block(seed, index, n, config)
        for a in range(part.start, part.stop, batch_rows):
            yield rows.take(slice(a, min(a + batch_rows, part.stop)))


def _block_parts(start: int, stop: int) -> Iterator[tuple[int, slice]]:
    """(block index, rows of that block) covering the catalogue's rows ``start:stop``."""
    for index in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1):
        offset = index * BLOCK_ROWS
        yield index, slice(max(start, offset) - offset, min(stop, offset + BLOCK_ROWS) - offset)
