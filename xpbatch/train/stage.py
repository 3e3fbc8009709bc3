"""Fit the scatter VAE on an XP store, on one device (``xpbatch train``).

The loop knows nothing about where the rows live (:mod:`xpbatch.train.feed` hands it batches
already on the device) nor about the network's insides (:mod:`xpbatch.model.network`).

Files written beside the model ``MODEL.safetensors``:

- ``MODEL.metrics.jsonl``: one JSON record per epoch (the fields of :class:`EpochRecord`);
- ``MODEL.checkpoint.safetensors``: the resumable state. Tensors: the weights and the AdamW
  moments; JSON metadata: completed epochs, optimizer hyperparameters, scheduler state, the
  history and a fingerprint of the run (store, split, settings). Loaded with safetensors, so
  nothing is ever unpickled.

Every epoch's shuffle and latent draws come from generators seeded with ``(seed, epoch)``, so a
run resumed from a checkpoint continues exactly as if it had never stopped (bitwise on CPU).
Per step there is no host-device synchronisation: losses are summed on the device and read once
per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from xpbatch.config import TrainConfig, result_options
from xpbatch.errors import TrainingError, XPBatchError
from xpbatch.model import fit_check as fit
from xpbatch.model.density import LatentDensity, fit_density, latent_kl
from xpbatch.model.device import resolve_device
from xpbatch.model.files import runtime_versions, save_model, write_safetensors
from xpbatch.model.network import ScatterVAE, VAEOutput, reconstruction_rmse, scatter_vae_loss
from xpbatch.model.trained import Normalisation, TrainedModel
from xpbatch.storage.location import Location
from xpbatch.storage.manifest import (
    COMPLETE,
    FINGERPRINT,
    KIND,
    RunManifest,
    RunRecord,
    real_output,
)
from xpbatch.storage.outputs import locked_output
from xpbatch.store.reader import open_xp_store, store_id
from xpbatch.train.data import (
    Batch,
    Selection,
    compute_normalisation,
    epoch_seed,
    read_source_id_file,
    row_chunks,
    select_rows,
)
from xpbatch.train.feed import ResidentRows, StreamedRows

if TYPE_CHECKING:
    import xarray as xr

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "xpbatch-train-checkpoint"
CHECKPOINT_VERSION = 1
EVAL_BATCH_SIZE = 16384
"""Rows per forward pass when evaluating (validation loss, latent statistics)."""

# Settings that change the result: a checkpoint only resumes under the same ones. (epochs,
# checkpoint_every and the device options may change; sample and source_ids are covered by the
# fingerprint of the split.)
_RESULT_KEYS = (
    "learning_rate",
    "weight_decay",
    "cycle_epochs",
    "min_learning_rate",
    "batch_size",
    "kl_weight",
    "seed",
    "validation_fraction",
    "partial_rows",
    "model",
)


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did; one line of the metrics file."""

    epoch: int
    """Epochs completed, counting this one (1-based)."""
    train_loss: float
    """Mean training loss over the epoch's batches (with latent sampling, train-mode BatchNorm)."""
    validation_loss: float | None
    """Loss on the validation rows at the posterior mean, eval-mode BatchNorm (None: no rows)."""
    validation_weighted_mse: float | None
    """The weighted-MSE term of the validation loss."""
    validation_kld: float | None
    """The KL term of the validation loss."""
    learning_rate: float
    """Learning rate during this epoch."""
    train_seconds: float
    """Wall time of the training batches (validation excluded)."""
    samples_per_s: float
    """Training rows per second of ``train_seconds``."""
    seconds: float
    """Wall time of the whole epoch, validation and bookkeeping included."""


@dataclass(frozen=True)
class TrainSummary:
    """What :func:`train_model` did: per-epoch records and where everything was written;
    ``str()`` is what ``xpbatch train`` prints."""

    records: list[EpochRecord]
    model_path: Path
    checkpoint_path: Path
    metrics_path: Path
    counts: dict[str, int]
    """Row accounting of the selection (see :class:`xpbatch.train.data.Selection`)."""
    device: str
    data_placement: str
    """'device' (rows resident on the device) or 'stream' (read from the store every epoch)."""
    epochs_resumed: int = 0
    """Epochs an earlier run had done (``resume``), taken from its checkpoint."""
    wall_s: float = 0.0
    """Wall time of this run (reading the store, training, writing the model)."""
    stopped_early: str | None = None
    """When and why early stopping ended the run (``records`` end at the kept epoch); None
    when every epoch ran."""

    def __str__(self) -> str:
        counts = self.counts
        resumed = f" ({self.epochs_resumed} from the checkpoint)" if self.epochs_resumed else ""
        lines = [
            f"model          {self.model_path}",
            f"epochs         {len(self.records)}{resumed} on {self.device} ({self.data_placement})",
            f"rows           {counts['train']:,} training, {counts['validation']:,} validation",
        ]
        if counts.get("excluded"):
            reasons = ", ".join(
                f"{k.removeprefix('excluded_')} {v:,}"
                for k, v in counts.items()
                if k.startswith("excluded_") and v
            )
            lines.append(f"rows excluded  {counts['excluded']:,} unusable ({reasons})")
        if counts.get("unknown_source_ids"):
            n = counts["unknown_source_ids"]
            lines.append(f"source ids     {n:,} listed source ids are not in the store")
        if self.records:
            last = self.records[-1]
            validation = "-" if last.validation_loss is None else f"{last.validation_loss:.4g}"
            lines.append(f"final loss     train {last.train_loss:.4g}, validation {validation}")
        if self.stopped_early:
            lines.append(f"stopped        {self.stopped_early}")
        hint = self.hint()
        if hint:
            lines.append(f"hint           {hint}")
        lines += [
            f"wall time      {self.wall_s:.1f} s",
            f"metrics        {self.metrics_path}",
            f"checkpoint     {self.checkpoint_path}",
        ]
        return "\n".join(lines)

    def hint(self) -> str | None:
        """Advice when the final validation loss is above its best (the run overfitted or
        diverged); None otherwise."""
        losses = self.validation_loss
        if self.stopped_early or not np.isfinite(losses).any():
            return None
        best = int(np.nanargmin(losses))
        if best == len(losses) - 1 or not losses[-1] > losses[best]:
            return None
        return (
            f"the validation loss rose after epoch {best + 1} ({losses[best]:.4g} -> "
            f"{losses[-1]:.4g}): try --early-stopping 5, a lower --learning-rate, or "
            "--preset quick for a first model"
        )

    @property
    def train_loss(self) -> np.ndarray:
        """(epochs,) mean training loss per epoch."""
        return np.array([r.train_loss for r in self.records])

    @property
    def validation_loss(self) -> np.ndarray:
        """(epochs,) validation loss per epoch (NaN without validation rows)."""
        return np.array(
            [np.nan if r.validation_loss is None else r.validation_loss for r in self.records]
        )


class Rows(Protocol):
    """What the loop needs of a set of rows (:class:`ResidentRows` or :class:`StreamedRows`)."""

    placement: str
    n_rows: int

    def shuffled_batches(
        self, batch_size: int, *, seed: int, generator: torch.Generator
    ) -> Iterator[Batch]: ...

    def ordered_batches(self, batch_size: int) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class RunPaths:
    """The files of one training run."""

    model: Path
    checkpoint: Path
    metrics: Path

    @classmethod
    def for_model(cls, model: str | os.PathLike[str]) -> RunPaths:
        """``m.safetensors`` -> ``m.checkpoint.safetensors`` and ``m.metrics.jsonl`` beside it."""
        model = Path(model)
        stem = model.name.removesuffix(".safetensors")
        return cls(
            model,
            model.with_name(f"{stem}.checkpoint.safetensors"),
            model.with_name(f"{stem}.metrics.jsonl"),
        )


# --- the public entry point -----------------------------------------------------------------
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


MODEL_KIND = "model"
"""What train writes (a model file, its checkpoint and metrics beside it), as manifests say."""


class _TrainRecord(RunRecord):
    """A training run's manifest is its files' own headers: the model file's xpbatch metadata
    and the checkpoint's (its fingerprint and epochs done)."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths
        self.where = paths.checkpoint

    def read(self) -> dict[str, Any] | None:
        from xpbatch.model.files import read_model_metadata

        model, checkpoint = self.paths.model, self.paths.checkpoint
        if not model.exists() and not checkpoint.exists():
            return None
        try:
            if model.exists():
                read_model_metadata(model)
            run = _Snapshot.read_run(checkpoint) if checkpoint.exists() else {}
        except (XPBatchError, OSError, ValueError, KeyError):
            return {KIND: None}  # not a model file or checkpoint xpbatch wrote
        return {KIND: MODEL_KIND, FINGERPRINT: run.get("fingerprint"), COMPLETE: model.exists()}

    def write(self, fields: Mapping[str, Any]) -> None:
        """Nothing: the loop writes the checkpoint and the model file themselves."""


def _claim_outputs(paths: RunPaths, config: TrainConfig) -> RunManifest:
    """The training run's manifest, the model and its checkpoint claimed under the one output
    rule; resumed when the checkpoint is continued (its fingerprint is checked when it is
    loaded)."""
    existing = [p for p in (paths.model, paths.checkpoint) if p.exists()]
    run = RunManifest(paths.model, kind=MODEL_KIND, record=_TrainRecord(paths))
    run.claim(
        resume=config.resume,
        overwrite=config.overwrite,
        exists=bool(existing),
        found=f"{existing[0].name} of an earlier run" if existing else "",
        remove=lambda: None,  # files xpbatch names after the model; each is replaced whole
    )
    if run.resumed and not paths.checkpoint.is_file():
        raise TrainingError(
            f"--resume: {paths.model} has no checkpoint beside it ({paths.checkpoint}) to "
            "continue from; pass --overwrite to train again"
        )
    return run


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


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """TF32 matmuls for precision 'tf32' (CUDA only), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    if precision == "tf32":
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _fingerprint(
    store: str, selection: Selection, config: TrainConfig, device: torch.device, placement: str
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the store, the split, the settings, and the
    device type and data placement (they change the random stream and the arithmetic, so a
    resumed run would not continue the same trajectory)."""
    settings = {k: getattr(config, k) for k in _RESULT_KEYS}
    settings["model"] = dataclasses.asdict(config.model)
    return _json_roundtrip(
        {
            "store_id": store,
            "split_sha256": selection.fingerprint(),
            "settings": settings,
            "device": device.type,
            "data_placement": placement,
        }
    )


def _json_roundtrip(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


# --- network, optimizer, scheduler and their checkpoint --------------------------------------
def make_optimizer(
    network: ScatterVAE, config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts]:
    """AdamW and its cosine schedule with warm restarts every ``config.cycle_epochs`` epochs."""
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.cycle_epochs, eta_min=config.min_learning_rate
    )
    return optimizer, scheduler


@dataclass
class _TrainingState:
    """Everything that evolves during training, and its (safe) serialisation."""

    network: ScatterVAE
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts
    epoch: int = 0
    """Epochs completed."""

    @classmethod
    def new(cls, config: TrainConfig, device: torch.device) -> _TrainingState:
        """Initial weights from ``config.seed`` (without touching the caller's global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            network = ScatterVAE(config.model).to(device)
        return cls(network, *make_optimizer(network, config))

    def capture(self) -> _Snapshot:
        """A copy of the current state (on the device: no host synchronisation)."""
        tensors = {f"network.{k}": v.detach().clone() for k, v in self.network.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for key, value in values.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().clone()
        meta = {
            "epoch": self.epoch,
            "param_groups": _json_roundtrip(optimizer["param_groups"]),
            "scheduler": _json_roundtrip(self.scheduler.state_dict()),
        }
        return _Snapshot(tensors, meta)

    def restore(self, snapshot: _Snapshot) -> None:
        """Load a snapshot (from :meth:`capture` or a checkpoint file)."""
        network: dict[str, torch.Tensor] = {}
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in snapshot.tensors.items():
            kind, _, rest = name.partition(".")
            if kind == "network":
                network[rest] = tensor
            else:
                index, _, key = rest.partition(".")
                optimizer_state.setdefault(int(index), {})[key] = tensor
        self.network.load_state_dict(network, strict=True)
        self.optimizer.load_state_dict(
            {"state": optimizer_state, "param_groups": snapshot.meta["param_groups"]}
        )
        self.scheduler.load_state_dict(snapshot.meta["scheduler"])
        self.epoch = int(snapshot.meta["epoch"])

    def load_checkpoint(self, path: Path, run: RunManifest, *, epochs: int) -> list[EpochRecord]:
        """Restore a checkpoint of this run (its fingerprint checked by ``run``); returns its
        history."""
        snapshot, extra = _Snapshot.read(path)
        run.check(_flat(extra["fingerprint"]), what=f"training run (checkpoint {path})")
        epoch = int(snapshot.meta["epoch"])
        if epoch > epochs:
            raise TrainingError(
                f"--resume: checkpoint {path} has already done {epoch} epochs, more than "
                f"--epochs {epochs}; raise --epochs to continue training"
            )
        try:
            self.restore(snapshot)
        except (RuntimeError, KeyError, ValueError) as e:
            raise TrainingError(f"--resume: checkpoint {path} does not fit this model: {e}") from e
        logger.info("resumed %s at epoch %d", path, epoch)
        return [EpochRecord(**r) for r in extra["records"]]


@dataclass(frozen=True)
class _Snapshot:
    """Training state as tensors plus JSON-able scalars."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def write(self, path: Path, extra: dict[str, Any]) -> None:
        """Atomically write a checkpoint file (safetensors; scalars in its JSON metadata)."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "format_version": str(CHECKPOINT_VERSION),
            "state": json.dumps(self.meta),
            "run": json.dumps(extra),
        }
        write_safetensors(tensors, path, metadata=metadata)  # a full disk: an OSError

    @staticmethod
    def read_run(path: Path) -> dict[str, Any]:
        """A checkpoint file's run description (history, fingerprint), without its tensors."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise TrainingError(f"checkpoint {path} is truncated or corrupt: {e}") from e
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not an xpbatch training checkpoint")
        run: dict[str, Any] = json.loads(metadata["run"])
        return run

    @classmethod
    def read(cls, path: Path) -> tuple[_Snapshot, dict[str, Any]]:
        """A checkpoint file's snapshot and run description (history, fingerprint)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise TrainingError(f"checkpoint {path} is truncated or corrupt: {e}") from e
        if metadata.get("format") != CHECKPOINT_FORMAT or metadata.get("format_version") != str(
            CHECKPOINT_VERSION
        ):
            raise TrainingError(
                f"{path} is not an xpbatch training checkpoint (version {CHECKPOINT_VERSION})"
            )
        return cls(tensors, json.loads(metadata["state"])), json.loads(metadata["run"])


def _flat(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A training fingerprint with its settings at the top, so a difference names the setting."""
    settings = fingerprint.get("settings", {})
    return {**settings, **{k: v for k, v in fingerprint.items() if k != "settings"}}


# --- the loop -------------------------------------------------------------------------------
class _NonFiniteLoss(Exception):
    """An epoch's loss is NaN or infinite (the message says which)."""


def _as_float(out: VAEOutput) -> VAEOutput:
    """The outputs in float32 (bf16 autocast leaves some in bfloat16); the loss is fp32."""
    return VAEOutput(
        mu=out.mu.float(), log_var=out.log_var.float(), xhat=out.xhat.float(), shat=out.shat.float()
    )


@dataclass
class _EarlyStopping:
    """The best validation loss so far, its epoch and state, and the patience left."""

    patience: int
    best_loss: float
    best_epoch: int
    best: _Snapshot

    @classmethod
    def start(
        cls, patience: int | None, state: _TrainingState, records: list[EpochRecord]
    ) -> _EarlyStopping | None:
        """None without early stopping; a resumed run's current state is its best so far."""
        if patience is None:
            return None
        losses = [r.validation_loss for r in records if r.validation_loss is not None]
        best_loss = losses[-1] if losses else math.inf
        return cls(patience, best_loss, state.epoch, state.capture())

    def should_stop(self, record: EpochRecord, state: _TrainingState) -> bool:
        """Note ``record``; whether the loss has not improved for ``patience`` epochs."""
        if record.validation_loss is not None and record.validation_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.best = (
                record.validation_loss,
                record.epoch,
                state.capture(),
            )
            return False
        return record.epoch - self.best_epoch >= self.patience

    def reason(self, epoch: int) -> str:
        """What the summary says about the stop."""
        return (
            f"early stopping after epoch {epoch}: the validation loss has not improved for "
            f"{self.patience} epochs; kept the weights of epoch {self.best_epoch} (validation "
            f"{self.best_loss:.4g})"
        )


class _Loop:
    """Epochs, validation, metrics, checkpoints, and what happens on NaN or Ctrl-C."""

    def __init__(
        self,
        config: TrainConfig,
        state: _TrainingState,
        paths: RunPaths,
        fingerprint: dict[str, Any],
        *,
        progress: bool,
    ) -> None:
        self.config, self.state, self.paths = config, state, paths
        self.fingerprint, self.progress = fingerprint, progress
        self.device = next(state.network.parameters()).device
        self.stopped: str | None = None
        """Why training stopped before ``config.epochs`` (early stopping), else None."""

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(
        self, train_rows: Rows, validation_rows: Rows, records: list[EpochRecord]
    ) -> list[EpochRecord]:
        """Train from ``state.epoch`` to ``config.epochs``; returns the whole history."""
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        bar = tqdm(
            total=config.epochs,
            initial=state.epoch,
            unit="epoch",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        snapshot = state.capture()
        watch = _EarlyStopping.start(config.early_stopping, state, records)
        try:
            while state.epoch < config.epochs:
                snapshot = state.capture()  # the last good state, kept on NaN or Ctrl-C
                try:
                    record = self._epoch(train_rows, validation_rows)
                except _NonFiniteLoss as e:
                    self._write_checkpoint(snapshot, records[: snapshot.meta["epoch"]])
                    raise TrainingError(self._nan_message(str(e), snapshot)) from None
                records.append(record)
                _append_metrics(self.paths.metrics, record)
                bar.update(1)
                bar.set_postfix(
                    train=f"{record.train_loss:.4g}",
                    val="-" if record.validation_loss is None else f"{record.validation_loss:.4g}",
                    samples_s=f"{record.samples_per_s:.3g}",
                )
                if watch is not None and watch.should_stop(record, state):
                    state.restore(watch.best)  # the best epoch's weights, optimizer and schedule
                    self.stopped = watch.reason(record.epoch)
                    records = records[: state.epoch]
                    _rewrite_metrics(self.paths.metrics, records)
                    self._write_checkpoint(watch.best, records)
                    logger.info("%s", self.stopped)
                    break
                if state.epoch % config.checkpoint_every == 0 or state.epoch == config.epochs:
                    self._write_checkpoint(state.capture(), records)
        except KeyboardInterrupt:
            self._write_checkpoint(snapshot, records[: snapshot.meta["epoch"]])
            logger.info(  # the CLI says it in its one line; -v shows which epoch
                "interrupted: checkpoint of epoch %d written to %s; resume with --resume",
                snapshot.meta["epoch"],
                self.paths.checkpoint,
            )
            raise
        finally:
            bar.close()
        return records

    def _epoch(self, train_rows: Rows, validation_rows: Rows) -> EpochRecord:
        """Train one epoch and validate; raises _NonFiniteLoss when a loss is NaN or inf."""
        config, state = self.config, self.state
        started = time.perf_counter()
        learning_rate = float(state.optimizer.param_groups[0]["lr"])
        train_loss = self._train(train_rows, epoch_seed(config.seed, state.epoch))
        train_seconds = time.perf_counter() - started  # _train ends with a device sync
        validation = self._validate(validation_rows) if validation_rows.n_rows else None
        if not math.isfinite(train_loss):
            raise _NonFiniteLoss(f"training loss {train_loss} at learning rate {learning_rate:.3g}")
        if validation is not None and not math.isfinite(validation[0]):
            raise _NonFiniteLoss(f"validation loss {validation[0]}")
        state.scheduler.step()
        state.epoch += 1
        return EpochRecord(
            epoch=state.epoch,
            train_loss=train_loss,
            validation_loss=None if validation is None else validation[0],
            validation_weighted_mse=None if validation is None else validation[1],
            validation_kld=None if validation is None else validation[2],
            learning_rate=learning_rate,
            train_seconds=train_seconds,
            samples_per_s=train_rows.n_rows / max(train_seconds, 1e-9),
            seconds=time.perf_counter() - started,
        )

    def _train(self, rows: Rows, seed: int) -> float:
        """One pass over the shuffled training rows; the mean loss (one host sync)."""
        network, optimizer = self.state.network, self.state.optimizer
        network.train()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        total = torch.zeros((), device=self.device)
        n_rows = 0
        for x, x_err, valid in rows.shuffled_batches(
            self.config.batch_size, seed=seed, generator=generator
        ):
            with self._autocast():
                out = network(x, sample=True, generator=generator)
            loss = scatter_vae_loss(
                _as_float(out), x, x_err, valid, kl_weight=self.config.kl_weight
            ).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * x.shape[0]
            n_rows += x.shape[0]
        return float(total) / max(n_rows, 1)

    @torch.no_grad()
    def _validate(self, rows: Rows) -> list[float]:
        """[total, weighted_mse, kld] on the validation rows, at the posterior mean."""
        network = self.state.network
        network.eval()
        sums = torch.zeros(3, device=self.device)
        for x, x_err, valid in rows.ordered_batches(EVAL_BATCH_SIZE):
            with self._autocast():
                out = network(x)
            terms = scatter_vae_loss(
                _as_float(out), x, x_err, valid, kl_weight=self.config.kl_weight
            )
            sums += torch.stack([terms.total, terms.weighted_mse, terms.kld]) * x.shape[0]
        network.train()
        return (sums / rows.n_rows).tolist()

    def _write_checkpoint(self, snapshot: _Snapshot, records: list[EpochRecord]) -> None:
        extra = {
            "fingerprint": self.fingerprint,
            "records": [dataclasses.asdict(r) for r in records],
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        snapshot.write(self.paths.checkpoint, extra)
        logger.info("checkpoint of epoch %d: %s", snapshot.meta["epoch"], self.paths.checkpoint)

    def _nan_message(self, what: str, snapshot: _Snapshot) -> str:
        good = snapshot.meta["epoch"]
        return (
            f"the loss is not finite ({what}) in epoch {good + 1}; training stopped. "
            f"The last good state (after epoch {good}) "
            f"is in {self.paths.checkpoint}. Lower --learning-rate (or raise --batch-size), or "
            "look for extreme values in the input; resuming with the same settings would fail "
            "the same way."
        )


def _append_metrics(path: Path, record: EpochRecord) -> None:
    with path.open("a") as f:
        f.write(json.dumps(dataclasses.asdict(record)) + "\n")


def _rewrite_metrics(path: Path, records: list[EpochRecord]) -> None:
    """Start the metrics file afresh with the records so far (after a resume: the checkpoint's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))


# --- the model file -------------------------------------------------------------------------
@torch.no_grad()
def _latent_density(network: ScatterVAE, rows: Rows, *, seed: int) -> LatentDensity:
    """Per-dimension KL and the density of the training rows' (latent mean, rmse) pairs."""
    network.eval()
    device = next(network.parameters()).device
    kl = torch.zeros(network.config.latent_dim, dtype=torch.float64, device=device)
    means, rmse = [], []
    for x, x_err, valid in rows.ordered_batches(EVAL_BATCH_SIZE):
        out = network(x)  # at the posterior mean, like encode-catalog
        kl += latent_kl(out.mu, out.log_var)
        means.append(out.mu.float().cpu().numpy())  # (batch, latent)
        rmse.append(reconstruction_rmse(x, out.xhat, x_err, valid).float().cpu().numpy())
    if not means:
        return LatentDensity.prior(network.config.latent_dim)
    kl_per_row = (kl / rows.n_rows).cpu().numpy()
    return fit_density(np.concatenate(means), kl_per_row, np.concatenate(rmse), seed=seed)


def _fit_statistics(model: TrainedModel, rows: Rows) -> dict[str, Any] | None:
    """What the first training rows look like to the trained model
    (:mod:`xpbatch.model.fit_check`)."""
    x, x_err, valid = next(iter(rows.ordered_batches(fit.SAMPLE_ROWS)))  # (rows, input) each
    x_np, x_err_np = x.float().cpu().numpy(), x_err.float().cpu().numpy()
    valid_np = np.ones(x_np.shape, bool) if valid is None else valid.cpu().numpy()
    stats = fit.measure(model, x_np, x_err_np, valid_np, source=fit.SOURCE_TRAINING)
    return None if stats is None else stats.to_dict()


def _write_model(
    network: ScatterVAE,
    normalisation: Normalisation,
    path: Path,
    train_rows: Rows,
    selection: Selection,
    records: list[EpochRecord],
    *,
    config: TrainConfig,
    store: xr.Dataset,
    device: torch.device,
    timings: dict[str, float],
) -> TrainedModel:
    """Save the trained network with its normalisation, split and provenance."""
    density = _latent_density(network, train_rows, seed=config.seed)
    last = records[-1] if records else None
    provenance = {
        "source": "trained",
        "store_id": store_id(store),
        "epochs": len(records),
        "seed": config.seed,
        "config": _json_roundtrip(result_options(config)),
        "counts": dict(selection.counts),
        "split_sha256": selection.fingerprint(),
        "final_train_loss": None if last is None else last.train_loss,
        "final_validation_loss": None if last is None else last.validation_loss,
        "device": str(device),
        "data_placement": train_rows.placement,
        "timings": timings,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": runtime_versions(),
    }
    model = TrainedModel(
        network=network.cpu(),
        normalisation=normalisation,
        name=path.name.removesuffix(".safetensors"),
        provenance=provenance,
        latent_reference_mean=density.centre,
        latent_reference_std=density.scale,
        density=density,
        train_source_id=selection.train_source_id,
        validation_source_id=selection.validation_source_id,
    )
    model.fit_statistics = _fit_statistics(model, train_rows)
    save_model(model, path)
    logger.info("wrote %s (%d epochs)", path, len(records))
    return model
