"""The mock's sky: source density over HEALPix pixels, hence each row's source_id and place.

Rows are laid over the 786432 level-8 pixels in pixel order (so in source_id order), as many
per pixel as a Galactic disc, bulge, dust lane and halo give; every function here depends only
on the catalogue's size ``n`` (and, for positions, the block's random stream).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from xpbatch.storage.partitions import HEALPIX_LEVEL, HEALPIX_SHIFT

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
class SkyPixels:
    """What the rows need of each level-8 pixel: the cumulative density and the latitude."""

    cumulative: np.ndarray  # (N_PIXELS,) float64, cumulative source fraction up to each pixel
    sin_b: np.ndarray  # (N_PIXELS,) float32, sine of the Galactic latitude of the pixel centre


@functools.cache
def sky_pixels() -> SkyPixels:
    """The sky model on every level-8 pixel (computed once)."""
    ra, dec = _pixel_centres()
    l_gal, b = _galactic(ra, dec)
    density = _source_density(l_gal, b)
    cumulative = np.cumsum(density)
    return SkyPixels(cumulative=cumulative / cumulative[-1], sin_b=np.sin(b).astype(np.float32))


def pixel_row_bounds(n: int) -> np.ndarray:
    """End row (exclusive) of every level-8 pixel when ``n`` rows are laid out over the sky.

    Pixel ``p`` holds rows ``bounds[p-1]:bounds[p]``; rows are in pixel order, so in source_id
    order. Depends only on ``n``.
    """
    bounds = np.floor(sky_pixels().cumulative * n).astype(np.int64)
    bounds[-1] = n
    return bounds


def source_ids(
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


def positions(source_id: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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


@functools.lru_cache(maxsize=4)
def row_bounds(n: int) -> np.ndarray:
    """:func:`pixel_row_bounds`, cached and read-only."""
    bounds = pixel_row_bounds(n)
    bounds.setflags(write=False)
    return bounds
