"""XP spectra as flux against wavelength (nm): GaiaXPy's sampling of the continuous coefficients.

The store, the reconstruction and the scatter are all in DR3's continuous representation: 55
BP and 55 RP coefficients of Hermite-function bases, in e-/s. GaiaXPy (the optional extra
``spectra``: ``pip install 'xpbatch[spectra]'``) turns them into an absolutely calibrated
spectrum sampled in wavelength (``gaiaxpy.calibrate``: flux in W m⁻² nm⁻¹, default grid 336 to
1020 nm in steps of 2 nm, BP and RP merged where they overlap). It propagates each
coefficient's uncertainty through the same linear sampling, so:

- measured: the store's ``coefficients`` with ``coefficient_errors`` give flux ± error, with
  DR3's correlations between coefficients when the store carries them
  (``--with-correlations``), else as independent errors;
- model: the reconstruction with the learned ``scatter`` in place of the errors gives
  flux ± scatter (the scatter VAE's scatter is per coefficient and independent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from xpbatch import schema
from xpbatch.errors import MissingExtraError, StoreError
from xpbatch.storage.paths import PathLike

if TYPE_CHECKING:
    import xarray as xr

    from xpbatch.model.files import TrainedModel

SPECTRA_EXTRA = "spectra"
"""The optional extra that installs GaiaXPy (``pip install 'xpbatch[spectra]'``)."""


@dataclasses.dataclass(frozen=True)
class SampledSpectra:
    """Spectra sampled in wavelength."""

    wavelength: np.ndarray
    """(sample,) nm."""
    flux: np.ndarray
    """(row, sample) W m⁻² nm⁻¹."""
    flux_error: np.ndarray
    """(row, sample) W m⁻² nm⁻¹: the coefficients' uncertainties propagated."""


def sample_spectra(
    coefficients: np.ndarray,
    uncertainties: np.ndarray,
    *,
    correlations: tuple[np.ndarray, np.ndarray] | None = None,
    source_id: Sequence[int] | np.ndarray | None = None,
    wavelength: np.ndarray | None = None,
) -> SampledSpectra:
    """Calibrate (rows, 110) coefficients (BP 0-54, RP 0-54, e-/s) into flux against nm.

    ``uncertainties`` (rows, 110) are the coefficients' errors (or the model's scatter);
    ``correlations`` the BP and RP packed correlations (rows, 1485) as DR3 and the store hold
    them, None: independent. ``wavelength`` is GaiaXPy's default grid when None.

    Raises
    ------
    MissingExtraError
        GaiaXPy is not installed.

    Examples
    --------
    >>> sampled = sample_spectra(coefficients, errors)  # doctest: +SKIP
    >>> sampled.wavelength[[0, -1]]  # doctest: +SKIP
    array([ 336., 1020.])
    """
    import pandas as pd

    calibrate = _gaiaxpy_calibrate()
    coefficients = np.atleast_2d(np.asarray(coefficients, np.float64))  # (rows, 110)
    uncertainties = np.atleast_2d(np.asarray(uncertainties, np.float64))  # (rows, 110)
    n_rows, n = len(coefficients), schema.N_BP
    if coefficients.shape[1:] != (schema.N_COEFF,) or uncertainties.shape != coefficients.shape:
        raise StoreError(
            f"spectra need (rows, {schema.N_COEFF}) coefficients and uncertainties "
            f"(BP 0-54, RP 0-54), got {coefficients.shape} and {uncertainties.shape}"
        )
    ids = list(range(n_rows)) if source_id is None else [int(s) for s in source_id]
    if correlations is None:
        bp_corr = rp_corr = [np.zeros(n * (n - 1) // 2)] * n_rows
    else:
        bp_corr = list(np.atleast_2d(np.asarray(correlations[0], np.float64)))
        rp_corr = list(np.atleast_2d(np.asarray(correlations[1], np.float64)))
    frame = pd.DataFrame(
        {
            "source_id": ids,
            "bp_n_parameters": n,
            "rp_n_parameters": n,
            "bp_standard_deviation": 1.0,  # cancels: GaiaXPy divides the errors by it, then
            # multiplies the sampled error by it
            "rp_standard_deviation": 1.0,
            "bp_coefficients": list(coefficients[:, :n]),
            "rp_coefficients": list(coefficients[:, n:]),
            "bp_coefficient_errors": list(uncertainties[:, :n]),
            "rp_coefficient_errors": list(uncertainties[:, n:]),
            "bp_coefficient_correlations": bp_corr,
            "rp_coefficient_correlations": rp_corr,
        }
    )
    spectra, sampling = calibrate(frame, wavelength)
    return SampledSpectra(
        wavelength=np.asarray(sampling, np.float64),
        flux=np.stack([np.asarray(f, np.float64) for f in spectra["flux"]]),
        flux_error=np.stack([np.asarray(f, np.float64) for f in spectra["flux_error"]]),
    )


def _gaiaxpy_calibrate():  # type: ignore[no-untyped-def]
    """GaiaXPy's ``calibrate`` without its progress output, or one clear message.

    GaiaXPy is imported here, on first use, not with xpbatch, and what its import changes for
    the whole session is put back: it sets matplotlib's ``text.usetex`` (every later plot then
    needs LaTeX) and ignores every ``RuntimeWarning``.
    """
    import warnings

    import matplotlib

    try:
        with matplotlib.rc_context(), warnings.catch_warnings():
            from gaiaxpy.calibrator import calibrator
    except ImportError as e:
        raise MissingExtraError(
            "drawing spectra in wavelength needs GaiaXPy, which is not installed: "
            f"pip install 'xpbatch[{SPECTRA_EXTRA}]' (or pip install gaiaxpy)"
        ) from e

    def calibrate(frame, wavelength):  # type: ignore[no-untyped-def]
        # gaiaxpy.calibrate is _calibrate with disable_info=False (a progress bar per call).
        return calibrator._calibrate(frame, wavelength, save_file=False, disable_info=True)

    return calibrate


@dataclasses.dataclass(frozen=True)
class SourceSpectra:
    """The measured and modelled spectra of a few sources, for :func:`plot_spectrum`."""

    source_id: np.ndarray
    """(row,) in the order asked for."""
    measured: SampledSpectra
    """The store's coefficients ± coefficient_errors."""
    reconstructed: SampledSpectra | None
    """The model's reconstruction ± its scatter; None without a model or stored reconstruction."""
    titles: list[str]
    """One line per source: its id and, from a catalogue, anomaly_score and rmse."""


def spectra_of(
    store: xr.Dataset | PathLike,
    source_id: Sequence[int],
    *,
    model: TrainedModel | PathLike | None = None,
    catalog: xr.Dataset | PathLike | None = None,
    wavelength: np.ndarray | None = None,
) -> SourceSpectra:
    """Measured and reconstructed spectra in nm of ``source_id`` (see :func:`plot_spectrum`)."""
    from xpbatch.store.reader import open_xp_store

    _gaiaxpy_calibrate()  # the missing extra is said before any data is read
    ds = _dataset(store, open_xp_store)
    ids = np.asarray(source_id, np.int64)
    rows = row_positions(ds, ids, what="store")
    inputs = ds.isel(source=rows).compute()
    coefficients = inputs[schema.COEFFICIENTS].values  # (rows, 110)
    errors = inputs[schema.COEFFICIENT_ERRORS].values
    titles = [f"source_id {i}" for i in ids]
    recon = scatter = None
    if catalog is not None:
        from xpbatch.catalog.zarr_catalog import open_catalog

        cat = _dataset(catalog, open_catalog)
        picked = cat.isel(source=row_positions(cat, ids, what="catalogue")).compute()
        if schema.ANOMALY_SCORE in picked:
            titles = [
                f"{t}: anomaly_score {a:.1f} nats, rmse {r:.2f}"
                for t, a, r in zip(
                    titles,
                    picked[schema.ANOMALY_SCORE].values,
                    picked[schema.RMSE].values,
                    strict=True,
                )
            ]
        if schema.RECONSTRUCTION in picked:
            recon = picked[schema.RECONSTRUCTION].values
            scatter = picked[schema.SCATTER].values
    if recon is None and model is not None:
        from xpbatch.encode.kernel import encode_arrays
        from xpbatch.model.files import load_model

        trained = load_model(model) if not hasattr(model, "network") else model
        result = encode_arrays(
            trained,  # type: ignore[arg-type]
            coefficients,
            errors,
            inputs[schema.PHOT_G_MEAN_FLUX].values,
        )
        recon, scatter = result.reconstruction, result.scatter
    names = (schema.correlations_name("bp"), schema.correlations_name("rp"))
    correlations = None
    if all(name in inputs for name in names):
        correlations = (inputs[names[0]].values, inputs[names[1]].values)
    measured = sample_spectra(
        coefficients, errors, correlations=correlations, source_id=ids, wavelength=wavelength
    )
    reconstructed = None
    if recon is not None and scatter is not None:
        reconstructed = sample_spectra(recon, scatter, source_id=ids, wavelength=wavelength)
    return SourceSpectra(ids, measured, reconstructed, titles)


def row_positions(ds: xr.Dataset, source_id: np.ndarray, *, what: str) -> np.ndarray:
    """The row of each ``source_id`` in ``ds``, found chunk by chunk (dask), in the order given.

    Raises
    ------
    StoreError
        A source_id is not in ``ds``.
    """
    import dask.array as da

    ids = np.asarray(source_id, np.int64)
    column = ds[schema.SOURCE_ID].data
    found = da.flatnonzero(da.isin(column, ids)).compute()  # rows, ascending
    found_ids = np.asarray(column[found]) if found.size else found  # reads only those rows
    lookup = dict(zip(found_ids.tolist(), found.tolist(), strict=True))
    missing = [int(i) for i in ids if int(i) not in lookup]
    if missing:
        raise StoreError(
            f"source_id {missing[0]} is not in this {what}"
            + (f" ({len(missing)} of the {len(ids)} ids are not)" if len(missing) > 1 else "")
            + "; pass ids that the store and catalogue hold (e.g. from xpbatch.top_anomalies)"
        )
    return np.array([lookup[int(i)] for i in ids], np.int64)


def _dataset(value: xr.Dataset | PathLike, opener: Callable[[PathLike], xr.Dataset]) -> xr.Dataset:
    """``value`` if it is already opened, else ``opener(value)``."""
    import xarray as xr

    return value if isinstance(value, xr.Dataset) else opener(value)
