"""DPAC AVRO XP records (``MeanSpectrumSolutionWithCov``, as GaiaXPy reads them), via fastavro.

Each record is ``sourceId``, ``solutionId`` and ``bpSpec``/``rpSpec`` (null for a missing band)
holding ``basisFunctionSetDefId`` and a ``solution`` with ``parameters``, ``numberOfParameters``,
``standardDeviation`` and ``covariance``: the lower triangle with the diagonal, row-major
(``numpy.tril_indices(n)``), without the standard-deviation scaling. AVRO stores no errors and no
correlations; the DR3 ones follow from it (float32-exact against the archive's CSV):

- error ``e_k = sqrt(C_kk) * standardDeviation``;
- correlation ``R_ij = C_ij / sqrt(C_ii * C_jj)`` for ``i > j``, packed like DR3's
  (``numpy.tril_indices(n, k=-1)``).

fastavro yields one dict per record; each field becomes one column in one pass over the records,
and the arrays are joined by numpy (never a Python loop over values). The columns then go
through the shared table code (:mod:`xpbatch.ingest.table`), which checks basis and length.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xpbatch import dr3, schema
from xpbatch.errors import ParseError
from xpbatch.ingest.common import ParsedFile, ReadRequest
from xpbatch.ingest.table import parse_table


def read_avro(
    path: Path, data: bytes, request: ReadRequest, file_info: dict[str, Any]
) -> ParsedFile:
    """Parse a DPAC AVRO file of mean XP spectra."""
    import fastavro

    try:
        reader = fastavro.reader(io.BytesIO(data))
        fields = [f["name"] for f in reader.writer_schema.get("fields", [])]  # type: ignore[union-attr]
        needed = [dr3.AVRO_SOURCE_ID, *dr3.AVRO_BAND.values()]
        if not set(needed) <= set(fields):
            raise ParseError(
                f"{path}: an AVRO file of another schema: XP records need the fields {needed} "
                f"(DPAC MeanSpectrumSolutionWithCov, as GaiaXPy reads), but this one has "
                f"{fields[:8]}{'...' if len(fields) > 8 else ''}"
            )
        records: list[dict[str, Any]] = list(reader)  # type: ignore[arg-type]
    except ParseError:
        raise
    except Exception as e:  # fastavro raises ValueError, EOFError, SchemaResolutionError ...
        raise ParseError(
            f"{path}: cannot read this AVRO file ({type(e).__name__}: {e}); is it truncated? "
            "Download it again."
        ) from e
    return parse_table(_columns(records, request), path, request, file_info)


def _columns(records: list[dict[str, Any]], request: ReadRequest) -> pa.Table:
    """The records as a table in DR3's column names (arrays as list columns)."""
    columns: dict[str, pa.Array] = {
        dr3.SOURCE_ID: pa.array([r.get(dr3.AVRO_SOURCE_ID) for r in records], pa.int64()),
        dr3.SOLUTION_ID: pa.array([r.get(dr3.AVRO_SOLUTION_ID) for r in records], pa.int64()),
    }
    for band, key in dr3.AVRO_BAND.items():
        specs = [r.get(key) or {} for r in records]
        solutions = [s.get("solution") or {} for s in specs]
        for field, name in dr3.AVRO_BAND_FIELDS.items():
            columns[f"{band}_{name}"] = pa.array([s.get(field) for s in specs], _type(name))
        for field, name in dr3.AVRO_SOLUTION_FIELDS.items():
            columns[f"{band}_{name}"] = pa.array([s.get(field) for s in solutions], _type(name))
        parameters = [s.get(dr3.AVRO_PARAMETERS) or [] for s in solutions]
        covariance = [s.get(dr3.AVRO_COVARIANCE) or [] for s in solutions]
        std = np.array([s.get("standardDeviation", np.nan) for s in solutions], dtype=np.float64)
        coefficients, errors, correlations = _band_arrays(parameters, covariance, std)
        columns[f"{band}_coefficients"] = coefficients
        columns[f"{band}_coefficient_errors"] = errors
        if request.with_correlations:
            columns[schema.correlations_name(band)] = correlations
    return pa.table(columns)


def _type(name: str) -> pa.DataType:
    dtype = dr3.BAND_COLUMNS[name]
    return pa.int64() if dtype.startswith("int") else pa.float64()


def _band_arrays(
    parameters: list[list[float]], covariance: list[list[float]], std: np.ndarray
) -> tuple[pa.ListArray, pa.ListArray, pa.ListArray]:
    """Coefficients, DR3 errors and packed correlations of one band, as list columns.

    Rows are grouped by their number of coefficients, so each group's covariance is one
    (rows, n(n+1)/2) matrix and every step below is a numpy operation on it.
    """
    n_par = np.array([len(p) for p in parameters], dtype=np.int64)
    n_cov = np.array([len(c) for c in covariance], dtype=np.int64)
    values = _joined(parameters)
    flat_cov = _joined(covariance)
    cov_start = np.concatenate([[0], np.cumsum(n_cov)[:-1]])
    n = len(parameters)
    errors: list[np.ndarray | None] = [None] * n
    correlations: list[np.ndarray | None] = [None] * n
    for size in np.unique(n_par[n_par > 0]).tolist():
        rows = np.flatnonzero((n_par == size) & (n_cov == size * (size + 1) // 2))
        if not rows.size:
            continue
        cov = flat_cov[cov_start[rows, None] + np.arange(size * (size + 1) // 2)]  # (rows, packed)
        diagonal = cov[:, _packed(*np.diag_indices(size))]  # (rows, size)
        err = np.sqrt(diagonal) * std[rows, None]
        i, j = np.tril_indices(size, k=-1)
        corr = cov[:, _packed(i, j)] / np.sqrt(diagonal[:, i] * diagonal[:, j])
        for k, row in enumerate(rows.tolist()):  # hand each row its slice (views, no copies)
            errors[row], correlations[row] = err[k], corr[k]
    return (
        _list_array(values, n_par),
        _ragged(errors),
        _ragged(correlations),
    )


def _joined(cells: list[list[float]]) -> np.ndarray:
    """All cells' values end to end (numpy converts each list in C)."""
    arrays = [np.asarray(c, dtype=np.float64) for c in cells if c]
    return np.concatenate(arrays) if arrays else np.empty(0)


def _packed(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Index of (i, j), j <= i, in a row-major packed lower triangle with the diagonal."""
    return i * (i + 1) // 2 + j


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float64()))


def _ragged(rows: list[np.ndarray | None]) -> pa.ListArray:
    """A list column of per-row arrays; None (no covariance) is an empty row."""
    lengths = np.array([0 if r is None else len(r) for r in rows], dtype=np.int64)
    present = [r for r in rows if r is not None]
    values = np.concatenate(present) if present else np.empty(0)
    return _list_array(values, lengths)
