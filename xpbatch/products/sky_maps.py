"""``xpbatch skymap``: HEALPix maps of a catalogue, accumulated chunk by chunk, drawn in Mollweide.

Each task reads one catalogue chunk and returns per-pixel sums (:class:`SkyMaps`) that the
caller adds up, so memory depends on the number of pixels (``12 * 4**order``), never on the
number of rows. Unless given, the order is the finest at which a pixel holds enough sources
on average to be a map rather than speckle (:func:`auto_order`). The maps:

================  ==========================================================================
map               definition (per HEALPix nested pixel at ``order``)
================  ==========================================================================
count             rows whose position falls in the pixel (all rows, encoded or not)
fraction encoded  rows without the ``not_encoded`` flag / count
median rmse       median of ``rmse`` over encoded rows, from a histogram of log10(rmse) in
                  :data:`RMSE_BINS_PER_DEX` bins per dex over ``RMSE_RANGE`` (interpolated
                  within its bin: exact to 1/(2·RMSE_BINS_PER_DEX) dex; values outside the
                  range count in an under/overflow bin)
mean latent k     mean of ``latent_mean[:, k]`` over encoded rows
================  ==========================================================================

Positions are the catalogue's ra/dec; a row without them is placed by its source_id's
level-12 pixel (:mod:`xpbatch.products.sky_positions`), which at the orders drawn here (at most 12)
is the pixel
the source had when its id was assigned.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from xpbatch import schema
from xpbatch.config import SkyMapConfig
from xpbatch.errors import ConfigError
from xpbatch.products.plots import save_figure
from xpbatch.products.sky_positions import SkySource
from xpbatch.runtime.executor import Executor, LazyClient
from xpbatch.schema import CatalogFlag
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.manifest import file_manifest
from xpbatch.storage.outputs import locked_output
from xpbatch.storage.paths import PathLike

if TYPE_CHECKING:
    from distributed import Client
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_ORDER = 12
MIN_SOURCES_PER_PIXEL = 20
"""The automatic order is the finest whose pixels hold at least this many sources on average,
so that a small catalogue gives a map rather than speckle."""
MAX_AUTO_ORDER = 5
"""The automatic order stops here (12,288 pixels of about 1.8°): finer than a figure shows, and
each task's per-pixel sums grow four times per order."""
RMSE_RANGE = (1e-3, 1e3)
"""rmse values the histogram resolves; others go to the under/overflow bins."""
RMSE_BINS_PER_DEX = 20
TASKS_IN_FLIGHT_PER_THREAD = 2


def _rmse_edges() -> np.ndarray:
    lo, hi = np.log10(RMSE_RANGE)
    return np.linspace(lo, hi, round((hi - lo) * RMSE_BINS_PER_DEX) + 1)  # log10 edges


@dataclasses.dataclass
class SkyMaps:
    """Per-pixel sums of a catalogue (or part of one); add two with ``+``."""

    order: int
    count: np.ndarray
    """(pixel,) int64 rows per pixel."""
    encoded: np.ndarray
    """(pixel,) int64 encoded rows per pixel."""
    latent_sum: np.ndarray
    """(pixel, latent) float64 sum of latent_mean over encoded rows."""
    rmse_histogram: np.ndarray
    """(pixel, bins + 2) int64 encoded rows per log10(rmse) bin; first/last: under/overflow."""

    @classmethod
    def empty(cls, order: int, n_latent: int) -> SkyMaps:
        """All-zero maps."""
        n_pix = 12 * 4**order
        n_bins = len(_rmse_edges()) + 1
        return cls(
            order,
            np.zeros(n_pix, np.int64),
            np.zeros(n_pix, np.int64),
            np.zeros((n_pix, n_latent)),
            np.zeros((n_pix, n_bins), np.int64),
        )

    def __add__(self, other: SkyMaps) -> SkyMaps:
        return SkyMaps(
            self.order,
            self.count + other.count,
            self.encoded + other.encoded,
            self.latent_sum + other.latent_sum,
            self.rmse_histogram + other.rmse_histogram,
        )

    @property
    def fraction_encoded(self) -> np.ndarray:
        """(pixel,) encoded / count; NaN where a pixel has no row."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.encoded / self.count, np.nan)

    @property
    def mean_latent(self) -> np.ndarray:
        """(pixel, latent) mean latent over encoded rows; NaN where a pixel has none."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(
                self.encoded[:, None] > 0, self.latent_sum / self.encoded[:, None], np.nan
            )

    @property
    def median_rmse(self) -> np.ndarray:
        """(pixel,) median rmse of encoded rows from the histogram; NaN where none."""
        edges = _rmse_edges()
        inner = self.rmse_histogram[:, 1:-1]  # (pixel, bins)
        cumulative = np.cumsum(self.rmse_histogram, axis=1)  # (pixel, bins + 2)
        half = self.encoded / 2.0
        k = np.argmax(cumulative >= half[:, None], axis=1)  # bin holding the median
        below = np.where(k > 0, cumulative[np.arange(len(k)), np.maximum(k - 1, 0)], 0)
        inside = self.rmse_histogram[np.arange(len(k)), k]
        with np.errstate(invalid="ignore", divide="ignore"):
            fraction = np.clip((half - below) / inside, 0, 1)
        j = np.clip(k - 1, 0, inner.shape[1] - 1)  # inner bin index
        log_value = edges[j] + fraction * (edges[j + 1] - edges[j])
        log_value = np.where(
            k == 0, edges[0], np.where(k == inner.shape[1] + 1, edges[-1], log_value)
        )
        return np.where(self.encoded > 0, 10.0**log_value, np.nan)


@dataclasses.dataclass(frozen=True)
class _ChunkMaps:
    """Per-pixel sums of one catalogue chunk (the picklable body of each task)."""

    source: SkySource
    order: int

    def __call__(self, index: int) -> SkyMaps:
        import cdshealpix.nested
        from astropy import units as u

        values = self.source.read(index, (schema.LATENT_MEAN, schema.RMSE, schema.FLAGS))
        pixel = cdshealpix.nested.lonlat_to_healpix(
            values[schema.RA] * u.deg, values[schema.DEC] * u.deg, self.order
        ).astype(np.int64)
        maps = SkyMaps.empty(self.order, self.source.layout.latent_dim)
        n_pix = len(maps.count)
        maps.count += np.bincount(pixel, minlength=n_pix)
        encoded = (values[schema.FLAGS] & np.uint16(CatalogFlag.NOT_ENCODED)) == 0
        pixel_enc = pixel[encoded]
        maps.encoded += np.bincount(pixel_enc, minlength=n_pix)
        latent = values[schema.LATENT_MEAN][encoded].astype(np.float64)  # (encoded, latent)
        for k in range(latent.shape[1]):
            maps.latent_sum[:, k] = np.bincount(pixel_enc, latent[:, k], minlength=n_pix)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_rmse = np.log10(values[schema.RMSE][encoded].astype(np.float64))
        bins = np.searchsorted(_rmse_edges(), log_rmse, side="right")  # 0 = underflow
        flat = pixel_enc * maps.rmse_histogram.shape[1] + bins
        maps.rmse_histogram += np.bincount(flat, minlength=maps.rmse_histogram.size).reshape(
            maps.rmse_histogram.shape
        )
        return maps


def auto_order(n_sources: int) -> int:
    """The finest HEALPix order, at most :data:`MAX_AUTO_ORDER`, whose ``12 * 4**order``
    pixels hold at least :data:`MIN_SOURCES_PER_PIXEL` sources on average (0 for very few).

    Examples
    --------
    >>> auto_order(20_000), auto_order(200_000), auto_order(219_000_000)
    (3, 4, 5)
    """
    order = 0
    while order < MAX_AUTO_ORDER and n_sources >= MIN_SOURCES_PER_PIXEL * 12 * 4 ** (order + 1):
        order += 1
    return order


def compute_sky_maps(
    catalog: PathLike,
    *,
    order: int | None = None,
    client: Client | LazyClient | Executor | None = None,
) -> SkyMaps:
    """Accumulate the HEALPix maps of a complete catalogue, one chunk per task.

    Parameters
    ----------
    catalog
        A complete catalogue (``xpbatch encode-catalog``).
    order
        HEALPix order of the maps (0..12); None: :func:`auto_order` of the number of rows.
    client
        A ``distributed.Client``: chunks run on its workers, at most two per worker thread in
        flight. None: serially here.

    Examples
    --------
    >>> maps = compute_sky_maps("catalog.zarr")  # doctest: +SKIP
    >>> int(maps.count.sum()), maps.order  # every row once; the order chosen  # doctest: +SKIP
    """
    if order is not None and not 0 <= order <= MAX_ORDER:
        raise ConfigError(f"a sky map's HEALPix order must be in 0..{MAX_ORDER}, got {order}")
    source = SkySource.open(catalog, positions_from_source_id=True)
    if order is None:
        order = auto_order(source.layout.n_rows)
    task = _ChunkMaps(source, order)
    total = SkyMaps.empty(order, source.layout.latent_dim)
    executor = Executor.of(client, tasks_per_thread=TASKS_IN_FLIGHT_PER_THREAD)
    for part in executor.map(task, range(source.n_chunks), name="sky map"):
        total = total + part
    return total


# --- drawing ----------------------------------------------------------------------------------
def _plot_longitude(ra: np.ndarray) -> np.ndarray:
    """Mollweide longitude (radians, -pi..pi) of right ascension ``ra`` (radians): RA 180° at
    the centre, increasing to the left (the sky as seen from inside the sphere)."""
    return np.pi - np.mod(ra, 2 * np.pi)


def _mollweide_grid(order: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longitude/latitude cell edges (radians) and the pixel of each cell centre."""
    import cdshealpix.nested
    from astropy import units as u

    height = width // 2
    x = np.linspace(-np.pi, np.pi, width + 1)
    y = np.linspace(-np.pi / 2, np.pi / 2, height + 1)
    xc, yc = (x[:-1] + x[1:]) / 2, (y[:-1] + y[1:]) / 2
    lon, lat = np.meshgrid(xc, yc)  # (height, width)
    ra = np.mod(np.pi - lon, 2 * np.pi)  # inverse of _plot_longitude
    pixel = cdshealpix.nested.lonlat_to_healpix(ra * u.rad, lat * u.rad, order)
    return x, y, np.asarray(pixel, np.int64)


def _galactic_plane() -> tuple[np.ndarray, np.ndarray]:
    """The Galactic plane (b = 0) in plot coordinates, broken (NaN) where it crosses the edge."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    galactic_l = np.linspace(0, 360, 1441)
    icrs = SkyCoord(
        l=galactic_l * u.deg, b=np.zeros_like(galactic_l) * u.deg, frame="galactic"
    ).icrs
    lon, lat = _plot_longitude(np.asarray(icrs.ra.rad)), np.asarray(icrs.dec.rad)
    cut = np.flatnonzero(np.abs(np.diff(lon)) > np.pi) + 1  # where it wraps around the map
    return np.insert(lon, cut, np.nan), np.insert(lat, cut, np.nan)


def _panels(maps: SkyMaps) -> list[tuple[str, np.ndarray, dict[str, Any], str]]:
    """(title, per-pixel values, pcolormesh options, colour bar label) of every panel."""
    from matplotlib.colors import LogNorm

    count = np.where(maps.count > 0, maps.count.astype(float), np.nan)
    area = 4 * np.pi * np.degrees(1.0) ** 2 / len(maps.count)  # deg² of one pixel
    panels: list[tuple[str, np.ndarray, dict[str, Any], str]] = [
        (
            "sources",
            count,
            {"cmap": "viridis", "norm": LogNorm(vmin=1, vmax=max(float(maps.count.max()), 2))},
            f"sources per pixel ({area:.3g} deg²)",
        ),
        (
            "fraction encoded",
            maps.fraction_encoded,
            {"cmap": "magma", "vmin": 0, "vmax": 1},
            "encoded / sources",
        ),
        (
            "median rmse",
            maps.median_rmse,
            {"cmap": "cividis", **_robust_limits(maps.median_rmse)},
            "median rmse [units of the errors]",
        ),
    ]
    mean = maps.mean_latent
    for k in range(mean.shape[1]):
        limits = _robust_limits(mean[:, k])
        panels.append(
            (f"mean latent {k}", mean[:, k], {"cmap": "coolwarm", **limits}, f"mean z{k}")
        )
    return panels


def _robust_limits(values: np.ndarray) -> dict[str, float]:
    """Colour limits at the 2nd and 98th percentiles, so a few sparse pixels do not set them."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {}
    lo, hi = np.percentile(finite, [2, 98])
    return {"vmin": float(lo), "vmax": float(hi)} if hi > lo else {}


RA_TICKS_DEG = (300, 240, 180, 120, 60)
DEC_TICKS_DEG = (-60, -30, 0, 30, 60)


def _sky_axes(ax: Axes, plane: tuple[np.ndarray, np.ndarray]) -> None:
    """Graticule with RA/Dec labels, the celestial equator and the Galactic plane."""
    ra = np.radians(RA_TICKS_DEG)
    ax.set_xticks(_plot_longitude(ra), [f"{d}°" for d in RA_TICKS_DEG], fontsize=6)
    ax.set_yticks(np.radians(DEC_TICKS_DEG), [f"{d:+d}°" for d in DEC_TICKS_DEG], fontsize=6)
    ax.grid(True, color="0.5", lw=0.4, alpha=0.6)
    ax.set_xlabel("RA", fontsize=7, labelpad=1)
    ax.set_ylabel("Dec", fontsize=7, labelpad=1)
    ax.plot([-np.pi, np.pi], [0, 0], color="k", lw=0.8, ls="--", label="celestial equator")
    ax.plot(*plane, color="k", lw=0.9, label="Galactic plane")


def draw_sky_maps(maps: SkyMaps, *, title: str = "", width: int = 480) -> Figure:
    """Draw every map in Mollweide and return the figure (save it with ``fig.savefig``).

    ICRS, RA increasing to the left with RA 180° at the centre; a graticule labelled in RA and
    Dec, the celestial equator (dashed) and the Galactic plane (solid) on every panel; each
    colour bar says what it shows and its unit. The figure is a plain
    :class:`matplotlib.figure.Figure` (pyplot's state and backend are left alone), so in
    Jupyter it shows as a cell's value and later plots keep working.

    Examples
    --------
    >>> fig = draw_sky_maps(compute_sky_maps("catalog.zarr"))  # doctest: +SKIP
    >>> fig.savefig("sky.png")  # doctest: +SKIP
    """
    from matplotlib.ticker import ScalarFormatter

    from xpbatch.products.plots import new_figure

    x, y, pixel = _mollweide_grid(maps.order, width)
    plane = _galactic_plane()
    panels = _panels(maps)
    n_cols = 3
    n_rows = -(-len(panels) // n_cols)
    fig = new_figure(figsize=(4.4 * n_cols, 3.0 * n_rows + 0.7))
    for i, (name, values, options, label) in enumerate(panels):
        ax = fig.add_subplot(n_rows, n_cols, i + 1, projection="mollweide")
        image = np.ma.masked_invalid(values[pixel])  # (height, width)
        mesh = ax.pcolormesh(x, y, image, shading="flat", rasterized=True, **options)
        ax.set_title(name, fontsize=9)
        _sky_axes(ax, plane)
        bar = fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
        if "norm" not in options:
            bar.formatter = ScalarFormatter(useOffset=False)
        bar.set_label(label, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    pixel_deg = np.degrees(np.sqrt(4 * np.pi / len(maps.count)))
    fig.suptitle(
        f"{title}  {int(maps.count.sum()):,} sources, HEALPix order {maps.order} "
        f"(pixels of about {pixel_deg:.2g}°); ICRS, Mollweide, RA increasing to the left".strip(),
        fontsize=10,
    )
    return fig


SKY_MAP_KIND = "sky map"
"""The kind of output :func:`write_sky_maps` records (xpbatch.storage.manifest)."""


@locked_output("out", "skymap")
def write_sky_maps(
    catalog: PathLike,
    out: PathLike | Location,
    *,
    client: Client | LazyClient | None = None,
    config: SkyMapConfig | None = None,
) -> SkyMaps:
    """:func:`compute_sky_maps` drawn into the PNG ``out`` (``xpbatch skymap``).

    ``out`` follows the one output rule (:mod:`xpbatch.storage.manifest`): an existing file is
    replaced only with ``config.overwrite`` and only when it is a sky map xpbatch drew (its
    record ``OUT.xpbatch.json`` beside it); it is checked before the maps are computed.

    Examples
    --------
    >>> maps = write_sky_maps("catalog.zarr", "sky.png")  # doctest: +SKIP
    """
    config = config or SkyMapConfig()
    run = file_manifest(out, kind=SKY_MAP_KIND)
    run.claim(resume=False, overwrite=config.overwrite, remove=lambda: None)  # replaced whole
    maps = compute_sky_maps(catalog, order=config.order, client=client)
    run.begin(catalog=str(zarr_arrays.absolute(catalog)), order=maps.order)
    save_figure(draw_sky_maps(maps, title=str(catalog)), run.output)
    run.mark_complete(sources=int(maps.count.sum()))
    return maps
