"""Rare populations injected into a mock (MockConfig.*_fraction, ``xpbatch mock --rare``).

Unresolved binaries, emission-line stars and DA white dwarfs, labelled in the labels' population
column. They draw from their own random stream, so every other row is the same with or without.
"""

from __future__ import annotations

import math

import numpy as np

from xpbatch.config import MockConfig
from xpbatch.mock.instrument import response
from xpbatch.mock.spectra import (
    WAVELENGTH_NM,
    extinction_on_grid,
    photon_continuum,
    photon_spectrum,
)
from xpbatch.schema import N_BP, N_RP

POPULATIONS = ("normal", "binary", "emission_line", "white_dwarf")
"""The labels table's ``population`` codes: the index of the name here."""
RARE_STREAM = 1  # rare populations draw from their own stream: the others' rows never change
_BALMER_NM = (656.28, 486.13, 434.05, 410.17, 397.01, 388.91)


def draw_population(seed: int, index: int, size: int, config: MockConfig) -> np.ndarray:
    """(size,) int8 population codes of block ``index``; 0 everywhere without rare fractions."""
    if not any(config.rare_fractions.values()):
        return np.zeros(size, np.int8)
    u = np.random.default_rng([seed, index, RARE_STREAM]).random(size)
    cuts = np.cumsum(list(config.rare_fractions.values()))  # in POPULATIONS[1:] order
    return ((np.searchsorted(cuts, u, side="right") + 1) % len(POPULATIONS)).astype(np.int8)


def rare_photons(
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
    g_column = response()[:, N_BP + N_RP]

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
    ) * depth + np.outer(labels["a_v"] * (0.4 * np.log(10.0)), extinction_on_grid())
    dwarf_star = photon_continuum(labels["teff"]) * np.exp(-tau)
    return np.where(white_dwarf[:, None], dwarf_star, photons)
