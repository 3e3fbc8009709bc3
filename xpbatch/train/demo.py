"""Inputs of ``xpbatch encode-catalog --demo``: a mock store and a small model, built once.

Both are cached in the repository's ``xpbatch-demo/`` (or ``$XPBATCH_DEMO_DIR``; see
:func:`demo_dir`, which finds it from the repository root or any directory below it, such as
``notebooks/`` where Jupyter starts the notebooks): the first demo builds them
(the README says how long), later demos only encode. Every file is written atomically by the
module that owns it, and a half-built input is rebuilt, so killing a demo is harmless.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from xpbatch.config import TrainConfig
from xpbatch.errors import ModelFileError, StoreError

logger = logging.getLogger(__name__)

DEMO_DIR_ENV = "XPBATCH_DEMO_DIR"
"""Environment variable naming the demo's cache directory (default ``./xpbatch-demo``)."""
DEMO_ROWS = 200_000
"""Mock spectra in the demo store: enough to see the cluster work, quick to build."""
DEMO_SEED = 0
DEMO_CHUNK_ROWS = 16_384
"""Smaller than the store default so that the demo's 2-core cluster gets 13 tasks to share."""
DEMO_TRAINING = TrainConfig.from_toml(
    None,
    {
        "epochs": 3,
        "sample": 10_000,
        "cycle_epochs": 3,
        "early_stopping": None,
        "checkpoint_every": 1000,
        "seed": DEMO_SEED,
        "device": "cpu",
    },
    preset="quick",
)
"""The quick preset (``xpbatch train --preset quick``) cut to three epochs on a smaller sample:
a model that is quick to train and good enough to show (not for science: ``xpbatch train``
with the defaults reproduces the published run)."""


@dataclasses.dataclass(frozen=True)
class DemoInputs:
    """Where the demo's store, model and catalogue live."""

    root: Path
    store: Path
    model: Path
    catalog: Path


DEMO_DIR_NAME = "xpbatch-demo"


def demo_dir(start: str | os.PathLike[str] | None = None) -> Path:
    """The demo cache: ``$XPBATCH_DEMO_DIR``, else ``xpbatch-demo`` in the xpbatch checkout
    holding ``start`` (default: the working directory), else ``./xpbatch-demo``.

    The checkout is the nearest directory at or above ``start`` with an ``xpbatch-demo``
    directory or xpbatch's ``pyproject.toml``, so the demo, the README commands (run from the
    repository root) and the notebooks (started in ``notebooks/``) share one cache.
    """
    if DEMO_DIR_ENV in os.environ:
        return Path(os.environ[DEMO_DIR_ENV])
    here = Path(start if start is not None else Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / DEMO_DIR_NAME).is_dir() or _is_checkout(directory):
            return directory / DEMO_DIR_NAME
    return Path(DEMO_DIR_NAME)


def _is_checkout(directory: Path) -> bool:
    project = directory / "pyproject.toml"
    return project.is_file() and 'name = "xpbatch"' in project.read_text(errors="replace")


def demo_inputs(
    root: str | os.PathLike[str] | None = None,
    *,
    echo: Callable[[str], object] = logger.info,
) -> DemoInputs:
    """Build (only what is missing) and return the demo's inputs.

    Parameters
    ----------
    root
        Cache directory; default :func:`demo_dir`.
    echo
        Where to report what is being built (the CLI passes ``click.echo``).

    Examples
    --------
    >>> inputs = demo_inputs()  # doctest: +SKIP
    >>> inputs.store, inputs.model  # doctest: +SKIP
    (PosixPath('xpbatch-demo/mock-200k.zarr'), PosixPath('xpbatch-demo/demo-model.safetensors'))
    """
    base = Path(root) if root is not None else demo_dir()
    inputs = DemoInputs(
        root=base,
        store=base / f"mock-{DEMO_ROWS // 1000}k.zarr",
        model=base / "demo-model.safetensors",
        catalog=base / "demo-catalog.zarr",
    )
    base.mkdir(parents=True, exist_ok=True)
    if not store_ready(inputs.store):
        from xpbatch.mock import write_mock_store

        echo(f"building the demo store {inputs.store} ({DEMO_ROWS:,} mock spectra, once)…")
        if inputs.store.exists():  # half-built by a killed demo: it is our own cache, rebuild
            shutil.rmtree(inputs.store)
        write_mock_store(
            inputs.store, DEMO_ROWS, seed=DEMO_SEED, chunk_rows=DEMO_CHUNK_ROWS, overwrite=True
        )
    if not _model_ready(inputs.model):
        from xpbatch.train.stage import train_model

        echo(f"training the small demo model {inputs.model} (once)…")
        train_model(
            inputs.store,
            inputs.model,
            config=dataclasses.replace(DEMO_TRAINING, progress_bar=False, overwrite=True),
        )
    return inputs


def store_ready(path: Path) -> bool:
    """Whether ``path`` is a complete, valid XP store (else it is (re)built)."""
    from xpbatch import schema
    from xpbatch.store.reader import open_xp_store

    try:
        ds = open_xp_store(path)
    except (StoreError, FileNotFoundError):
        return False
    return schema.RA in ds  # a store from before positions is rebuilt with them


def _model_ready(path: Path) -> bool:
    from xpbatch.model.files import read_model_metadata

    try:
        read_model_metadata(path)
    except ModelFileError:
        return False
    return True
