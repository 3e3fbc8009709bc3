"""``xpbatch bench train``: the trainer against a straightforward loop, on the same rows.

The straightforward loop is what one writes first: the standardised rows in host memory as
NumPy arrays, a new ``numpy.random.permutation`` every epoch, each batch gathered on the host and
copied to the device, ``loss.item()`` after every step. Same network, optimizer, scheduler, loss
and batch size. ``xpbatch train`` keeps the rows on the device, draws the permutation there and
reads the loss once per epoch.

Both rates are training samples per second of the training phase (validation excluded): the
median over the epochs after the first (which warms up allocators and kernels). The two are run
alternately, ``rounds`` times each, in the same process, and each keeps its best round: on a
machine shared with other jobs single runs are noisy (±30 % seen on 2 shared cores).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from xpbatch.benchmarks.encode import mock_store
from xpbatch.config import Device, TrainConfig
from xpbatch.model.device import resolve_device
from xpbatch.model.network import ScatterVAE, scatter_vae_loss
from xpbatch.store.reader import open_xp_store
from xpbatch.train.checkpoints import make_optimizer
from xpbatch.train.data import compute_normalisation, row_chunks, select_rows
from xpbatch.train.feed import ResidentRows
from xpbatch.train.stage import train_model

PUBLISHED_EPOCHS = 5000
PUBLISHED_ROWS = 450_000
"""The published run: 5000 epochs over ~450k spectra (6 h 21 min on one consumer GPU)."""


@dataclasses.dataclass(frozen=True)
class TrainBenchmark:
    """Measured training rates of one ``bench train`` run."""

    rows: int
    epochs: int
    batch_size: int
    device: str
    torch_threads: int
    ours: list[list[float]]
    """Samples/s of ``xpbatch train`` per round and epoch."""
    plain: list[list[float]]
    """Samples/s of the straightforward loop per round and epoch."""

    @staticmethod
    def _typical(rounds: list[list[float]]) -> float:
        """The best round's median over its epochs after the first."""
        return max(statistics.median(r[1:] if len(r) > 1 else r) for r in rounds)

    @property
    def ours_rate(self) -> float:
        """Samples/s of ``xpbatch train`` (best round, median epoch)."""
        return self._typical(self.ours)

    @property
    def plain_rate(self) -> float:
        """Samples/s of the straightforward loop (best round, median epoch)."""
        return self._typical(self.plain)

    @property
    def ratio(self) -> float:
        """ours / plain (expected: at least 1 on CPU, well above on a GPU)."""
        return self.ours_rate / self.plain_rate

    def report(self) -> str:
        """A few lines for the terminal."""
        published = PUBLISHED_EPOCHS * PUBLISHED_ROWS

        def line(name: str, rate: float) -> str:
            per_epoch = PUBLISHED_ROWS / rate
            return (
                f"  {name:<20} {rate:>10,.0f} samples/s   published schedule: "
                f"{per_epoch:.2f} s/epoch, {published / rate / 3600:.1f} h"
            )

        return "\n".join(
            [
                f"training on {self.rows:,} rows, batch {self.batch_size}, {self.epochs} epochs, "
                f"device {self.device} ({self.torch_threads} torch threads)",
                line("xpbatch train", self.ours_rate),
                line("straightforward loop", self.plain_rate),
                f"  ratio {self.ratio:.2f}x (median of epochs 2-{self.epochs}, best of "
                f"{len(self.ours)} alternating rounds)",
                "  target on one H100: 5000 epochs x 450k spectra in < 20 min (< 0.25 s/epoch)",
            ]
        )


def plain_loop(
    x: np.ndarray,
    x_err: np.ndarray,
    config: TrainConfig,
    device: torch.device,
) -> list[float]:
    """Train the straightforward way; samples/s of each epoch."""
    torch.manual_seed(config.seed)
    network = ScatterVAE(config.model).to(device)
    optimizer, scheduler = make_optimizer(network, config)  # the same as xpbatch train's
    rng = np.random.default_rng(config.seed)
    n, size = x.shape[0], config.batch_size
    rates = []
    for _ in range(config.epochs):
        started = time.perf_counter()
        perm = rng.permutation(n)
        running = 0.0
        for start in range(0, n - 1, size):  # a last batch of one row is skipped, as ours does
            idx = perm[start : start + size]
            xb = torch.from_numpy(x[idx]).to(device)
            eb = torch.from_numpy(x_err[idx]).to(device)
            loss = scatter_vae_loss(network(xb, sample=True), xb, eb, kl_weight=config.kl_weight)
            optimizer.zero_grad()
            loss.total.backward()
            optimizer.step()
            running += loss.total.item() * len(idx)
        scheduler.step()
        rates.append(n / (time.perf_counter() - started))
    return rates


def run_train_benchmark(
    rows: int,
    *,
    epochs: int = 4,
    batch_size: int = 1024,
    device: Device = "auto",
    rounds: int = 2,
    workdir: str | Path | None = None,
    echo: Callable[[str], object] = print,
) -> TrainBenchmark:
    """Train on a mock store with ``xpbatch train`` and with :func:`plain_loop`; compare rates.

    Parameters
    ----------
    rows
        Mock spectra (generated once per size in ``workdir``); all usable rows are trained on.
    epochs, batch_size
        The same for both; the published optimisation otherwise.
    device
        'auto', 'cpu' or 'cuda'.
    rounds
        Times each is run, alternately; each keeps its best round.
    workdir
        Where to keep the mock store between runs (default: a temporary directory).
    """
    with tempfile.TemporaryDirectory(prefix="xpbatch-bench-train-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        store = mock_store(rows, work, echo=echo)
        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            device=device,
            validation_fraction=0.0,
            checkpoint_every=epochs,
            data_placement="device",
        )
        resolved = resolve_device(config.device, precision=config.precision)
        ds = open_xp_store(store)
        selection = select_rows(ds, config)
        chunks = row_chunks(ds)
        normalisation = compute_normalisation(ds, selection.train, chunks)
        host = ResidentRows.load(ds, selection.train, chunks, normalisation, torch.device("cpu"))
        ours, plain = [], []
        for round_ in range(1, rounds + 1):
            echo(f"round {round_}/{rounds}: xpbatch train, {epochs} epochs on {resolved}…")
            model = Path(tmp) / "bench.safetensors"
            history = train_model(
                store, model, config=dataclasses.replace(config, progress_bar=False, overwrite=True)
            )
            ours.append([r.samples_per_s for r in history.records])
            echo(f"round {round_}/{rounds}: straightforward loop, {epochs} epochs on {resolved}…")
            plain.append(plain_loop(host.x.numpy(), host.x_err.numpy(), config, resolved))
    return TrainBenchmark(
        rows=int(selection.train.size),
        epochs=epochs,
        batch_size=batch_size,
        device=str(resolved),
        torch_threads=torch.get_num_threads(),
        ours=ours,
        plain=plain,
    )
