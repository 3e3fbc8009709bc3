"""Regenerate the README's pictures from the demo: ``python docs/make_figures.py``.

Builds the demo inputs if needed (``xpbatch encode-catalog --demo``'s store and model in the
checkout's ``xpbatch-demo/``), encodes the demo catalogue if it is missing, and draws its sky
maps into ``docs/sky-maps.png`` (what ``xpbatch skymap`` and notebook 2 show).
"""

from __future__ import annotations

from pathlib import Path

from xpbatch.catalog.zarr_catalog import open_catalog
from xpbatch.config import ClusterConfig, EncodeConfig
from xpbatch.train.demo import demo_dir, demo_inputs

DOCS = Path(__file__).resolve().parent
SKY_ORDER = 4


def main() -> None:
    from xpbatch.runtime.cluster import connect
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.products.sky_maps import compute_sky_maps, draw_sky_maps

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
        maps = compute_sky_maps(inputs.catalog, order=SKY_ORDER, client=client)
    out = draw_sky_maps(maps, DOCS / "sky-maps.png", title="demo catalogue", width=360)
    _shrink(out)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


def _shrink(png: Path) -> None:
    """256 colours instead of 24 bits: a few times smaller in the repository, same picture."""
    from PIL import Image

    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=256)
    small.save(png, optimize=True)


if __name__ == "__main__":
    main()
