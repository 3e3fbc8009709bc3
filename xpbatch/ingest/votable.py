"""VOTable XP files: BINARY2 (astroquery's default), BINARY and TABLEDATA (``votable_plain``).

astropy parses the XML; ``arraysize="*"`` fields come as variable-length cells (a missing band
is a zero-length array or an empty ``<TD>``), scalars as masked values. The shared table code
(:mod:`xpbatch.ingest.table`) does the rest.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

from xpbatch.errors import ParseError
from xpbatch.ingest.common import ParsedFile, ReadRequest
from xpbatch.ingest.table import arrow_table, parse_table


def read_votable(
    path: Path, data: bytes, request: ReadRequest, file_info: dict[str, Any]
) -> ParsedFile:
    """Parse the first table of a VOTable."""
    from astropy.io.votable import parse

    try:
        with warnings.catch_warnings():  # astropy warns about UCDs and units it does not know
            warnings.simplefilter("ignore")
            votable = parse(io.BytesIO(data), verify="ignore", filename=str(path))
            table = votable.get_first_table().to_table(use_names_over_ids=True)
    except Exception as e:  # expat's ExpatError, astropy's VOTable errors, IndexError (no table)
        # expat and astropy put the position first in the message: 'line:column: ...'
        position = re.match(r"(\d+):(\d+):", str(e))
        where = f", line {position.group(1)}" if position else ""
        raise ParseError(
            f"{path}{where}: not a readable VOTable ({type(e).__name__}: {e}); is it truncated "
            "or not XML? Download it again."
        ) from e
    return parse_table(arrow_table(table), path, request, file_info)
