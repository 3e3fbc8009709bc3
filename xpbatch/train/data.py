"""Which rows of an XP store training uses, and their normalisation (:mod:`xpbatch.train.feed`
brings them to the device).

Everything here reads the store one Zarr chunk at a time. Memory grows by one bit per store row
(the usable-row masks) plus the positions of the selected rows, which the model file records
anyway; nothing else depends on the store's size.

Which rows are usable for training
----------------------------------
A row is excluded (and counted by reason) when its G flux is missing or not positive: without it
the input recipe is undefined. By default rows with a missing band or non-finite values are
excluded too, as in the published training set (which dropped every row with a NaN); with
``partial_rows=True`` they are kept and their invalid coefficients are masked in the loss (rows
with both bands missing are always excluded: nothing is left to learn from).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from xpbatch import schema
from xpbatch.errors import ConfigError, TrainingError
from xpbatch.model.trained import Normalisation, _isin_sorted
from xpbatch.schema import InputFlag

if TYPE_CHECKING:
    import xarray as xr

    from xpbatch.config import TrainConfig

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(x, x_err, valid) on the device: (rows, input) float32 each; valid is None when all valid."""

EXCLUDING_FLAGS = (
    InputFlag.G_FLUX_MISSING,
    InputFlag.BP_MISSING,
    InputFlag.RP_MISSING,
    InputFlag.NON_FINITE,
)
"""Input flags that can exclude a row from training, in the order they are reported."""

# Seed streams: numpy/torch generators are seeded with (seed, purpose[, epoch]) so that each
# purpose and each epoch has its own independent stream (resuming at an epoch is exact).
_SAMPLE, _SPLIT, _EPOCH = 1, 2, 3


def rng_for(seed: int, *purpose: int) -> np.random.Generator:
    """A numpy generator of its own for ``(seed, *purpose)``."""
    return np.random.default_rng([seed, *purpose])


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle and latent draws (63 bits, for torch.Generator)."""
    words = np.random.SeedSequence([seed, _EPOCH, epoch]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def unusable_flags(partial_rows: bool) -> InputFlag:
    """The input flags that exclude a row from training."""
    if partial_rows:
        return InputFlag.G_FLUX_MISSING
    return functools.reduce(operator.or_, EXCLUDING_FLAGS)


# --- reading the store chunk by chunk ---------------------------------------------------------
def row_chunks(ds: xr.Dataset) -> list[tuple[int, int]]:
    """(start, stop) of every chunk along ``source``."""
    sizes = ds[schema.COEFFICIENTS].chunksizes.get(schema.SOURCE)
    if not sizes:  # not dask-backed: one block
        n = ds.sizes[schema.SOURCE]
        return [(0, n)] if n else []
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def read_rows(ds: xr.Dataset, names: tuple[str, ...], start: int, stop: int) -> list[np.ndarray]:
    """The given variables over rows ``start:stop`` as numpy arrays (one chunk, read serially)."""
    import dask

    part = ds[list(names)].isel({schema.SOURCE: slice(start, stop)})
    # A synchronous read: no thread pool per chunk, and never a Dask client that happens to be
    # the default in the caller's session.
    arrays = dask.compute(*[part[name].data for name in names], scheduler="synchronous")
    return [np.asarray(a) for a in arrays]


@dataclass(frozen=True)
class RowBlock:
    """Some rows of one chunk: their store positions and their raw values."""

    positions: np.ndarray  # (rows,) int64
    coefficients: np.ndarray  # (rows, input) float32, e-/s
    coefficient_errors: np.ndarray  # (rows, input) float32, e-/s
    phot_g_mean_flux: np.ndarray  # (rows,) float64, e-/s


_VALUES = (schema.COEFFICIENTS, schema.COEFFICIENT_ERRORS, schema.PHOT_G_MEAN_FLUX)


def _position_spans(positions: np.ndarray, chunks: list[tuple[int, int]]) -> list[slice]:
    """For each chunk, the slice of the sorted ``positions`` that fall in it."""
    starts = np.searchsorted(positions, [a for a, _ in chunks])
    stops = np.searchsorted(positions, [b for _, b in chunks])
    return [slice(int(i), int(j)) for i, j in zip(starts, stops, strict=True)]


def iter_blocks(
    ds: xr.Dataset,
    positions: np.ndarray,
    chunks: list[tuple[int, int]],
    order: np.ndarray | None = None,
) -> Iterator[RowBlock]:
    """The rows at sorted ``positions``, one :class:`RowBlock` per chunk that holds any of them.

    ``order`` visits the chunks in another order (indices into ``chunks``).
    """
    spans = _position_spans(positions, chunks)
    for i in range(len(chunks)) if order is None else order:
        rows = positions[spans[i]]
        if rows.size == 0:
            continue
        start, stop = chunks[i]
        c, e, g = read_rows(ds, _VALUES, start, stop)
        local = rows - start
        yield RowBlock(rows, c[local], e[local], g[local])


# --- selection ------------------------------------------------------------------------------
def read_source_id_file(path: str | Path) -> np.ndarray:
    """Source ids listed in a file: Parquet (column ``source_id``) or text/CSV.

    A text file has one id per line, or comma-separated columns under a header line that names
    ``source_id``; blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"source-id file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=[schema.SOURCE_ID])[0].to_numpy().astype(np.int64)
        except (KeyError, ValueError, OSError) as e:
            raise ConfigError(f"cannot read column source_id from {path}: {e}") from e
    column = 0
    ids: list[int] = []
    try:
        text_lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"source-id file {path} is not text (byte {e.start} is not UTF-8): give a text file "
            "of source ids, one per line or a CSV column 'source_id', or a Parquet file"
        ) from None
    for number, line in enumerate(text_lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = [f.strip() for f in text.split(",")]
        if not ids and schema.SOURCE_ID in fields:  # header line
            column = fields.index(schema.SOURCE_ID)
            continue
        try:
            ids.append(int(fields[column]))
        except (ValueError, IndexError):
            raise ConfigError(
                f"{path}, line {number}: expected a source_id (an integer) in column "
                f"{column + 1}, found {text[:60]!r}"
            ) from None
    return np.asarray(ids, dtype=np.int64)


@dataclass(frozen=True)
class Selection:
    """The store rows training uses, split into training and validation rows."""

    train: np.ndarray  # (n_train,) int64 store positions, ascending
    validation: np.ndarray  # (n_validation,) int64 store positions, ascending
    train_source_id: np.ndarray  # (n_train,) int64
    validation_source_id: np.ndarray  # (n_validation,) int64
    counts: dict[str, int] = field(default_factory=dict)
    """store_rows, candidates, excluded (and excluded_<flag> per reason), selected, train,
    validation; with a source-id file also requested_source_ids, duplicate_source_ids and
    unknown_source_ids."""

    def fingerprint(self) -> str:
        """sha256 of the split: which sources are training and which validation rows."""
        digest = hashlib.sha256(np.ascontiguousarray(self.train_source_id).tobytes())
        digest.update(b"|")
        digest.update(np.ascontiguousarray(self.validation_source_id).tobytes())
        return digest.hexdigest()


def _effective_flags(flags: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The store's flags, plus G_FLUX_MISSING wherever the flux is not finite and positive."""
    with np.errstate(invalid="ignore"):
        bad_g = ~(np.isfinite(g) & (g > 0))
    return flags | np.where(bad_g, np.uint8(InputFlag.G_FLUX_MISSING), np.uint8(0))


def select_rows(
    ds: xr.Dataset,
    config: TrainConfig,
    *,
    wanted_source_id: np.ndarray | None = None,
) -> Selection:
    """Find the usable rows (optionally among ``wanted_source_id``), sample and split them.

    Raises
    ------
    TrainingError
        When fewer than two rows remain for training; the message gives the counts.
    """
    unusable = unusable_flags(config.partial_rows)
    both_bands = np.uint8(InputFlag.BP_MISSING | InputFlag.RP_MISSING)
    counts = {"store_rows": int(ds.sizes[schema.SOURCE]), "candidates": 0, "excluded": 0}
    counts.update({f"excluded_{flag.name.lower()}": 0 for flag in EXCLUDING_FLAGS})  # type: ignore[union-attr]
    wanted = None
    if wanted_source_id is not None:
        wanted = np.unique(wanted_source_id)
        counts["requested_source_ids"] = int(wanted_source_id.size)
        counts["duplicate_source_ids"] = int(wanted_source_id.size - wanted.size)
    matched = 0
    usable_bits: list[np.ndarray] = []  # per chunk, packed 8 rows a byte: memory ~ rows / 8
    chunks = row_chunks(ds)
    for start, stop in chunks:
        sid, flags, g = read_rows(
            ds, (schema.SOURCE_ID, schema.INPUT_FLAGS, schema.PHOT_G_MEAN_FLUX), start, stop
        )
        candidate = np.ones(sid.shape, bool) if wanted is None else _isin_sorted(sid, wanted)
        matched += int(candidate.sum())
        flags = _effective_flags(flags, g)
        excluded = candidate & (
            ((flags & np.uint8(unusable)) != 0) | ((flags & both_bands) == both_bands)
        )
        for flag in EXCLUDING_FLAGS:
            has = (flags & np.uint8(flag)) != 0
            counts[f"excluded_{flag.name.lower()}"] += int((excluded & has).sum())  # type: ignore[union-attr]
        usable_bits.append(np.packbits(candidate & ~excluded))
        counts["excluded"] += int(excluded.sum())
    counts["candidates"] = matched
    if wanted is not None:
        counts["unknown_source_ids"] = int(wanted.size - matched)
    selected = _sample(usable_bits, chunks, config, counts)
    return _split(ds, selected, chunks, config, counts)


def _describe(counts: dict[str, int]) -> str:
    """A one-line account of where the rows went, for errors and logs."""
    reasons = ", ".join(
        f"{k.removeprefix('excluded_')}: {v}"
        for k, v in counts.items()
        if k.startswith("excluded_") and v
    )
    text = f"the store has {counts['store_rows']} rows"
    if "requested_source_ids" in counts:
        text += (
            f"; the source-id file lists {counts['requested_source_ids']} ids "
            f"({counts['duplicate_source_ids']} duplicates), {counts['unknown_source_ids']} of "
            "them not in the store"
        )
    text += f"; {counts['candidates']} candidate rows, {counts['excluded']} excluded as unusable"
    return text + (f" ({reasons})" if reasons else "")


def _sample(
    usable_bits: list[np.ndarray],
    chunks: list[tuple[int, int]],
    config: TrainConfig,
    counts: dict[str, int],
) -> np.ndarray:
    """Positions of all usable rows, or of a seeded sample of ``config.sample`` of them.

    The sample is drawn as ranks among the usable rows, so only the sampled positions are ever
    held in memory, not those of every usable row of the store.
    """
    n_usable = counts["candidates"] - counts["excluded"]
    ranks = None
    if config.sample is not None:
        if config.sample > n_usable:
            raise TrainingError(
                f"asked for a sample of {config.sample} rows but only {n_usable} usable rows "
                f"were found ({_describe(counts)}); lower --sample or leave it out"
            )
        pick = rng_for(config.seed, _SAMPLE).choice(n_usable, size=config.sample, replace=False)
        ranks = np.sort(pick)
    parts = [np.empty(0, np.int64)]
    first_rank = 0  # rank of the first usable row of the chunk
    for (start, stop), bits in zip(chunks, usable_bits, strict=True):
        rows = np.flatnonzero(np.unpackbits(bits, count=stop - start)) + start
        if ranks is not None:
            lo, hi = np.searchsorted(ranks, [first_rank, first_rank + rows.size])
            picked = rows[ranks[lo:hi] - first_rank]
            first_rank += rows.size
            rows = picked
        parts.append(rows)
    return np.concatenate(parts)


def _split(
    ds: xr.Dataset,
    selected: np.ndarray,
    chunks: list[tuple[int, int]],
    config: TrainConfig,
    counts: dict[str, int],
) -> Selection:
    """Seeded training/validation split of the selected positions."""
    n = int(selected.size)
    n_val = round(config.validation_fraction * n)
    if config.validation_fraction > 0 and n >= 3:
        n_val = max(n_val, 1)
    if n - n_val < 2:
        raise TrainingError(
            f"nothing to train on: {n} usable rows selected, {n - n_val} left for training after "
            f"the validation split, at least 2 needed ({_describe(counts)}). Check the selection "
            "(--source-ids, --sample) and the store's input_flags."
        )
    order = rng_for(config.seed, _SPLIT).permutation(n)
    validation = np.sort(selected[order[:n_val]])
    train = np.sort(selected[order[n_val:]])
    counts.update(selected=n, train=int(train.size), validation=int(validation.size))
    logger.info(
        "training selection: %s; %d train, %d validation rows",
        _describe(counts),
        train.size,
        validation.size,
    )
    return Selection(
        train=train,
        validation=validation,
        train_source_id=_source_ids(ds, train, chunks),
        validation_source_id=_source_ids(ds, validation, chunks),
        counts=counts,
    )


def _source_ids(ds: xr.Dataset, positions: np.ndarray, chunks: list[tuple[int, int]]) -> np.ndarray:
    """source_id at sorted store positions, read chunk by chunk."""
    out = np.empty(positions.size, np.int64)
    for (start, stop), span in zip(chunks, _position_spans(positions, chunks), strict=True):
        if span.stop > span.start:
            (sid,) = read_rows(ds, (schema.SOURCE_ID,), start, stop)
            out[span] = sid[positions[span] - start]
    return out


# --- normalisation --------------------------------------------------------------------------
class _Moments:
    """Per-column count, mean and sum of squared deviations, merged chunk by chunk.

    Chan et al.'s pairwise update in float64: numerically stable whatever the number of rows
    or the offset of the values (a naive sum of squares loses everything to cancellation).
    """

    def __init__(self, n_columns: int) -> None:
        self.count = np.zeros(n_columns)
        self.mean = np.zeros(n_columns)
        self.m2 = np.zeros(n_columns)

    def add(self, values: np.ndarray, valid: np.ndarray) -> None:
        """Merge the valid entries of ``values`` (rows, columns)."""
        n_b = valid.sum(axis=0).astype(np.float64)
        safe = np.maximum(n_b, 1)
        mean_b = np.where(valid, values, 0).sum(axis=0) / safe
        m2_b = (np.where(valid, values - mean_b, 0) ** 2).sum(axis=0)
        total = self.count + n_b
        delta = mean_b - self.mean
        weight = np.divide(n_b, total, out=np.zeros_like(total), where=total > 0)
        self.mean = self.mean + delta * weight
        self.m2 = self.m2 + m2_b + delta**2 * self.count * weight
        self.count = total

    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0, like numpy's default)."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))


def compute_normalisation(
    ds: xr.Dataset, positions: np.ndarray, chunks: list[tuple[int, int]]
) -> Normalisation:
    """Per-coefficient mean and std of ``coefficients / phot_g_mean_flux`` over the given rows.

    Streamed chunk by chunk; coefficients that are not valid (NaN, or a non-positive error)
    are left out of their column's statistics.
    """
    moments: _Moments | None = None
    for block in iter_blocks(ds, positions, chunks):
        c = block.coefficients.astype(np.float64)
        e = block.coefficient_errors
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(c) & np.isfinite(e) & (e > 0)
            y = c / block.phot_g_mean_flux[:, None]
        if moments is None:
            moments = _Moments(c.shape[1])
        moments.add(y, valid)
    if moments is None:
        raise TrainingError("cannot compute the normalisation: no training rows")
    std = moments.std()
    bad = np.flatnonzero((moments.count < 2) | ~(std > 0) | ~np.isfinite(moments.mean))
    if bad.size:
        labels = [str(ds[schema.COEFF].values[i]) for i in bad[:5]]
        raise TrainingError(
            f"cannot standardise coefficient(s) {', '.join(labels)}: fewer than two "
            "valid values or zero spread among the training rows; select more (or other) rows"
        )
    return Normalisation(moments.mean, std)
