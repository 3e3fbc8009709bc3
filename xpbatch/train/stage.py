"""Fit the scatter VAE on an XP store, on one device (``xpbatch train``).

:func:`train_model` selects the rows (:mod:`xpbatch.train.data`), keeps them on the device or
streams them (:mod:`xpbatch.train.feed`), trains (:mod:`xpbatch.train.loop`) and writes the model
file (:mod:`xpbatch.train.model_file`).

Files written beside the model ``MODEL.safetensors``:

- ``MODEL.metrics.jsonl``: one JSON record per epoch (the fields of
  :class:`~xpbatch.train.summary.EpochRecord`);
- ``MODEL.checkpoint.safetensors``: the resumable state (:mod:`xpbatch.train.checkpoints`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from xpbatch.config import TrainConfig
from xpbatch.model.device import resolve_device
from xpbatch.model.trained import Normalisation
from xpbatch.storage.location import Location
from xpbatch.storage.manifest import real_output
from xpbatch.storage.outputs import locked_output
from xpbatch.store.reader import open_xp_store, store_id
from xpbatch.train.checkpoints import RunPaths, _claim_outputs, _fingerprint, _flat, _TrainingState
from xpbatch.train.data import (
    Selection,
    compute_normalisation,
    read_source_id_file,
    row_chunks,
    select_rows,
)
from xpbatch.train.feed import ResidentRows, StreamedRows
from xpbatch.train.loop import Rows, _Loop, _matmul_precision
from xpbatch.train.model_file import _write_model
from xpbatch.train.summary import EpochRecord, TrainSummary, _rewrite_metrics

if TYPE_CHECKING:
    import xarray as xr


logger = logging.getLogger(__name__)


@locked_output("out", "train")
def train_model(
    store: str | os.PathLike[str] | Location | xr.Dataset,
    out: str | os.PathLike[str],
    *,
    config: TrainConfig | None = None,
) -> TrainSummary:
    """Fit a scatter VAE on the usable rows of an XP store and write the model file.

    Parameters
    ----------
    store
        An XP store path or ``s3://`` URL (``xpbatch ingest``/``mock``/``write_xp_store``) or
        the dataset :func:`xpbatch.open_xp_store` returned.
    out
        Model file to write (``.safetensors``); the checkpoint and the metrics file go beside it.
    config
        Optimisation, selection and device settings, and ``resume`` (continue from the
        checkpoint beside ``out``; refused if the store, the split or a setting that changes
        the result differs; ``epochs`` may be raised), ``overwrite`` and ``progress_bar``. The
        default is the published run (5000 epochs, AdamW 1e-4, cosine warm restarts every 500
        epochs, batch 1024). Training runs on one device, so there is no ``client``.

    Returns
    -------
    TrainSummary
        One :class:`EpochRecord` per epoch (those before a resume included).

    Raises
    ------
    TrainingError
        Nothing left to train on (the message counts the rows excluded and why), no CUDA device
        when one was asked for, a checkpoint that does not belong to this run, or a loss that
        became NaN (the last good state is kept in the checkpoint).
    OutputExistsError
        The model or its checkpoint exists and neither ``resume`` nor ``overwrite`` was given.
    KeyboardInterrupt
        After writing a checkpoint of the last completed epoch; ``resume=True`` continues it.

    Examples
    --------
    >>> from xpbatch.config import TrainConfig, result_options
    >>> history = train_model("mock.zarr", "model.safetensors",
    ...                       config=TrainConfig(epochs=20))  # doctest: +SKIP
    >>> history.validation_loss[-1]  # doctest: +SKIP
    """
    config = config or TrainConfig()
    paths = RunPaths.for_model(real_output(out))
    run = _claim_outputs(paths, config)
    device = resolve_device(config.device, precision=config.precision)
    started = time.perf_counter()
    ds = store if not isinstance(store, str | os.PathLike | Location) else open_xp_store(store)
    wanted = read_source_id_file(config.source_ids) if config.source_ids else None
    selection = select_rows(ds, config, wanted_source_id=wanted)
    if selection.counts.get("unknown_source_ids"):
        logger.warning(
            "%d of the source ids in %s are not in the store and were skipped",
            selection.counts["unknown_source_ids"],
            config.source_ids,
        )
    chunks = row_chunks(ds)
    normalisation = compute_normalisation(ds, selection.train, chunks)
    train_rows, validation_rows = _feed(ds, selection, chunks, normalisation, device, config)
    prepare_s = time.perf_counter() - started

    state = _TrainingState.new(config, device)
    fingerprint = _fingerprint(store_id(ds), selection, config, device, train_rows.placement)
    records: list[EpochRecord] = []
    if run.resumed:
        run.fingerprint = _flat(fingerprint)
        records = state.load_checkpoint(paths.checkpoint, run, epochs=config.epochs)
    _rewrite_metrics(paths.metrics, records)
    with _matmul_precision(config.precision):
        epochs_resumed = len(records)
        loop = _Loop(config, state, paths, fingerprint, progress=config.progress_bar)
        records = loop.run(train_rows, validation_rows, records)
    timings = {"prepare_s": prepare_s, "train_s": sum(r.seconds for r in records)}
    _write_model(
        state.network,
        normalisation,
        paths.model,
        train_rows,
        selection,
        records,
        config=config,
        store=ds,
        device=device,
        timings=timings,
    )
    return TrainSummary(
        records=records,
        model_path=paths.model,
        checkpoint_path=paths.checkpoint,
        metrics_path=paths.metrics,
        counts=dict(selection.counts),
        device=str(device),
        data_placement=train_rows.placement,
        epochs_resumed=epochs_resumed,
        wall_s=time.perf_counter() - started,
        stopped_early=loop.stopped,
    )


def _free_memory(device: torch.device) -> int:
    """Bytes free on the device (available host memory for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume it fits
        return 1 << 62


def _feed(
    ds: xr.Dataset,
    selection: Selection,
    chunks: list[tuple[int, int]],
    normalisation: Normalisation,
    device: torch.device,
    config: TrainConfig,
) -> tuple[Rows, Rows]:
    """Training and validation rows, resident on the device when they fit, else streamed."""
    n_rows = selection.train.size + selection.validation.size
    needed = n_rows * normalisation.mean.size * (4 + 4 + 1)  # x, x_err float32 and a mask
    placement = config.data_placement
    if placement == "auto":
        budget = config.device_memory_fraction * _free_memory(device)
        placement = "device" if needed <= budget else "stream"
    logger.info("%d rows (%.2f GB) on %s: %s", n_rows, needed / 1e9, device, placement)
    sets: list[Rows] = []
    for positions in (selection.train, selection.validation):
        if placement == "device":
            sets.append(ResidentRows.load(ds, positions, chunks, normalisation, device))
        else:
            sets.append(
                StreamedRows(
                    ds,
                    positions,
                    chunks,
                    normalisation,
                    device,
                    shuffle_chunks=config.shuffle_chunks,
                )
            )
    return sets[0], sets[1]
