"""Parquet XP files (list columns or one column per coefficient), read with pyarrow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from xpbatch.errors import ParseError
from xpbatch.ingest.common import ParsedFile, ReadRequest
from xpbatch.ingest.table import parse_table


def read_parquet(
    path: Path, data: bytes, request: ReadRequest, file_info: dict[str, Any]
) -> ParsedFile:
    """Parse a Parquet file of XP rows."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowInvalid) as e:
        raise ParseError(
            f"{path}: cannot read this Parquet file ({e}); is it truncated? Download it again."
        ) from e
    return parse_table(table, path, request, file_info)
