"""Pictures of a catalogue for notebooks and talks: spectra in nanometres and latent corner plots.

Every function draws on its own :class:`matplotlib.figure.Figure` (never pyplot's current
figure) and returns it: nothing here selects a matplotlib backend, so a Jupyter kernel keeps
its inline plotting, and a script saves the figure with :func:`save_figure`. In a Jupyter
kernel a returned figure is shown when it is a cell's value.

- :func:`plot_spectrum`: a source's measured spectrum with its errors against the model's
  reconstruction ± its learned scatter, as flux against wavelength (nm), sampled by GaiaXPy
  (:mod:`xpbatch.products.spectra`).
- :func:`plot_latents`: a corner plot of the latent means, 2-D histograms over every row
  (counts, or the mean of a per-row value such as Teff in each bin), computed chunk by chunk.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xpbatch import schema
from xpbatch.errors import ConfigError
from xpbatch.products.spectra import SPECTRA_EXTRA, SampledSpectra, spectra_of
from xpbatch.storage.location import Location, as_location, is_url
from xpbatch.storage.paths import PathLike, atomic_path

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from xpbatch.model.files import TrainedModel

__all__ = ["SPECTRA_EXTRA", "new_figure", "plot_latents", "plot_spectrum", "save_figure"]

FLUX_UNIT = "W m$^{-2}$ nm$^{-1}$"


def new_figure(*, figsize: tuple[float, float]) -> Figure:
    """An empty figure with its own Agg canvas, outside pyplot (no backend chosen or changed).

    In a Jupyter kernel whose backend is the inline one, IPython's PNG display of figures is
    switched on here (what pyplot does on its first figure), so a returned figure shows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    if "ipykernel" in sys.modules:
        with contextlib.suppress(ImportError):  # acts only when the backend is the inline one
            import matplotlib_inline.backend_inline  # noqa: F401
    return fig


def save_figure(fig: Figure, path: PathLike | Location, *, dpi: int = 100) -> Path | Location:
    """Write ``fig`` as a PNG under a temporary name and rename it (never half a file); on
    object storage as one PUT (whole or absent)."""
    if is_url(path):
        png = io.BytesIO()
        fig.savefig(png, dpi=dpi, format="png")
        location = as_location(path)
        location.write_bytes(png.getvalue())
        return location
    path = Path(path) if not isinstance(path, Location) else path.path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


# --- spectra ------------------------------------------------------------------------------------
def plot_spectrum(
    store: xr.Dataset | PathLike,
    source_id: int | Sequence[int],
    *,
    model: TrainedModel | PathLike | None = None,
    catalog: xr.Dataset | PathLike | None = None,
    wavelength: np.ndarray | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Draw sources' measured spectra and the model's reconstruction in nm (GaiaXPy's sampling).

    For each source: the measured spectrum (from the store's coefficients) as points with
    ±1σ error bars propagated from ``coefficient_errors``, and the reconstruction at the latent
    mean as a line with a band of ± the model's learned intrinsic scatter. All are GaiaXPy's
    absolute calibration (``gaiaxpy.calibrate``) of the 55 + 55 coefficients, flux in
    W m⁻² nm⁻¹ against wavelength in nm; one panel per source.

    Parameters
    ----------
    store
        The input XP store (path or :func:`xpbatch.open_xp_store`), for the measured spectra.
    source_id
        One source or several (one panel each).
    model
        The model that encoded the catalogue: recomputes the reconstruction and scatter (fast,
        a few rows). Needed unless ``catalog`` holds them (``--with-reconstruction``).
    catalog
        The catalogue: its reconstruction and scatter are used when it has them; its
        ``anomaly_score`` and ``rmse`` go into the panel titles.
    wavelength
        Sampling in nm (GaiaXPy's default: 336 to 1020 nm in steps of 2 nm).
    ax
        Draw one source into these axes instead of a new figure.

    Raises
    ------
    ImportError
        GaiaXPy is not installed (``pip install 'xpbatch[spectra]'``).

    Examples
    --------
    >>> fig = xpbatch.plot_spectrum(store, 4295806720, model="model.safetensors")  # doctest: +SKIP
    >>> xpbatch.save_figure(fig, "spectrum.png")  # doctest: +SKIP
    """
    ids = [int(s) for s in np.atleast_1d(np.asarray(source_id, np.int64))]
    if ax is not None and len(ids) != 1:
        raise ConfigError(f"plot_spectrum draws one source into ax=, got {len(ids)} source ids")
    rows = spectra_of(store, ids, model=model, catalog=catalog, wavelength=wavelength)
    if ax is None:
        fig = new_figure(figsize=(8, 2.8 * len(ids)))
        axes = [fig.add_subplot(len(ids), 1, i + 1) for i in range(len(ids))]
    else:
        fig, axes = ax.figure, [ax]  # type: ignore[assignment]
    for i, axis in enumerate(axes):
        _draw_spectrum(axis, rows.measured, rows.reconstructed, i)
        axis.set_title(rows.titles[i], fontsize=9)
        axis.set_ylabel(f"flux [{FLUX_UNIT}]")
    axes[-1].set_xlabel("wavelength [nm]")
    axes[0].legend(fontsize=8, loc="upper right")
    return fig  # type: ignore[return-value]


def _draw_spectrum(
    ax: Axes, measured: SampledSpectra, reconstructed: SampledSpectra | None, i: int
) -> None:
    wl = measured.wavelength
    if reconstructed is not None:
        flux, spread = reconstructed.flux[i], reconstructed.flux_error[i]
        ax.fill_between(wl, flux - spread, flux + spread, color="C1", alpha=0.3, lw=0)
        ax.plot(wl, flux, color="C1", lw=1.2, label="reconstruction ± scatter")
    ax.errorbar(
        wl,
        measured.flux[i],
        measured.flux_error[i],
        fmt=".",
        ms=2.5,
        lw=0.6,
        color="k",
        label="measured ± error",
    )
    ax.axhline(0, color="0.7", lw=0.5, zorder=0)
    ax.set_xlim(wl[0], wl[-1])


# --- latent corner plots --------------------------------------------------------------------------
def plot_latents(
    catalog: xr.Dataset | PathLike,
    *,
    dims: Sequence[int] | None = None,
    bins: int = 60,
    values: Any = None,
    label: str = "",
    cmap: str | None = None,
    title: str = "",
) -> Figure:
    """Corner plot of the latent means: a 2-D histogram of every pair of dimensions.

    Every encoded row counts (rows not encoded are NaN and fall outside every histogram); the
    histograms are dask reductions, computed chunk by chunk, so a catalogue of any size works.
    The range of each dimension is the encoded rows' mean ± 4 standard deviations.

    Parameters
    ----------
    catalog
        The catalogue (path or :func:`xpbatch.open_catalog`).
    dims
        Latent dimensions to show; default: the model's active ones (the catalogue's
        ``latent_density`` attribute), else all.
    bins
        Bins per axis.
    values
        A per-row value aligned with the catalogue's rows (NumPy or dask array, e.g. a label
        joined by ``source_id``): each bin is coloured by its rows' mean value instead of by
        the number of rows. NaN values are left out.
    label
        Colour bar label for ``values`` (with its unit, e.g. ``"Teff [K]"``).

    Examples
    --------
    >>> fig = xpbatch.plot_latents("catalog.zarr", bins=40)  # doctest: +SKIP
    """
    import dask
    import dask.array as da

    ds = _open_catalog(catalog)
    mu = ds[schema.LATENT_MEAN].data  # (source, latent), lazy
    if dims is None:
        density = ds.attrs.get(schema.ATTR_LATENT_DENSITY) or {}
        dims = density.get("active_dims") or list(range(mu.shape[1]))
    dims = [int(d) for d in dims]
    if len(dims) < 2 or not all(0 <= d < mu.shape[1] for d in dims):
        raise ConfigError(
            f"plot_latents needs at least two latent dimensions in 0..{mu.shape[1] - 1}, "
            f"got dims={dims}"
        )
    mean, std = dask.compute(da.nanmean(mu, axis=0), da.nanstd(mu, axis=0))
    ranges = {d: (mean[d] - 4 * std[d], mean[d] + 4 * std[d]) for d in dims}
    pairs = [(a, b) for i, a in enumerate(dims) for b in dims[i + 1 :]]
    weights = None
    if values is not None:
        weights = da.asarray(values)
        if weights.shape != (mu.shape[0],):
            raise ConfigError(
                f"values must have one entry per catalogue row ({mu.shape[0]:,}), "
                f"got shape {weights.shape}"
            )
        weights = weights.rechunk((mu.chunks[0],)).astype(np.float64)

    def histogram(a: int, b: int, w: Any = None) -> Any:
        ok = da.isfinite(mu[:, a]) & da.isfinite(mu[:, b])
        if w is not None:
            ok = ok & da.isfinite(w)
            w = da.where(ok, w, 0.0)
        return da.histogram2d(
            mu[:, a], mu[:, b], bins=bins, range=[ranges[a], ranges[b]], weights=w
        )[0]

    (counts,) = dask.compute({p: histogram(*p) for p in pairs})
    if weights is None:
        images = {p: np.where(h > 0, h, np.nan) for p, h in counts.items()}
        norm_kind, label = "log", label or "sources per bin"
    else:
        (summed,) = dask.compute({p: histogram(*p, weights) for p in pairs})
        (with_value,) = dask.compute(
            {p: histogram(*p, da.isfinite(weights).astype(np.float64)) for p in pairs}
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            images = {
                p: np.where(with_value[p] > 0, summed[p] / with_value[p], np.nan) for p in pairs
            }
        norm_kind = "linear"
    return _corner(images, dims, ranges, norm_kind=norm_kind, label=label, cmap=cmap, title=title)


def _corner(
    images: dict[tuple[int, int], np.ndarray],
    dims: list[int],
    ranges: dict[int, tuple[float, float]],
    *,
    norm_kind: str,
    label: str,
    cmap: str | None,
    title: str,
) -> Figure:
    from matplotlib.colors import LogNorm, Normalize

    finite = np.concatenate([im[np.isfinite(im)].ravel() for im in images.values()] or [[]])
    if norm_kind == "log":
        norm: Normalize = LogNorm(vmin=1, vmax=max(float(finite.max(initial=1)), 2))
        cmap = cmap or "viridis"
    else:
        lo, hi = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
        norm, cmap = Normalize(vmin=lo, vmax=hi), cmap or "RdYlBu_r"
    n = len(dims) - 1
    fig = new_figure(figsize=(2.1 * n + 1.2, 2.1 * n))
    axes = fig.subplots(n, n, squeeze=False, sharex="col", sharey="row")
    mesh = None
    for row in range(n):
        for col in range(n):
            ax = axes[row, col]
            a, b = dims[col], dims[row + 1]
            if col > row:
                ax.set_axis_off()
                continue
            extent = [*ranges[a], *ranges[b]]
            mesh = ax.imshow(
                images[(a, b)].T, origin="lower", extent=extent, aspect="auto", cmap=cmap, norm=norm
            )
            if row == n - 1:
                ax.set_xlabel(f"z{a}")
            if col == 0:
                ax.set_ylabel(f"z{b}")
    assert mesh is not None
    fig.colorbar(mesh, ax=axes, shrink=0.6, label=label)
    if title:
        fig.suptitle(title)
    return fig


def _open_catalog(catalog: xr.Dataset | PathLike) -> xr.Dataset:
    import xarray as xr

    if isinstance(catalog, xr.Dataset):
        return catalog
    from xpbatch.catalog.zarr_catalog import open_catalog

    return open_catalog(catalog)
