"""The mock's instrument: photon spectra to BP/RP coefficients, their errors and correlations.

BP (330-680 nm) and RP (630-1050 nm) disperse a spectrum like a prism onto a 60-sample
pseudo-wavelength window, blurred by a line-spread function, and it is projected onto 55
Hermite functions per band, rotated like Gaia's "optimised" bases so that the first coefficient
carries the flux. The spectrum is scaled so that its G-band integral is the star's G flux.
Errors follow DR3's pattern (a relative floor for bright stars, photon noise, a background for
faint ones, fewer transits meaning larger errors, correlations between orders).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from xpbatch.mock.spectra import (
    INSTRUMENT_SEED,
    WAVELENGTH_NM,
    extinction_curve,
    logistic,
    photon_continuum,
    photon_spectrum,
)
from xpbatch.schema import N_BP, N_RP

# --- the instrument: BP and RP as 60 pseudo-wavelength samples, 55 Hermite functions each ---
_N_SAMPLES = 60  # pseudo-wavelength samples of a Gaia XP window
_EDGE_SAMPLES = (8.0, 52.0)  # where a band's nominal limits fall in the window
_LSF_SIGMA = 0.85  # line-spread function, standard deviation in samples (FWHM 2 samples)
_HERMITE_CENTRE = 30.0  # sample at the centre of the Hermite functions


@dataclass(frozen=True)
class _BandOptics:
    name: str
    lo_nm: float
    hi_nm: float
    dispersion_power: float
    """Pseudo-wavelength is linear in λ**-power (prism-like: finer sampling in the blue)."""
    hermite_scale: float
    """Scale (samples) of the Hermite functions: 3 lets the 55 of them span the window."""
    n_coeff: int


_OPTICS = (
    _BandOptics("bp", 330.0, 680.0, 2.0, 3.0, N_BP),
    _BandOptics("rp", 630.0, 1050.0, 0.4, 3.0, N_RP),
)


def _pseudo_wavelength(optics: _BandOptics, wavelength: np.ndarray) -> np.ndarray:
    """Sample position of each wavelength (nm) in the band's 60-sample window."""
    p = optics.dispersion_power
    lo, hi = optics.lo_nm**-p, optics.hi_nm**-p
    first, last = _EDGE_SAMPLES
    return first + (last - first) * (lo - wavelength**-p) / (lo - hi)


def _throughput(optics: _BandOptics, wavelength: np.ndarray) -> np.ndarray:
    """Filter edges (a few nm wide) times a smooth CCD quantum efficiency."""
    edges = logistic((wavelength - optics.lo_nm) / 4.0) * logistic(
        (optics.hi_nm - wavelength) / 6.0
    )
    return edges * np.exp(-0.5 * ((wavelength - 640.0) / 330.0) ** 2)


def _g_throughput(wavelength: np.ndarray) -> np.ndarray:
    """The G passband (330-1050 nm), in the same photon units as the BP/RP throughputs."""
    edges = logistic((wavelength - 335.0) / 5.0) * logistic((1040.0 - wavelength) / 8.0)
    return edges * np.exp(-0.5 * ((wavelength - 640.0) / 330.0) ** 2)


def hermite_functions(n: int, x: np.ndarray) -> np.ndarray:
    """The first ``n`` orthonormal Hermite functions at ``x``: (len(x), n)."""
    out = np.empty((len(x), n))
    out[:, 0] = np.pi**-0.25 * np.exp(-0.5 * x**2)
    if n > 1:
        out[:, 1] = np.sqrt(2.0) * x * out[:, 0]
    for k in range(1, n - 1):
        out[:, k + 1] = (
            np.sqrt(2.0 / (k + 1)) * x * out[:, k] - np.sqrt(k / (k + 1)) * out[:, k - 1]
        )
    return out


def _hermite_projection(optics: _BandOptics) -> np.ndarray:
    """(n_wavelength, n_coeff): photon flux on WAVELENGTH_NM -> Hermite coefficients of the band.

    Photons of wavelength λ land at pseudo-wavelength u(λ), spread by the LSF; the sampled
    spectrum is projected onto orthonormal Hermite functions (inner products over a grid wide
    enough to hold every function).
    """
    u_grid = np.linspace(-20.0, _N_SAMPLES + 20.0, 8 * (_N_SAMPLES + 40) + 1)
    du = u_grid[1] - u_grid[0]
    u_of_lambda = _pseudo_wavelength(optics, WAVELENGTH_NM)
    lsf = np.exp(-0.5 * ((u_grid[:, None] - u_of_lambda[None, :]) / _LSF_SIGMA) ** 2)
    lsf /= np.sqrt(2 * np.pi) * _LSF_SIGMA
    sampled = lsf * (_throughput(optics, WAVELENGTH_NM) * np.gradient(WAVELENGTH_NM))[None, :]
    scale = optics.hermite_scale
    basis = hermite_functions(optics.n_coeff, (u_grid - _HERMITE_CENTRE) / scale) / np.sqrt(scale)
    return (basis.T @ sampled * du).T


# --- the instrument, computed once ----------------------------------------------------------
# Photon flux ratios BP/G and RP/G of a solar-type star in DR3 (G_BP - G = 0.33, G - G_RP = 0.49
# with the DR3 zero points 25.3385, 25.6874, 24.7479).
_SOLAR_BP_OVER_G = 0.535
_SOLAR_RP_OVER_G = 0.66
_SOLAR = {"teff": 5772.0, "logg": 4.44, "m_h": 0.0, "alpha_m": 0.0, "a_v": 0.0}


_N_PRINCIPAL = 4  # leading directions of the optimised basis


def _optimised_basis(hermite: np.ndarray) -> np.ndarray:
    """An orthogonal (n, n) rotation of the Hermite coefficients that makes spectra compact.

    Like Gaia's optimised bases: the first few functions are the principal directions of smooth
    template spectra (Planck continua 3000-15000 K, A_V 0-4), so the first coefficient carries
    most of the flux; the others are the Hermite functions in their order, orthogonalised
    against those, so higher orders still mean finer structure (absorption features).
    """
    teff = np.repeat(np.geomspace(3000.0, 15000.0, 40), 5)
    a_v = np.tile(np.linspace(0.0, 4.0, 5), 40)
    continua = photon_continuum(teff) * 10.0 ** (
        -0.4 * np.outer(a_v, extinction_curve(WAVELENGTH_NM))
    )
    coeffs = continua @ hermite  # (templates, n)
    coeffs /= np.linalg.norm(coeffs, axis=1, keepdims=True)
    _, _, vt = np.linalg.svd(coeffs, full_matrices=False)
    n = hermite.shape[1]
    # Gram-Schmidt (QR) of [principal directions, Hermite order 0, 1, ...]: (n, n) orthogonal.
    q, r = np.linalg.qr(np.hstack([vt[:_N_PRINCIPAL].T, np.eye(n)])[:, :n])
    q *= np.sign(np.diag(r))[None, :]
    if (coeffs @ q[:, 0]).mean() < 0:
        q[:, 0] *= -1
    return q


@functools.cache
def response() -> np.ndarray:
    """(n_wavelength, 110 + 3): photon flux -> BP coefficients, RP coefficients, G, BP, RP.

    Each band is scaled so that a solar-type star has DR3's BP/G and RP/G flux ratios.
    """
    step = np.gradient(WAVELENGTH_NM)
    coefficients = []
    totals = []
    for optics in _OPTICS:
        hermite = _hermite_projection(optics)
        coefficients.append(hermite @ _optimised_basis(hermite))
        totals.append(_throughput(optics, WAVELENGTH_NM) * step)
    response = np.column_stack([*coefficients, _g_throughput(WAVELENGTH_NM) * step, *totals])
    g, bp, rp = N_BP + N_RP, N_BP + N_RP + 1, N_BP + N_RP + 2
    solar = (photon_spectrum({k: np.array([v]) for k, v in _SOLAR.items()}) @ response)[0]
    scale = np.ones(response.shape[1])
    scale[:N_BP] = scale[bp] = _SOLAR_BP_OVER_G * solar[g] / solar[bp]
    scale[N_BP:g] = scale[rp] = _SOLAR_RP_OVER_G * solar[g] / solar[rp]
    response *= scale
    response.setflags(write=False)
    return response


def observe(labels: dict[str, np.ndarray], g_flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless coefficients (rows, 110) and BP, RP total fluxes (rows, 2), both in e-/s."""
    return project(photon_spectrum(labels), g_flux)


def project(photons: np.ndarray, g_flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`observe` of photon spectra (rows, n_wavelength) already computed."""
    projected = photons @ response()  # (rows, 110 + 3)
    n_coeff = N_BP + N_RP
    per_g = g_flux / projected[:, n_coeff]
    return projected[:, :n_coeff] * per_g[:, None], projected[:, n_coeff + 1 :] * per_g[:, None]


# --- errors ---------------------------------------------------------------------------------
# sigma(c_0) = k sqrt((a F)^2 + b F + c) for a band with F e-/s and k = c_0 / F of a solar-type
# star, fitted to real DR3 rows (signal-to-noise of c_0:
# ~2500 when bright, ~100 at G ~ 19).
_ERROR_FLOOR = 3.9e-4  # a: calibration floor, relative
_ERROR_PHOTON = 1.2e-3  # b: photon noise
_ERROR_BACKGROUND = 10.7  # c: background and read noise
_TYPICAL_TRANSITS = 45.0
_ORDERS = np.arange(N_BP)
# The floor follows the signal, which falls with order; the noise terms are flat up to order
# ~40 and then fall, the last two orders much lower (as in every DR3 row).
_FLOOR_SHAPE = 0.15 + 0.85 * np.exp(-_ORDERS / 10.0)
_NOISE_SHAPE = np.where(_ORDERS <= 40, 1.0, 1.0 - 0.5 * (_ORDERS - 40) / 12.0)
_NOISE_SHAPE[-2:] = (0.17, 0.08)


def coefficient_errors(
    band_flux: np.ndarray, n_transits: np.ndarray, jitter: np.ndarray
) -> np.ndarray:
    """Errors (rows, 110) of the coefficients of stars with BP, RP total fluxes (rows, 2).

    ``jitter`` (rows, 110) multiplies each error (DR3 errors scatter from order to order).
    """
    per_band = []
    for band in range(2):
        flux = band_flux[:, band : band + 1]
        floor = (_ERROR_FLOOR * flux * _FLOOR_SHAPE) ** 2
        noise = (_ERROR_PHOTON * flux + _ERROR_BACKGROUND) * _NOISE_SHAPE**2
        per_band.append(_solar_c0_per_flux()[band] * np.sqrt(floor + noise))
    fewer_transits = np.sqrt(_TYPICAL_TRANSITS / n_transits)[:, None]
    return np.concatenate(per_band, axis=1) * fewer_transits * jitter


@functools.cache
def _solar_c0_per_flux() -> tuple[float, float]:
    """c_0 / band flux of BP and RP for a solar-type star."""
    solar = (photon_spectrum({k: np.array([v]) for k, v in _SOLAR.items()}) @ response())[0]
    g = N_BP + N_RP
    return float(solar[0] / solar[g + 1]), float(solar[N_BP] / solar[g + 2])


def g_flux_error(g_flux: np.ndarray, n_transits: np.ndarray) -> np.ndarray:
    """phot_g_mean_flux_error: relative 2e-4 when bright, ~0.1 % at G 17, ~1 % at G 20."""
    variance = (2e-4 * g_flux) ** 2 + 2e-3 * g_flux + 5.0
    return np.sqrt(variance * _TYPICAL_TRANSITS / n_transits)


# --- correlations of the coefficient errors -------------------------------------------------
N_CORRELATION_TEMPLATES = 16
"""Distinct correlation matrices per band; each row uses one per band (cheap to write)."""


@functools.cache
def correlation_templates(band: str) -> np.ndarray:
    """(N_CORRELATION_TEMPLATES, 55, 55) float32 correlation matrices of one band's errors.

    Random positive-definite matrices with DR3's statistics (median |r| ~0.05, 99th percentile
    ~0.4, strongest among the low orders, smallest eigenvalue ~0.02-0.1).
    """
    rng = np.random.default_rng([INSTRUMENT_SEED, ("bp", "rp").index(band)])
    n = N_BP if band == "bp" else N_RP
    low_orders = np.exp(-np.arange(n) / 8.0)
    templates = []
    for _ in range(N_CORRELATION_TEMPLATES):
        dof = int(rng.integers(120, 250))
        rank = int(rng.integers(2, 5))
        strength = rng.uniform(1.5, 3.0)
        a = rng.standard_normal((n, dof))
        b = rng.standard_normal((n, rank)) * (strength * low_orders)[:, None]
        cov = a @ a.T / dof + b @ b.T
        sd = np.sqrt(np.diag(cov))
        corr = (cov / np.outer(sd, sd)).astype(np.float32)
        np.fill_diagonal(corr, 1.0)
        templates.append(corr)
    out = np.stack(templates)
    out.setflags(write=False)
    return out


@functools.cache
def _correlation_factors(band: str) -> np.ndarray:
    """Cholesky factors (templates, n, n) of the float32 templates, to draw correlated noise."""
    return np.linalg.cholesky(correlation_templates(band).astype(np.float64))


def packed_correlations(band: str) -> np.ndarray:
    """(templates, n(n-1)/2) float32: each template's strictly lower triangle, row-major (DR3)."""
    templates = correlation_templates(band)
    rows, cols = np.tril_indices(templates.shape[1], k=-1)
    return templates[:, rows, cols]


def correlated_noise(z: np.ndarray, template: np.ndarray, band: str) -> np.ndarray:
    """Standard normal draws z (rows, n) correlated with each row's template (rows,)."""
    factors = _correlation_factors(band)
    out = np.empty_like(z)
    for k in range(len(factors)):
        rows = template == k
        out[rows] = z[rows] @ factors[k].T
    return out
