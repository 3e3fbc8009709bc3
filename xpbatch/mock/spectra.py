"""The stars of the mock: their labels and their photon spectra.

Every star gets labels (Teff, log g, [M/H], [α/M], A_V, G) from a main-sequence or a
giant-branch population. Its photon spectrum is a Planck continuum at Teff times temperature-,
gravity- and metallicity-dependent absorption (Balmer lines and jump, blue line blanketing,
Ca II H&K, CN, CH, Mg b, Na D, the Ca triplet, TiO and CaH bands, a forest of weak metal lines),
reddened with the Cardelli, Clayton & Mathis (1989) law, on the fine grid :data:`WAVELENGTH_NM`.
"""

from __future__ import annotations

import functools

import numpy as np

from xpbatch.config import MockConfig
from xpbatch.schema import G_ZERO_POINT_MAG

WAVELENGTH_NM = np.arange(300.0, 1161.0, 1.0)
"""The fine wavelength grid (nm) every spectrum is computed on."""
# Seed of the random parts of the instrument (line forest here, correlation templates in
# instrument.py): the same for every catalogue, like the real instrument.
INSTRUMENT_SEED = 20220613
_C2_NM_K = 1.438777e7  # second radiation constant h c / k in nm K


def logistic(x: np.ndarray) -> np.ndarray:
    """The logistic function 1 / (1 + exp(-x)), computed without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def photon_continuum(teff: np.ndarray) -> np.ndarray:
    """Planck photon flux λ B_λ(Teff) on WAVELENGTH_NM, (rows, n_wavelength), arbitrary units."""
    lam = WAVELENGTH_NM / 500.0  # in units of 500 nm keeps the numbers near 1
    return lam**-4 / np.expm1(_C2_NM_K / np.outer(teff, WAVELENGTH_NM))


@functools.cache
def extinction_on_grid() -> np.ndarray:
    """:func:`extinction_curve` on WAVELENGTH_NM (computed once)."""
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
    step = logistic((centre - lam) / width)
    band = logistic((lam - centre) / 0.8) * np.exp(-np.clip(lam - centre, 0, None) / width)
    named = depth * np.select([kind == "line", kind == "step"], [line, step], band)
    return np.vstack([named, _line_forest()[None, :]])


_FOREST_LINES = 300


def _line_forest() -> np.ndarray:
    """Optical depth of a fixed forest of weak metal lines, denser in the blue (unit strength).

    Real spectra hold thousands of blended lines; they give the higher orders their structure.
    """
    rng = np.random.default_rng(INSTRUMENT_SEED)
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
    profiles, extinction = _feature_profiles(), extinction_on_grid()
    drivers = _feature_drivers(labels)
    names = [f[4] for f in _FEATURES] + ["line_forest"]
    strengths = np.stack([drivers[name] for name in names], axis=1)  # (rows, n_features + 1)
    tau = strengths @ profiles  # (rows, n_wavelength)
    tau += np.outer(labels["a_v"] * (0.4 * np.log(10.0)), extinction)
    return photon_continuum(labels["teff"]) * np.exp(-tau)


# --- labels ---------------------------------------------------------------------------------
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


def _draw_g_mag(rng: np.random.Generator, size: int, config: MockConfig) -> np.ndarray:
    """G magnitudes: counts rising as 10**(slope G) (flat for slope 0) up to the limit, a few
    fainter sources."""
    slope, bright, limit = config.counts_slope, config.g_mag_min, config.g_mag_limit
    u = rng.random(size)
    if slope == 0.0:
        rising = bright + u * (limit - bright)
    else:
        rising = bright + np.log10(1.0 + u * (10.0 ** (slope * (limit - bright)) - 1.0)) / slope
    faint = limit + (_FAINTEST_G - limit) * rng.random(size) ** 1.5
    return np.where(rng.random(size) < config.faint_fraction, faint, rising)


def g_flux_from_mag(g_mag: np.ndarray) -> np.ndarray:
    """phot_g_mean_flux (e-/s) of a G magnitude with the DR3 zero point."""
    return 10.0 ** ((G_ZERO_POINT_MAG - np.asarray(g_mag, dtype=np.float64)) / 2.5)
