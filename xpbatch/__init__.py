"""xpbatch: encode the Gaia DR3 BP/RP (XP) catalogue with a scatter VAE on Dask.

The public API is imported lazily so that ``import xpbatch`` (and ``xpbatch --help``) stays fast
and does not pull in torch or distributed until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_MODULES = {
    # stage entry points, in the order the data flows, and what each returns
    "xpbatch.mock": (
        "make_mock",
        "MockSummary",
        "write_mock_store",
        "write_mock_dr3_bulk",
        "read_mock_labels",
    ),
    "xpbatch.ingest": ("ingest_files", "ingest_table", "IngestSummary"),
    "xpbatch.store.xp_store": ("write_xp_store",),
    "xpbatch.store.reader": ("open_xp_store",),
    "xpbatch.train.stage": ("train_model",),
    "xpbatch.train.summary": ("TrainSummary",),
    "xpbatch.runtime.cluster": ("connect",),
    "xpbatch.encode.stage": ("encode_catalog", "EncodeSummary"),
    "xpbatch.encode.kernel": ("encode_chunk", "encode_arrays", "EncodeResult"),
    "xpbatch.encode.mc": ("MonteCarlo",),
    "xpbatch.catalog.zarr_catalog": ("open_catalog",),
    "xpbatch.catalog.verify": ("verify_catalog", "VerifyReport"),
    "xpbatch.products.parquet_export": ("export_parquet", "ParquetExportSummary"),
    "xpbatch.products.hats_export": ("export_hats", "HatsExportSummary"),
    "xpbatch.products.neighbours": ("find_neighbours", "write_neighbours"),
    "xpbatch.products.sky_maps": (
        "compute_sky_maps",
        "draw_sky_maps",
        "write_sky_maps",
        "SkyMaps",
    ),
    "xpbatch.products.plots": ("plot_spectrum", "plot_latents", "save_figure"),
    "xpbatch.products.spectra": ("sample_spectra", "SampledSpectra"),
    "xpbatch.products.anomalies": ("top_anomalies",),
    # the model and its file
    "xpbatch.model.network": ("ScatterVAE",),
    "xpbatch.model.files": ("TrainedModel", "save_model", "load_model", "import_xpvae"),
    # every stage's options
    "xpbatch.config": (
        "ClusterConfig",
        "EncodeConfig",
        "HatsExportConfig",
        "IngestConfig",
        "MockConfig",
        "ModelConfig",
        "NeighboursConfig",
        "OutputOptions",
        "ParquetExportConfig",
        "SkyMapConfig",
        "TrainConfig",
    ),
    # every error, each also a built-in exception (ValueError, FileNotFoundError, ...)
    "xpbatch.errors": (
        "XPBatchError",
        "CatalogError",
        "ChecksumError",
        "ChunkError",
        "ClusterError",
        "ClusterUnavailableError",
        "ConfigError",
        "InputShapeError",
        "MissingExtraError",
        "ModelFileError",
        "ModelMismatchError",
        "OutputExistsError",
        "OutputLockedError",
        "ParseError",
        "ResumeRefusedError",
        "StorageError",
        "StorageNotFoundError",
        "ConditionalWriteError",
        "StoreError",
        "StoreNotFoundError",
        "TrainingError",
    ),
}
_API = {name: module for module, names in _MODULES.items() for name in names}
"""Public name -> the module that defines it (imported on first use)."""

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'xpbatch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
