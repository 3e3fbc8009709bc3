"""``xpbatch bench encode --mc-samples K``: the Monte-Carlo latents' CPU cost and DR3 projections.

Serial ``encode_catalog`` with K draws per spectrum (full covariance, on a mock store with
correlations) against K bare forward passes of the same network, one torch thread, in
alternating rounds, the best of each kept (other jobs only ever slow a round down). The host's
share of the draws (normals, Cholesky factors, the reduction) is timed apart: on a GPU node it is
what the cores must keep up with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from xpbatch import schema
from xpbatch.benchmarks.encode import (
    alternate_encodes,
    bench_model,
)
from xpbatch.config import EncodeConfig
from xpbatch.encode.mc import MonteCarlo, correlation_factors, reduce_draws, standard_normals
from xpbatch.schema import DR3_N_SOURCES
from xpbatch.store.reader import open_variables
from xpbatch.train.demo import store_ready

GPU_NODE_CORES = 16
"""Cores of the GPU node the projection is for (1 GPU, 16 cores)."""
GPU_FLOPS = 20e12
"""Sustained float32 FLOP/s assumed for the encoder's small matrix products on one H100/H200
(about a third of its float32 peak without tensor cores)."""
logger = logging.getLogger(__name__)

HOST_ROWS = 4096
"""Rows the host's share is timed on (one block)."""


@dataclasses.dataclass(frozen=True)
class McEfficiency:
    """CPU seconds per spectrum of the Monte-Carlo encode against K bare forward passes."""

    rows: int
    rounds: int
    samples: int
    covariance: str
    forward_cpu_s: float
    """One bare forward pass of the full network (eval, inference mode, encode's batches)."""
    plain_cpu_s: float
    """Serial encode_catalog without draws (read, kernel, write, records, verification)."""
    mc_cpu_s: float
    """Serial encode_catalog with K draws per spectrum, everything included."""
    host_mc_cpu_s: float
    """The draws' host work on the CPU path: normals, factors of both bands, reduction."""
    gpu_host_mc_cpu_s: float
    """The draws' host work on the torch (GPU) path, which makes normals and factors on the
    device: the reduction."""
    device_flops: float
    """Floating-point operations per spectrum on the device: K encoder passes, the noise
    products, the two Cholesky factors and the normals."""

    @property
    def ratio(self) -> float:
        """encode_catalog with K draws / K bare forward passes (the issue's bar: at most 1.3)."""
        return self.mc_cpu_s / (self.samples * self.forward_cpu_s)

    def cpu_hours(self) -> float:
        """Core-hours for DR3: rows x CPU per spectrum (chunks run in parallel, one thread
        each; scaling taken as ideal, disk and network not counted)."""
        return DR3_N_SOURCES * self.mc_cpu_s / 3600

    def gpu_node_rate(self, cores: int = GPU_NODE_CORES) -> float:
        """Spectra/s of one GPU node: the slower of its cores doing the host work (the plain
        encode's non-network part plus the torch path's host share, kernel launches not
        counted) and the GPU doing :attr:`device_flops` at :data:`GPU_FLOPS`."""
        host = (self.plain_cpu_s - self.forward_cpu_s) + self.gpu_host_mc_cpu_s
        return min(cores / host, GPU_FLOPS / self.device_flops)

    def report(self, cores: tuple[int, ...] = (16, 128, 1024)) -> str:
        """The figures as the CLI prints them."""
        k = self.samples
        node = self.gpu_node_rate()
        return "\n".join(
            [
                f"Monte-Carlo latents, K = {k} draws, {self.covariance} covariance, on "
                f"{self.rows:,} mock spectra (1 process, 1 torch thread, best of {self.rounds} "
                "alternating rounds):",
                f"  bare forward pass x {k}: {k * self.forward_cpu_s * 1e6:8.1f} CPU µs/spectrum",
                f"  encode_catalog, no draws: {self.plain_cpu_s * 1e6:8.1f} CPU µs/spectrum",
                f"  encode_catalog --mc-samples {k}: {self.mc_cpu_s * 1e6:8.1f} CPU µs/spectrum "
                f"(the draws' normals, factors and reduction {self.host_mc_cpu_s * 1e6:.1f})",
                f"  ratio / {k} bare forward passes: {self.ratio:.2f} (bar <= 1.3)",
                f"  DR3 ({DR3_N_SOURCES:,} spectra) on CPUs: {self.cpu_hours():,.0f} core-hours; "
                + ", ".join(f"{_duration(self.cpu_hours() / n)} on {n} cores" for n in cores)
                + " (model: CPU per spectrum x rows / cores, ideal scaling, I/O not counted)",
                f"  DR3 on one GPU node ({GPU_NODE_CORES} cores): {node:,.0f} spectra/s, "
                f"{_duration(DR3_N_SOURCES / node / 3600)} (model: min of cores / host CPU per "
                f"spectrum, the draws' normals and factors made on the GPU, and GPU "
                f"{GPU_FLOPS / 1e12:.0f} TFLOP/s / {self.device_flops / 1e6:.2f} MFLOP per "
                "spectrum; kernel launches not counted)",
            ]
        )


def _duration(hours: float) -> str:
    """'3.2 h', or '14 min' under an hour."""
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def device_flops(model_path: Path, samples: int) -> float:
    """FLOPs per spectrum: K passes of the encoder (2 per weight), both bands' noise products
    (2 n^2 per band and draw), their Cholesky factors (n^3 / 3 each) and the normals (taken as
    40 per value)."""
    from xpbatch.model.files import load_model

    network = load_model(model_path).network
    weights = sum(
        p.numel()
        for name, p in network.named_parameters()
        if name.startswith(("encoder.", "mu.")) and p.dim() == 2
    )
    n_bp = network.config.input_dim // 2
    n_rp = network.config.input_dim - n_bp
    per_draw = 2 * weights + 2 * (n_bp**2 + n_rp**2) + 40 * (n_bp + n_rp)
    return float(samples * per_draw + (n_bp**3 + n_rp**3) / 3)


def host_mc_seconds(store: Path, samples: int, *, full: bool) -> tuple[float, float]:
    """CPU seconds per spectrum of the draws' host work on the store's first rows: on the CPU
    path (normals, the factors for a ``full`` covariance, reduction) and on the torch path
    (the reduction)."""
    bands = schema.BANDS if full else ()
    names = [schema.SOURCE_ID, *(schema.correlations_name(b) for b in bands)]
    arrays = open_variables(store, names)
    rows = slice(0, HOST_ROWS)
    ids = np.asarray(arrays[schema.SOURCE_ID][rows])
    packed = [np.asarray(arrays[name][rows], np.float32) for name in names[1:]]
    n = len(ids)
    z = np.empty((n, samples * schema.N_COEFF), np.float32)
    factors = [np.empty((n, m, m), np.float32) for m in (schema.N_BP, schema.N_RP)]
    mu = np.zeros((n * samples, 6), np.float32)
    mean, std = np.empty((n, 6), np.float32), np.empty((n, 6), np.float32)
    flags = np.zeros(n, np.uint16)

    def draws() -> None:
        standard_normals(ids, 0, z)
        for p, f in zip(packed, factors, strict=True):
            correlation_factors(p, f)

    def reduction() -> None:
        reduce_draws(mu, flags, mean, std)

    def best(step: Callable[[], None]) -> float:
        step()  # compiled and warm
        times = []
        for _ in range(3):
            started = time.process_time()
            step()
            times.append(time.process_time() - started)
        return min(times) / n

    reduced = best(reduction)
    return best(draws) + reduced, reduced


def correlated_mock_store(rows: int, workdir: Path, *, echo: Callable[[str], object]) -> Path:
    """A mock store of ``rows`` spectra with packed correlations, generated once per size."""
    from xpbatch.mock import write_mock_store

    path = workdir / f"mock-{rows}-correlations.zarr"
    if not store_ready(path):
        echo(f"generating {rows:,} mock spectra with correlations in {path} (once)…")
        write_mock_store(path, rows, seed=0, with_correlations=True, overwrite=True)
    return path


def measure_mc_efficiency(
    store: Path, model_path: Path, out: Path, *, samples: int, rounds: int = 3
) -> McEfficiency:
    """Alternate K bare forward passes, serial encode_catalog without and with K draws (one
    torch thread; :func:`~xpbatch.benchmarks.encode.alternate_encodes`); keep the best of each.
    ``store`` should carry correlations (full covariance)."""
    plain = EncodeConfig(progress_bar=False)
    drawn = dataclasses.replace(plain, mc_samples=samples)
    n_rows, forward, (plain_s, mc_s) = alternate_encodes(
        store, model_path, out, [plain, drawn], rounds=rounds
    )
    draws = MonteCarlo.of_run(drawn, zarr.open_group(str(store), mode="r").attrs.asdict())
    assert draws is not None
    covariance = draws.covariance  # the run's own choice ('auto': full with correlations)
    host, gpu_host = host_mc_seconds(store, samples, full=covariance == "full")
    return McEfficiency(
        rows=n_rows,
        rounds=rounds,
        samples=samples,
        covariance=covariance,
        forward_cpu_s=min(forward),
        plain_cpu_s=min(plain_s),
        mc_cpu_s=min(mc_s),
        host_mc_cpu_s=host,
        gpu_host_mc_cpu_s=gpu_host,
        device_flops=device_flops(model_path, samples),
    )


def run_mc_benchmark(
    rows: int,
    *,
    samples: int,
    rounds: int = 3,
    workdir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], object] = logger.info,
) -> McEfficiency:
    """The CLI's ``bench encode --mc-samples``: store and model made once in ``workdir``
    (default: a temporary directory, removed after)."""
    scratch = Path(tempfile.mkdtemp(prefix="xpbatch-bench-mc-"))
    folder = Path(workdir) if workdir is not None else scratch
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _run_mc_benchmark(rows, samples=samples, rounds=rounds, folder=folder, echo=echo)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_mc_benchmark(
    rows: int, *, samples: int, rounds: int, folder: Path, echo: Callable[[str], object]
) -> McEfficiency:
    store = correlated_mock_store(rows, folder, echo=echo)
    model_path = bench_model(store, folder)
    echo(f"K = {samples}: bare forward passes, encode_catalog without and with draws, alternating…")
    return measure_mc_efficiency(
        store, model_path, folder / "mc.zarr", samples=samples, rounds=rounds
    )
