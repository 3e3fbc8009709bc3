"""Does a model fit the data? Statistics of what a model saw in training, and the check of a store.

A model applied to data in other units or another normalisation does not fail: it writes
plausible-looking garbage (every row a latent outlier, or latents collapsed to a point and an
rmse of 1e8). So before any work ``encode-catalog`` measures rows from every chunk of the store the
way the model's training rows were measured, and refuses when they differ by more than a
tolerance:

=================  =======================================================================
statistic          definition (over the measured rows)
=================  =======================================================================
``input_spread``   median over coefficients of the robust standard deviation
                   (interquartile range / 1.349) of the standardised inputs ``x``, valid
                   values only. By construction of the normalisation it is about 1 on the
                   training rows; a store scaled x30 gives about 30.
``latent_spread``  root sum of squares over latent dimensions of the robust standard
                   deviation of the latent means (collapsed dimensions add nothing)
``rmse_median``    median of the rows' rmse (see the catalogue's ``rmse``)
=================  =======================================================================

``xpbatch train`` records them on its training rows, ``xpbatch import-xpvae`` records what the
normalisation file implies (``input_spread`` 1: the published training rows are not
available), and a model without them (one never trained, or trained on rows too few to
measure) is checked like an imported one, with a note saying so.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import numpy as np
import torch

from xpbatch.errors import ModelMismatchError
from xpbatch.model.trained import TrainedModel, standardise

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 4096
"""Rows measured: of the training rows (train), or in all, from every chunk, of a store
(encode; see :func:`rows_per_chunk`)."""
MIN_ROWS = 8
"""Fewer usable rows than this say too little about spreads: only the rmse is then checked."""
INPUT_SPREAD_FACTOR = 10.0
"""``input_spread`` may differ from the model's by this factor either way. Measured: a mock store
under a model trained on mock rows 1.0x; the published reference inputs under the imported
published model 0.18 against the normalisation's 1 (5.5x); a x30 store 30x; a x1e6 store or a
model trained on one 1e6x."""
LATENT_SPREAD_FACTOR = 10.0
"""``latent_spread`` may differ by this factor either way (a collapsed encoding is ~100x)."""
RMSE_FACTOR = 1000.0
"""``rmse_median`` may exceed the model's by this factor. Measured: real DR3 sample rows (bright,
so small errors) under a model trained on mock rows 61x; a foreign normalisation ~1e7x."""
IQR_TO_STD = 1.349
"""Interquartile range of a standard normal distribution."""

SOURCE_TRAINING = "training rows"
SOURCE_NORMALISATION = "normalisation file"


@dataclasses.dataclass(frozen=True)
class FitStatistics:
    """What one set of rows looks like to a model (see the module docstring)."""

    source: str
    """Where the numbers come from: training rows, a normalisation file, or a store."""
    rows: int
    """Rows measured (0 when implied by a normalisation file)."""
    input_spread: float | None
    latent_spread: float | None = None
    rmse_median: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, as stored in a model file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitStatistics:
        """Inverse of :meth:`to_dict`."""
        return cls(**values)

    @classmethod
    def from_normalisation(cls) -> FitStatistics:
        """What a normalisation file implies: standardised training inputs spread about 1."""
        return cls(source=SOURCE_NORMALISATION, rows=0, input_spread=1.0)


def _robust_std(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(columns,) IQR / 1.349 of each column over its valid rows; NaN for a column with none."""
    masked = np.where(valid, values, np.nan).astype(np.float64)
    with warnings.catch_warnings():  # a column without valid values is NaN, on purpose
        warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)
        q25, q75 = np.nanpercentile(masked, [25, 75], axis=0)
    return (q75 - q25) / IQR_TO_STD


@torch.no_grad()
def measure(
    model: TrainedModel, x: np.ndarray, x_err: np.ndarray, valid: np.ndarray, *, source: str
) -> FitStatistics | None:
    """The statistics of standardised rows ``x`` (rows, input) under ``model``; None if no rows.

    ``valid`` (rows, input) marks the usable values; rows without any are left out. The spreads
    need :data:`MIN_ROWS` rows and are None below; ``rmse_median`` is measured from one row on.
    """
    rows = valid.any(axis=1)
    x, x_err, valid = x[rows], x_err[rows], valid[rows]
    if len(x) == 0:
        return None
    enough = len(x) >= MIN_ROWS
    network = model.network.eval()
    device = next(network.parameters()).device
    out = network(torch.from_numpy(np.where(valid, x, 0).astype(np.float32)).to(device))
    mu = out.mu.double().cpu().numpy()  # (rows, latent)
    xhat = out.xhat.double().cpu().numpy()  # (rows, input)
    with np.errstate(all="ignore"):
        z2 = np.where(valid, ((x - xhat) / x_err) ** 2, 0.0)
        rmse = np.sqrt(z2.sum(axis=1) / valid.sum(axis=1))
    return FitStatistics(
        source=source,
        rows=len(x),
        input_spread=float(np.nanmedian(_robust_std(x, valid))) if enough else None,
        latent_spread=(
            float(np.sqrt(np.sum(_robust_std(mu, np.ones_like(mu, bool)) ** 2))) if enough else None
        ),
        rmse_median=float(np.median(rmse)),
    )


def measure_physical(
    model: TrainedModel,
    coefficients: np.ndarray,
    coefficient_errors: np.ndarray,
    phot_g_mean_flux: np.ndarray,
    *,
    source: str,
) -> FitStatistics | None:
    """:func:`measure` of rows in e-/s (a store's), standardised with the model's recipe."""
    inp = standardise(coefficients, coefficient_errors, phot_g_mean_flux, model.normalisation)
    usable = inp.encodable
    return measure(model, inp.x[usable], inp.x_err[usable], inp.valid[usable], source=source)


def expected_statistics(model: TrainedModel) -> FitStatistics:
    """What the model recorded; for a model without statistics, what its normalisation implies."""
    if model.fit_statistics is not None:
        return FitStatistics.from_dict(model.fit_statistics)
    return FitStatistics.from_normalisation()


def _outside(found: float, expected: float, factor: float, *, upper_only: bool = False) -> bool:
    if not np.isfinite(found):
        return True
    if found > expected * factor:
        return True
    return not upper_only and found < expected / factor


def fit_problems(found: FitStatistics, expected: FitStatistics) -> list[str]:
    """Each way ``found`` departs from ``expected`` beyond the tolerances (empty: it fits)."""
    checks = [
        ("input_spread", found.input_spread, expected.input_spread, INPUT_SPREAD_FACTOR, False),
        ("latent_spread", found.latent_spread, expected.latent_spread, LATENT_SPREAD_FACTOR, False),
        ("rmse_median", found.rmse_median, expected.rmse_median, RMSE_FACTOR, True),
    ]
    problems = []
    for name, value, reference, factor, upper_only in checks:
        if value is None or reference is None:
            continue
        if _outside(value, reference, factor, upper_only=upper_only):
            allowed = f"at most {factor:g}x that" if upper_only else f"within a factor {factor:g}"
            problems.append(
                f"{name} is {value:.3g}, expected {reference:.3g} (from the model's "
                f"{expected.source}; {allowed})"
            )
    return problems


def check_fit(model: TrainedModel, found: FitStatistics | None, *, where: str) -> None:
    """Refuse (ModelMismatchError) when ``found`` (rows of ``where``) does not fit ``model``."""
    if found is None:
        logger.warning("no usable row in %s: the model's fit to the data was not checked", where)
        return
    expected = expected_statistics(model)
    if model.fit_statistics is None:
        logger.info(
            "model %r records no training statistics: its fit to %s is checked "
            "against its normalisation only (standardised inputs must spread about 1)",
            model.name,
            where,
        )
    problems = fit_problems(found, expected)
    if problems:
        raise ModelMismatchError(
            f"model {model.name!r} does not fit the data of {where}; its normalisation does not "
            f"fit this store: measured on {found.rows} rows, " + "; ".join(problems) + ". Were "
            "the coefficients scaled or in other units, or was the model trained on other data? "
            "(Inputs are coefficients / phot_g_mean_flux, standardised with the model's mean and "
            "std.) Use a model trained on data like this store, or pass --skip-fit-check "
            "(EncodeConfig(check_fit=False)) to encode anyway."
        )


ROWS_PER_CHUNK = 32
"""Fewest rows measured in every chunk of a store (more when the store has few chunks)."""


def rows_per_chunk(n_chunks: int) -> int:
    """Rows to sample from each of ``n_chunks`` chunks: :data:`SAMPLE_ROWS` in all, at least
    :data:`ROWS_PER_CHUNK` each."""
    return max(ROWS_PER_CHUNK, -(-SAMPLE_ROWS // max(n_chunks, 1)))


def check_store_sample(model: TrainedModel, sample: dict[str, np.ndarray], *, where: str) -> None:
    """Refuse (ModelMismatchError) when rows sampled from every chunk of a store do not fit.

    ``sample`` holds ``coefficients``, ``coefficient_errors``, ``phot_g_mean_flux`` and
    ``chunk`` (each row's chunk). All rows together are measured as :func:`check_fit` does;
    then each chunk's ``input_spread`` on its own, so that one chunk in other units (e.g. a late
    chunk scaled x1e6) is refused too, not averaged away.
    """
    coefficients, errors = sample["coefficients"], sample["coefficient_errors"]
    flux, chunk = sample["phot_g_mean_flux"], sample["chunk"]
    found = measure_physical(model, coefficients, errors, flux, source="store")
    check_fit(model, found, where=f"{len(chunk)} rows sampled from every chunk of {where}")
    reference = expected_statistics(model).input_spread
    if reference is None:
        return
    inp = standardise(coefficients, errors, flux, model.normalisation)
    bad = []
    for index in np.unique(chunk):
        rows = (chunk == index) & inp.encodable & inp.valid.any(axis=1)
        if rows.sum() < MIN_ROWS:
            continue
        spread = float(np.nanmedian(_robust_std(inp.x[rows], inp.valid[rows])))
        if _outside(spread, reference, INPUT_SPREAD_FACTOR):
            bad.append(f"chunk {int(index)} ({spread:.3g})")
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ModelMismatchError(
            f"model {model.name!r} does not fit {len(bad)} chunk(s) of {where}: their "
            f"input_spread is {shown}, expected {reference:.3g} (from the model's "
            f"{expected_statistics(model).source}; within a factor {INPUT_SPREAD_FACTOR:g}). Were "
            "those chunks' coefficients scaled or in other units? Rebuild the store, or pass "
            "--skip-fit-check (EncodeConfig(check_fit=False)) to encode anyway."
        )
