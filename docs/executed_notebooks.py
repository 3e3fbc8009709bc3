"""mkdocs hook: the notebook pages show their outputs, from the copies the test suite executed.

The notebooks are stored without outputs (a small repository, readable diffs), and executing
them in the docs build would run every notebook a second time in CI. Instead
``tests/test_notebooks.py``, which executes every notebook on a small store, writes each
executed copy to ``build/notebooks/NAME.ipynb`` (git-ignored), and this hook renders a
notebook page from its executed copy when there is one whose cells are the stored notebook's
(a copy of an older version is never shown). ``$XPBATCH_DOCS_NOTEBOOKS`` chooses:

- ``auto`` (the default): the executed copy when it is current, else the notebook as stored
  (code and text, no figures), said in the build's log;
- ``executed``: every notebook page from a current executed copy, else the build fails
  (the test that checks the site's figures builds it so);
- ``stored``: the notebooks as stored.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority

ENV = "XPBATCH_DOCS_NOTEBOOKS"
MODES = ("auto", "executed", "stored")
EXECUTED_DIR = Path(__file__).resolve().parents[1] / "build" / "notebooks"
"""Where tests/test_notebooks.py writes the executed copies."""

log = logging.getLogger("mkdocs.hooks.executed_notebooks")


def mode() -> str:
    """The mode ``$XPBATCH_DOCS_NOTEBOOKS`` asks for (``auto`` when unset)."""
    value = os.environ.get(ENV, "auto").strip() or "auto"
    if value not in MODES:
        raise PluginError(f"${ENV} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def cells(path: Path) -> list[tuple[str, str]]:
    """A notebook's cells as (type, source): what an executed copy must share with the stored
    notebook (outputs, counts and metadata may differ)."""
    book = json.loads(path.read_text(encoding="utf-8"))
    return [
        (cell["cell_type"], "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"])
        for cell in book["cells"]
    ]


def executed_copy(stored: Path, directory: Path = EXECUTED_DIR) -> tuple[Path | None, str]:
    """The current executed copy of the notebook ``stored``, or None and why not."""
    copy = directory / stored.name
    if not copy.is_file():
        return None, f"no executed copy at {copy}"
    try:
        same = cells(copy) == cells(stored)
    except (OSError, ValueError, KeyError) as e:
        return None, f"{copy} is not a readable notebook ({e})"
    if not same:
        return None, f"{copy} was executed from another version of {stored.name}"
    return copy, f"outputs from {copy}"


@event_priority(-100)  # after mkdocs-jupyter wraps each notebook's File (its wrapper computes
# abs_src_path itself, so the path is set on the wrapper that it reads at render time)
def on_files(files: Any, config: Any, **_: Any) -> Any:
    """Point each notebook page at its current executed copy (see the module docstring)."""
    chosen = mode()
    missing = []
    for file in files:
        if not file.src_uri.endswith(".ipynb") or file.abs_src_path is None:
            continue
        if chosen == "stored":
            continue
        copy, why = executed_copy(Path(file.abs_src_path))
        if copy is None:
            missing.append(why)
            log.info("%s: rendered as stored, without outputs (%s)", file.src_uri, why)
            continue
        log.info("%s: rendered with its %s", file.src_uri, why)
        file.abs_src_path = str(copy)
    if missing and chosen == "executed":
        raise PluginError(
            f"${ENV}=executed: {len(missing)} notebook page(s) have no current executed copy "
            f"({'; '.join(missing)}); run `python -m pytest tests/test_notebooks.py`, which "
            f"writes them to {EXECUTED_DIR}, or unset ${ENV}"
        )
    return files
