"""Regenerate the pictures the README and the docs show: ``python docs/make_figures.py``.

Builds the demo inputs if needed (``xpbatch encode-catalog --demo``'s store and model in the
checkout's ``xpbatch-demo/``), encodes the demo catalogue if it is missing, then draws

- ``docs/sky-maps.png``: its sky maps (what ``xpbatch skymap`` and notebook 2 show), at the
  HEALPix order chosen for its number of sources;
- ``docs/spectrum.png``: a typical source (median ``anomaly_score``) and the most anomalous one,
  measured against reconstructed ± scatter, in nm (``xpbatch.plot_spectrum``, GaiaXPy's
  sampling; needs ``pip install -e '.[spectra]'``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xpbatch.catalog.zarr_catalog import open_catalog
from xpbatch.config import ClusterConfig, EncodeConfig
from xpbatch.train.demo import demo_dir, demo_inputs

DOCS = Path(__file__).resolve().parent


def main() -> None:
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.products.anomalies import top_anomalies
    from xpbatch.products.plots import plot_spectrum
    from xpbatch.products.sky_maps import compute_sky_maps, draw_sky_maps
    from xpbatch.runtime.cluster import connect

    inputs = demo_inputs(demo_dir(DOCS), echo=print)
    with connect(ClusterConfig(n_workers=2, dashboard_address=":0")) as client:
        try:
            open_catalog(inputs.catalog)
        except (OSError, ValueError):
            config = EncodeConfig(overwrite=True, progress_bar=False)
            print(
                encode_catalog(
                    inputs.store, inputs.model, inputs.catalog, client=client, config=config
                )
            )
        maps = compute_sky_maps(inputs.catalog, client=client)
    _write(draw_sky_maps(maps, title="demo catalogue", width=360), DOCS / "sky-maps.png")

    ds = open_catalog(inputs.catalog)
    score = ds.anomaly_score.values
    typical = int(ds.source_id.values[np.nanargmin(np.abs(score - np.nanmedian(score)))])
    rarest = int(top_anomalies(ds, 1).source_id.iloc[0])
    fig = plot_spectrum(inputs.store, [typical, rarest], model=inputs.model, catalog=ds)
    _write(fig, DOCS / "spectrum.png")


def _write(fig: object, png: Path) -> None:
    """Save ``fig`` with 256 colours instead of 24 bits: a few times smaller in the repository,
    the same picture."""
    from PIL import Image

    from xpbatch.products.plots import save_figure

    save_figure(fig, png)  # type: ignore[arg-type]
    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=256)
    small.save(png, optimize=True)
    print(f"wrote {png} ({png.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
