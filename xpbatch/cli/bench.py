"""``xpbatch bench ...``: throughput and memory measurements on mock data.

Like the stage commands, each only parses, calls one benchmark function and prints its report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xpbatch.cli.options import cluster_config, cluster_options
from xpbatch.config import DEVICES, Device, TrainConfig


def _count(flag: str, default: int, *, minimum: int, help: str | None = None) -> Any:
    """An integer option of at least ``minimum``, its default shown."""
    kind = click.IntRange(min=minimum)
    return click.option(flag, type=kind, default=default, show_default=True, help=help)


def _workdir(what: str) -> Any:
    """``--workdir``: where a benchmark keeps its inputs between runs."""
    return click.option(
        "--workdir",
        type=click.Path(file_okay=False),
        default=None,
        help=f"{what} [default: a temporary directory].",
    )


@click.group("bench")
def bench_group() -> None:
    """Measure throughput on mock data (CPU time is per core; shared machines add noise)."""


@bench_group.command("ingest")
@_count(
    "--rows",
    48_000,
    minimum=100,
    help="Mock sources to generate (dr3-bulk files, cached in --workdir).",
)
@_count(
    "--rows-per-file",
    12_000,
    minimum=50,
    help="Rows per mock bulk file (a DR3 file holds 64.7k on average; small files add "
    "per-file costs).",
)
@_count(
    "--rounds",
    2,
    minimum=1,
    help="Repeat every measurement, in turn with the others, and keep the best (a shared "
    "machine's speed varies).",
)
@_workdir("Where to keep the mock files between runs")
@cluster_options
def bench_ingest_command(
    rows: int, rows_per_file: int, rounds: int, workdir: str | None, **kwargs: Any
) -> None:
    """Ingest rows/s per core against a plain pandas + np.fromstring reader, and the DR3 time."""
    from xpbatch.benchmarks.ingest import run_ingest_benchmark
    from xpbatch.runtime.cluster import connect

    cluster = cluster_config(kwargs)
    with connect(cluster) as client:
        result = run_ingest_benchmark(
            rows,
            rows_per_file=rows_per_file,
            rounds=rounds,
            workdir=workdir,
            client=client,
            echo=click.echo,
        )
    click.echo(result.report())


@bench_group.command("encode")
@_count(
    "--rows",
    1_000_000,
    minimum=1000,
    help="Mock spectra to encode (generated once per size in --workdir).",
)
@click.option(
    "--memory-rows",
    type=click.IntRange(min=1000),
    default=None,
    help="Second, larger size for the memory comparison [default: 4 x --rows].",
)
@_count(
    "--repeats",
    2,
    minimum=1,
    help="Alternating runs of each contender; the fastest of each is reported.",
)
@click.option(
    "--mc-samples",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Instead: the CPU cost of encode-catalog --mc-samples K (full covariance, serial, one "
    "thread) against K bare forward passes, and DR3 on CPUs and a GPU node. Use a few 10,000 "
    "--rows.",
)
@_workdir("Where to keep the mock stores between runs")
@cluster_options
def bench_encode_command(
    rows: int,
    memory_rows: int | None,
    repeats: int,
    mc_samples: int,
    workdir: str | None,
    **kwargs: Any,
) -> None:
    """encode-catalog spectra/s against a bare loop, worker memory at two sizes, DR3 time."""
    from xpbatch.benchmarks.encode import run_encode_benchmark
    from xpbatch.runtime.cluster import connect

    if mc_samples:
        from xpbatch.benchmarks.encode_mc import run_mc_benchmark

        mc = run_mc_benchmark(
            rows, samples=mc_samples, rounds=repeats, workdir=workdir, echo=click.echo
        )
        click.echo(mc.report())
        return
    cluster = cluster_config(kwargs)
    with connect(cluster) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
        result = run_encode_benchmark(
            rows,
            client=client,
            memory_rows=memory_rows,
            repeats=repeats,
            workdir=workdir,
            echo=click.echo,
        )
    click.echo(result.report())


@bench_group.command("train")
@_count(
    "--rows",
    100_000,
    minimum=1000,
    help="Mock spectra to train on (generated once per size in --workdir).",
)
@_count("--epochs", 4, minimum=2)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=TrainConfig.batch_size,
    show_default=True,
)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@_count(
    "--rounds",
    2,
    minimum=1,
    help="Run each this many times, alternately, and keep each one's best round.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads on CPU [default: torch's choice, one per core]; on a machine shared "
    "with other jobs use 1: spinning OpenMP threads make rates swing 30-fold.",
)
@_workdir("Where to keep the mock store between runs")
def bench_train_command(
    rows: int,
    epochs: int,
    batch_size: int,
    device: Device,
    rounds: int,
    threads: int | None,
    workdir: str | None,
) -> None:
    """Training samples/s of xpbatch train against a straightforward loop, on the same rows."""
    import torch

    from xpbatch.benchmarks.train import run_train_benchmark

    if threads is not None:
        torch.set_num_threads(threads)
    result = run_train_benchmark(
        rows,
        epochs=epochs,
        batch_size=batch_size,
        device=device,
        rounds=rounds,
        workdir=workdir,
        echo=click.echo,
    )
    click.echo(result.report())


@bench_group.command("anomalies")
@_count(
    "--rows",
    240_000,
    minimum=10_000,
    help="Mock spectra to build and encode; the model trains on 60,000 of them.",
)
@click.option(
    "--rare-fraction",
    type=click.FloatRange(0.0005, 0.5),
    default=0.005,
    show_default=True,
    help="Fraction of rare sources (binaries, emission-line stars, white dwarfs, a third each).",
)
@_count("--queries", 1000, minimum=10)
@_count("--epochs", 40, minimum=1)
@click.option(
    "--mc-samples",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also encode with K Monte-Carlo draws and measure whether latent_std_mc helps the "
    "anomaly score (density convolved with it) or the neighbours (chi2 ranking).",
)
@_workdir("Keep the mock, model and catalogue here")
def bench_anomalies_command(
    rows: int,
    rare_fraction: float,
    queries: int,
    epochs: int,
    mc_samples: int,
    workdir: str | None,
) -> None:
    """ROC AUC of anomaly_score, rmse and the 5-sigma rule; neighbours' label differences."""
    import dataclasses
    import tempfile

    from xpbatch.benchmarks.anomalies import TRAINING, run_anomaly_benchmark

    training = dataclasses.replace(TRAINING, epochs=epochs, cycle_epochs=epochs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        result = run_anomaly_benchmark(
            rows,
            rare_fraction=rare_fraction,
            n_queries=queries,
            training=training,
            workdir=root,
            echo=click.echo,
        )
        click.echo(result.report())
        if mc_samples:
            from xpbatch.benchmarks.anomalies_mc import measure_mc_widths

            click.echo(f"encoding again with {mc_samples} Monte-Carlo draws ...")
            effect = measure_mc_widths(root, samples=mc_samples, n_queries=queries)
            click.echo(effect.report())


@bench_group.command("neighbours")
@_count(
    "--rows",
    4_000_000,
    minimum=1000,
    help="Rows of the synthetic catalogue (written once per size in --workdir).",
)
@_count("--queries", 10, minimum=1)
@_count("-k", 100, minimum=1)
@_workdir("Keep the synthetic catalogue here")
@cluster_options
def bench_neighbours_command(
    rows: int, queries: int, k: int, workdir: str | None, **kwargs: Any
) -> None:
    """Time and peak memory of the exact latent search, and its equality with NumPy."""
    from xpbatch.benchmarks.neighbours import run_neighbours_benchmark
    from xpbatch.runtime.cluster import connect

    with connect(cluster_config(kwargs)) as client:
        click.echo(
            run_neighbours_benchmark(rows, client=client, queries=queries, k=k, workdir=workdir)
        )


@bench_group.command("object-storage")
@click.argument("url")
@_count("--rows", 262_144, minimum=1000, help="Rows of the mock store (written once in --workdir).")
@_count("--repeats", 3, minimum=1, help="Runs of each, alternating local and object storage.")
@_workdir("Keep the mock store and the local catalogue here")
@click.option(
    "--storage-options", default=None, metavar="JSON", help="Settings over the AWS environment."
)
def bench_object_storage_command(
    url: str, rows: int, repeats: int, workdir: str | None, storage_options: str | None
) -> None:
    """The same encode written to local disk and to URL (s3://bucket/prefix), alternating."""
    from xpbatch.benchmarks.object_storage import run_object_storage_benchmark
    from xpbatch.cli.options import check_output_storage, located

    target = located(url, storage_options)
    check_output_storage(target)
    click.echo(run_object_storage_benchmark(target, rows=rows, repeats=repeats, workdir=workdir))


@bench_group.command("uncertainty")
@_count(
    "--stars",
    20_000,
    minimum=100,
    help="Mock stars, each observed twice with independent noise, G spread evenly over 9-17.6.",
)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The model to calibrate [default: train a quick one on a mock, kept in --workdir].",
)
@click.option(
    "--mc-samples",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Monte-Carlo draws per spectrum (encode-catalog --mc-samples); 0: latent_std alone.",
)
@_count("--train-rows", 20_000, minimum=1000, help="Rows of the training mock (no --model).")
@_count("--epochs", 20, minimum=1, help="Epochs of the quick model (no --model).")
@_workdir("Keep the mocks, model and catalogue here")
def bench_uncertainty_command(
    stars: int,
    model: str | None,
    mc_samples: int,
    train_rows: int,
    epochs: int,
    workdir: str | None,
) -> None:
    """std of the normalised repeat difference of the latent means, per dim and G bin."""
    import dataclasses

    from xpbatch.benchmarks.uncertainty import TRAINING, run_uncertainty_benchmark

    training = dataclasses.replace(TRAINING, epochs=epochs, cycle_epochs=epochs)
    result = run_uncertainty_benchmark(
        stars,
        model=model,
        mc_samples=mc_samples,
        train_rows=train_rows,
        training=training,
        workdir=workdir,
        echo=click.echo,
    )
    click.echo(result.report())
