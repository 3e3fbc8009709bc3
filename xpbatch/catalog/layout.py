"""The catalogue's layout: its variables, the template of the whole output, the chunk record.

Layout of ``CATALOG.zarr`` (a Zarr v3 group; names from :mod:`xpbatch.schema`)::

    zarr.json                 group attributes: run fingerprint, versions, times, ``complete``
    source_id, latent, coeff  coordinates
    latent_mean, latent_std   (source, latent) float32
    scatter                   (source, coeff) float32, e-/s
    rmse, flags               (source,) float32 / uint16
    anomaly_score             (source,) float32, nats
    latent_mean_mc, _std_mc   (source, latent) float32, only ``with_mc`` (``--mc-samples``)
    ra, dec                   (source,) float64 coordinates in deg (ICRS, J2016.0), if the store has
    reconstruction            (source, coeff) float32, e-/s, only ``with_reconstruction``
    _xpbatch/chunk_records    (chunk, field) int64: one completion record per chunk

The Zarr plumbing the catalogue shares with the input store (specs, codecs, templates, opening,
region writes, chunk files) is :mod:`xpbatch.storage.zarr_arrays`; every name on disk is in
:mod:`xpbatch.schema`. The template is written by :func:`create_catalog`, the chunks by
:mod:`xpbatch.catalog.writer`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import zarr
import zarr.codecs

from xpbatch import schema
from xpbatch.errors import InputShapeError
from xpbatch.schema import CatalogFlag
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import ArraySpec, flag_attrs

logger = logging.getLogger(__name__)


RECORD_FIELDS = ("rows", "rows_encoded", *(f"flag_{str(f.name).lower()}" for f in CatalogFlag))
"""Columns of a completion record: row count, rows encoded, rows with each CatalogFlag bit."""
RECORD_MISSING = -1
"""Fill value of ``chunk_records``: a record still holding it was never written."""
CHECKSUM_MISSING = -1
"""Fill value of ``chunk_checksums``: no checksum was taken (the chunk is not written yet)."""

# Blosc lz4 with byte shuffle: several times faster than zstd for a similar size on encoder
# outputs, so the codec costs little beside the forward pass (docs/performance.md, codecs).
_SHUFFLE: Final = "shuffle"


# --- layout ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CatalogLayout:
    """Shape of a catalogue: its rows come in the same chunks as the input store's."""

    n_rows: int
    """Rows of the input store (every one appears in the catalogue)."""
    chunk_rows: int
    """Rows per chunk, equal to the input store's: chunk k of the input is chunk k here."""
    latent_dim: int = 6
    """Size of the model's latent space."""
    n_coeff: int = schema.N_COEFF
    """Coefficients per spectrum."""
    with_reconstruction: bool = False
    """Whether the catalogue holds the decoder's reconstruction."""
    with_positions: bool = False
    """Whether the catalogue carries the store's ``ra`` and ``dec`` (copied, as coordinates)."""
    with_mc: bool = False
    """Whether the catalogue holds Monte-Carlo latents (``latent_mean_mc``, ``latent_std_mc``)."""

    def __post_init__(self) -> None:
        if self.n_rows < 0 or self.chunk_rows < 1:
            raise InputShapeError(
                f"a catalogue needs n_rows >= 0 and chunk_rows >= 1, got {self.n_rows}, "
                f"{self.chunk_rows}"
            )

    @property
    def n_chunks(self) -> int:
        """Number of chunks along ``source``."""
        return -(-self.n_rows // self.chunk_rows)

    def rows(self, index: int) -> slice:
        """The rows of chunk ``index``."""
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} is outside 0..{self.n_chunks - 1}")
        start = index * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.n_rows))

    def variables(self) -> list[ArraySpec]:
        """Every row variable, ``source_id`` first."""
        return _variable_specs(self)

    def to_attrs(self) -> dict[str, Any]:
        """The layout as JSON-friendly attributes (``with_mc`` only when set, so a catalogue
        without Monte-Carlo latents records the layout it always did)."""
        attrs = dataclasses.asdict(self)
        if not self.with_mc:
            del attrs["with_mc"]
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> CatalogLayout:
        """Inverse of :meth:`to_attrs`."""
        return cls(**attrs)


def _variable_specs(layout: CatalogLayout) -> list[ArraySpec]:
    latent, coeff = layout.latent_dim, layout.n_coeff
    rows = (schema.SOURCE,)
    by_latent, by_coeff = (schema.SOURCE, schema.LATENT), (schema.SOURCE, schema.COEFF)
    specs = [
        ArraySpec(
            schema.SOURCE_ID, "int64", rows, -1, "1",
            "Gaia DR3 source identifier; same rows, same order as the input store",
        ),
        ArraySpec(
            schema.LATENT_MEAN, "float32", by_latent, np.nan, "1",
            "posterior mean of the scatter VAE's latent variables; NaN where flags has "
            "not_encoded",
            latent,
        ),
        ArraySpec(
            schema.LATENT_STD, "float32", by_latent, np.nan, "1",
            "posterior standard deviation of the latent variables, exp(log_var / 2); NaN where "
            "flags has not_encoded",
            latent,
        ),
        ArraySpec(
            schema.SCATTER, "float32", by_coeff, np.nan, schema.FLUX_UNITS,
            "intrinsic scatter predicted by the scatter decoder, in the units of "
            "coefficient_errors (compare the two); NaN where flags has not_encoded",
            coeff,
        ),
        ArraySpec(
            schema.RMSE, "float32", rows, np.nan, "1",
            "sqrt(mean over valid coefficients of ((x - xhat) / x_err)^2) in the model's "
            "standardised space: error-weighted reconstruction residual; NaN where not encoded",
        ),
        ArraySpec(
            schema.FLAGS, "uint16", rows, 0, "1",
            "bit mask of xpbatch.schema.CatalogFlag: low byte = the input store's input_flags, "
            "high byte = the model's (not encoded, latent outlier, training/validation member)",
            extra_attrs=flag_attrs(CatalogFlag),
        ),
        ArraySpec(
            schema.ANOMALY_SCORE, "float32", rows, np.nan, "nat",
            "-log density of (latent mean on the active dimensions, ln rmse), standardised, "
            "under the model's training-set density (attribute latent_density); higher is "
            "rarer; NaN where flags has not_encoded",
        ),
    ]  # fmt: skip
    if layout.with_mc:
        specs += [
            ArraySpec(
                schema.LATENT_MEAN_MC, "float32", by_latent, np.nan, "1",
                "mean over the Monte-Carlo draws of the coefficients (from each source's "
                "measurement covariance, see the options attribute) of the latent posterior "
                "mean; NaN where flags has not_encoded",
                latent,
            ),
            ArraySpec(
                schema.LATENT_STD_MC, "float32", by_latent, np.nan, "1",
                "standard deviation (ddof=1) over the Monte-Carlo draws of the latent posterior "
                "mean: the latents' spread due to the source's measurement noise; NaN where "
                "flags has not_encoded",
                latent,
            ),
        ]  # fmt: skip
    if layout.with_positions:
        units = schema.POSITION_ATTRS[schema.ATTR_UNITS]
        extra = tuple((k, v) for k, v in schema.POSITION_ATTRS.items() if k != schema.ATTR_UNITS)
        specs += [
            ArraySpec(
                name, "float64", rows, np.nan, units,
                f"{text} of the source (gaia_source), ICRS at epoch J2016.0; copied from the "
                "input store (NaN where it had none)",
                extra_attrs=extra,
            )
            for name, text in ((schema.RA, "right ascension"), (schema.DEC, "declination"))
        ]  # fmt: skip
    if layout.with_reconstruction:
        specs.append(
            ArraySpec(
                schema.RECONSTRUCTION, "float32", by_coeff, np.nan, schema.FLUX_UNITS,
                "decoder reconstruction of the coefficients at the posterior mean, in e-/s; NaN "
                "where flags has not_encoded",
                coeff,
            )
        )  # fmt: skip
    return specs


# --- the template -----------------------------------------------------------------------------
def create_catalog(
    path: PathLike | Location,
    layout: CatalogLayout,
    *,
    attrs: Mapping[str, Any],
    coeff_labels: list[str] | None = None,
) -> None:
    """Write the metadata of the whole catalogue (no rows yet) at a path that must not exist.

    Parameters
    ----------
    path
        Directory of the new Zarr v3 group.
    layout
        Rows, chunking and which variables.
    attrs
        Group attributes of the run; must contain the fingerprint attributes
        (:data:`xpbatch.schema.CATALOG_FINGERPRINT_ATTRS`) other than
        the layout and schema version (which are added here).
    coeff_labels
        Labels of the coefficient axis; default ``bp_0 … bp_{n/2-1}, rp_0 …``.
    """
    path = zarr_arrays.where(path)
    # Attributes in the same write as the group: from its first file on, it is recognisably ours.
    group = zarr.open_group(
        zarr_arrays.zarr_target(path),
        mode="w-",
        zarr_format=3,
        attributes={
            **attrs,
            schema.CATALOG_ATTR_SCHEMA_VERSION: schema.CATALOG_SCHEMA_VERSION,
            schema.CATALOG_ATTR_LAYOUT: layout.to_attrs(),
            schema.CATALOG_ATTR_COMPLETE: False,
            schema.CATALOG_ATTR_START_TIME: zarr_arrays.utc_now(),
            schema.CATALOG_ATTR_END_TIME: None,
        },
    )
    coordinates = [schema.SOURCE_ID]
    if layout.with_positions:
        coordinates += [schema.RA, schema.DEC]
    zarr_arrays.create_row_arrays(
        group,
        layout.variables(),
        n_rows=layout.n_rows,
        chunk_rows=layout.chunk_rows,
        compressors=zarr_arrays.blosc_crc32c(_SHUFFLE),
        coordinates=coordinates,
    )
    zarr_arrays.write_axis(
        group, schema.LATENT, np.arange(layout.latent_dim, dtype=np.int16), "latent dimension"
    )
    n_bp = layout.n_coeff // 2
    labels = np.array(coeff_labels or schema.coeff_labels(n_bp, layout.n_coeff - n_bp))
    if labels.shape != (layout.n_coeff,):
        raise InputShapeError(f"need {layout.n_coeff} coefficient labels, got {labels.shape}")
    zarr_arrays.write_axis(group, schema.COEFF, labels, "coefficient label: band and order")
    records = group.create_group(
        schema.BOOKKEEPING_GROUP,
        attributes={
            schema.ATTR_DESCRIPTION: "xpbatch bookkeeping: one completion record per chunk"
        },
    )
    records.create_array(
        _basename(schema.DEVICES_ARRAY),
        shape=(layout.n_chunks,),
        chunks=(1,),
        dtype=str,
        fill_value="",
        compressors=(zarr.codecs.Crc32cCodec(),),
        dimension_names=["chunk"],
        attributes={
            schema.ATTR_DESCRIPTION: "device that encoded each chunk ('' until it is written)"
        },
        config={"write_empty_chunks": True},
    )
    zarr_arrays.create_chunk_table(
        group,
        schema.CHECKSUMS_ARRAY,
        n_chunks=layout.n_chunks,
        variables=[spec.name for spec in layout.variables()],
        description="the crc32c each chunk file carried when its writer wrote it (-1: not taken)",
    )
    # Created last: a catalogue without this array has an unfinished template.
    records.create_array(
        _basename(schema.RECORDS_ARRAY),
        shape=(layout.n_chunks, len(RECORD_FIELDS)),
        chunks=(1, len(RECORD_FIELDS)),
        dtype="int64",
        fill_value=RECORD_MISSING,
        compressors=(zarr.codecs.Crc32cCodec(),),
        dimension_names=["chunk", "field"],
        attributes={
            schema.ATTR_RECORD_FIELDS: list(RECORD_FIELDS),
            schema.ATTR_RECORD_MISSING: RECORD_MISSING,
        },
        config={"write_empty_chunks": True},
    )
    logger.info("created catalogue %s: %d rows in %d chunks", path, layout.n_rows, layout.n_chunks)


def _basename(name: str) -> str:
    """The last part of an array's path in the group, e.g. ``chunk_records``."""
    return name.rsplit("/", 1)[-1]


# --- the completion record --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkRecord:
    """What a finished chunk recorded: its rows and how many rows carry each flag."""

    index: int
    rows: int
    rows_encoded: int
    flag_counts: dict[str, int]
    """CatalogFlag name (lower case) -> rows with that bit."""

    @classmethod
    def from_outputs(cls, index: int, outputs: Mapping[str, np.ndarray]) -> ChunkRecord:
        """Count the rows and flags of one chunk's outputs."""
        flags = np.asarray(outputs[schema.FLAGS])
        counts = {
            str(f.name).lower(): int(np.count_nonzero(flags & np.uint16(f))) for f in CatalogFlag
        }
        return cls(index, int(flags.size), int(flags.size) - counts["not_encoded"], counts)

    def to_row(self) -> np.ndarray:
        """The record as one row of ``chunk_records`` (see :data:`RECORD_FIELDS`)."""
        values = [self.rows, self.rows_encoded, *self.flag_counts.values()]
        return np.array(values, np.int64)

    @classmethod
    def from_row(cls, index: int, row: np.ndarray) -> ChunkRecord:
        """Inverse of :meth:`to_row`."""
        names = [str(f.name).lower() for f in CatalogFlag]
        return cls(
            index, int(row[0]), int(row[1]), dict(zip(names, map(int, row[2:]), strict=True))
        )
