"""The join with gaia_source: each XP source's G flux (and sky position when there is one).

The G flux normalises the spectra. It comes from a gaia_source companion file when one is given
(the same-suffix ``GaiaSource_*.csv.gz`` of a bulk file, or any CSV/Parquet with source_id and
phot_g_mean_flux or phot_g_mean_mag), else from the XP file itself when it carries those columns
(archive queries often add them). A companion wins; ``input_flags`` says when the XP file's own
value was used (G_FLUX_FROM_XP_FILE) and when the flux was computed from the magnitude.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xpbatch import dr3, schema
from xpbatch.errors import ParseError
from xpbatch.ingest.common import (
    HashingReader,
    LineMap,
    Problems,
    concat,
    manifest_md5,
    numbers,
    string_column,
)
from xpbatch.ingest.text_file import open_text, read_batches
from xpbatch.storage.paths import PathLike
from xpbatch.store.xp_store import source_id_order

logger = logging.getLogger(__name__)

_VALUES = (dr3.PHOT_G_MEAN_FLUX, dr3.PHOT_G_MEAN_MAG, dr3.RA, dr3.DEC)
"""gaia_source columns read besides source_id (each optional; flux or magnitude needed)."""


@dataclasses.dataclass
class GaiaSourceTable:
    """source_id (ascending) and the G flux, G magnitude, ra and dec of gaia_source files."""

    source_id: np.ndarray
    values: dict[str, np.ndarray]
    """float64 per source, NaN where missing; a column the files lack is all NaN."""
    files: list[dict[str, Any]]

    @property
    def flux(self) -> np.ndarray:
        return self.values[dr3.PHOT_G_MEAN_FLUX]

    @property
    def mag(self) -> np.ndarray:
        return self.values[dr3.PHOT_G_MEAN_MAG]

    def has_positions(self) -> bool:
        return bool(self.files) and not np.isnan(self.values[dr3.RA]).all()


def read_gaia_source(paths: Sequence[PathLike], *, verify_md5: bool = True) -> GaiaSourceTable:
    """Read source_id, the G flux/magnitude and ra/dec from gaia_source CSV(.gz) or Parquet files.

    Either of ``phot_g_mean_flux`` and ``phot_g_mean_mag`` may be absent (not both); ``ra`` and
    ``dec`` are optional. Duplicate source_ids across the files are an error.
    """
    ids, tables, files = [], [], []
    for path in map(Path, paths):
        read = _read_gaia_parquet if path.suffix.lower() == ".parquet" else _read_gaia_csv
        columns, info = read(path, verify_md5)
        n = len(columns[schema.SOURCE_ID])
        ids.append(np.asarray(columns[schema.SOURCE_ID], dtype=np.int64))
        tables.append(
            {c: np.asarray(columns.get(c, np.full(n, np.nan)), np.float64) for c in _VALUES}
        )
        files.append({**info, "rows": n, "role": "gaia_source"})
    source_id = np.concatenate(ids) if ids else np.empty(0, np.int64)
    order, repeats = source_id_order(source_id)
    source_id = source_id[order]
    repeated = source_id[repeats]
    if repeated.size:
        raise ParseError(
            f"gaia_source files {[str(p) for p in paths]} list source_id {int(repeated[0])} more "
            f"than once ({repeated.size} repeats); give each gaia_source file once"
        )
    values = {c: (np.concatenate([t[c] for t in tables]) if tables else np.empty(0))[order]
              for c in _VALUES}  # fmt: skip
    return GaiaSourceTable(source_id, values, files)


def _read_gaia_csv(path: Path, verify_md5: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    text = open_text(path, verify_md5=verify_md5)
    with text.stream, text.hashing:
        wanted = [c for c in (schema.SOURCE_ID, *_VALUES) if c in text.columns]
        _require_gaia_columns(path, wanted)
        problems = Problems(path, LineMap(text.first_line))
        pieces, row0 = [], 0
        for batch in read_batches(text, wanted, problems):
            piece = {}
            for name in wanted:
                arrow_type = pa.int64() if name == schema.SOURCE_ID else pa.float64()
                values = numbers(string_column(batch, name), arrow_type, name, problems, row0)
                piece[name] = pc.fill_null(values, np.nan if name != schema.SOURCE_ID else 0)
            pieces.append({k: v.to_numpy(zero_copy_only=False) for k, v in piece.items()})
            row0 += batch.num_rows
            problems.raise_first()  # a broken gaia_source row is never skipped: the join needs it
        info = text.hashing.finish(path)
    columns = concat(pieces) or {schema.SOURCE_ID: np.empty(0, np.int64)}
    return columns, info


def _read_gaia_parquet(
    path: Path, verify_md5: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        names = {n.lower(): n for n in pq.read_schema(path).names}
        wanted = [c for c in (schema.SOURCE_ID, *_VALUES) if c in names]
        _require_gaia_columns(path, wanted)
        table = pq.read_table(path, columns=[names[c] for c in wanted])
    except (OSError, pa.ArrowInvalid) as e:
        raise ParseError(f"{path}: cannot read this Parquet file ({e})") from e
    columns = {
        c: pc.fill_null(
            table.column(names[c]).cast(pa.float64() if c != schema.SOURCE_ID else pa.int64()),
            np.nan if c != schema.SOURCE_ID else 0,
        ).to_numpy()
        for c in wanted
    }
    with HashingReader(open(path, "rb"), manifest_md5(path) if verify_md5 else None) as hashing:
        info = hashing.finish(path)
    return columns, info


def _require_gaia_columns(path: Path, found: list[str]) -> None:
    g = {dr3.PHOT_G_MEAN_FLUX, dr3.PHOT_G_MEAN_MAG}
    if schema.SOURCE_ID not in found or not g & set(found):
        raise ParseError(
            f"{path}: a gaia_source file needs source_id and phot_g_mean_flux or phot_g_mean_mag; "
            f"found {found}"
        )


@dataclasses.dataclass
class Joined:
    """What the join gives each XP source."""

    flux: np.ndarray
    """phot_g_mean_flux (e-/s), NaN when unknown."""
    from_mag: np.ndarray
    """The flux was computed from phot_g_mean_mag."""
    from_xp_file: np.ndarray
    """The flux (or magnitude) came from the XP file, not from a companion."""
    positions: dict[str, np.ndarray]
    """ra and dec (degrees) when the companion or the XP file has them, else empty; NaN where
    the given values are not a position (see ``position_invalid``)."""
    position_invalid: np.ndarray
    """Rows whose given ra/dec were not finite or out of range (flag POSITION_INVALID)."""


def join_g_flux(
    source_id: np.ndarray,
    gaia: GaiaSourceTable,
    own: Mapping[str, np.ndarray] | None = None,
) -> Joined:
    """phot_g_mean_flux (and ra, dec) of each source: the companion's, else the XP file's own.

    ``own``: the gaia_source columns the XP file carries (:attr:`ParsedFile.extras`). A source
    with neither flux nor magnitude anywhere gets NaN (it is kept and flagged G_FLUX_MISSING by
    :func:`~xpbatch.store.input_recipe.compute_input_flags`).
    """
    own = dict(own or {})
    n = len(source_id)
    index = np.minimum(np.searchsorted(gaia.source_id, source_id), max(len(gaia.source_id) - 1, 0))
    found = gaia.source_id[index] == source_id if len(gaia.source_id) else np.zeros(n, bool)

    def companion(name: str) -> np.ndarray:
        return (
            np.where(found, gaia.values[name][index], np.nan)
            if len(gaia.source_id)
            else (np.full(n, np.nan))
        )

    def best(name: str) -> tuple[np.ndarray, np.ndarray]:
        """The companion's value, else the file's own; and where the file's own was used."""
        theirs, mine = companion(name), own.get(name, np.full(n, np.nan))
        use_mine = ~np.isfinite(theirs) & np.isfinite(mine)
        return np.where(use_mine, mine, theirs), use_mine

    flux, flux_own = best(dr3.PHOT_G_MEAN_FLUX)
    mag, mag_own = best(dr3.PHOT_G_MEAN_MAG)
    from_mag = ~np.isfinite(flux) & np.isfinite(mag)
    flux[from_mag] = 10 ** ((dr3.G_ZERO_POINT_MAG - mag[from_mag]) / 2.5)
    from_xp_file = flux_own | (from_mag & mag_own)
    if gaia.files and not found.all():
        logger.warning("%d source(s) are not in the gaia_source files", (~found).sum())
    positions = {}
    if gaia.has_positions() or dr3.RA in own:
        ra, ra_own = best(dr3.RA)
        dec = np.where(ra_own, own.get(dr3.DEC, np.nan), companion(dr3.DEC))  # a pair, one source
        invalid = _invalid_positions(ra, dec)
        ra[invalid], dec[invalid] = np.nan, np.nan
        positions = {schema.RA: ra, schema.DEC: dec}
        if ra_own.any() and gaia.has_positions():
            logger.info("%d position(s) came from the XP file", ra_own.sum())
        if invalid.any():
            logger.warning(
                "%d source(s) have ra/dec that are not finite or out of range (e.g. source_id "
                "%d): stored without a position and flagged POSITION_INVALID",
                invalid.sum(),
                source_id[invalid][0],
            )
    else:
        invalid = np.zeros(n, bool)
    return Joined(flux, from_mag, from_xp_file, positions, invalid)


def _invalid_positions(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Rows given a position (either coordinate not NaN) that is not finite or out of range."""
    given = ~(np.isnan(ra) & np.isnan(dec))
    with np.errstate(invalid="ignore"):
        valid = (ra >= 0) & (ra < 360) & (dec >= -90) & (dec <= 90)
    return given & ~valid
