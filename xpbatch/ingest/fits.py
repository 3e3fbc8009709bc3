"""FITS binary tables of XP spectra (the archive's ``format='fits'``, written by STIL).

Arrays are variable-length (``PD(55)``, ``PE(55)``; a missing band is a zero-length array) or
fixed-length (``55D``) columns; integer columns carry ``TNULL``. astropy reads the table; the
shared table code (:mod:`xpbatch.ingest.table`) does the rest.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from xpbatch.errors import ParseError
from xpbatch.ingest.common import ParsedFile, ReadRequest
from xpbatch.ingest.table import arrow_table, parse_table


def read_fits(
    path: Path, data: bytes, request: ReadRequest, file_info: dict[str, Any]
) -> ParsedFile:
    """Parse the first binary-table HDU of a FITS file."""
    from astropy.io import fits
    from astropy.table import Table

    try:
        with warnings.catch_warnings():  # astropy warns about non-standard cards it still reads
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(data), memmap=False) as hdus:
                tables = [h for h in hdus if isinstance(h, fits.BinTableHDU)]
                if not tables:
                    raise ParseError(
                        f"{path}: a FITS file without a binary table (it has "
                        f"{[type(h).__name__ for h in hdus]}); XP spectra come as a BINTABLE"
                    )
                hdus.verify("silentfix")
                table = Table.read(tables[0], character_as_bytes=False)
    except ParseError:
        raise
    except Exception as e:  # astropy raises OSError, ValueError, TypeError... on broken files
        raise ParseError(
            f"{path}: cannot read this FITS file ({type(e).__name__}: {e}); is it truncated? "
            "Download it again."
        ) from e
    return parse_table(arrow_table(table), path, request, file_info)
