"""What a training run reports: one :class:`EpochRecord` per epoch, each also a line of the
metrics file ``MODEL.metrics.jsonl`` beside the model, and the :class:`TrainSummary` that
:func:`~xpbatch.train.stage.train_model` returns."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


def _append_metrics(path: Path, record: EpochRecord) -> None:
    with path.open("a") as f:
        f.write(json.dumps(dataclasses.asdict(record)) + "\n")


def _rewrite_metrics(path: Path, records: list[EpochRecord]) -> None:
    """Start the metrics file afresh with the records so far (after a resume: the checkpoint's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
