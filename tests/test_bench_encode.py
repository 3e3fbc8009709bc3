"""``xpbatch bench encode`` at a tiny size: it measures both contenders and reports the figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from xpbatch import schema
from xpbatch.benchmarks.encode import run_encode_benchmark
from xpbatch.model.files import load_model

if TYPE_CHECKING:
    from distributed import Client


def test_bench_encode_reports_rates_memory_and_projection(
    dask_client: Client, tmp_path: Path
) -> None:
    said: list[str] = []
    result = run_encode_benchmark(
        2000, client=dask_client, memory_rows=5000, repeats=1, workdir=tmp_path, echo=said.append
    )
    assert result.bare_rate > 0 and result.cluster_rate > 0
    assert result.bare_cpu_s > 0 and result.cluster_cpu_s > 0
    assert set(result.worker_peak_rss) == {2000, 5000}
    assert min(result.worker_peak_rss.values()) > 50 * 2**20  # a worker with torch loaded
    report = result.report()
    for text in ("ratio encode-catalog / bare loop", "CPU seconds", "peak RSS per worker", "DR3"):
        assert text in report
    efficiency = result.efficiency
    assert efficiency.forward_cpu_s > 0 and efficiency.encode_cpu_s > efficiency.forward_cpu_s
    assert efficiency.ratio == efficiency.encode_cpu_s / efficiency.forward_cpu_s
    assert efficiency.gpu_node_rate(16) == 16 / efficiency.host_cpu_s
    for text in (
        "ratio encode_catalog / forward pass",
        "non-network CPU",
        "GPU node with 16",
        "node model",
    ):
        assert text in report
    # The model scores with a fitted mixture, so the efficiency includes a real score's cost.
    density = load_model(tmp_path / "bench-model.safetensors").density
    assert density is not None and density.kind == "gaussian_mixture"
    # The larger store repeats the mock spectra, with its own ascending source_ids.
    small, large = (
        zarr.open_group(tmp_path / "mock-2000.zarr"),
        zarr.open_group(tmp_path / "tiled-5000.zarr"),
    )
    np.testing.assert_array_equal(
        large[schema.COEFFICIENTS][4000:4100], small[schema.COEFFICIENTS][0:100]
    )
    assert np.all(np.diff(large[schema.SOURCE_ID][:]) > 0)
    assert not (tmp_path / "c.zarr").exists()  # catalogues are removed, inputs kept


def test_the_forward_pass_is_timed_alone_on_the_loaded_network() -> None:
    from xpbatch.benchmarks.encode import forward_cpu_seconds
    from xpbatch.model.trained import TrainedModel

    model = TrainedModel.untrained()
    assert forward_cpu_seconds(model, batch_size=4096, rows=65536) > 0  # enough for the clock
    assert not model.network.training  # eval mode: batch norm uses its running statistics


def test_bench_encode_mc_reports_the_ratio_and_projections(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from xpbatch.cli.main import main

    args = ["bench", "encode", "--mc-samples", "8", "--rows", "1000", "--repeats", "1"]
    result = CliRunner().invoke(main, [*args, "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "K = 8 draws, full covariance, on 1,000 mock spectra" in result.output
    ratio = float(result.output.split("ratio / 8 bare forward passes: ")[1].split()[0])
    assert 0.1 < ratio < 10  # measured, not the bar: 1,000 rows on a shared machine are noisy
    assert "core-hours" in result.output and "one GPU node (16 cores)" in result.output
    assert not (tmp_path / "mc.zarr").exists()  # the measured catalogue is removed
