"""Realistic synthetic XP data with known labels, at any size, as a store or as DR3 bulk files.

Physics: every star gets labels (Teff, log g, [M/H], [α/M], A_V, G) from a main-sequence or a
giant-branch population, and a place on a sky with a Galactic disc and bulge (hence its
source_id). Its photon spectrum is a Planck continuum at Teff times temperature-, gravity- and
metallicity-dependent absorption (Balmer lines and jump, blue line blanketing, Ca II H&K, CN, CH,
Mg b, Na D, the Ca triplet, TiO and CaH bands, a forest of weak metal lines), reddened with the
Cardelli, Clayton & Mathis (1989) law. BP (330-680 nm) and RP (630-1050 nm) disperse it like a
prism onto a 60-sample pseudo-wavelength window, blurred by a line-spread function, and it is
projected onto 55 Hermite functions per band, rotated like Gaia's "optimised" bases so that the
first coefficient carries the flux. The spectrum is scaled so that its G-band integral is the
star's G flux. Errors follow DR3's pattern (a relative floor for bright stars, photon noise, a
background for faint ones, fewer transits meaning larger errors, correlations between orders),
and noise drawn with those errors and correlations is added.

Determinism: rows are generated in blocks of :data:`BLOCK_ROWS` rows, block ``k`` from its own
random stream ``numpy.random.default_rng([seed, k])`` drawn in a fixed order. A row therefore
depends only on ``(n, seed, config, row index)``: any chunking of the output (store chunks, bulk
files) gives the same rows, and any range of rows can be generated on its own. On one machine
the output is bitwise reproducible; another CPU or BLAS may round a few float32 values the other
way.

Labels: a store's labels sit beside it (``mock.zarr`` -> ``mock.zarr.labels.parquet``), bulk
files' inside their directory (``mock_labels.parquet``); :func:`read_mock_labels` finds both.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xpbatch import __version__, dr3, schema
from xpbatch.config import MOCK_ROWS_PER_FILE, MockConfig
from xpbatch.errors import ConfigError, InputShapeError, OutputExistsError, StoreNotFoundError
from xpbatch.partitions import HEALPIX_LEVEL, HEALPIX_SHIFT, N_PIXELS, file_name
from xpbatch.paths import atomic_path
from xpbatch.schema import G_ZERO_POINT_MAG, N_BP, N_RP
from xpbatch.store import DEFAULT_CHUNK_ROWS, INT_MISSING, XPStoreWriter

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

BLOCK_ROWS = 4096
"""Rows per random stream. Fixed forever: changing it changes every mock catalogue."""
MAX_ROWS = 10**12
"""Most rows a mock catalogue can have (ids stay unique far beyond DR3's 2.2e8)."""
# Seed of the random parts of the instrument (line forest, correlation templates): the same for
# every catalogue, like the real instrument.
_INSTRUMENT_SEED = 20220613

# --- the sky: where the rows are, hence their source_id -------------------------------------
SOLUTION_ID = 4545469030156206080  # the DR3 value seen in real rows

# Equatorial coordinates of the north Galactic pole and the Galactic longitude of the north
# celestial pole (J2000), to turn pixel centres into Galactic latitude and longitude.
_RA_NGP = math.radians(192.85948)
_DEC_NGP = math.radians(27.12825)
_L_NCP = math.radians(122.93192)


def _pixel_centres(level: int = HEALPIX_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Right ascension and declination (radians) of every nested HEALPix pixel centre."""
    nside = 2**level
    pix = np.arange(12 * nside * nside, dtype=np.int64)
    face = pix >> (2 * level)
    within = pix & (nside * nside - 1)
    ix = np.zeros_like(pix)
    iy = np.zeros_like(pix)
    for bit in range(level):  # de-interleave the nested index: x on even bits, y on odd bits
        ix |= ((within >> (2 * bit)) & 1) << bit
        iy |= ((within >> (2 * bit + 1)) & 1) << bit
    jrll = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])[face]
    jpll = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7])[face]
    ring = jrll * nside - ix - iy - 1  # 1 .. 4 nside - 1
    npix = 12 * nside * nside
    north, south = ring < nside, ring > 3 * nside
    nr = np.where(north, ring, np.where(south, 4 * nside - ring, nside))
    z = np.where(
        north,
        1 - nr**2 * 4.0 / npix,
        np.where(south, nr**2 * 4.0 / npix - 1, (2 * nside - ring) * 8.0 * nside / npix),
    )
    shift = np.where(north | south, 1, (ring - nside) & 1)
    jp = (jpll * nr + ix - iy + 1 + shift) // 2
    jp = np.where(jp > 4 * nside, jp - 4 * nside, np.where(jp < 1, jp + 4 * nside, jp))
    ra = (jp - (shift + 1) * 0.5) * (np.pi / 2 / nr)
    return ra, np.arcsin(z)


def _galactic(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Galactic longitude in (-π, π] and latitude (radians) of equatorial coordinates."""
    sin_b = np.sin(dec) * np.sin(_DEC_NGP) + np.cos(dec) * np.cos(_DEC_NGP) * np.cos(ra - _RA_NGP)
    b = np.arcsin(np.clip(sin_b, -1, 1))
    y = np.cos(dec) * np.sin(ra - _RA_NGP)
    x = np.sin(dec) * np.cos(_DEC_NGP) - np.cos(dec) * np.sin(_DEC_NGP) * np.cos(ra - _RA_NGP)
    l_gal = _L_NCP - np.arctan2(y, x)
    return np.angle(np.exp(1j * l_gal)), b


def _source_density(l_gal: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Relative number of XP sources per pixel: a thin disc, a bulge, dust and a faint halo.

    Fitted (grid search) to the DR3 bulk-file partition: files hold about equal rows, so the
    source density over a file's pixel range is ~1/its pixel count; the log densities of the
    3386 ranges correlate at 0.90 with this model's (rms 0.6 dex).
    """
    disc = np.exp(-np.abs(np.sin(b)) / 0.15) * (0.3 + 0.7 * np.exp(-0.5 * (l_gal / 0.8) ** 2))
    bulge = np.exp(-0.5 * (l_gal**2 + b**2) / math.radians(9.0) ** 2)
    # Dust hides the mid-plane towards the inner Galaxy.
    dust = 1 - 0.6 * np.exp(-0.5 * (b / math.radians(1.5)) ** 2) * np.exp(-0.5 * l_gal**2)
    return 0.01 + (disc + bulge) * dust


@dataclass(frozen=True)
class _Sky:
    cumulative: np.ndarray  # (N_PIXELS,) float64, cumulative source fraction up to each pixel
    sin_b: np.ndarray  # (N_PIXELS,) float32, sine of the Galactic latitude of the pixel centre


@functools.cache
def _sky() -> _Sky:
    ra, dec = _pixel_centres()
    l_gal, b = _galactic(ra, dec)
    density = _source_density(l_gal, b)
    cumulative = np.cumsum(density)
    return _Sky(cumulative=cumulative / cumulative[-1], sin_b=np.sin(b).astype(np.float32))


def pixel_row_bounds(n: int) -> np.ndarray:
    """End row (exclusive) of every level-8 pixel when ``n`` rows are laid out over the sky.

    Pixel ``p`` holds rows ``bounds[p-1]:bounds[p]``; rows are in pixel order, so in source_id
    order. Depends only on ``n``.
    """
    bounds = np.floor(_sky().cumulative * n).astype(np.int64)
    bounds[-1] = n
    return bounds


# --- the instrument: BP and RP as 60 pseudo-wavelength samples, 55 Hermite functions each ---
WAVELENGTH_NM = np.arange(300.0, 1161.0, 1.0)
"""The fine wavelength grid (nm) every spectrum is computed on."""
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


def _logistic(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _throughput(optics: _BandOptics, wavelength: np.ndarray) -> np.ndarray:
    """Filter edges (a few nm wide) times a smooth CCD quantum efficiency."""
    edges = _logistic((wavelength - optics.lo_nm) / 4.0) * _logistic(
        (optics.hi_nm - wavelength) / 6.0
    )
    return edges * np.exp(-0.5 * ((wavelength - 640.0) / 330.0) ** 2)


def _g_throughput(wavelength: np.ndarray) -> np.ndarray:
    """The G passband (330-1050 nm), in the same photon units as the BP/RP throughputs."""
    edges = _logistic((wavelength - 335.0) / 5.0) * _logistic((1040.0 - wavelength) / 8.0)
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


# --- stellar spectra ------------------------------------------------------------------------
_C2_NM_K = 1.438777e7  # second radiation constant h c / k in nm K


def _photon_continuum(teff: np.ndarray) -> np.ndarray:
    """Planck photon flux λ B_λ(Teff) on WAVELENGTH_NM, (rows, n_wavelength), arbitrary units."""
    lam = WAVELENGTH_NM / 500.0  # in units of 500 nm keeps the numbers near 1
    return lam**-4 / np.expm1(_C2_NM_K / np.outer(teff, WAVELENGTH_NM))


@functools.cache
def _extinction_on_grid() -> np.ndarray:
    return extinction_curve(WAVELENGTH_NM)


def extinction_curve(wavelength: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """A_λ / A_V of Cardelli, Clayton & Mathis (1989), optical and near-infrared branches."""
    x = 1000.0 / wavelength  # inverse micron
    y = x - 1.82
    a = np.where(
        x < 1.1,
        0.574 * x**1.61,
        np.polyval([0.32999, -0.77530, 0.01979, 0.72085, -0.02427, -0.50447, 0.17699, 1.0], y),
    )
    b = np.where(
        x < 1.1,
        -0.527 * x**1.61,
        np.polyval([-2.09002, 5.30260, -0.62251, -5.38434, 1.07233, 2.28305, 1.41338, 0.0], y),
    )
    return a + b / r_v


# Absorption features: (kind, centre nm, width nm, depth, strength driver). Kinds: "line" a
# Gaussian, "step" a smooth drop to the blue of the centre, "band" a molecular band with a sharp
# head at the centre fading to the red. Drivers are computed by _feature_drivers.
_FEATURES: tuple[tuple[str, float, float, float, str], ...] = (
    ("line", 656.28, 1.6, 0.7, "hydrogen"),  # Hα
    ("line", 486.13, 1.6, 0.9, "hydrogen"),  # Hβ
    ("line", 434.05, 1.5, 0.9, "hydrogen"),  # Hγ
    ("line", 410.17, 1.5, 0.8, "hydrogen"),  # Hδ
    ("line", 397.01, 1.4, 0.6, "hydrogen"),  # Hε
    ("line", 388.91, 1.4, 0.5, "hydrogen"),  # H8
    ("step", 364.6, 3.0, 0.6, "balmer_jump"),
    ("step", 420.0, 30.0, 0.9, "blanketing"),  # metal lines crowd the blue
    ("step", 380.0, 15.0, 0.6, "blanketing"),
    ("line", 393.37, 1.5, 1.0, "calcium_hk"),  # Ca II K
    ("line", 396.85, 1.5, 0.9, "calcium_hk"),  # Ca II H
    ("line", 388.3, 5.0, 0.4, "cn_giant"),  # CN
    ("line", 430.5, 2.5, 0.15, "metal"),  # CH G band
    ("line", 527.0, 3.0, 0.05, "metal"),  # Fe I blend
    ("line", 517.5, 2.0, 0.12, "magnesium"),  # Mg b
    ("line", 589.3, 1.5, 0.12, "sodium"),  # Na D
    ("line", 849.8, 1.2, 0.05, "calcium_triplet"),
    ("line", 854.2, 1.2, 0.12, "calcium_triplet"),
    ("line", 866.2, 1.2, 0.10, "calcium_triplet"),
    ("band", 476.1, 25.0, 0.4, "tio"),
    ("band", 495.4, 25.0, 0.5, "tio"),
    ("band", 516.7, 25.0, 0.5, "tio"),
    ("band", 544.8, 25.0, 0.6, "tio"),
    ("band", 558.9, 25.0, 0.6, "tio"),
    ("band", 615.9, 25.0, 0.6, "tio"),
    ("band", 705.4, 30.0, 0.9, "tio"),
    ("band", 758.9, 30.0, 0.8, "tio"),
    ("band", 843.2, 30.0, 0.4, "tio"),
    ("line", 638.0, 5.0, 0.5, "cah_dwarf"),  # CaH in M dwarfs
)


@functools.cache
def _feature_profiles() -> np.ndarray:
    """(n_features, n_wavelength): the shape of each feature's optical depth, unit depth."""
    lam = WAVELENGTH_NM[None, :]
    kind = np.array([f[0] for f in _FEATURES])[:, None]
    centre = np.array([f[1] for f in _FEATURES])[:, None]
    width = np.array([f[2] for f in _FEATURES])[:, None]
    depth = np.array([f[3] for f in _FEATURES])[:, None]
    line = np.exp(-0.5 * ((lam - centre) / width) ** 2)
    step = _logistic((centre - lam) / width)
    band = _logistic((lam - centre) / 0.8) * np.exp(-np.clip(lam - centre, 0, None) / width)
    named = depth * np.select([kind == "line", kind == "step"], [line, step], band)
    return np.vstack([named, _line_forest()[None, :]])


_FOREST_LINES = 300


def _line_forest() -> np.ndarray:
    """Optical depth of a fixed forest of weak metal lines, denser in the blue (unit strength).

    Real spectra hold thousands of blended lines; they give the higher orders their structure.
    """
    rng = np.random.default_rng(_INSTRUMENT_SEED)
    centre = 330.0 + 700.0 * rng.beta(1.0, 4.0, _FOREST_LINES)
    width = rng.uniform(0.8, 2.0, _FOREST_LINES)
    depth = 0.04 * rng.lognormal(0.0, 0.8, _FOREST_LINES)
    lines = np.exp(-0.5 * ((WAVELENGTH_NM[None, :] - centre[:, None]) / width[:, None]) ** 2)
    return depth @ lines


def _feature_drivers(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """How strong each family of features is for each star (1 is a typical strong case)."""
    teff, logg = labels["teff"], labels["logg"]
    z = 10.0 ** labels["m_h"]
    alpha = 10.0 ** labels["alpha_m"]
    theta = 5040.0 / teff
    giant = np.clip((3.8 - logg) / 2.5, 0.0, 1.0)  # 0 for dwarfs, 1 high on the giant branch
    cool = np.clip((4100.0 - teff) / 500.0, 0.0, None) ** 1.3
    hydrogen = np.exp(-0.5 * ((teff - 9500.0) / 1800.0) ** 2)  # peaks in A stars
    return {
        "hydrogen": hydrogen * (1.0 + 0.1 * (logg - 4.0)),
        "balmer_jump": hydrogen * (1.0 + 0.3 * (4.0 - logg)),  # larger at low gravity
        "blanketing": z**0.8 * theta**3,
        "metal": z**0.8 * theta**2,
        "calcium_hk": z**0.5 * 2.0 * np.clip(theta - 0.65, 0.0, None),
        "cn_giant": z**0.8 * theta**2 * giant,
        "magnesium": z**0.7 * alpha * theta**2 * (1.0 - 0.4 * giant),
        "sodium": z**0.6 * theta**3 * (1.0 - 0.6 * giant),
        "calcium_triplet": z**0.5 * alpha**0.5 * (0.7 + 0.5 * giant),
        "tio": cool * z**0.6,
        "cah_dwarf": cool * (1.0 - giant),
        "line_forest": z**0.8 * theta**2.5,
    }


def photon_spectrum(labels: dict[str, np.ndarray]) -> np.ndarray:
    """Photon flux on WAVELENGTH_NM, (rows, n_wavelength), arbitrary scale.

    Planck continuum at Teff times absorption features and interstellar extinction.
    """
    profiles, extinction = _feature_profiles(), _extinction_on_grid()
    drivers = _feature_drivers(labels)
    names = [f[4] for f in _FEATURES] + ["line_forest"]
    strengths = np.stack([drivers[name] for name in names], axis=1)  # (rows, n_features + 1)
    tau = strengths @ profiles  # (rows, n_wavelength)
    tau += np.outer(labels["a_v"] * (0.4 * np.log(10.0)), extinction)
    return _photon_continuum(labels["teff"]) * np.exp(-tau)


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
    continua = _photon_continuum(teff) * 10.0 ** (
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
def _response() -> np.ndarray:
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


def _observe(labels: dict[str, np.ndarray], g_flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless coefficients (rows, 110) and BP, RP total fluxes (rows, 2), both in e-/s."""
    return _project(photon_spectrum(labels), g_flux)


def _project(photons: np.ndarray, g_flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_observe` of photon spectra (rows, n_wavelength) already computed."""
    projected = photons @ _response()  # (rows, 110 + 3)
    n_coeff = N_BP + N_RP
    per_g = g_flux / projected[:, n_coeff]
    return projected[:, :n_coeff] * per_g[:, None], projected[:, n_coeff + 1 :] * per_g[:, None]


# --- labels ---------------------------------------------------------------------------------
LABEL_COLUMNS = ("teff", "logg", "m_h", "alpha_m", "a_v", "g_mag", "is_giant", "population")
"""Columns of the labels table besides ``source_id``: Teff (K), log g (cgs dex), [M/H] and
[α/M] (dex), A_V (mag), the true G magnitude, whether the star is a giant, and its population
(int8, an index into :data:`POPULATIONS`)."""

_FAINTEST_G = 20.5


def draw_labels(
    rng: np.random.Generator, size: int, sin_b: np.ndarray, config: MockConfig
) -> dict[str, np.ndarray]:
    """Physical labels of ``size`` stars at Galactic latitudes with sines ``sin_b``.

    Dwarfs: Teff 3500-7500 K (a magnitude-limited sample favours F and G stars), log g from a
    main-sequence relation minus evolution off the zero-age main sequence. Giants: a red giant
    branch (log g 1-3.5, cooler at high metallicity and low gravity) and a red clump (35 %).
    Every draw is made for every row, so the random stream is used the same way whatever the mix.
    """
    is_giant = rng.random(size) < config.giant_fraction
    m_h = np.clip(rng.normal(config.metallicity_mean, config.metallicity_std, size), -2.5, 0.6)
    # Metal-poor stars are alpha-enhanced (thick disc, halo).
    alpha_m = np.clip(0.3 * np.clip(-m_h, 0.0, 1.0) + rng.normal(0.0, 0.04, size), -0.1, 0.45)

    teff_dwarf = 3500.0 + 4000.0 * rng.beta(2.2, 1.8, size)
    zams = 4.72 - 0.55 * ((teff_dwarf - 3500.0) / 4000.0) ** 1.5
    logg_dwarf = np.clip(zams - np.abs(rng.normal(0.0, 0.12, size)), 3.9, 4.8)

    in_clump = rng.random(size) < 0.35
    logg_rgb = rng.uniform(1.0, 3.5, size)
    teff_rgb = 3900.0 + 520.0 * (logg_rgb - 1.0) - 300.0 * m_h + rng.normal(0.0, 80.0, size)
    teff_clump = 4750.0 - 250.0 * m_h + rng.normal(0.0, 100.0, size)
    logg_clump = 2.45 + rng.normal(0.0, 0.1, size)
    teff_giant = np.clip(np.where(in_clump, teff_clump, teff_rgb), 3800.0, 5200.0)
    logg_giant = np.clip(np.where(in_clump, logg_clump, logg_rgb), 1.0, 3.5)

    # Dust lies in the plane: the mean A_V falls from extinction_plane to extinction_pole.
    mean_av = config.extinction_pole + (config.extinction_plane - config.extinction_pole) * np.exp(
        -np.abs(sin_b) / 0.1
    )
    a_v = np.minimum(mean_av * rng.exponential(1.0, size), 8.0)

    return {
        "teff": np.where(is_giant, teff_giant, teff_dwarf),
        "logg": np.where(is_giant, logg_giant, logg_dwarf),
        "m_h": m_h,
        "alpha_m": alpha_m,
        "a_v": a_v,
        "g_mag": _draw_g_mag(rng, size, config),
        "is_giant": is_giant,
    }


# --- rare populations (MockConfig.*_fraction, ``xpbatch mock --rare``) -----------------------
POPULATIONS = ("normal", "binary", "emission_line", "white_dwarf")
"""The labels table's ``population`` codes: the index of the name here."""
_RARE_STREAM = 1  # rare populations draw from their own stream: the others' rows never change
_BALMER_NM = (656.28, 486.13, 434.05, 410.17, 397.01, 388.91)


def _draw_population(seed: int, index: int, size: int, config: MockConfig) -> np.ndarray:
    """(size,) int8 population codes of block ``index``; 0 everywhere without rare fractions."""
    if not any(config.rare_fractions.values()):
        return np.zeros(size, np.int8)
    u = np.random.default_rng([seed, index, _RARE_STREAM]).random(size)
    cuts = np.cumsum(list(config.rare_fractions.values()))  # in POPULATIONS[1:] order
    return ((np.searchsorted(cuts, u, side="right") + 1) % len(POPULATIONS)).astype(np.int8)


def _rare_photons(
    rng: np.random.Generator, labels: dict[str, np.ndarray], population: np.ndarray
) -> np.ndarray:
    """Photon spectra (rows, n_wavelength) of rare rows; white dwarfs' labels are updated.

    Binary: the primary plus a companion of very different Teff (an M dwarf beside a star
    hotter than 5000 K, a 7000-10000 K star beside a cooler one) giving 25-50 % of the G flux.
    Emission line: Hα with an equivalent width of 2-8 nm in emission, Hβ a third of it.
    White dwarf: a 7000-30000 K continuum with Balmer lines 4 nm wide; log g 8.
    """
    size = len(population)
    white_dwarf = population == POPULATIONS.index("white_dwarf")
    labels["teff"][white_dwarf] = rng.uniform(7000.0, 30000.0, size)[white_dwarf]
    labels["logg"][white_dwarf] = 8.0
    labels["is_giant"][white_dwarf] = False
    photons = photon_spectrum(labels)
    g_column = _response()[:, N_BP + N_RP]

    binary = population == POPULATIONS.index("binary")
    companion = {k: v.copy() for k, v in labels.items()}
    cool = rng.uniform(3200.0, 3800.0, size)
    hot = rng.uniform(7000.0, 10000.0, size)
    companion["teff"] = np.where(labels["teff"] > 5000.0, cool, hot)
    companion["logg"] = np.full(size, 4.5)
    light = rng.uniform(0.25, 0.5, size)[:, None]
    second = photon_spectrum(companion)
    mixed = (1 - light) * photons / (photons @ g_column)[:, None]
    mixed += light * second / (second @ g_column)[:, None]
    photons = np.where(binary[:, None], mixed, photons)

    emission = population == POPULATIONS.index("emission_line")
    width = rng.uniform(2.0, 8.0, size)[:, None]  # equivalent width, nm
    for centre, strength in ((_BALMER_NM[0], 1.0), (_BALMER_NM[1], 1.0 / 3.0)):
        at_line = photons[:, np.argmin(np.abs(WAVELENGTH_NM - centre))][:, None]
        profile = np.exp(-0.5 * ((WAVELENGTH_NM - centre) / 1.5) ** 2) / (
            1.5 * math.sqrt(2 * math.pi)
        )
        photons = photons + np.where(emission[:, None], strength * width * at_line * profile, 0.0)

    depth = 1.5 * np.exp(-0.5 * ((labels["teff"] - 12000.0) / 9000.0) ** 2)[:, None]
    tau = sum(
        np.exp(-0.5 * ((WAVELENGTH_NM - centre) / 4.0) ** 2) for centre in _BALMER_NM
    ) * depth + np.outer(labels["a_v"] * (0.4 * np.log(10.0)), _extinction_on_grid())
    dwarf_star = _photon_continuum(labels["teff"]) * np.exp(-tau)
    return np.where(white_dwarf[:, None], dwarf_star, photons)


def _draw_g_mag(rng: np.random.Generator, size: int, config: MockConfig) -> np.ndarray:
    """G magnitudes: counts rising as 10**(slope G) up to the limit, a few fainter sources."""
    slope, bright, limit = config.counts_slope, config.g_mag_min, config.g_mag_limit
    u = rng.random(size)
    rising = bright + np.log10(1.0 + u * (10.0 ** (slope * (limit - bright)) - 1.0)) / slope
    faint = limit + (_FAINTEST_G - limit) * rng.random(size) ** 1.5
    return np.where(rng.random(size) < config.faint_fraction, faint, rising)


def _g_flux_from_mag(g_mag: np.ndarray) -> np.ndarray:
    """phot_g_mean_flux (e-/s) of a G magnitude with the DR3 zero point."""
    return 10.0 ** ((G_ZERO_POINT_MAG - np.asarray(g_mag, dtype=np.float64)) / 2.5)


# --- errors ---------------------------------------------------------------------------------
# sigma(c_0) = k sqrt((a F)^2 + b F + c) for a band with F e-/s and k = c_0 / F of a solar-type
# star, fitted to the three real DR3 rows in ../shared/dr3/samples (signal-to-noise of c_0:
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


def _coefficient_errors(
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
    solar = (photon_spectrum({k: np.array([v]) for k, v in _SOLAR.items()}) @ _response())[0]
    g = N_BP + N_RP
    return float(solar[0] / solar[g + 1]), float(solar[N_BP] / solar[g + 2])


def _g_flux_error(g_flux: np.ndarray, n_transits: np.ndarray) -> np.ndarray:
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
    rng = np.random.default_rng([_INSTRUMENT_SEED, ("bp", "rp").index(band)])
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


def _correlated_noise(z: np.ndarray, template: np.ndarray, band: str) -> np.ndarray:
    """Standard normal draws z (rows, n) correlated with each row's template (rows,)."""
    factors = _correlation_factors(band)
    out = np.empty_like(z)
    for k in range(len(factors)):
        rows = template == k
        out[rows] = z[rows] @ factors[k].T
    return out


# --- rows -----------------------------------------------------------------------------------
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


def _source_ids(
    rows: np.ndarray, pixel: np.ndarray, bounds: np.ndarray, jitter: np.ndarray
) -> np.ndarray:
    """Gaia-style source_id of global rows ``rows`` in level-8 ``pixel``, ascending and unique.

    ``pixel << 43 | level-12 sub-pixel << 35 | 1 << 32 | running number << 8``, like real DR3
    ids; the k-th of a pixel's m rows gets the slot ``k * 2**32 // m`` plus a random offset
    smaller than the spacing, so the ids never collide and keep the row order.
    """
    first = np.where(pixel > 0, bounds[pixel - 1], 0)
    spacing = (1 << 32) // np.maximum(bounds[pixel] - first, 1)
    slot = (rows - first) * spacing + (jitter * spacing).astype(np.int64)
    return (pixel << HEALPIX_SHIFT) | ((slot >> 24) << 35) | (1 << 32) | ((slot & 0xFFFFFF) << 8)


_POSITION_DEPTH = 29
"""A position is the centre of a random level-29 sub-pixel of the source's level-12 pixel."""


def _positions(source_id: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ICRS ra, dec (degrees) inside each source_id's level-12 pixel (``source_id >> 35``).

    DR3 ids encode the level-12 nested pixel of the position when the id was assigned; the mock
    keeps every source there (real stars with high proper motion may have left it).
    """
    import cdshealpix.nested

    shift = 2 * (_POSITION_DEPTH - 12)
    within = rng.integers(0, 1 << shift, len(source_id), dtype=np.int64)
    pixel = ((source_id >> 35) << shift) | within
    lon, lat = cdshealpix.nested.healpix_to_lonlat(pixel.astype(np.uint64), _POSITION_DEPTH)
    return np.asarray(lon.deg, np.float64), np.asarray(lat.deg, np.float64)


_SPECTRUM_BATCH = 1024  # rows per spectrum computation, to keep temporary arrays small


@functools.lru_cache(maxsize=1)  # consecutive ranges (store chunks) reuse the last block
def _block(seed: int, index: int, n: int, config: MockConfig) -> MockRows:
    """Block ``index`` (BLOCK_ROWS rows, some past ``n`` in the last block) of a catalogue.

    Every random number comes from this block's own stream, drawn for all rows in a fixed order,
    so the block is the same whichever rows of it are used.
    """
    rng = np.random.default_rng([seed, index])
    size = BLOCK_ROWS
    rows = index * BLOCK_ROWS + np.arange(size, dtype=np.int64)
    bounds = _pixel_row_bounds(n)
    pixel = np.minimum(np.searchsorted(bounds, rows, side="right"), N_PIXELS - 1)
    labels = draw_labels(rng, size, _sky().sin_b[pixel], config)
    labels["population"] = _draw_population(seed, index, size, config)
    g_true = _g_flux_from_mag(labels["g_mag"])
    n_transits = np.round(15.0 + rng.gamma(2.5, 16.0, size)).astype(np.int64)

    true = np.empty((size, N_BP + N_RP))
    band_flux = np.empty((size, 2))
    for start in range(0, size, _SPECTRUM_BATCH):
        part = slice(start, start + _SPECTRUM_BATCH)
        true[part], band_flux[part] = _observe(
            {k: v[part] for k, v in labels.items()}, g_true[part]
        )
    rare = np.flatnonzero(labels["population"])
    if rare.size:
        rare_rng = np.random.default_rng([seed, index, _RARE_STREAM, 1])
        rare_labels = {k: v[rare] for k, v in labels.items()}
        photons = _rare_photons(rare_rng, rare_labels, labels["population"][rare])
        true[rare], band_flux[rare] = _project(photons, g_true[rare])
        for name, values in rare_labels.items():
            labels[name][rare] = values
    errors = _coefficient_errors(band_flux, n_transits, np.exp(rng.normal(0.0, 0.15, true.shape)))
    template = rng.integers(0, N_CORRELATION_TEMPLATES, (size, 2))
    z = rng.standard_normal(true.shape)
    noise = np.concatenate(
        [
            _correlated_noise(z[:, :N_BP], template[:, 0], "bp"),
            _correlated_noise(z[:, N_BP:], template[:, 1], "rp"),
        ],
        axis=1,
    )
    g_error = _g_flux_error(g_true, n_transits)
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

    source_id = _source_ids(rows, pixel, bounds, rng.random(size))
    ra, dec = _positions(source_id, rng)  # drawn last: the earlier draws stay as they were
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


@functools.lru_cache(maxsize=4)
def _pixel_row_bounds(n: int) -> np.ndarray:
    bounds = pixel_row_bounds(n)
    bounds.setflags(write=False)
    return bounds


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
    _check_size(n, seed)
    if not 0 <= start <= stop <= n:
        raise InputShapeError(f"rows {start}:{stop} are outside the mock catalogue's {n} rows")
    if start == stop:
        return _block(seed, 0, n, config).take(slice(0, 0))
    parts = []
    for index in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1):
        offset = index * BLOCK_ROWS
        part = slice(max(start, offset) - offset, min(stop, offset + BLOCK_ROWS) - offset)
        parts.append(_block(seed, index, n, config).take(part))
    return parts[0] if len(parts) == 1 else MockRows.concat(parts)


def _check_size(n: int, seed: int) -> None:
    if n < 1:
        raise ConfigError(f"a mock catalogue needs at least 1 row, got n={n}")
    if n > MAX_ROWS:
        raise ConfigError(f"n={n} is more than the {MAX_ROWS} rows a mock catalogue can hold")
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")


# --- writing a store ------------------------------------------------------------------------
LABELS_FILE = "mock_labels.parquet"
"""Name of the labels table inside a bulk-file directory."""
STORE_LABELS_SUFFIX = ".labels.parquet"
"""A store's labels table sits beside it: ``mock.zarr`` -> ``mock.zarr.labels.parquet`` (inside
the store, Zarr would warn about a foreign file on every listing)."""


def labels_path(path: str | Path) -> Path:
    """Where the labels of the mock store or bulk-file directory ``path`` are."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return path.with_name(path.name + STORE_LABELS_SUFFIX)
    return path / LABELS_FILE


def _mock_attrs(n: int, seed: int, config: MockConfig) -> dict[str, Any]:
    """What a mock catalogue records about itself (store attributes, bulk-file header)."""
    return {
        "data_release": "Gaia DR3 (synthetic: xpbatch mock)",
        "mock": {
            "n": n,
            "seed": seed,
            "block_rows": BLOCK_ROWS,
            "config": dataclasses.asdict(config),
        },
    }


_LABEL_TYPES = {"is_giant": pa.bool_(), "population": pa.int8()}
"""Arrow types of the label columns that are not float32."""


class _LabelsWriter:
    """Streams the labels table to Parquet under a temporary name; ``close`` publishes it."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self._partial = path.with_name(path.name + ".partial")
        schema_ = pa.schema(
            [("source_id", pa.int64())]
            + [(c, _LABEL_TYPES.get(c, pa.float32())) for c in LABEL_COLUMNS]
        )
        self._writer = pq.ParquetWriter(self._partial, schema_, compression="zstd")

    def write_table(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()
        os.replace(self._partial, self.path)


def write_mock_store(
    path: str | Path,
    n: int,
    *,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    config: MockConfig | None = None,
    scalars: Collection[str] = (),
    with_correlations: bool = False,
    rows_per_file: int = MOCK_ROWS_PER_FILE,
    overwrite: bool = False,
) -> Path:
    """Write an ``n``-row mock catalogue as an XP store, chunk by chunk (memory flat in ``n``).

    The labels go beside the store, to ``<path>.labels.parquet`` (``mock.zarr`` ->
    ``mock.zarr.labels.parquet``); read them with :func:`read_mock_labels`. The store records
    the partition ranges of the bulk files :func:`write_mock_dr3_bulk` would write (attribute
    ``partition_ranges``, as ``xpbatch ingest`` records them from DR3 file names).

    Parameters
    ----------
    path
        Directory of the new store.
    n
        Number of sources.
    seed
        Non-negative seed; the same ``(n, seed, config)`` always gives the same rows, whatever
        ``chunk_rows`` is, and the same rows as :func:`write_mock_dr3_bulk`.
    chunk_rows
        Rows per store chunk.
    config
        Populations and defect fractions (:class:`xpbatch.config.MockConfig`).
    scalars, with_correlations
        Also store these DR3 scalar columns / the packed correlations, like ``xpbatch ingest``
        with ``--scalars`` / ``--with-correlations``.
    rows_per_file
        Rows per bulk file, about, of the partition ranges recorded (see
        :func:`bulk_file_plan`).
    overwrite
        Replace an existing store at ``path``.

    Returns
    -------
    pathlib.Path
        The store's path.

    Examples
    --------
    >>> write_mock_store("mock.zarr", 10_000, seed=1)  # doctest: +SKIP
    PosixPath('mock.zarr')
    >>> read_mock_labels("mock.zarr").head()  # doctest: +SKIP
    """
    config = config or MockConfig()
    _check_size(n, seed)
    partitions = [[file.lo, file.hi] for file in bulk_file_plan(n, rows_per_file)]
    writer = XPStoreWriter.create(
        path,
        n,
        chunk_rows=chunk_rows,
        attrs={**_mock_attrs(n, seed, config), schema.STORE_ATTR_PARTITION_RANGES: partitions},
        scalars=scalars,
        with_correlations=with_correlations,
        with_positions=True,
        overwrite=overwrite,
    )
    labels = _LabelsWriter(labels_path(writer.path))
    for region in writer.chunk_slices():
        rows = mock_rows(n, region.start, region.stop, seed=seed, config=config)
        writer.write_rows(
            region.start,
            source_id=rows.source_id,
            coefficients=rows.coefficients,
            coefficient_errors=rows.coefficient_errors,
            phot_g_mean_flux=rows.phot_g_mean_flux,
            scalars={name: rows.scalars[name] for name in scalars},
            correlations=(
                {band: rows.correlations(band) for band in schema.BANDS}
                if with_correlations
                else None
            ),
            positions={schema.RA: rows.ra, schema.DEC: rows.dec},
        )
        labels.write_table(rows.labels_table())
        logger.debug("mock store %s: wrote rows %d..%d", writer.path, region.start, region.stop)
    labels.close()
    return writer.finalize()


def read_mock_labels(path: str | Path) -> pd.DataFrame:
    """The labels of a mock catalogue, indexed by ``source_id``.

    Parameters
    ----------
    path
        A store written by :func:`write_mock_store` (its labels are ``<path>.labels.parquet``), a
        directory written by :func:`write_mock_dr3_bulk` (``mock_labels.parquet`` inside), or a
        labels file itself.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`LABEL_COLUMNS` (Teff in K, log g, [M/H], [α/M], A_V in mag, the true G
        magnitude, is_giant, population: an index into :data:`POPULATIONS`), one row per
        source in source_id order.
    """
    import pandas as pd

    path = Path(path)
    table_path = path if path.suffix == ".parquet" else labels_path(path)
    if not table_path.is_file():
        raise StoreNotFoundError(
            f"no mock labels at {table_path}; labels exist only for catalogues written by "
            "`xpbatch mock` (store or dr3-bulk)"
        )
    return pd.read_parquet(table_path).set_index("source_id")


# --- writing DR3 bulk files -----------------------------------------------------------------
MD5SUM_FILE = "_MD5SUM.txt"
_TEXT_BATCH = 1024  # rows formatted at once (~40 MB of text)
try:  # ISA-L deflates ~4x faster than zlib at the same ratio (2.3x); compression dominates.
    from isal import igzip as _gzip

    _GZIP_LEVEL = 2
except ImportError:  # pragma: no cover - the plain zlib path is exercised where isal is absent
    import gzip as _gzip  # type: ignore[no-redef]

    _GZIP_LEVEL = 1  # zlib's fastest: 2.3x smaller; level 6 gives 2.6x at 1/6 the speed


class _Column(NamedTuple):
    """A column of a bulk file as its ECSV header describes it."""

    name: str
    datatype: str
    ucd: str
    description: str
    subtype: str | None = None


# gaiadr3.xp_continuous_mean_spectrum, per band ({B} is BP or RP): names, order and dtypes are
# xpbatch.dr3's (arrays are ECSV strings); the ECSV metadata is the archive's.
_BAND_COLUMN_META = {
    "basis_function_id": ("meta.id", "Identifier defining the set of basis functions for the {B} "
                          "spectrum representation"),
    "degrees_of_freedom": ("stat.fit.dof", "Degrees of freedom for the {B} spectrum "
                           "representation"),
    "n_parameters": ("stat.fit.param", "Number of parameters for the {B} spectrum "
                     "representation"),
    "n_measurements": ("meta.number", "Number of measurements used for the {B} spectrum "
                       "generation"),
    "n_rejected_measurements": ("meta.number", "Number of rejected measurements in the {B} "
                                "spectrum generation"),
    "standard_deviation": ("stat.stdev", "Standard deviation for the {B} spectrum "
                           "representation"),
    "chi_squared": ("stat.fit.chi2", "Chi squared for the {B} spectrum representation"),
    "coefficients": ("stat.fit.param", "Basis function coefficients for the {B} spectrum "
                     "representation"),
    "coefficient_errors": ("stat.error", "Basis function coefficient errors for the {B} "
                           "spectrum representation"),
    "coefficient_correlations": ("stat.correlation", "Correlation matrix for {B} coefficients"),
    "n_relevant_bases": ("meta.number", "Number of bases that are relevant for the "
                         "representation of this mean {B} spectrum"),
    "relative_shrinking": ("stat.fit.param", "Measure of the relative shrinking of the "
                           "coefficient vector when truncation is applied for the mean {B} "
                           "spectrum"),
}  # fmt: skip
_BAND_COLUMNS = tuple(
    _Column(name, "string", *_BAND_COLUMN_META[name], f"{dtype}[null]")
    if name in dr3.ARRAYS
    else _Column(name, dtype, *_BAND_COLUMN_META[name])
    for name, dtype in dr3.BAND_COLUMNS.items()
)
_SOURCE_ID_COLUMN = _Column(
    "source_id", "int64", "meta.id;meta.main",
    "Unique source identifier (unique within a particular Data Release)",
)  # fmt: skip
_XP_COLUMNS = (
    _SOURCE_ID_COLUMN,
    _Column("solution_id", "int64", "meta.version", "Solution Identifier"),
    *(
        c._replace(name=f"{band}_{c.name}", description=c.description.format(B=band.upper()))
        for band in schema.BANDS
        for c in _BAND_COLUMNS
    ),
)
_GAIA_SOURCE_COLUMNS = (
    _SOURCE_ID_COLUMN,
    _Column("ra", "float64", "pos.eq.ra;meta.main", "Right ascension (deg)"),
    _Column("dec", "float64", "pos.eq.dec;meta.main", "Declination (deg)"),
    _Column("phot_g_mean_flux", "float64", "phot.flux;stat.mean;em.opt",
            "G-band mean flux (electron/s)"),
    _Column("phot_g_mean_flux_error", "float32", "stat.error;phot.flux;em.opt",
            "Error on G-band mean flux (electron/s)"),
    _Column("phot_g_mean_mag", "float32", "phot.mag;stat.mean;em.opt", "G-band mean magnitude"),
)  # fmt: skip


def _ecsv_header(columns: tuple[_Column, ...], generator: str) -> bytes:
    """The ``#`` ECSV header of a bulk file, then the CSV line of column names."""
    lines = ["%ECSV 1.0", "---", "delimiter: ','", "datatype:"]
    for column in columns:
        lines += ["-", f"  name: {column.name}", f"  datatype: {column.datatype}"]
        if column.subtype:
            lines.append(f"  subtype: '{column.subtype}'")
        lines += [f"  description: {column.description}", "  meta:", f"    ucd: {column.ucd}"]
    lines += ["meta:", f"  generator: '{generator}'"]
    header = "".join(f"# {line}\n" for line in lines) + ",".join(c.name for c in columns) + "\n"
    return header.encode()


def _float_text(values: np.ndarray) -> pa.Array:
    """Shortest round-trip decimal of each value (float32 as float32); NaN, Infinity as in JSON."""
    text = pc.cast(pa.array(values), pa.string())
    if not np.isfinite(values).all():
        for mask, token in (
            (np.isnan(values), "NaN"),
            (np.isposinf(values), "Infinity"),
            (np.isneginf(values), "-Infinity"),
        ):
            text = pc.if_else(pa.array(mask), token, text)
    return text


def _json_arrays(matrix: np.ndarray) -> pa.Array:
    """Each row of a (rows, k) array as a double-quoted JSON array: ``"[1.5,-2.25,...]"``."""
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, _float_text(matrix.reshape(-1)))
    return pc.binary_join_element_wise('"[', pc.binary_join(lists, ","), ']"', "")


@functools.cache
def _correlation_text(band: str) -> pa.Array:
    """The double-quoted JSON text of each correlation template of one band."""
    return _json_arrays(packed_correlations(band))


def _null_where(mask: np.ndarray, text: pa.Array) -> pa.Array:
    """``null`` (the bulk files' missing value) where ``mask``."""
    return pc.if_else(pa.array(mask), "null", text) if mask.any() else text


def _csv_lines(columns: list[pa.Array]) -> memoryview:
    """The bytes of the CSV lines of these text columns (one ``\\n``-terminated line a row)."""
    lines = pc.binary_join_element_wise(pc.binary_join_element_wise(*columns, ","), "", "\n")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
    first, last = offsets[lines.offset], offsets[lines.offset + len(lines)]
    return memoryview(lines.buffers()[2])[first:last]


def _xp_text(rows: MockRows) -> memoryview:
    """The bulk-file lines of ``rows`` (gaiadr3.xp_continuous_mean_spectrum columns)."""
    columns = [
        pc.cast(pa.array(rows.source_id), pa.string()),
        pc.cast(pa.array(rows.scalars["solution_id"]), pa.string()),
    ]
    for b, band in enumerate(schema.BANDS):
        missing = rows.scalars[f"{band}_n_parameters"] < 0
        part = slice(0, N_BP) if band == "bp" else slice(N_BP, N_BP + N_RP)
        arrays = {
            # float32 values written as float64 text: every reader gets the same float32 back
            "coefficients": _json_arrays(rows.coefficients[:, part].astype(np.float64)),
            "coefficient_errors": _json_arrays(rows.coefficient_errors[:, part]),
            "coefficient_correlations": _correlation_text(band).take(
                pa.array(rows.correlation_template[:, b])
            ),
        }
        for column in _BAND_COLUMNS:
            text = arrays.get(column.name)
            if text is None:
                text = _float_text(rows.scalars[f"{band}_{column.name}"])
            columns.append(_null_where(missing, text))
    return _csv_lines(columns)


def _gaia_source_text(rows: MockRows) -> memoryview:
    """The GaiaSource companion lines of ``rows``: source_id, ra, dec and the G photometry."""
    missing = np.isnan(rows.phot_g_mean_flux)
    columns = [pc.cast(pa.array(rows.source_id), pa.string())]
    columns += [_float_text(rows.ra), _float_text(rows.dec)]
    for values in (rows.phot_g_mean_flux, rows.phot_g_mean_flux_error, rows.phot_g_mean_mag):
        columns.append(_null_where(missing, _float_text(values)))
    return _csv_lines(columns)


@dataclass(frozen=True)
class BulkFile:
    """One bulk file pair: HEALPix level-8 range ``lo..hi`` (inclusive) and its rows."""

    lo: int
    hi: int
    start: int
    stop: int

    @property
    def xp_name(self) -> str:
        return file_name("XpContinuousMeanSpectrum", self.lo, self.hi, ".csv.gz")

    @property
    def gaia_source_name(self) -> str:
        return file_name("GaiaSource", self.lo, self.hi, ".csv.gz")


def bulk_file_plan(n: int, rows_per_file: int = MOCK_ROWS_PER_FILE) -> list[BulkFile]:
    """How ``n`` rows are cut into bulk files: whole pixels, about ``rows_per_file`` rows each.

    Like DR3's partition, the files' pixel ranges are contiguous and cover all 786432 level-8
    pixels, and every file has at least one row.
    """
    if rows_per_file < 1:
        raise ConfigError(f"rows_per_file must be at least 1, got {rows_per_file}")
    bounds = _pixel_row_bounds(n)
    targets = np.arange(rows_per_file, n, rows_per_file, dtype=np.int64)
    cuts = np.unique(np.searchsorted(bounds, targets - 1, side="right"))  # pixel of each target
    cuts = cuts[bounds[cuts] < n]  # a cut after the last row would leave an empty file
    his = [*cuts.tolist(), N_PIXELS - 1]
    los = [0, *(cuts + 1).tolist()]
    return [
        BulkFile(lo, hi, int(bounds[lo - 1]) if lo else 0, int(bounds[hi]))
        for lo, hi in zip(los, his, strict=True)
    ]


class _HashingWriter(io.RawIOBase):
    """A binary file that also computes the MD5 of what is written to it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.md5 = hashlib.md5()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.md5.update(data)
        return self.raw.write(data)


class _GzipOutput:
    """A .csv.gz written under a temporary name, published (renamed) only when complete.

    The gzip header carries no name and no time, so the same rows give the same bytes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._partial = path.with_name(path.name + ".partial")
        self._raw = open(self._partial, "wb")  # noqa: SIM115 - closed in close()
        self._hashing = _HashingWriter(self._raw)
        self._gzip = _gzip.GzipFile(
            filename="", mode="wb", fileobj=self._hashing, compresslevel=_GZIP_LEVEL, mtime=0
        )

    def write(self, data: bytes | memoryview) -> None:
        self._gzip.write(data)

    def close(self) -> str:
        """Finish the file, publish it and return its MD5."""
        self._gzip.close()
        self._raw.close()
        os.replace(self._partial, self.path)
        return self._hashing.md5.hexdigest()

    def abandon(self) -> None:
        """Remove the unfinished file after an error."""
        self._gzip.close()
        self._raw.close()
        self._partial.unlink(missing_ok=True)


def _row_batches(
    n: int, start: int, stop: int, seed: int, config: MockConfig
) -> Iterator[MockRows]:
    """Rows ``start:stop`` in batches of at most _TEXT_BATCH rows, each block generated once."""
    for index in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1):
        block = _block(seed, index, n, config)
        offset = index * BLOCK_ROWS
        first, last = max(start, offset), min(stop, offset + BLOCK_ROWS)
        for a in range(first, last, _TEXT_BATCH):
            yield block.take(slice(a - offset, min(a + _TEXT_BATCH, last) - offset))


def _write_bulk_pair(
    out_dir: Path, file: BulkFile, n: int, seed: int, config: MockConfig
) -> tuple[dict[str, str], pa.Table]:
    """Write one XpContinuousMeanSpectrum file and its GaiaSource companion.

    Returns the MD5 of each file by name, and the labels of the file's rows.
    """
    generator = f"xpbatch {__version__} mock (synthetic data), n={n}, seed={seed}"
    outputs = [
        (_GzipOutput(out_dir / file.xp_name), _XP_COLUMNS, _xp_text),
        (_GzipOutput(out_dir / file.gaia_source_name), _GAIA_SOURCE_COLUMNS, _gaia_source_text),
    ]
    labels = []
    try:
        for output, columns, _ in outputs:
            output.write(_ecsv_header(columns, generator))
        for rows in _row_batches(n, file.start, file.stop, seed, config):
            for output, _, text in outputs:
                output.write(text(rows))
            labels.append(rows.labels_table())
    except BaseException:
        for output, _, _ in outputs:
            output.abandon()
        raise
    checksums = {output.path.name: output.close() for output, _, _ in outputs}
    logger.info("mock bulk: wrote %s (%d rows)", file.xp_name, file.stop - file.start)
    return checksums, pa.concat_tables(labels)


_OUR_FILES = (
    "XpContinuousMeanSpectrum_*.csv.gz*",
    "GaiaSource_*.csv.gz*",
    MD5SUM_FILE,
    LABELS_FILE,
)


def _prepare_bulk_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``, or clear our files from it when ``overwrite`` (nothing else)."""
    ours = [p for pattern in _OUR_FILES for p in out_dir.glob(pattern)]
    if ours and not overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds bulk files ({ours[0].name}, ...); pass overwrite=True "
            "(--overwrite) to replace them, or choose another directory"
        )
    for path in ours:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_mock_dr3_bulk(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    rows_per_file: int = MOCK_ROWS_PER_FILE,
    config: MockConfig | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> list[Path]:
    """Write an ``n``-row mock catalogue as Gaia DR3 bulk files, file by file (memory flat).

    Writes ``XpContinuousMeanSpectrum_<lo>-<hi>.csv.gz`` files in the format of the DR3 CDN
    (ECSV ``#`` header, JSON arrays in double quotes, ``null`` in every field of a missing
    band, the 1485 correlations of each band), same-suffix ``GaiaSource_<lo>-<hi>.csv.gz``
    companions (source_id, ra, dec, phot_g_mean_flux, phot_g_mean_flux_error,
    phot_g_mean_mag; ``null`` where missing), the ``_MD5SUM.txt`` manifest (written last) and
    ``mock_labels.parquet``.

    The rows are exactly those of :func:`write_mock_store` with the same ``(n, seed, config)``:
    coefficients are float32 values written as float64 text, errors and magnitudes as float32
    text, fluxes as float64 text, each with the shortest decimal that reads back exactly, so
    ingesting these files gives the same store. NaN and infinite coefficients are written
    ``NaN`` and ``Infinity`` (as Python's json module does).

    Parameters
    ----------
    out_dir
        Directory for the files (created if needed).
    n
        Number of sources.
    seed
        Non-negative seed, as for :func:`write_mock_store`.
    rows_per_file
        Rows per file, about: files hold whole HEALPix level-8 pixels.
    config
        Populations and defect fractions.
    overwrite
        Replace bulk files already in ``out_dir`` (other files are left alone).
    workers
        Files written at once, by threads (compression and formatting release the GIL):
        about one per free core.

    Returns
    -------
    list of pathlib.Path
        The XpContinuousMeanSpectrum files, in source_id order.

    Examples
    --------
    >>> files = write_mock_dr3_bulk("bulk/", 100_000, rows_per_file=20_000)  # doctest: +SKIP
    >>> [f.name for f in files][:1]  # doctest: +SKIP
    ['XpContinuousMeanSpectrum_000000-236841.csv.gz']
    """
    config = config or MockConfig()
    _check_size(n, seed)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    plan = bulk_file_plan(n, rows_per_file)
    _prepare_bulk_dir(out_dir, overwrite)
    labels = _LabelsWriter(out_dir / LABELS_FILE)
    checksums: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # map yields in plan order, so the labels table stays in source_id order.
        for sums, table in pool.map(
            lambda file: _write_bulk_pair(out_dir, file, n, seed, config), plan
        ):
            checksums.update(sums)
            labels.write_table(table)
    labels.close()
    manifest = "".join(f"{md5}  {name}\n" for name, md5 in sorted(checksums.items()))
    with atomic_path(out_dir / MD5SUM_FILE) as tmp:
        tmp.write_text(manifest)
    return [out_dir / file.xp_name for file in plan]
