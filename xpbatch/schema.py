"""The on-disk contract: dimension, variable and attribute names, dtypes and flag bits.

Every stage reads and writes through these names; nothing else spells them out.
"""

from __future__ import annotations

import enum

from xpbatch import dr3

# --- dimensions -----------------------------------------------------------------------------
SOURCE = "source"
COEFF = "coeff"
LATENT = "latent"

# --- coefficients ---------------------------------------------------------------------------
N_BP = dr3.N_COEFFICIENTS["bp"]
N_RP = dr3.N_COEFFICIENTS["rp"]
N_COEFF = N_BP + N_RP
BANDS = dr3.BANDS
DR3_N_SOURCES = 219_197_643
"""Rows of gaiadr3.xp_continuous_mean_spectrum: what the benchmarks project to."""


def coeff_labels(n_bp: int = N_BP, n_rp: int = N_RP) -> list[str]:
    """Labels of the coefficient axis: ``bp_0 … bp_{n_bp-1}, rp_0 … rp_{n_rp-1}``."""
    return [f"bp_{i}" for i in range(n_bp)] + [f"rp_{i}" for i in range(n_rp)]


# --- attributes and groups of both -----------------------------------------------------------
ATTR_UNITS = "units"
ATTR_DESCRIPTION = "description"
ATTR_COORDINATES = "coordinates"
"""Names the coordinates of a variable (xarray reads it)."""
ATTR_FLAG_MASKS = "flag_masks"
ATTR_FLAG_MEANINGS = "flag_meanings"
ATTR_RECORD_FIELDS = "fields"
"""Of a bookkeeping array: what its columns hold."""
ATTR_RECORD_MISSING = "missing"
"""Of a bookkeeping array: its fill value, held where nothing was recorded yet."""
BOOKKEEPING_GROUP = "_xpbatch"
"""xpbatch's own records (what was written, by whom), beside the data variables."""


# --- format versions ------------------------------------------------------------------------
# Each kind of file xpbatch writes records one integer format version (the store and the
# catalogue as a group attribute, the model file as a metadata key). A reader accepts its own
# version only: files of an older format are rebuilt, never read through compatibility code.
def format_version_problem(found: object, expected: int, *, what: str, redo: str) -> str | None:
    """Why ``what`` of format ``found`` cannot be read by this xpbatch (format ``expected``).

    None when it can. ``redo`` says how to rebuild an older or unversioned file.

    Examples
    --------
    >>> format_version_problem(2, 2, what="x.zarr", redo="re-ingest it") is None
    True
    >>> print(format_version_problem(1, 2, what="x.zarr", redo="re-ingest it"))
    x.zarr was written by an older xpbatch (format 1, this xpbatch reads 2): re-ingest it
    """
    try:
        version = None if isinstance(found, bool) else int(found)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        version = None
    if version == expected:
        return None
    if version is not None and version > expected:
        return (
            f"{what} was written by a newer xpbatch (format {version}, this xpbatch reads "
            f"{expected}): upgrade xpbatch"
        )
    if found is None:
        return (
            f"{what} was written by an older xpbatch or not by xpbatch (no format version "
            f"recorded, this xpbatch reads {expected}): {redo}"
        )
    return (
        f"{what} was written by an older xpbatch (format {found}, this xpbatch reads "
        f"{expected}): {redo}"
    )


# --- the input XP store ---------------------------------------------------------------------
STORE_SCHEMA_VERSION = 2
"""Format version of the store (attribute :data:`STORE_ATTR_SCHEMA_VERSION`); 2 added the
chunk file table :data:`CHUNK_FILES`."""
SOURCE_ID = dr3.SOURCE_ID
COEFFICIENTS = "coefficients"
COEFFICIENT_ERRORS = "coefficient_errors"
PHOT_G_MEAN_FLUX = dr3.PHOT_G_MEAN_FLUX
INPUT_FLAGS = "input_flags"
RA = "ra"
DEC = "dec"
POSITION_ATTRS = {"units": "deg", "frame": "ICRS", "epoch": "J2016.0"}
"""Attributes of ``ra``/``dec`` (store and catalogue): gaia_source positions, degrees, ICRS at
the Gaia DR3 reference epoch J2016.0."""
CORRELATION = "correlation"
"""Dimension of the packed off-diagonal correlations (55·54/2 = 1485 per band)."""


def correlations_name(band: str) -> str:
    """Store variable of one band's packed correlations, e.g. ``bp_coefficient_correlations``."""
    return f"{band}_coefficient_correlations"


# Optional DR3 per-row scalars kept in the store: name -> (dtype, units, description); the
# dtypes are DR3's (xpbatch.dr3). Integer columns hold -1 where the band is missing (DR3 has no
# value there) or the input file did not have the column.
_BAND_SCALAR_TEXT = {
    "basis_function_id": "identifier of the set of basis functions",
    "degrees_of_freedom": "degrees of freedom of the fit",
    "n_parameters": "number of coefficients of the fit",
    "n_measurements": "number of epoch spectra used",
    "n_rejected_measurements": "number of epoch spectra rejected",
    "standard_deviation": "standard deviation of the fit",
    "chi_squared": "chi-squared of the fit",
    "n_relevant_bases": "number of bases relevant to the spectrum",
    "relative_shrinking": "relative shrinking of the coefficient vector",
}
DR3_SCALARS: dict[str, tuple[str, str, str]] = {
    dr3.SOLUTION_ID: (dr3.SCALARS[dr3.SOLUTION_ID], "1", "Gaia solution identifier"),
    **{
        f"{band}_{name}": (dr3.SCALARS[f"{band}_{name}"], "1", f"{band.upper()} {text} (Gaia DR3)")
        for band in BANDS
        for name, text in _BAND_SCALAR_TEXT.items()
    },
}
"""The DR3 columns besides the arrays that a store may carry (``--scalars``)."""
CHUNK_FILES = f"{BOOKKEEPING_GROUP}/chunk_files"
"""(chunk, variable) int64 array: the byte size of every chunk file, recorded by the writer of
that chunk right after writing it (-1: never written). Readers check each file against it, so a
chunk file deleted or truncated later is an error, never the fill value standing in for data.
Its attribute ``variables`` (:data:`ATTR_CHUNK_FILE_VARIABLES`) names the columns."""
ATTR_CHUNK_FILE_VARIABLES = "variables"

# Group attributes of a store.
STORE_ATTR_SCHEMA_VERSION = "xpbatch_store_schema_version"
"""The store's format version (:func:`format_version_problem`)."""
STORE_ATTR_COMPLETE = "complete"
"""True once every row is written and the store finalized; readers refuse a store without it."""
STORE_ATTR_ROW_COUNT = "row_count"
"""Rows of the store."""
STORE_ATTR_STORE_ID = "store_id"
"""A hash of the creation uuid, row count and per-chunk source_id ranges: the identity that
models and catalogues record and ``--resume`` compares."""
STORE_ATTR_INPUT_FILES = "input_files"
"""The files ingested (the XP files and their gaia_source companions)."""
STORE_ATTR_DATA_RELEASE = "data_release"
"""The data release of the spectra (``Gaia DR3``)."""
STORE_ATTR_PARTITION_RANGES = "partition_ranges"
"""``[[lo, hi], ...]``: the DR3 bulk partitions (HEALPix level-8, inclusive) of the input files,
when their names follow the DR3 pattern; export-parquet splits its files by them."""
STORE_ATTR_XPBATCH_VERSION = "xpbatch_version"
"""The xpbatch version that wrote the store."""
STORE_ATTR_CREATED = "created"
"""When the store was created (UTC, ISO 8601)."""
STORE_ATTR_FINALIZED = "finalized"
"""When the store was finalized, i.e. marked complete (UTC, ISO 8601)."""
STORE_ATTR_UUID = "store_uuid"
"""A random id drawn at creation; hashed into ``store_id``."""
STORE_ATTR_CHUNK_ROWS = "chunk_rows"
"""Rows per chunk along ``source``."""
STORE_ATTR_SCALARS = "scalars"
"""The DR3 scalar columns the store carries (``--scalars``)."""
STORE_ATTR_WITH_CORRELATIONS = "with_correlations"
"""Whether the store carries the packed correlations (``--with-correlations``)."""
STORE_ATTR_WITH_POSITIONS = "with_positions"
"""Whether the store carries ``ra`` and ``dec``."""
STORE_ATTR_CHUNK_RANGES = "source_id_chunk_ranges"
"""``[[first, last], ...]``: the source_id range of every chunk, recorded by finalize."""
STORE_ATTR_INGEST_OPTIONS = "ingest_options"
"""The inputs and options of the ingest that wrote the store (what ``ingest --resume`` checks)."""
STORE_ATTR_SKIPPED_ROW_COUNT = "skipped_row_count"
"""Malformed input rows that ingest skipped (and listed, up to a limit, in ``skipped_rows``)."""
STORE_ATTR_SKIPPED_ROWS = "skipped_rows"
"""The first skipped rows (file, line or row, reason), up to a limit."""

FLUX_UNITS = "electron/s"
G_ZERO_POINT_MAG = dr3.G_ZERO_POINT_MAG
"""Used when only the magnitude is known (see :mod:`xpbatch.dr3`)."""


class InputFlag(enum.IntFlag):
    """Bits of the store's ``input_flags`` (uint8). They are also the low byte of ``flags``."""

    BP_MISSING = 1
    """No BP spectrum: the 55 BP coefficients are NaN."""
    RP_MISSING = 2
    """No RP spectrum: the 55 RP coefficients are NaN."""
    G_FLUX_MISSING = 4
    """phot_g_mean_flux missing, not finite or not positive, and no G magnitude to fall back on."""
    NON_FINITE = 8
    """Some coefficient or error of a present band is NaN/inf, or an error is <= 0."""
    G_FLUX_FROM_MAG = 16
    """phot_g_mean_flux was missing and was computed from phot_g_mean_mag."""
    G_FLUX_FROM_XP_FILE = 32
    """The G flux (or magnitude) came from the XP file itself, not from a gaia_source companion."""
    POSITION_INVALID = 64
    """ra/dec were given but not finite or out of range (ra in [0, 360), dec in [-90, 90]): they
    are stored as NaN, so the row has no position (export-hats and skymap place it by its
    source_id with --positions-from-source-id, as rows without a companion position)."""


# --- the output catalogue -------------------------------------------------------------------
CATALOG_SCHEMA_VERSION = 2
"""Format version of the catalogue (attribute :data:`CATALOG_ATTR_SCHEMA_VERSION`); 2 added
``anomaly_score``, the latent density attribute, and the chunk devices and checksums."""
# Group attributes of a catalogue.
CATALOG_ATTR_COMPLETE = "complete"
"""True once every chunk is encoded and verified; :func:`xpbatch.open_catalog` refuses a catalogue
without it."""
CATALOG_ATTR_SCHEMA_VERSION = "xpbatch_catalog_schema_version"
"""Version of this layout (:data:`CATALOG_SCHEMA_VERSION`)."""
CATALOG_ATTR_LAYOUT = "layout"
"""Rows, chunk rows, latent size and the optional variables (a ``CatalogLayout``)."""
CATALOG_ATTR_MODEL_HASH = "model_hash"
"""sha256 of the model file's content: which model encoded the rows."""
CATALOG_ATTR_STORE_ID = "input_store_id"
"""The input store's ``store_id``."""
CATALOG_ATTR_INPUT_STORE = "input_store"
"""Path of the input store when the catalogue was written."""
CATALOG_ATTR_OPTIONS = "options"
"""The encode options that change the result: the batch size and, with Monte-Carlo latents, the
draws per spectrum, their seed and covariance (:data:`MC_OPTION_SAMPLES` ...)."""
MC_OPTION_SAMPLES = "mc_samples"
"""Key of :data:`CATALOG_ATTR_OPTIONS`: draws per spectrum K (absent: no Monte-Carlo latents)."""
MC_OPTION_SEED = "mc_seed"
"""Key of :data:`CATALOG_ATTR_OPTIONS`: the seed; a row's draws depend on (seed, source_id) only."""
MC_OPTION_COVARIANCE = "mc_covariance"
"""Key of :data:`CATALOG_ATTR_OPTIONS`: the draws' covariance, one of :data:`MC_COVARIANCES`."""
MC_COVARIANCES = ("full", "diagonal")
"""'full': each band's errors and packed correlations (the store's ``*_coefficient_correlations``);
'diagonal': the errors alone (a store without correlations)."""
CATALOG_ATTR_RUN_ID = "run_id"
"""A random id of the run that created the catalogue (kept on ``--resume``)."""
CATALOG_ATTR_START_TIME = "start_time"
"""When the run started (UTC, ISO 8601)."""
CATALOG_ATTR_END_TIME = "end_time"
"""When the run finished (UTC, ISO 8601)."""
CATALOG_ATTR_RESUMED = "resumed"
"""Times (UTC) at which ``--resume`` continued the run."""
CATALOG_FINGERPRINT_ATTRS = (
    CATALOG_ATTR_SCHEMA_VERSION,
    CATALOG_ATTR_MODEL_HASH,
    CATALOG_ATTR_STORE_ID,
    CATALOG_ATTR_LAYOUT,
    CATALOG_ATTR_OPTIONS,
)
"""Attributes that must be equal for ``--resume`` to continue a catalogue."""
RECORDS_ARRAY = f"{BOOKKEEPING_GROUP}/chunk_records"
"""(chunk, field) int64: one completion record per chunk; its attribute ``fields`` names them."""
CHECKSUMS_ARRAY = f"{BOOKKEEPING_GROUP}/chunk_checksums"
"""(chunk, variable) int64: the crc32c each chunk file of a chunk carries (Zarr's crc32c codec,
over the encoded chunk), read by its writer right after writing and fsyncing the files, before
the completion record (-1: not taken). Its attribute ``variables``
(:data:`ATTR_CHUNK_FILE_VARIABLES`) names the columns."""
DEVICES_ARRAY = f"{BOOKKEEPING_GROUP}/chunk_devices"
"""Per chunk, the device that encoded it, e.g. 'cpu' or 'cuda:0 (NVIDIA H200)' ('' until
written)."""
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
SCATTER = "scatter"
RMSE = "rmse"
FLAGS = "flags"
RECONSTRUCTION = "reconstruction"
ANOMALY_SCORE = "anomaly_score"
LATENT_MEAN_MC = "latent_mean_mc"
"""(source, latent) float32, only with Monte-Carlo latents (``--mc-samples K``): the mean over K
draws of the coefficients from the source's measurement covariance of the encoder's posterior
mean (dimensionless latent units, as latent_mean)."""
LATENT_STD_MC = "latent_std_mc"
"""(source, latent) float32, beside :data:`LATENT_MEAN_MC`: the standard deviation (ddof=1) over
the K draws of the posterior mean: how far the source's own measurement noise moves its latents."""
ATTR_LATENT_DENSITY = "latent_density"
"""Catalogue attribute: the model's active dimensions, latent centre and scale, outlier cut."""


class CatalogFlag(enum.IntFlag):
    """Bits of the catalogue's ``flags`` (uint16). The low byte repeats :class:`InputFlag`."""

    BP_MISSING = InputFlag.BP_MISSING
    RP_MISSING = InputFlag.RP_MISSING
    G_FLUX_MISSING = InputFlag.G_FLUX_MISSING
    NON_FINITE = InputFlag.NON_FINITE
    G_FLUX_FROM_MAG = InputFlag.G_FLUX_FROM_MAG
    G_FLUX_FROM_XP_FILE = InputFlag.G_FLUX_FROM_XP_FILE
    POSITION_INVALID = InputFlag.POSITION_INVALID
    NOT_ENCODED = 256
    """No output for this row (all outputs NaN); the input bits say why."""
    LATENT_OUTLIER = 512
    """anomaly_score is above the model's threshold: the 99.9 % quantile of the training set's
    scores (of the prior's, for a model without a fitted density); see xpbatch.model.density."""
    IN_TRAINING_SET = 1024
    """The model was fitted on this source."""
    IN_VALIDATION_SET = 2048
    """The source was in this model's validation set."""


# --- the model file -------------------------------------------------------------------------
MODEL_FORMAT_NAME = "xpbatch-model"
"""Metadata ``format`` of an xpbatch model file (safetensors)."""
MODEL_FORMAT_VERSION = 2
"""Format version of the model file (metadata :data:`MODEL_ATTR_FORMAT_VERSION`, a string as
safetensors metadata must be); 2 made the latent density and ``fit_statistics`` keys
required."""
MODEL_ATTR_FORMAT_VERSION = "format_version"
