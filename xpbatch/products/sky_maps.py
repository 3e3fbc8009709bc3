"""``xpbatch skymap``: HEALPix maps of a catalogue, accumulated chunk by chunk, drawn in Mollweide.

Each task reads one catalogue chunk and returns per-pixel sums (:class:`SkyMaps`) that the
caller adds up, so memory depends on the number of pixels (``12 * 4**order``), never on the
number of rows. The maps:

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xpbatch import schema
from xpbatch.config import SkyMapConfig
from xpbatch.errors import ConfigError
from xpbatch.products.sky_positions import SkySource
from xpbatch.runtime.executor import Executor, LazyClient
from xpbatch.schema import CatalogFlag
from xpbatch.storage import zarr_arrays
from xpbatch.storage.manifest import file_manifest
from xpbatch.storage.outputs import locked_output
from xpbatch.storage.paths import PathLike, atomic_path

if TYPE_CHECKING:
    from distributed import Client

DEFAULT_ORDER = 5
"""HEALPix order of the maps: 12 288 pixels of about 1.8 degrees."""
MAX_ORDER = 12
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


def compute_sky_maps(
    catalog: PathLike,
    *,
    order: int = DEFAULT_ORDER,
    client: Client | LazyClient | Executor | None = None,
) -> SkyMaps:
    """Accumulate the HEALPix maps of a complete catalogue, one chunk per task.

    Parameters
    ----------
    catalog
        A complete catalogue (``xpbatch encode-catalog``).
    order
        HEALPix order of the maps (0..12).
    client
        A ``distributed.Client``: chunks run on its workers, at most two per worker thread in
        flight. None: serially here.

    Examples
    --------
    >>> maps = compute_sky_maps("catalog.zarr", order=4)  # doctest: +SKIP
    >>> int(maps.count.sum())  # every row once  # doctest: +SKIP
    """
    if not 0 <= order <= MAX_ORDER:
        raise ConfigError(f"a sky map's HEALPix order must be in 0..{MAX_ORDER}, got {order}")
    source = SkySource.open(catalog, positions_from_source_id=True)
    task = _ChunkMaps(source, order)
    total = SkyMaps.empty(order, source.layout.latent_dim)
    executor = Executor.of(client, tasks_per_thread=TASKS_IN_FLIGHT_PER_THREAD)
    for part in executor.map(task, range(source.n_chunks), name="sky map"):
        total = total + part
    return total


# --- drawing ----------------------------------------------------------------------------------
def _mollweide_grid(order: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longitude/latitude cell edges (radians, RA increasing to the left) and the pixel of
    each cell centre."""
    import cdshealpix.nested
    from astropy import units as u

    height = width // 2
    x = np.linspace(np.pi, -np.pi, width + 1)  # plot longitude: RA 0 at the right edge
    y = np.linspace(-np.pi / 2, np.pi / 2, height + 1)
    xc, yc = (x[:-1] + x[1:]) / 2, (y[:-1] + y[1:]) / 2
    lon, lat = np.meshgrid(xc, yc)  # (height, width)
    ra = np.mod(np.pi - lon, 2 * np.pi)
    pixel = cdshealpix.nested.lonlat_to_healpix(ra * u.rad, lat * u.rad, order)
    return x, y, np.asarray(pixel, np.int64)


def _panels(maps: SkyMaps) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """(title, per-pixel values, imshow options) of every panel."""
    with np.errstate(divide="ignore"):
        log_count = np.where(maps.count > 0, np.log10(maps.count.astype(float)), np.nan)
    panels: list[tuple[str, np.ndarray, dict[str, Any]]] = [
        ("log10 sources per pixel", log_count, {"cmap": "viridis"}),
        ("fraction encoded", maps.fraction_encoded, {"cmap": "magma", "vmin": 0, "vmax": 1}),
        ("median rmse", maps.median_rmse, {"cmap": "cividis", **_robust_limits(maps.median_rmse)}),
    ]
    mean = maps.mean_latent
    for k in range(mean.shape[1]):
        limits = _robust_limits(mean[:, k])
        panels.append((f"mean latent {k}", mean[:, k], {"cmap": "coolwarm", **limits}))
    return panels


def _robust_limits(values: np.ndarray) -> dict[str, float]:
    """Colour limits at the 2nd and 98th percentiles, so a few sparse pixels do not set them."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {}
    lo, hi = np.percentile(finite, [2, 98])
    return {"vmin": float(lo), "vmax": float(hi)} if hi > lo else {}


def draw_sky_maps(maps: SkyMaps, output: PathLike, *, title: str = "", width: int = 480) -> Path:
    """Draw every map in Mollweide (RA increasing to the left, centre RA 180°) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    x, y, pixel = _mollweide_grid(maps.order, width)
    panels = _panels(maps)
    n_cols = 3
    n_rows = -(-len(panels) // n_cols)
    fig = plt.figure(figsize=(4.2 * n_cols, 2.5 * n_rows + 0.6))
    for i, (name, values, options) in enumerate(panels):
        ax = fig.add_subplot(n_rows, n_cols, i + 1, projection="mollweide")
        image = np.ma.masked_invalid(values[pixel])  # (height, width)
        mesh = ax.pcolormesh(x, y, image, shading="flat", rasterized=True, **options)
        ax.set_title(name, fontsize=9)
        ax.set_xticklabels([])
        ax.set_yticklabels([])
        ax.grid(True, alpha=0.3)
        bar = fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.04)
        bar.formatter = ScalarFormatter(useOffset=False)
        bar.ax.tick_params(labelsize=7)
    n_rows_total = int(maps.count.sum())
    fig.suptitle(
        f"{title}  {n_rows_total:,} sources, HEALPix order {maps.order} (ICRS, Mollweide, "
        "RA increasing to the left, centre RA 180°)".strip(),
        fontsize=10,
    )
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return output


SKY_MAP_KIND = "sky map"
"""The kind of output :func:`write_sky_maps` records (xpbatch.storage.manifest)."""


@locked_output("out", "skymap")
def write_sky_maps(
    catalog: PathLike,
    out: PathLike,
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
    run.begin(catalog=str(zarr_arrays.absolute(catalog)), order=config.order)
    draw_sky_maps(maps, run.output, title=str(catalog))
    run.mark_complete(sources=int(maps.count.sum()))
    return maps
