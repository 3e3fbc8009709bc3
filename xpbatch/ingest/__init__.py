"""Gaia DR3 XP files -> XP store (``xpbatch ingest``).

Every XP file a user downloads ingests: bulk ``XpContinuousMeanSpectrum_*.csv.gz`` and the
archive's CSV/ECSV (:mod:`~xpbatch.ingest.text`), VOTable (:mod:`~xpbatch.ingest.votable`),
FITS (:mod:`~xpbatch.ingest.fits`), DPAC AVRO (:mod:`~xpbatch.ingest.avro`), Parquet
(:mod:`~xpbatch.ingest.parquet`) and zip bundles of these (:mod:`~xpbatch.ingest.bundle`), in
any layout seen in real use (:mod:`~xpbatch.ingest.table`), recognised from their
bytes (:mod:`~xpbatch.ingest.reader`). The text reader opens a file and reads its header in
:mod:`~xpbatch.ingest.text_file`; it reads blocks of well-formed lines with the compiled
scanner (:mod:`~xpbatch.ingest.fastscan`, laid out by :mod:`~xpbatch.ingest.fast_layout`), and
the others with the general reader: quoted cells cut out of the lines
(:mod:`~xpbatch.ingest.quoted_cells`), then array cells parsed into numbers
(:mod:`~xpbatch.ingest.array_cells`). The G flux comes from a gaia_source companion or the XP
file itself (:mod:`~xpbatch.ingest.gaia_source`); each file becomes a resumable part
(:mod:`~xpbatch.ingest.parts`); :mod:`~xpbatch.ingest.run` builds the store. The DR3 format
facts live in :mod:`xpbatch.dr3`.
"""

from xpbatch.dr3 import GAIA_SOURCE_GLOB, GAIA_SOURCE_NAME, XP_GLOB, XP_NAME
from xpbatch.ingest.common import BadRow, ParsedFile, ReadRequest, gzip_module
from xpbatch.ingest.gaia_source import GaiaSourceTable, join_g_flux, read_gaia_source
from xpbatch.ingest.parts import FileTask, PartInfo, ingest_file
from xpbatch.ingest.reader import FORMATS, parse_xp_file, read_xp_file, sniff
from xpbatch.ingest.run import (
    MAX_RECORDED_BAD_ROWS,
    IngestSummary,
    expand_inputs,
    ingest_files,
    ingest_table,
    pair_files,
)

_gzip = gzip_module  # the benchmark times gzip alone with the ingest's own inflater

__all__ = [
    "FORMATS",
    "GAIA_SOURCE_GLOB",
    "GAIA_SOURCE_NAME",
    "MAX_RECORDED_BAD_ROWS",
    "XP_GLOB",
    "XP_NAME",
    "BadRow",
    "FileTask",
    "GaiaSourceTable",
    "IngestSummary",
    "ParsedFile",
    "PartInfo",
    "ReadRequest",
    "expand_inputs",
    "ingest_file",
    "ingest_files",
    "ingest_table",
    "join_g_flux",
    "pair_files",
    "parse_xp_file",
    "read_gaia_source",
    "read_xp_file",
    "sniff",
]
