"""The training loop: epochs, validation, metrics, checkpoints, early stopping, and what
happens on NaN or Ctrl-C.

The loop knows nothing about where the rows live (:mod:`xpbatch.train.feed` hands it batches
already on the device) nor about the network's insides (:mod:`xpbatch.model.network`).

Every epoch's shuffle and latent draws come from generators seeded with ``(seed, epoch)``, so a
run resumed from a checkpoint continues exactly as if it had never stopped (bitwise on CPU).
Per step there is no host-device synchronisation: losses are summed on the device and read once
per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import torch

from xpbatch.config import TrainConfig
from xpbatch.errors import TrainingError
from xpbatch.model.network import VAEOutput, scatter_vae_loss
from xpbatch.train.checkpoints import RunPaths, _Snapshot, _TrainingState
from xpbatch.train.data import Batch, epoch_seed
from xpbatch.train.summary import EpochRecord, _append_metrics, _rewrite_metrics

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 16384
"""Rows per forward pass when evaluating (validation loss, latent statistics)."""


class Rows(Protocol):
    """What the loop needs of a set of rows (:class:`ResidentRows` or :class:`StreamedRows`)."""

    placement: str
    n_rows: int

    def shuffled_batches(
        self, batch_size: int, *, seed: int, generator: torch.Generator
    ) -> Iterator[Batch]: ...

    def ordered_batches(self, batch_size: int) -> Iterator[Batch]: ...


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
