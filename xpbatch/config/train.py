"""How ``xpbatch train`` fits the scatter VAE, its presets, and the network's architecture."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal

from xpbatch.config.fields import (
    Device,
    OutputOptions,
    check_choices,
    check_resume_or_overwrite,
    from_mapping,
    read_toml,
)
from xpbatch.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the scatter VAE (Laroche & Speagle 2024)."""

    input_dim: int = 110
    """Number of input coefficients (55 BP + 55 RP in DR3)."""
    hidden_widths: tuple[int, ...] = (90, 70, 50, 30, 10)
    """Encoder layer widths; the decoders use them in reverse."""
    latent_dim: int = 6
    """Size of the latent space."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_widths", tuple(int(w) for w in self.hidden_widths))
        if self.input_dim < 1 or self.latent_dim < 1:
            raise ConfigError(
                "input_dim and latent_dim must be positive, "
                f"got {self.input_dim}, {self.latent_dim}"
            )
        if not self.hidden_widths or min(self.hidden_widths) < 1:
            raise ConfigError(f"hidden_widths must be positive integers, got {self.hidden_widths}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TrainConfig(OutputOptions):
    """How ``xpbatch train`` fits the scatter VAE; the defaults reproduce the published run.

    In a TOML file (``--config``) every field is a top-level key, and the architecture is the
    table ``[model]`` (keys of :class:`ModelConfig`).
    """

    epochs: int = 5000
    """Passes over the training rows (published: 5000)."""
    learning_rate: float = 1e-4
    """AdamW learning rate at the start of every cosine cycle (published: 1e-4)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (published: torch's default, 0.01)."""
    cycle_epochs: int = 500
    """Epochs per cosine-annealing cycle before each warm restart (T_0; published: 500)."""
    min_learning_rate: float = 1e-10
    """Learning rate at the end of every cycle (eta_min; published: 1e-10)."""
    batch_size: int = 1024
    """Spectra per optimisation step (published: 1024)."""
    kl_weight: float = 1.0
    """Weight of the KL term in the loss; 1 is the published loss."""
    seed: int = 0
    """Seed of the sample, the split, the initial weights, the shuffles and the latent draws."""
    validation_fraction: float = 0.1
    """Fraction of the selected rows held out for validation (0: no validation)."""
    sample: int | None = None
    """Train on a seeded random sample of this many usable rows instead of all of them."""
    source_ids: str | None = None
    """File of the source_ids to train on: one per line, or a CSV/Parquet column 'source_id'."""
    partial_rows: bool = False
    """Also train on rows with a missing band or non-finite values (masked in the loss); by
    default they are excluded, as in the published training set."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many epochs (and always at the end)."""
    device: Device = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'."""
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """'fp32'; on CUDA also 'tf32' (TF32 matmuls) or 'bf16' (bfloat16 autocast)."""
    data_placement: Literal["auto", "device", "stream"] = "auto"
    """'device': load the rows onto the device once; 'stream': read shuffled chunks from the
    store every epoch; 'auto': 'device' when they fit in device_memory_fraction."""
    device_memory_fraction: float = 0.5
    """Share of the free device memory (available host memory on CPU) resident data may use."""
    shuffle_chunks: int = 4
    """Streaming: store chunks read and shuffled together (more mixes better, costs memory)."""
    early_stopping: int | None = None
    """Stop when the validation loss has not improved on its best for this many epochs, and keep
    the best epoch's weights (None: train every epoch). Needs validation rows."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Architecture of the network (TOML table [model])."""
    resume: bool = False
    """Continue the run from the checkpoint beside the model file (refused when the store, the
    split or a setting that changes the result differs; epochs may be raised). Without a
    checkpoint, start a new run."""
    progress_bar: bool = True
    """Show a progress bar (epoch, losses, samples/s) on stderr."""

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            model = from_mapping(ModelConfig, self.model, where="[model]")
            object.__setattr__(self, "model", model)
        positive = {
            "epochs": self.epochs,
            "cycle_epochs": self.cycle_epochs,
            "batch_size": self.batch_size,
            "checkpoint_every": self.checkpoint_every,
            "shuffle_chunks": self.shuffle_chunks,
        }
        for name, value in positive.items():
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be at least 2 (BatchNorm), got {self.batch_size}")
        if self.sample is not None and (not _is_int(self.sample) or self.sample < 2):
            raise ConfigError(f"sample must be an integer of at least 2 rows, got {self.sample!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not self.learning_rate > 0 or not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(
                f"need learning_rate > 0 and 0 <= min_learning_rate <= learning_rate, got "
                f"{self.learning_rate} and {self.min_learning_rate}"
            )
        if self.weight_decay < 0 or self.kl_weight < 0:
            raise ConfigError(
                f"weight_decay and kl_weight must be >= 0, got {self.weight_decay}, "
                f"{self.kl_weight}"
            )
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if not 0 < self.device_memory_fraction <= 1:
            raise ConfigError(
                f"device_memory_fraction must be in (0, 1], got {self.device_memory_fraction}"
            )
        if self.early_stopping is not None:
            if not _is_int(self.early_stopping) or self.early_stopping < 1:
                raise ConfigError(
                    f"early_stopping (patience in epochs) must be a positive integer, got "
                    f"{self.early_stopping!r}"
                )
            if self.validation_fraction == 0:
                raise ConfigError(
                    "early_stopping watches the validation loss: it needs validation_fraction > 0"
                )
        check_choices(self)
        if self.precision != "fp32" and self.device == "cpu":
            raise ConfigError(f"precision {self.precision!r} needs device 'cuda' (or 'auto')")
        check_resume_or_overwrite(self, "training run")

    @classmethod
    def from_toml(
        cls,
        path: str | os.PathLike[str] | None,
        overrides: Mapping[str, Any] | None = None,
        *,
        preset: TrainPreset | None = None,
    ) -> TrainConfig:
        """The settings of ``preset`` (if any), then the file at ``path`` (if any; not its
        ``[storage]`` table), then ``overrides`` (CLI flags) on top."""
        found = read_toml(path) if path is not None else {}
        where = f"configuration file {path}" if path is not None else "configuration"
        return cls.from_settings(found, overrides, preset=preset, where=where)

    @classmethod
    def from_settings(
        cls,
        settings: Mapping[str, Any],
        overrides: Mapping[str, Any] | None = None,
        *,
        preset: TrainPreset | None = None,
        where: str = "configuration",
    ) -> TrainConfig:
        """:meth:`from_toml` of settings already read (a ``[storage]`` table is not ours)."""
        values = {k: v for k, v in settings.items() if k != "storage"}
        base = TRAIN_PRESETS[preset] if preset is not None else {}
        return from_mapping(cls, {**base, **values, **(overrides or {})}, where=where)


TrainPreset = Literal["published", "quick"]
"""The named starting points of ``xpbatch train --preset``."""

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "published": {},
    "quick": {
        "epochs": 40,
        "learning_rate": 2e-3,
        "cycle_epochs": 40,
        "batch_size": 512,
        "early_stopping": 5,
    },
}
"""``xpbatch train --preset NAME``: settings over :class:`TrainConfig`'s defaults (flags and
``--config`` win). 'published' is the published run (5000 epochs on every usable row); 'quick'
trains at a higher learning rate in one short cosine cycle and stops once the validation loss
stops improving: a first model in minutes on a CPU for a store of tens of thousands of rows, to
try the pipeline (not for science; on a larger store add ``--sample``)."""
