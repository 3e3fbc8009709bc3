"""Realistic synthetic XP data with known labels, at any size, as a store or as DR3 bulk files.

Every star gets labels (Teff, log g, [M/H], [α/M], A_V, G) and a place on a sky with a
Galactic disc and bulge (hence its source_id); its photon spectrum is observed by a model of BP
and RP into 55 + 55 coefficients with DR3-like errors, correlations and noise. A row depends only
on ``(n, seed, config, row index)``, so any chunking of the output gives the same rows.

Where is what (data flows down this list):

- :mod:`~xpbatch.mock.sky`: source density over HEALPix pixels, source_ids, positions.
- :mod:`~xpbatch.mock.spectra`: labels and photon spectra (features, extinction).
- :mod:`~xpbatch.mock.instrument`: optics, Hermite projection, coefficient errors, correlations.
- :mod:`~xpbatch.mock.populations`: rare populations (binaries, emission lines, white dwarfs).
- :mod:`~xpbatch.mock.labels`: the labels table: where it is, write, read.
- :mod:`~xpbatch.mock.rows`: :class:`MockRows`, generated block by block; DR3 scalars, defects.
- :mod:`~xpbatch.mock.plan`: how the rows are cut into bulk files.
- :mod:`~xpbatch.mock.store_writer`: an XP store.
- :mod:`~xpbatch.mock.ecsv` and :mod:`~xpbatch.mock.bulk_writer`: DR3 bulk csv.gz files.
- :mod:`~xpbatch.mock.stage`: the stage entry :func:`make_mock` and its :class:`MockSummary`.
"""

from __future__ import annotations

from xpbatch.mock.bulk_writer import write_mock_dr3_bulk
from xpbatch.mock.instrument import (
    N_CORRELATION_TEMPLATES,
    correlation_templates,
    hermite_functions,
    packed_correlations,
)
from xpbatch.mock.labels import (
    LABEL_COLUMNS,
    LABELS_FILE,
    STORE_LABELS_SUFFIX,
    labels_path,
    read_mock_labels,
)
from xpbatch.mock.plan import BulkFile, bulk_file_plan
from xpbatch.mock.populations import POPULATIONS
from xpbatch.mock.rows import BLOCK_ROWS, MAX_ROWS, MockRows, mock_rows
from xpbatch.mock.sky import pixel_row_bounds
from xpbatch.mock.spectra import WAVELENGTH_NM, draw_labels, extinction_curve, photon_spectrum
from xpbatch.mock.stage import MockSummary, make_mock
from xpbatch.mock.store_writer import write_mock_store

__all__ = [
    "BLOCK_ROWS",
    "LABELS_FILE",
    "LABEL_COLUMNS",
    "MAX_ROWS",
    "N_CORRELATION_TEMPLATES",
    "POPULATIONS",
    "STORE_LABELS_SUFFIX",
    "WAVELENGTH_NM",
    "BulkFile",
    "MockRows",
    "MockSummary",
    "bulk_file_plan",
    "correlation_templates",
    "draw_labels",
    "extinction_curve",
    "hermite_functions",
    "labels_path",
    "make_mock",
    "mock_rows",
    "packed_correlations",
    "photon_spectrum",
    "pixel_row_bounds",
    "read_mock_labels",
    "write_mock_dr3_bulk",
    "write_mock_store",
]
