"""Where the rows of a catalogue are on the sky, chunk by chunk (export-hats and skymap share it).

A catalogue encoded from a store with gaia_source positions carries ``ra`` and ``dec`` (degrees,
ICRS, epoch J2016.0). Without them, the only position a row has is the HEALPix level-12 pixel
its ``source_id`` encodes (``source_id >> 35``, about 0.86 arcmin across, where the source was
when the id was assigned): :func:`chunk_positions` can fall back to that pixel's centre, and
says which rows it placed that way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xpbatch import schema
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.catalog.layout import CatalogLayout
from xpbatch.errors import CatalogError
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike

SOURCE_ID_PIXEL_ORDER = 12
"""HEALPix order (nested) of the pixel a Gaia source_id encodes."""
SOURCE_ID_PIXEL_SHIFT = 35
"""``source_id >> 35`` is that pixel."""
POSITION_FROM_SOURCE_ID = "position_from_source_id"
"""Column of the exports: True where ra/dec are the centre of the source_id's level-12 pixel."""


def source_id_pixel_centres(source_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ra, dec (degrees) of the centre of each source_id's HEALPix level-12 nested pixel."""
    import cdshealpix.nested

    pixel = (np.asarray(source_id, np.int64) >> SOURCE_ID_PIXEL_SHIFT).astype(np.uint64)
    lon, lat = cdshealpix.nested.healpix_to_lonlat(pixel, SOURCE_ID_PIXEL_ORDER)
    return np.asarray(lon.deg, np.float64), np.asarray(lat.deg, np.float64)


@dataclasses.dataclass(frozen=True)
class SkySource:
    """A complete catalogue read chunk by chunk, with positions (picklable, cheap to ship)."""

    path: str | Location
    layout: CatalogLayout
    positions_from_source_id: bool = False
    """Place rows without ra/dec at their source_id's level-12 pixel centre."""

    @classmethod
    def open(
        cls, path: PathLike | Location, *, positions_from_source_id: bool = False
    ) -> SkySource:
        """Check that ``path`` is a complete catalogue with positions (or that the fallback is
        allowed) and describe it.

        Raises
        ------
        CatalogError
            Incomplete, not a catalogue, or without ra/dec when the fallback is not allowed.
        """
        path = zarr_arrays.absolute(path)
        catalog.open_catalog(path)  # refuses an incomplete catalogue, with its own message
        layout = catalog.read_layout(path)
        if not layout.with_positions and not positions_from_source_id:
            raise CatalogError(
                f"catalogue {path} has no ra/dec: its input store was written without "
                "gaia_source positions. Re-ingest with GaiaSource files that carry ra and dec "
                "(then encode again), or pass --positions-from-source-id to place every row at "
                "the centre of its source_id's HEALPix level-12 pixel (about 0.86 arcmin "
                "across; the rows are marked position_from_source_id)."
            )
        return cls(path, layout, positions_from_source_id)

    @property
    def n_chunks(self) -> int:
        """Chunks of the catalogue."""
        return self.layout.n_chunks

    def read(self, index: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Chunk ``index`` of the catalogue variables ``names``, plus ``ra``, ``dec`` and
        :data:`POSITION_FROM_SOURCE_ID` (bool)."""
        rows = self.layout.rows(index)
        wanted = {schema.SOURCE_ID, *names}
        if self.layout.with_positions:
            wanted |= {schema.RA, schema.DEC}
        arrays = catalog.open_arrays(self.path, sorted(wanted))
        values = {name: np.asarray(array[rows]) for name, array in arrays.items()}
        sid = values[schema.SOURCE_ID]
        if self.layout.with_positions:
            ra, dec = values[schema.RA], values[schema.DEC]
        else:
            ra, dec = np.full(len(sid), np.nan), np.full(len(sid), np.nan)
        with np.errstate(invalid="ignore"):  # NaN compares False: missing too
            missing = ~((ra >= 0) & (ra < 360) & (dec >= -90) & (dec <= 90))
        if missing.any():
            if not self.positions_from_source_id:
                raise CatalogError(
                    f"{self.path}: {int(missing.sum())} row(s) of chunk {index} have no valid "
                    f"ra/dec (e.g. source_id {int(sid[missing][0])}): their store had no "
                    "gaia_source position for them, or one not finite or out of range. Pass "
                    "--positions-from-source-id to place them at the centre of their "
                    "source_id's level-12 pixel (marked position_from_source_id)."
                )
            ra, dec = ra.copy(), dec.copy()
            ra[missing], dec[missing] = source_id_pixel_centres(sid[missing])
        values[schema.RA], values[schema.DEC] = ra, dec
        values[POSITION_FROM_SOURCE_ID] = missing
        return values
