"""Pictures and the anomaly table: a sky map leaves a Jupyter kernel's plotting alone, spectra are
GaiaXPy's sampling in nm, corner plots count every row, top_anomalies ranks the whole column."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import numpy as np
import pytest

N_ROWS, CHUNK_ROWS = 2500, 1000


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory, encode_untrained: Callable[[Path, Path], Path]
) -> dict[str, Path]:
    from xpbatch.mock import write_mock_store

    root = tmp_path_factory.mktemp("plots")
    store = write_mock_store(root / "mock.zarr", N_ROWS, seed=5, chunk_rows=CHUNK_ROWS)
    return {"store": store, "catalog": encode_untrained(store, root / "catalog.zarr")}


def _image_outputs(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def test_a_sky_map_then_a_plot_in_one_kernel_both_show(
    inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's own (inline) backend: draw_sky_maps must not switch it away, or every later
    plt.show() in the notebook is silently empty."""
    from nbclient import NotebookClient

    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks inline, as in Jupyter
    book = nbformat.v4.new_notebook()
    book.cells = [
        nbformat.v4.new_code_cell(
            "import matplotlib, xpbatch\n"
            "backend = matplotlib.get_backend()\n"
            f"maps = xpbatch.compute_sky_maps({str(inputs['catalog'])!r}, order=1)\n"
            "xpbatch.draw_sky_maps(maps, width=90)"
        ),
        nbformat.v4.new_code_cell(
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
        ),
        nbformat.v4.new_code_cell("print(backend == matplotlib.get_backend(), backend)"),
    ]
    NotebookClient(book, timeout=240, kernel_name="python3").execute()
    sky, plot, check = book.cells
    assert _image_outputs(sky) == 1, sky.outputs
    assert _image_outputs(plot) == 1, plot.outputs
    assert check.outputs[0]["text"].startswith("True module://matplotlib_inline")


# --- top_anomalies --------------------------------------------------------------------------------
def test_top_anomalies_are_the_highest_scores_of_every_row(inputs: dict[str, Path]) -> None:
    import xpbatch
    from xpbatch.schema import CatalogFlag

    ds = xpbatch.open_catalog(inputs["catalog"])
    score = ds.anomaly_score.values
    top = xpbatch.top_anomalies(ds, 7)
    rows = np.flatnonzero(np.isfinite(score))
    expected = rows[np.lexsort((rows, -score[rows]))][:7]  # highest first, then lowest row
    np.testing.assert_array_equal(top.index.to_numpy(), expected)
    assert list(top.columns) == [
        "source_id", "anomaly_score", "rmse", "flags", "latent_outlier", "ra", "dec"
    ]  # fmt: skip
    np.testing.assert_array_equal(top.source_id.to_numpy(), ds.source_id.values[expected])
    np.testing.assert_array_equal(top.anomaly_score.to_numpy(), score[expected])
    np.testing.assert_array_equal(top.rmse.to_numpy(), ds.rmse.values[expected])
    np.testing.assert_array_equal(top.ra.to_numpy(), ds.ra.values[expected])
    outlier = (ds.flags.values[expected] & CatalogFlag.LATENT_OUTLIER) != 0
    np.testing.assert_array_equal(top.latent_outlier.to_numpy(), outlier)
    # More than are encoded: only the encoded ones, never a NaN score.
    everything = xpbatch.top_anomalies(inputs["catalog"], N_ROWS)
    assert len(everything) == int(np.isfinite(score).sum()) < N_ROWS
    assert np.isfinite(everything.anomaly_score).all()


def test_top_anomalies_refuses_a_bad_count(inputs: dict[str, Path]) -> None:
    import xpbatch

    with pytest.raises(xpbatch.ConfigError, match="n >= 1"):
        xpbatch.top_anomalies(inputs["catalog"], 0)


# --- spectra in nm --------------------------------------------------------------------------------
def test_sampled_spectra_are_gaiaxpys_calibration(inputs: dict[str, Path]) -> None:
    import matplotlib
    import pandas as pd

    import xpbatch

    with matplotlib.rc_context():  # GaiaXPy's import sets text.usetex
        import gaiaxpy

    rows = xpbatch.open_xp_store(inputs["store"]).isel(source=slice(0, 3)).compute()
    c = rows.coefficients.values.astype(np.float64)  # (3, 110), e-/s
    e = rows.coefficient_errors.values.astype(np.float64)
    sampled = xpbatch.sample_spectra(c, e)
    assert sampled.wavelength[0] == 336 and sampled.wavelength[-1] == 1020  # nm
    assert sampled.flux.shape == sampled.flux_error.shape == (3, len(sampled.wavelength))
    zeros = np.zeros(55 * 54 // 2)
    frame = pd.DataFrame(
        {
            "source_id": [1, 2, 3],
            **{f"{b}_n_parameters": 55 for b in ("bp", "rp")},
            **{f"{b}_standard_deviation": 1.0 for b in ("bp", "rp")},
            "bp_coefficients": list(c[:, :55]),
            "rp_coefficients": list(c[:, 55:]),
            "bp_coefficient_errors": list(e[:, :55]),
            "rp_coefficient_errors": list(e[:, 55:]),
            "bp_coefficient_correlations": [zeros] * 3,
            "rp_coefficient_correlations": [zeros] * 3,
        }
    )
    public, wavelength = gaiaxpy.calibrate(frame, save_file=False)  # the documented function
    np.testing.assert_array_equal(sampled.wavelength, wavelength)
    np.testing.assert_allclose(sampled.flux, np.stack(public.flux), rtol=1e-12)
    np.testing.assert_allclose(sampled.flux_error, np.stack(public.flux_error), rtol=1e-12)
    # Linear in the coefficients; independent errors add in quadrature.
    both = xpbatch.sample_spectra(c[:1] + c[1:2], np.hypot(e[:1], e[1:2]))
    np.testing.assert_allclose(both.flux[0], sampled.flux[0] + sampled.flux[1], rtol=1e-9)
    np.testing.assert_allclose(
        both.flux_error[0], np.hypot(sampled.flux_error[0], sampled.flux_error[1]), rtol=1e-9
    )


def test_xpbatch_and_gaiaxpy_leave_the_sessions_settings_alone(inputs: dict[str, Path]) -> None:
    """Importing GaiaXPy sets text.usetex (every later plot then needs LaTeX) and ignores every
    RuntimeWarning: neither importing xpbatch nor drawing a spectrum may change matplotlib's
    settings or the warning filters of the user's session."""
    code = (
        "import sys, warnings, matplotlib, numpy as np\n"
        "rc, filters = dict(matplotlib.rcParams), list(warnings.filters)\n"
        "import xpbatch\n"
        "assert 'gaiaxpy' not in sys.modules, 'import xpbatch imported gaiaxpy'\n"
        "rc_import, filters_import = dict(matplotlib.rcParams), list(warnings.filters)\n"
        "fig = xpbatch.plot_spectrum(sys.argv[1], sys.argv[2], catalog=sys.argv[3])\n"
        "xpbatch.sample_spectra(np.ones((1, 110)), np.ones((1, 110)))\n"
        "import gaiaxpy\n"  # already imported: no second side effect
        "assert 'gaiaxpy' in sys.modules\n"
        "rc_after = dict(matplotlib.rcParams)\n"
        "for name in ('backend',):  # pyplot resolves the backend on first use\n"
        "    rc.pop(name), rc_import.pop(name), rc_after.pop(name)\n"
        "print([k for k in rc if rc[k] != rc_import[k] or rc[k] != rc_after[k]])\n"
        "new = [f for f in warnings.filters if f not in filters_import]\n"
        "print([f for f in new if f[0] == 'ignore' and f[1] is None])  # a whole category\n"
        "warnings.warn('still shown', RuntimeWarning)"
    )
    import xpbatch

    source_id = str(int(xpbatch.open_catalog(inputs["catalog"]).source_id[0]))
    done = subprocess.run(
        [sys.executable, "-c", code, str(inputs["store"]), source_id, str(inputs["catalog"])],
        capture_output=True,
        text=True,
        check=True,
    )
    changed_rc, new_filters = done.stdout.splitlines()[-2:]
    assert changed_rc == "[]", f"matplotlib settings changed: {changed_rc}"
    assert new_filters == "[]", f"warnings of a whole category ignored: {new_filters}"
    assert "RuntimeWarning: still shown" in done.stderr


def test_plot_spectrum_draws_input_and_reconstruction_in_nm(inputs: dict[str, Path]) -> None:
    import xpbatch
    from xpbatch.model.trained import TrainedModel

    ds = xpbatch.open_catalog(inputs["catalog"])
    wanted = [int(s) for s in xpbatch.top_anomalies(ds, 2).source_id]
    fig = xpbatch.plot_spectrum(
        inputs["store"], wanted, model=TrainedModel.untrained(), catalog=inputs["catalog"]
    )
    assert len(fig.axes) == 2
    for ax, source in zip(fig.axes, wanted, strict=True):
        assert str(source) in ax.get_title() and "anomaly_score" in ax.get_title()
        assert ax.get_xlim() == (336.0, 1020.0)
        assert "W m" in ax.get_ylabel()
        assert len(ax.lines) >= 1 and ax.collections  # reconstruction, band and error bars
    assert fig.axes[-1].get_xlabel() == "wavelength [nm]"
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["reconstruction ± scatter", "measured ± error"]
    with pytest.raises(xpbatch.StoreError, match="source_id 12345 is not in this store"):
        xpbatch.plot_spectrum(inputs["store"], 12345)


def test_without_gaiaxpy_the_message_names_the_extra(
    inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import xpbatch

    monkeypatch.setitem(sys.modules, "gaiaxpy.calibrator", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"pip install 'xpbatch\[spectra\]'") as caught:
        xpbatch.plot_spectrum(inputs["store"], 1)
    assert isinstance(caught.value, xpbatch.MissingExtraError)


# --- latent corner plots --------------------------------------------------------------------------
def test_corner_plot_counts_every_encoded_row(inputs: dict[str, Path]) -> None:
    import dask.array as da

    import xpbatch

    ds = xpbatch.open_catalog(inputs["catalog"])
    fig = xpbatch.plot_latents(ds, dims=[0, 1, 2], bins=12)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3  # (0,1), (0,2), (1,2)
    mu = ds.latent_mean.values
    # The untrained model's latents spread by ~1e-6: take mean and std as the plot does (dask,
    # float32), then every encoded row within mean ± 4 std is in the (z0, z1) panel.
    mean, std = (f(ds.latent_mean.data, axis=0).compute() for f in (da.nanmean, da.nanstd))
    inside = np.all(np.abs(mu[:, :2] - mean[:2]) <= 4 * std[:2], axis=1)
    assert 0.9 * N_ROWS < inside.sum() <= np.isfinite(mu[:, 0]).sum()
    assert np.nansum(panels[0].images[0].get_array()) == inside.sum()
    bar = fig.axes[-1]
    assert bar.get_ylabel() == "sources per bin"
    teff = np.linspace(3000, 9000, N_ROWS)
    coloured = xpbatch.plot_latents(ds, dims=[0, 1], bins=6, values=teff, label="Teff [K]")
    image = next(ax for ax in coloured.axes if ax.images).images[0].get_array()
    assert 3000 <= np.nanmin(image) <= np.nanmax(image) <= 9000
    with pytest.raises(xpbatch.ConfigError, match="one entry per catalogue row"):
        xpbatch.plot_latents(ds, dims=[0, 1], values=teff[:10])
