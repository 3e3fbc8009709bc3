"""Filesystem helpers shared by the stages.

Standard library only, so that any module (the CLI included) can import it for free.
"""

from __future__ import annotations

import os

PathLike = str | os.PathLike[str]
"""A path as callers pass it: a string or any ``os.PathLike`` (``pathlib.Path``)."""
