"""xpbatch: encode the Gaia DR3 BP/RP (XP) catalogue with a scatter VAE on Dask.

The public API is imported lazily so that ``import xpbatch`` (and ``xpbatch --help``) stays fast
and does not pull in torch or distributed until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "ScatterVAE": "xpbatch.model",
    "ModelConfig": "xpbatch.config",
    "TrainConfig": "xpbatch.config",
    "TrainedModel": "xpbatch.artifact",
    "save_model": "xpbatch.artifact",
    "load_model": "xpbatch.artifact",
    "import_xpvae": "xpbatch.artifact",
    "write_xp_store": "xpbatch.store",
    "open_xp_store": "xpbatch.store",
    "MockConfig": "xpbatch.config",
    "write_mock_store": "xpbatch.mock",
    "write_mock_dr3_bulk": "xpbatch.mock",
    "read_mock_labels": "xpbatch.mock",
    "ingest_files": "xpbatch.ingest",
    "ingest_table": "xpbatch.ingest",
    "train_model": "xpbatch.train",
    "encode_catalog": "xpbatch.pipeline",
    "open_catalog": "xpbatch.catalog",
    "verify_catalog": "xpbatch.catalog",
    "find_neighbours": "xpbatch.neighbours",
    "HatsExportConfig": "xpbatch.config",
    "export_hats": "xpbatch.hats_export",
    "compute_sky_maps": "xpbatch.skymap",
    "draw_sky_maps": "xpbatch.skymap",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'xpbatch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
