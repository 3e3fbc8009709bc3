"""The labels table of a mock catalogue (what each source really is): where it is, write, read.

A store's labels sit beside it (``mock.zarr`` -> ``mock.zarr.labels.parquet``), bulk files'
inside their directory (``mock_labels.parquet``); :func:`read_mock_labels` finds both.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from xpbatch.errors import StoreNotFoundError
from xpbatch.storage.location import Location, as_location, is_url

if TYPE_CHECKING:
    import pandas as pd

LABEL_COLUMNS = (
    "teff",
    "logg",
    "m_h",
    "alpha_m",
    "a_v",
    "g_mag",
    "is_giant",
    "population",
    "star_id",
)
"""Columns of the labels table besides ``source_id``: Teff (K), log g (cgs dex), [M/H] and
[α/M] (dex), A_V (mag), the true G magnitude, whether the star is a giant, its population
(int8, an index into :data:`xpbatch.mock.POPULATIONS`), and the star it observes (int64: the
source_id of the star's first row; rows with the same star_id are repeat observations of one
star, ``MockConfig.repeats``; without repeats it is the row's own source_id)."""
LABELS_FILE = "mock_labels.parquet"
"""Name of the labels table inside a bulk-file directory."""
STORE_LABELS_SUFFIX = ".labels.parquet"
"""A store's labels table sits beside it: ``mock.zarr`` -> ``mock.zarr.labels.parquet`` (inside
the store, Zarr would warn about a foreign file on every listing)."""


def labels_path(path: str | Path | Location) -> Path | Location:
    """Where the labels of the mock store or bulk-file directory ``path`` are (beside a store
    on object storage: ``s3://b/mock.zarr.labels.parquet``)."""
    if is_url(path):
        location = as_location(path)
        return location.sibling(location.name + STORE_LABELS_SUFFIX)
    path = path.path if isinstance(path, Location) else Path(path)
    if (path / "zarr.json").is_file():
        return path.with_name(path.name + STORE_LABELS_SUFFIX)
    return path / LABELS_FILE


_LABEL_TYPES = {"is_giant": pa.bool_(), "population": pa.int8(), "star_id": pa.int64()}
"""Arrow types of the label columns that are not float32."""


class LabelsWriter:
    """Streams the labels table to Parquet under a temporary name; ``close`` publishes it."""

    def __init__(self, path: Path | Location) -> None:
        import pyarrow.parquet as pq

        self.path = path
        if isinstance(path, Location):  # written here, uploaded whole on close
            self._staging: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory()
            self._partial = Path(self._staging.name, path.name)
        else:
            self._staging = None
            self._partial = path.with_name(path.name + ".partial")
        schema_ = pa.schema(
            [("source_id", pa.int64())]
            + [(c, _LABEL_TYPES.get(c, pa.float32())) for c in LABEL_COLUMNS]
        )
        self._writer = pq.ParquetWriter(self._partial, schema_, compression="zstd")

    def write_table(self, table: pa.Table) -> None:
        """Append rows (a table of LABEL_COLUMNS keyed by source_id)."""
        self._writer.write_table(table)

    def close(self) -> None:
        """Finish the file and publish it under its name."""
        self._writer.close()
        if isinstance(self.path, Location):
            self.path.upload(self._partial)
            if self._staging is not None:
                self._staging.cleanup()
            return
        os.replace(self._partial, self.path)


def read_mock_labels(path: str | Path | Location) -> pd.DataFrame:
    """The labels of a mock catalogue, indexed by ``source_id``.

    Parameters
    ----------
    path
        A store written by :func:`write_mock_store` (its labels are ``<path>.labels.parquet``), a
        directory written by :func:`write_mock_dr3_bulk` (``mock_labels.parquet`` inside), or a
        labels file itself.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`LABEL_COLUMNS` (Teff in K, log g, [M/H], [α/M], A_V in mag, the true G
        magnitude, is_giant, population: an index into
        :data:`xpbatch.mock.POPULATIONS`, star_id: the source_id of the star's first
        observation), one row per source in source_id order.
    """
    import pandas as pd

    where = as_location(path)
    table_path = where if where.name.endswith(".parquet") else as_location(labels_path(path))
    if not table_path.is_file():
        raise StoreNotFoundError(
            f"no mock labels at {table_path}; labels exist only for catalogues written by "
            "`xpbatch mock` (store or dr3-bulk)"
        )
    with contextlib.closing(table_path.open_reader()) as f:
        return pd.read_parquet(f).set_index("source_id")
