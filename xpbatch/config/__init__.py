"""Frozen configuration dataclasses, one per stage; the single home of every default.

Standard library only, so ``import xpbatch.config`` (and ``xpbatch --help``) stays instant.
Each field's docstring is the help text of the CLI option generated from it
(:mod:`xpbatch.cli.options`), so it is plain text, without reStructuredText markup.

Every name is imported from here (``from xpbatch.config import IngestConfig``); the modules
hold them by job: :mod:`~xpbatch.config.fields` what every config shares (building one from a
mapping or a TOML file, ``Literal`` choices, the run-control fields, ``OutputOptions``, the
torch ``Device``), :mod:`~xpbatch.config.cluster` the Dask cluster,
:mod:`~xpbatch.config.ingest`, :mod:`~xpbatch.config.mock`, :mod:`~xpbatch.config.train` (with
the network's architecture and the presets) and :mod:`~xpbatch.config.encode` one stage each,
and :mod:`~xpbatch.config.products` the exports, neighbours and sky maps.
"""

from xpbatch.config.cluster import CLUSTER_LOCAL_CUDA, GPU_THREADS_PER_WORKER, ClusterConfig
from xpbatch.config.encode import EncodeConfig
from xpbatch.config.fields import (
    DEVICES,
    RUN_CONTROL_FIELDS,
    C,
    Device,
    OutputOptions,
    did_you_mean,
    field_choices,
    from_mapping,
    read_toml,
    result_options,
)
from xpbatch.config.ingest import DEFAULT_CHUNK_ROWS, IngestConfig
from xpbatch.config.mock import MOCK_ROWS_PER_FILE, MockConfig
from xpbatch.config.products import (
    HatsExportConfig,
    NeighboursConfig,
    ParquetExportConfig,
    SkyMapConfig,
)
from xpbatch.config.train import TRAIN_PRESETS, ModelConfig, TrainConfig, TrainPreset

__all__ = [
    "CLUSTER_LOCAL_CUDA",
    "DEFAULT_CHUNK_ROWS",
    "DEVICES",
    "GPU_THREADS_PER_WORKER",
    "MOCK_ROWS_PER_FILE",
    "RUN_CONTROL_FIELDS",
    "TRAIN_PRESETS",
    "C",
    "ClusterConfig",
    "Device",
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
    "TrainPreset",
    "did_you_mean",
    "field_choices",
    "from_mapping",
    "read_toml",
    "result_options",
]
