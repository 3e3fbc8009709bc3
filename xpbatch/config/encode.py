"""How ``encode-catalog`` runs."""

from __future__ import annotations

import dataclasses
from typing import Literal

from xpbatch.config.fields import (
    Device,
    OutputOptions,
    check_choices,
    check_resume_or_overwrite,
)
from xpbatch.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EncodeConfig(OutputOptions):
    """How ``encode-catalog`` runs (what it computes is fixed by the store and the model)."""

    batch_size: int = 4096
    """Rows per forward pass; every pass is padded to this size, so results do not depend on
    the chunking. The kernels' default too (xpbatch.encode.kernel.DEFAULT_BATCH_SIZE)."""
    with_reconstruction: bool = False
    """Also store the decoder's reconstruction (source, coeff) in e-/s: about twice the size."""
    resume: bool = False
    """Continue an interrupted run of the same store, model and options: skip recorded chunks;
    refuse when they differ. Without an earlier run, start a new one."""
    device: Device = "auto"
    """Torch device on each worker: 'auto' = the worker's GPU when it has one, else the CPU."""
    tasks_per_thread: int = 2
    """Chunks in flight per worker thread: enough to keep workers busy while results come
    back, few enough that the client and the workers hold a bounded amount of memory."""
    max_attempts: int = 3
    """Times a chunk is run before the run fails (a worker dying under it or an error both
    count; every chunk write is idempotent, so rerunning one is safe)."""
    no_workers_timeout: float = 600.0
    """Seconds the run waits for a cluster that has no workers before failing (resumably)."""
    verify: bool = True
    """Re-read and check every chunk at the end, before marking the catalogue complete."""
    check_fit: bool = True
    """Before any work, refuse a model whose training data do not look like the store's first
    rows (xpbatch.model.fit_check: scaled or foreign-unit coefficients, a foreign normalisation)."""
    progress_bar: bool = True
    """Show a progress bar of spectra done, spectra/s and ETA on stderr."""
    mc_samples: int = 0
    """Monte-Carlo latents: draw this many realisations of each spectrum from its measurement
    covariance, encode them all and store the mean and spread of their latent means
    (latent_mean_mc, latent_std_mc); 0 = off, else at least 2."""
    mc_seed: int = 0
    """Seed of the Monte-Carlo draws: a row's draws depend on (seed, source_id) alone, so a
    resumed or re-chunked run writes the same bytes."""
    mc_covariance: Literal["auto", "full", "diagonal"] = "auto"
    """Covariance of the draws: 'full' = errors and the store's packed correlations, 'diagonal'
    = the errors alone, 'auto' = full when the store carries correlations."""
    performance_report: str | None = None
    """Save Dask's performance report of the run to this HTML file (needs a cluster)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        check_resume_or_overwrite(self, "catalogue")
        check_choices(self)
        if self.tasks_per_thread < 1 or self.max_attempts < 1:
            raise ConfigError(
                f"tasks_per_thread and max_attempts must be at least 1, got "
                f"{self.tasks_per_thread} and {self.max_attempts}"
            )
        if self.mc_samples < 0 or self.mc_samples == 1:
            raise ConfigError(
                f"mc_samples must be 0 (off) or at least 2 (a spread needs two draws), got "
                f"{self.mc_samples}"
            )
        if not 0 <= self.mc_seed < 2**63:
            raise ConfigError(f"mc_seed must be in [0, 2**63), got {self.mc_seed}")
        if not self.no_workers_timeout > 0:
            raise ConfigError(
                f"no_workers_timeout must be positive seconds, got {self.no_workers_timeout}"
            )
