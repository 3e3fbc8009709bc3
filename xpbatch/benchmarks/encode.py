"""``xpbatch bench encode``: encode-catalog on a cluster against a bare loop, on the same store.

The bare loop is what one would write without Dask: one process, torch using every core, for
each chunk read it, :func:`~xpbatch.encode.kernel.encode_chunk` it, write it with zarr (same layout
and
codecs; no completion records, no fsync, no verification). ``encode-catalog`` is timed end to
end as users run it (template, tasks, records, final verification). Both are wall-clock rates on
the same machine in the same run; on a machine shared with other jobs the figures are noisy.

Memory: every worker samples its own resident set size (RSS) in a background thread while the
catalogue is encoded, at two catalogue sizes; flat memory means equal peaks.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from xpbatch import schema
from xpbatch.catalog.layout import CatalogLayout, create_catalog
from xpbatch.config import EncodeConfig
from xpbatch.encode.kernel import encode_chunk
from xpbatch.encode.outputs import INPUT_VARIABLES
from xpbatch.schema import DR3_N_SOURCES
from xpbatch.store.reader import open_variables
from xpbatch.train.demo import store_ready

if TYPE_CHECKING:
    from distributed import Client

    from xpbatch.model.trained import TrainedModel

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.05
GPU_NODE_CORES = 16
"""Cores of the GPU node the projection is for (the H200 node of issue 12: 1 GPU, 16 cores)."""


@dataclasses.dataclass(frozen=True)
class CpuEfficiency:
    """CPU time per spectrum of serial ``encode_catalog`` against the bare network forward pass.

    Both measured in this process with one torch thread, in alternating rounds; the smallest
    (least disturbed) figure of each is kept. The model is the bench's: the default
    architecture (a network's cost does not depend on its weights).
    """

    rows: int
    rounds: int
    forward_cpu_s: float
    """CPU seconds per spectrum of the loaded network's bare forward pass (eval and inference
    mode, batches of the encode's size over a 65,536-row tensor)."""
    encode_cpu_s: float
    """CPU seconds per spectrum of serial encode_catalog: plan, read, kernel, write, records,
    verification."""

    @property
    def ratio(self) -> float:
        """encode_catalog / forward pass (target at most 2.0, aim 1.5)."""
        return self.encode_cpu_s / self.forward_cpu_s

    @property
    def host_cpu_s(self) -> float:
        """CPU seconds per spectrum that are not the network: what a GPU node's cores must do."""
        return self.encode_cpu_s - self.forward_cpu_s

    def gpu_node_rate(self, cores: int = GPU_NODE_CORES) -> float:
        """Projected spectra/s of a GPU node: ``cores`` / host CPU per spectrum.

        The model: the GPU runs the network and the kernel's arithmetic (~0.13 TFLOP/s at 1 M/s,
        under 1 % of an H100), so the node is bound by its cores doing everything else, which
        parallelises over chunks; the figure is an upper bound that ignores memory bandwidth.
        """
        return cores / self.host_cpu_s

    def report(self, cores: int = GPU_NODE_CORES) -> str:
        """The figures as the CLI prints them."""
        return "\n".join(
            [
                f"CPU efficiency on {self.rows:,} spectra (1 process, 1 torch thread, best of "
                f"{self.rounds} alternating rounds):",
                f"  network forward pass: {self.forward_cpu_s * 1e6:6.2f} CPU µs/spectrum",
                f"  serial encode_catalog (verification included): "
                f"{self.encode_cpu_s * 1e6:6.2f} CPU µs/spectrum",
                f"  ratio encode_catalog / forward pass: {self.ratio:.2f} (target <= 2.0, aim 1.5)",
                f"  non-network CPU: {self.host_cpu_s * 1e6:.2f} µs/spectrum",
                f"  projected GPU node with {cores} cores: {self.gpu_node_rate(cores):,.0f} "
                "spectra/s (node model: 1 GPU runs the network, ~0.1 µs/spectrum, overlapped; "
                f"{cores} cores share the non-network CPU work, chunks in parallel; an upper "
                "bound: disk, network and memory bandwidth not counted)",
            ]
        )


FORWARD_ROWS = 65_536
"""Rows of the random tensor the bare forward pass runs over, in batches of the encode's size."""


def forward_cpu_seconds(model: TrainedModel, *, batch_size: int, rows: int = FORWARD_ROWS) -> float:
    """CPU seconds per row of the loaded network's bare forward pass: eval mode, inference mode,
    one torch thread, ``batch_size``-row batches of a ``rows``-row tensor (the network at its
    best: no recipe, no outputs, no copies)."""
    import torch

    x = torch.randn(rows, model.config.input_dim, generator=torch.Generator().manual_seed(0))
    network = model.network.eval()
    cpu = _cpu_seconds()
    with torch.inference_mode():
        for start in range(0, rows, batch_size):
            network(x[start : start + batch_size])
    return (_cpu_seconds() - cpu) / rows


def alternate_encodes(
    store: Path,
    model_path: Path,
    out: Path,
    configs: Sequence[EncodeConfig],
    *,
    rounds: int = 3,
) -> tuple[int, list[float], list[list[float]]]:
    """Per round, the bare forward pass (:func:`forward_cpu_seconds`), then serial
    encode_catalog on ``store`` with each of ``configs`` in turn, one torch thread: the store's
    rows, and the CPU seconds per spectrum of every round, of the forward pass and of each
    config."""
    import torch

    from xpbatch.encode.stage import encode_catalog
    from xpbatch.model.files import load_model

    model = load_model(model_path)
    n_rows = int(open_variables(store, [schema.SOURCE_ID])[schema.SOURCE_ID].shape[0])
    batch_size = configs[0].batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    forward: list[float] = []
    encodes: list[list[float]] = [[] for _ in configs]
    try:
        forward_cpu_seconds(model, batch_size=batch_size)  # warm-up: kernels chosen once
        for _ in range(rounds):
            forward.append(forward_cpu_seconds(model, batch_size=batch_size))
            for config, times in zip(configs, encodes, strict=True):
                shutil.rmtree(out, ignore_errors=True)  # removing files is not encoding
                cpu = _cpu_seconds()
                encode_catalog(store, model_path, out, config=config)
                times.append((_cpu_seconds() - cpu) / n_rows)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(out, ignore_errors=True)
    return n_rows, forward, encodes


def measure_cpu_efficiency(
    store: Path, model_path: Path, out: Path, *, rounds: int = 3
) -> CpuEfficiency:
    """Alternate the bare forward pass and serial encode_catalog on ``store``
    (:func:`alternate_encodes`); keep the best of each."""
    n_rows, forward, (encode,) = alternate_encodes(
        store, model_path, out, [EncodeConfig(progress_bar=False)], rounds=rounds
    )
    return CpuEfficiency(n_rows, rounds, min(forward), min(encode))


@dataclasses.dataclass(frozen=True)
class EncodeBenchmark:
    """Measured rates and memory of one ``bench encode`` run."""

    rows: int
    memory_rows: int
    repeats: int
    bare_wall_s: float
    """Fastest of ``repeats`` runs."""
    cluster_wall_s: float
    """Fastest of ``repeats`` runs, template and final verification included."""
    bare_cpu_s: float
    """CPU seconds of the fastest bare run (insensitive to other jobs, unlike wall time)."""
    cluster_cpu_s: float
    """CPU seconds of the fastest encode-catalog run: workers plus this process."""
    cluster_threads: int
    cluster_workers: int
    worker_peak_rss: dict[int, int]
    """Rows of the catalogue -> largest peak RSS of any worker (bytes) while encoding it."""
    bare_peak_rss: int
    """Peak RSS of this process during the bare loop (bytes)."""
    efficiency: CpuEfficiency
    """CPU time per spectrum of serial encode_catalog against the bare forward pass."""

    @property
    def bare_rate(self) -> float:
        """Spectra/s of the bare single-process loop."""
        return self.rows / self.bare_wall_s

    @property
    def cluster_rate(self) -> float:
        """Spectra/s of encode-catalog end to end."""
        return self.rows / self.cluster_wall_s

    @property
    def ratio(self) -> float:
        """encode-catalog rate / bare loop rate (target on one machine: at least 0.9)."""
        return self.cluster_rate / self.bare_rate

    @property
    def memory_growth(self) -> float:
        """Peak worker RSS at the larger size / at the smaller size, minus 1."""
        small, large = self.worker_peak_rss[self.rows], self.worker_peak_rss[self.memory_rows]
        return large / small - 1

    def report(self) -> str:
        """The figures as the CLI prints them."""
        hours = DR3_N_SOURCES / self.cluster_rate / 3600
        mb = {rows: rss / 2**20 for rows, rss in self.worker_peak_rss.items()}
        return "\n".join(
            [
                f"encode benchmark on {self.rows:,} mock spectra (wall clock; a shared machine "
                "adds noise)",
                f"  bare loop, 1 process, torch on {os.cpu_count()} cores: "
                f"{self.bare_rate:10,.0f} spectra/s ({self.bare_wall_s:.1f} s)",
                f"  encode-catalog, {self.cluster_workers} workers x "
                f"{self.cluster_threads // max(self.cluster_workers, 1)} thread(s):     "
                f"{self.cluster_rate:10,.0f} spectra/s ({self.cluster_wall_s:.1f} s, "
                "verification included)",
                f"  ratio encode-catalog / bare loop: {self.ratio:.2f} (target >= 0.9; fastest "
                f"of {self.repeats} alternating runs each)",
                f"  CPU seconds per million spectra: bare loop "
                f"{self.bare_cpu_s / self.rows * 1e6:,.1f}, encode-catalog "
                f"{self.cluster_cpu_s / self.rows * 1e6:,.1f} (workers + client/scheduler)",
                "  peak RSS per worker: "
                + ", ".join(f"{mb[r]:,.0f} MiB at {r:,} rows" for r in sorted(mb))
                + f" ({self.memory_growth:+.1%}; target within 10 %)",
                f"  peak RSS of the bare loop: {self.bare_peak_rss / 2**20:,.0f} MiB",
                f"  projected wall time for all {DR3_N_SOURCES:,} DR3 spectra on this cluster: "
                f"{hours:,.1f} h",
                self.efficiency.report(),
            ]
        )


# --- inputs -------------------------------------------------------------------------------------
def mock_store(rows: int, workdir: Path, *, echo: Callable[[str], object]) -> Path:
    """A mock store of ``rows`` spectra, generated once per size in ``workdir``."""
    from xpbatch.mock import write_mock_store

    path = workdir / f"mock-{rows}.zarr"
    if not store_ready(path):
        echo(f"generating {rows:,} mock spectra in {path} (once)…")
        write_mock_store(path, rows, seed=0, overwrite=True)
    return path


def tiled_store(source: Path, rows: int, workdir: Path, *, echo: Callable[[str], object]) -> Path:
    """A store of ``rows`` rows repeating ``source``'s spectra (with new, ascending source_ids).

    Generating physical mock spectra is slower than encoding them; for a memory and throughput
    measurement, repeated spectra are as good as new ones.
    """
    from xpbatch.store.xp_store import XPStoreWriter

    path = workdir / f"tiled-{rows}.zarr"
    if store_ready(path):
        return path
    echo(f"writing {rows:,} rows (tiles of {source.name}) to {path} (once)…")
    arrays = open_variables(source, [n for n in INPUT_VARIABLES if n != schema.SOURCE_ID])
    n_source = arrays[schema.COEFFICIENTS].shape[0]
    chunk_rows = arrays[schema.COEFFICIENTS].chunks[0]
    writer = XPStoreWriter.create(path, rows, chunk_rows=chunk_rows, overwrite=True)
    for region in writer.chunk_slices():
        picks = np.arange(region.start, region.stop) % n_source
        lo, hi = int(picks.min()), int(picks.max()) + 1
        block = {name: np.asarray(a[lo:hi])[picks - lo] for name, a in arrays.items()}
        writer.write_rows(
            region.start,
            source_id=np.arange(region.start, region.stop, dtype=np.int64) + 1,
            **block,
        )
    writer.finalize()
    return path


def bench_model(store: Path, workdir: Path) -> Path:
    """An untrained network with the store's normalisation (speed does not depend on weights)
    and a latent density fitted as ``train`` fits one, every dimension counted active: the
    anomaly score costs what it costs for a trained model (a mixture, not the 1-component
    prior)."""
    from xpbatch.model.density import fit_density
    from xpbatch.model.files import save_model
    from xpbatch.model.trained import Normalisation, TrainedModel, standardise

    sample = open_variables(store, INPUT_VARIABLES)
    rows = slice(0, 20_000)
    coefficients = np.asarray(sample[schema.COEFFICIENTS][rows])
    inp = standardise(
        coefficients,
        np.asarray(sample[schema.COEFFICIENT_ERRORS][rows]),
        np.asarray(sample[schema.PHOT_G_MEAN_FLUX][rows]),
        Normalisation.identity(schema.N_COEFF),
    )
    usable = inp.valid.all(axis=1) & inp.encodable
    x = inp.x[usable]  # (rows, 110) coefficients / G flux
    model = TrainedModel.untrained(seed=0).with_updates(
        name="bench-untrained", normalisation=Normalisation(x.mean(axis=0), x.std(axis=0) + 1e-6)
    )
    encoded = encode_chunk(model, {name: np.asarray(a[rows]) for name, a in sample.items()})
    latent = encoded[schema.LATENT_MEAN]
    density = fit_density(latent, np.ones(latent.shape[1]), encoded[schema.RMSE])
    model = model.with_updates(density=density)
    path = workdir / "bench-model.safetensors"
    save_model(model, path)
    return path


# --- the two contenders -------------------------------------------------------------------------
def bare_loop(store: Path, model: TrainedModel, out: Path) -> None:
    """Read chunk -> encode -> write chunk, in this process, torch on every core."""
    import torch

    inputs = open_variables(store, INPUT_VARIABLES)
    n_rows = inputs[schema.SOURCE_ID].shape[0]
    chunk_rows = inputs[schema.COEFFICIENTS].chunks[0]
    layout = CatalogLayout(n_rows=n_rows, chunk_rows=chunk_rows)
    shutil.rmtree(out, ignore_errors=True)
    create_catalog(out, layout, attrs={})
    outputs = {
        spec.name: zarr.open_array(out / spec.name, mode="r+") for spec in layout.variables()
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        for index in range(layout.n_chunks):
            rows = layout.rows(index)
            chunk = {name: np.asarray(array[rows]) for name, array in inputs.items()}
            result = encode_chunk(model, chunk)
            for name, array in outputs.items():
                array[rows] = result[name]
    finally:
        torch.set_num_threads(threads)


class _PeakRSS:
    """Samples this process's resident set size in a daemon thread and keeps the peak."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="xpbatch-rss")

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def start(self) -> _PeakRSS:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; the peak RSS seen, in bytes."""
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._process.memory_info().rss)


_SAMPLERS: dict[int, _PeakRSS] = {}


def _start_rss_sampler() -> None:
    """Start sampling this process's RSS (run on every worker with ``client.run``)."""
    _SAMPLERS[os.getpid()] = _PeakRSS().start()


def _stop_rss_sampler() -> int:
    """Stop this process's sampler; its peak RSS in bytes."""
    return _SAMPLERS.pop(os.getpid()).stop()


@dataclasses.dataclass(frozen=True)
class _Run:
    """One timed run: wall seconds, CPU seconds of every process involved, peak RSS."""

    wall_s: float
    cpu_s: float
    peak_rss: int


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far, to the nanosecond
    (``/proc``'s figures come in 10 ms ticks: too coarse for a forward pass of a fraction of a
    second)."""
    return time.process_time()


def _run_bare(store: Path, model: TrainedModel, out: Path) -> _Run:
    sampler = _PeakRSS().start()
    cpu, started = _cpu_seconds(), time.perf_counter()
    bare_loop(store, model, out)
    wall = time.perf_counter() - started
    return _Run(wall, _cpu_seconds() - cpu, sampler.stop())


def _run_cluster(client: Client, store: Path, model: Path, out: Path) -> _Run:
    """encode-catalog on ``client``; CPU counts its workers and this process (the scheduler of a
    LocalCluster runs here)."""
    from xpbatch.encode.stage import encode_catalog

    # Steady state: workers import torch and xpbatch once per cluster, not once per catalogue.
    client.run(importlib.import_module, "xpbatch.encode.stage")
    workers_cpu = client.run(_cpu_seconds)
    client.run(_start_rss_sampler)
    try:
        cpu, started = _cpu_seconds(), time.perf_counter()
        config = EncodeConfig(overwrite=True, progress_bar=False)
        encode_catalog(store, model, out, client=client, config=config)
        wall = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu
    finally:
        peaks = client.run(_stop_rss_sampler)
    after = client.run(_cpu_seconds)
    cpu += sum(after[w] - workers_cpu.get(w, 0.0) for w in after)
    return _Run(wall, cpu, max(peaks.values()))


def run_encode_benchmark(
    rows: int = 1_000_000,
    *,
    client: Client,
    memory_rows: int | None = None,
    repeats: int = 2,
    workdir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], object] = logger.info,
) -> EncodeBenchmark:
    """Measure encode-catalog against the bare loop, and worker memory at two sizes.

    Parameters
    ----------
    rows
        Mock spectra of the throughput comparison (generated once per size in ``workdir``).
    client
        The cluster to measure (the CLI's default: a LocalCluster on every core).
    memory_rows
        The second, larger catalogue size for the memory comparison; default ``4 * rows``.
    repeats
        Runs of each contender, alternating; the fastest of each is reported (other jobs on a
        shared machine only ever slow a run down).
    workdir
        Where the stores, model and catalogues go (default: a temporary directory, removed
        after); on a filesystem the workers see.
    echo
        Progress messages.
    """
    from xpbatch.model.files import load_model

    memory_rows = memory_rows or 4 * rows
    scratch = Path(tempfile.mkdtemp(prefix="xpbatch-bench-"))
    folder = Path(workdir) if workdir is not None else scratch
    folder.mkdir(parents=True, exist_ok=True)
    try:
        store = mock_store(rows, folder, echo=echo)
        big = tiled_store(store, memory_rows, folder, echo=echo)
        model_path = bench_model(store, folder)
        model = load_model(model_path)
        bare_runs, cluster_runs = [], []
        for attempt in range(1, repeats + 1):
            echo(f"run {attempt} of {repeats}: bare loop, then encode-catalog…")
            bare_runs.append(_run_bare(store, model, folder / "bare.zarr"))
            cluster_runs.append(_run_cluster(client, store, model_path, folder / "c.zarr"))
        echo("CPU efficiency: forward pass and serial encode_catalog, alternating…")
        efficiency = measure_cpu_efficiency(store, model_path, folder / "s.zarr", rounds=repeats)
        echo(f"encode-catalog on {memory_rows:,} rows (memory)…")
        large = _run_cluster(client, big, model_path, folder / "c-large.zarr")
        bare = min(bare_runs, key=lambda r: r.wall_s)
        cluster = min(cluster_runs, key=lambda r: r.wall_s)
        nthreads = client.nthreads()
        return EncodeBenchmark(
            rows=rows,
            memory_rows=memory_rows,
            repeats=repeats,
            bare_wall_s=bare.wall_s,
            cluster_wall_s=cluster.wall_s,
            bare_cpu_s=bare.cpu_s,
            cluster_cpu_s=cluster.cpu_s,
            cluster_threads=sum(nthreads.values()),
            cluster_workers=len(nthreads),
            worker_peak_rss={
                rows: max(r.peak_rss for r in cluster_runs),
                memory_rows: large.peak_rss,
            },
            bare_peak_rss=max(r.peak_rss for r in bare_runs),
            efficiency=efficiency,
        )
    finally:
        for name in ("bare.zarr", "c.zarr", "c-large.zarr"):
            shutil.rmtree(folder / name, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
