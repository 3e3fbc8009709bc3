"""Every exception xpbatch raises on purpose.

Each class also inherits the matching built-in, so ``except ValueError`` keeps working for
callers who do not know about xpbatch (the zarr-python v3 habit).
"""

from __future__ import annotations


class XPBatchError(Exception):
    """Base class of all xpbatch errors."""


class ConfigError(XPBatchError, ValueError):
    """An option or configuration value is invalid."""


class InputShapeError(XPBatchError, ValueError):
    """Arrays handed to xpbatch do not have the expected shapes."""


class ModelFileError(XPBatchError, ValueError):
    """A model file is missing, truncated, tampered with, or of another architecture."""


class StoreError(XPBatchError, ValueError):
    """An XP store does not follow the schema in :mod:`xpbatch.schema`."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """An XP store or catalogue path does not exist."""


class ParseError(XPBatchError, ValueError):
    """A DR3 input file is malformed; the message names file, line and reason."""


class ChecksumError(XPBatchError, ValueError):
    """A file does not match the checksum recorded for it."""


class CatalogError(XPBatchError, ValueError):
    """An output catalogue is incomplete, corrupted or belongs to another run."""


class ResumeRefusedError(CatalogError):
    """``--resume`` was asked for, but the existing output belongs to a different run."""


class OutputExistsError(XPBatchError, FileExistsError):
    """The output path exists and neither ``--resume`` nor ``--overwrite`` was given."""


class ModelMismatchError(XPBatchError, ValueError):
    """A model does not fit the data it is asked to encode (input size, units, normalisation)."""


class ChunkError(XPBatchError, RuntimeError):
    """Processing one chunk failed; the message names the chunk and the path."""


class TrainingError(XPBatchError, RuntimeError):
    """Training cannot start or had to stop (empty selection, NaN loss, ...)."""


class ClusterError(XPBatchError, RuntimeError):
    """A Dask cluster could not be created or reached (e.g. dask-cuda or a GPU missing)."""


class ClusterUnavailableError(ClusterError):
    """The cluster could not be started or reached at all, so no work began (no --resume hint)."""


class OutputLockedError(XPBatchError, RuntimeError):
    """Another run holds the output's lock; the message names it (run id, host, pid, start)."""


class StorageError(XPBatchError, OSError):
    """Object storage refused or failed a request (credentials, bucket, endpoint); the message
    names the URL, never a secret."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """No object or output exists at a storage location."""


class ConditionalWriteError(StorageError):
    """An object store ignores conditional writes (If-None-Match / If-Match), so one writer per
    output cannot be guaranteed there."""


class MissingExtraError(XPBatchError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""
