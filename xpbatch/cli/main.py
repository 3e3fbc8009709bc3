"""The ``xpbatch`` command line. It only translates: parse, build a config, call one function.

Heavy modules (torch, dask, zarr) are imported inside the commands so ``xpbatch --help`` is instant.
A stage's options are generated from its config's fields (:mod:`xpbatch.cli.options`): their
names, defaults and help live in :mod:`xpbatch.config` only. The benchmarks are in
:mod:`xpbatch.cli.bench`.
"""

from __future__ import annotations

import logging
import signal
import sys
import typing
from typing import Any

import click

from xpbatch import __version__
from xpbatch.cli.bench import bench_group
from xpbatch.cli.failures import FailuresInOneLine
from xpbatch.cli.options import (
    Flag,
    PathOrURL,
    check_output_storage,
    cluster_config,
    cluster_options,
    config_from_options,
    config_options,
    located,
    options_given,
    storage_option,
)
from xpbatch.config import (
    EncodeConfig,
    HatsExportConfig,
    IngestConfig,
    MockConfig,
    NeighboursConfig,
    OutputOptions,
    ParquetExportConfig,
    SkyMapConfig,
    TrainConfig,
    TrainPreset,
    read_toml,
)


@click.group(cls=FailuresInOneLine)
@click.version_option(__version__, prog_name="xpbatch")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Encode the Gaia DR3 BP/RP (XP) catalogue with a scatter VAE on Dask."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("import-xpvae")
@click.argument("weight", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--norm",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="The authors' normalisation file (.npz with arrays 'mu' and 'sig', 110 values each).",
)
@click.option("-o", "--output", type=click.Path(), required=True, help="Model file to write.")
@click.option("--name", default=None, help="Model name recorded in the file [default: file stem].")
@click.option(
    "--store",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Measure the latent dimensions' KL on this XP store's first rows [default: on spectra "
    "the model generates].",
)
@config_options(OutputOptions)
def import_xpvae_command(
    weight: str, norm: str, output: str, name: str | None, store: str | None, **kwargs: Any
) -> None:
    """Convert the published scatter-VAE checkpoint (WEIGHT.pt) into an xpbatch model file."""
    from xpbatch.model.files import import_xpvae

    config = config_from_options(OutputOptions, kwargs)
    model = import_xpvae(weight, norm, output, name=name, store=store, config=config)
    click.echo(f"wrote {output} (model {model.name}, sha256 {model.content_hash[:16]}…)")


@main.command("info")
@click.argument("path", type=PathOrURL(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@storage_option
def info_command(path: str, as_json: bool, storage_options: str | None) -> None:
    """Summarise an XP store, a catalogue or a model file (kind detected from PATH)."""
    import json

    from xpbatch.cli.info import format_summary, summarize

    summary = summarize(located(path, storage_options))
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@main.command("export-parquet")
@click.argument("catalog", type=PathOrURL(exists=True, file_okay=False))
@click.option(
    "-o",
    "--output",
    type=PathOrURL(file_okay=False),
    required=True,
    help="Directory (or s3:// prefix) to write.",
)
@click.option(
    "--partitions",
    type=click.Path(exists=True),
    default=None,
    help="DR3 partition ranges: the _MD5SUM.txt of the DR3 bulk download, the directory of "
    "bulk files, or a text file of 'lo hi' lines [default: recorded in CATALOG or --store].",
)
@click.option(
    "--store",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="The XP store CATALOG was encoded from: its partition ranges (recorded by `xpbatch "
    "ingest` from DR3 bulk files) are used when CATALOG records none.",
)
@config_options(ParquetExportConfig, flags={"threads": Flag(type=click.IntRange(min=1))})
@storage_option
def export_parquet_command(
    catalog: str,
    output: str,
    partitions: str | None,
    store: str | None,
    storage_options: str | None,
    **options: Any,
) -> None:
    """Write CATALOG's latents, rmse and flags as Parquet, one file per DR3 partition.

    Files are named XpLatent_<lo>-<hi>.parquet like the DR3 bulk files; rerunning the same
    command with --resume completes an interrupted export.
    """
    from xpbatch.products.parquet_export import export_parquet

    config = config_from_options(ParquetExportConfig, options)
    target = located(output, storage_options)
    check_output_storage(target)
    catalog_at = located(catalog, storage_options)
    summary = export_parquet(catalog_at, target, partitions=partitions, store=store, config=config)
    click.echo(str(summary))


@main.command("export-hats")
@click.argument("catalog", type=PathOrURL(exists=True, file_okay=False))
@click.option(
    "-o",
    "--output",
    type=PathOrURL(file_okay=False),
    required=True,
    help="Collection to write (a directory or s3:// URL).",
)
@config_options(HatsExportConfig)
@cluster_options
@storage_option
def export_hats_command(catalog: str, output: str, **kwargs: Any) -> None:
    """Write CATALOG as a HATS collection (catalogue, source_id index, optional margin) that
    lsdb.open_catalog opens, cone-searches and joins; hats-import does the partitioning."""
    storage = kwargs.pop("storage_options")
    target, catalog_at = located(output, storage), located(catalog, storage)
    cluster = cluster_config(kwargs)
    config = config_from_options(HatsExportConfig, kwargs)
    check_output_storage(target)
    from xpbatch.products.hats_export import export_hats
    from xpbatch.runtime.cluster import lazy_connect

    with lazy_connect(cluster, on_start=_show_dashboard) as client:
        summary = export_hats(catalog_at, target, client=client, config=config)
    click.echo(str(summary))


@main.command("skymap")
@click.argument("catalog", type=PathOrURL(exists=True, file_okay=False))
@click.option(
    "-o", "--output", type=PathOrURL(), required=True, help="PNG to write (a path or URL)."
)
@config_options(SkyMapConfig, flags={"order": Flag(type=click.IntRange(0, 12))})
@cluster_options
@storage_option
def skymap_command(catalog: str, output: str, **kwargs: Any) -> None:
    """Draw HEALPix maps of CATALOG (sources, fraction encoded, median rmse, mean of each
    latent) in Mollweide, accumulated chunk by chunk on a Dask cluster."""
    cluster = cluster_config(kwargs)
    config = config_from_options(SkyMapConfig, kwargs)
    from xpbatch.products.sky_maps import write_sky_maps
    from xpbatch.runtime.cluster import lazy_connect

    output_at = located(output, kwargs["storage_options"])
    check_output_storage(output_at)
    with lazy_connect(cluster, on_start=_show_dashboard) as client:
        maps = write_sky_maps(
            located(catalog, kwargs["storage_options"]), output_at, client=client, config=config
        )
    click.echo(
        f"wrote {output}: {int(maps.count.sum()):,} sources on {len(maps.count):,} pixels "
        f"(HEALPix order {maps.order})"
    )


def _show_dashboard(client: Any) -> None:
    """Print the Dask dashboard's link when a command's cluster starts (after its checks)."""
    click.echo(f"Dask dashboard: {client.dashboard_link}", err=True)


def _exit_on_sigterm() -> None:
    """Make SIGTERM (Slurm or Kubernetes preemption) a normal exit that closes the cluster.

    Finished chunks are recorded already; ``--resume`` continues from them.
    """

    def leave(signum: int, frame: object) -> None:
        click.echo("terminated: rerun with --resume to finish", err=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


@main.command("encode-catalog")
@click.argument("store", type=PathOrURL(), required=False)
@click.option("-m", "--model", type=click.Path(dir_okay=False), help="Model file (.safetensors).")
@click.option(
    "-o", "--output", type=PathOrURL(file_okay=False), help="Catalogue to write (a path or URL)."
)
@storage_option
@click.option(
    "--demo",
    is_flag=True,
    help="No input needed: build (once, cached) a mock store and a small model, and encode them.",
)
@config_options(
    EncodeConfig,
    flags={
        "check_fit": Flag(("--check-fit/--skip-fit-check",)),
        "performance_report": Flag(type=click.Path(dir_okay=False)),
    },
)
@cluster_options
def encode_catalog_command(
    store: str | None, model: str | None, output: str | None, demo: bool, **kwargs: Any
) -> None:
    """Encode every spectrum of STORE with the model into a Zarr catalogue, on a Dask cluster.

    Killing it is safe: rerun with --resume to finish, redoing only unfinished chunks.
    """
    _exit_on_sigterm()
    cluster = cluster_config(kwargs)
    storage = kwargs.pop("storage_options")
    settings = options_given(EncodeConfig, kwargs)
    if demo:
        from xpbatch.train.demo import demo_inputs

        if store or model:
            raise click.UsageError("--demo brings its own store and model; omit STORE and --model")
        inputs = demo_inputs(echo=click.echo)
        store, model = str(inputs.store), str(inputs.model)
        if output is None:
            output, settings["overwrite"] = str(inputs.catalog), not settings.get("resume")
    if store is None or model is None or output is None:
        raise click.UsageError("give STORE, --model and --output (or --demo)")
    config = EncodeConfig(**settings)
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.runtime.cluster import lazy_connect

    store_at, output_at = located(store, storage), located(output, storage)
    check_output_storage(output_at)  # so are wrong credentials or a missing bucket
    with lazy_connect(cluster, on_start=_show_dashboard) as client:
        summary = encode_catalog(store_at, model, output_at, client=client, config=config)
    click.echo(str(summary))
    if demo:
        click.echo(
            "\nOpen it with xarray:\n"
            "  import xpbatch\n"
            f"  ds = xpbatch.open_catalog({output!r})  # or xarray.open_zarr({output!r})\n"
            "  ds.latent_mean.isel(source=slice(0, 5)).values"
        )


@main.command("neighbours")
@click.argument("catalog", type=PathOrURL(exists=True, file_okay=False))
@click.option(
    "--source-id",
    "source_ids",
    multiple=True,
    required=True,
    metavar="ID[,ID...]",
    help="Query source(s) of CATALOG; repeat the option or separate ids with commas.",
)
@click.option(
    "-o",
    "--output",
    type=PathOrURL(),
    default=None,
    help="Write the table here (.parquet, else CSV; a path or URL) [default: CSV on stdout].",
)
@config_options(NeighboursConfig, flags={"k": Flag(names=("-k",), type=click.IntRange(min=1))})
@cluster_options
@storage_option
def neighbours_command(
    catalog: str, source_ids: tuple[str, ...], output: str | None, **kwargs: Any
) -> None:
    """The K nearest sources of CATALOG to each query source in latent space (exact scan)."""
    try:
        ids = [int(part) for text in source_ids for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise click.BadParameter(f"source ids are integers: {e}", param_hint="--source-id") from e
    config = config_from_options(NeighboursConfig, kwargs)
    storage = kwargs.pop("storage_options")
    at, output_at = located(catalog, storage), located(output, storage)
    check_output_storage(output_at)
    from xpbatch.products.neighbours import find_neighbours, write_neighbours
    from xpbatch.runtime.cluster import lazy_connect

    shown = _show_dashboard if output else None  # stdout (and stderr) carry just the table
    with lazy_connect(cluster_config(kwargs), on_start=shown) as client:
        if output is None:
            table = find_neighbours(at, ids, k=config.k, client=client)
            click.echo(table.to_csv(index=False), nl=False)
            return
        table = write_neighbours(at, ids, output_at, client=client, config=config)
    click.echo(f"wrote {len(table):,} neighbours of {len(set(ids)):,} sources to {output}")


@main.command("verify")
@click.argument("catalog", type=PathOrURL())
@click.option(
    "--store",
    type=PathOrURL(),
    default=None,
    help="The input XP store: also check the row count, store id and source_id values.",
)
@storage_option
def verify_command(catalog: str, store: str | None, storage_options: str | None) -> None:
    """Check that every chunk of CATALOG was written completely and consistently.

    Exit code 0 when sound, 1 when a problem was found (each one is listed).
    """
    from xpbatch.catalog.verify import verify_catalog

    report = verify_catalog(located(catalog, storage_options), located(store, storage_options))
    click.echo(str(report))
    if not report.ok:
        sys.exit(1)


@main.command("train")
@click.argument("store", type=PathOrURL(exists=True, file_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    required=True,
    help="Model file to write (.safetensors); checkpoint and metrics go beside it.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="TOML file of TrainConfig settings; flags given here win.",
)
@click.option(
    "--preset",
    type=click.Choice(typing.get_args(TrainPreset)),
    default=None,
    help="Start from named settings ('quick': a first model in minutes on a CPU, on a sample, "
    "with early stopping; 'published': the defaults); --config and flags win.",
)
@config_options(
    TrainConfig,
    exclude=("model",),  # the architecture: a [model] table of the --config file
    flags={
        "source_ids": Flag(type=click.Path(exists=True, dir_okay=False)),
        "partial_rows": Flag(("--partial-rows/--complete-rows",)),
        "progress_bar": Flag(("--progress/--no-progress",)),
    },
)
@storage_option
def train_command(
    store: str,
    output: str,
    config_file: str | None,
    preset: TrainPreset | None,
    storage_options: str | None,
    **options: Any,
) -> None:
    """Fit the scatter VAE on the usable rows of STORE (an XP store) and write a model file.

    The defaults reproduce the published optimisation (AdamW, learning rate 1e-4, cosine warm
    restarts every 500 epochs down to 1e-10, batch 1024, 5000 epochs: hours on a GPU, days on a
    CPU). For a first try use --preset quick.
    """
    from xpbatch.train.stage import train_model

    settings = read_toml(config_file) if config_file else {}  # read once: [storage] is here too
    where = f"configuration file {config_file}" if config_file else "configuration"
    given = options_given(TrainConfig, options)
    config = TrainConfig.from_settings(settings, given, preset=preset, where=where)
    storage = storage_options or settings.get("storage")
    summary = train_model(located(store, storage), output, config=config)  # Ctrl-C: cli.failures
    click.echo(str(summary))


@main.command("mock")
@click.option(
    "-o",
    "--output",
    type=PathOrURL(),
    required=True,
    help="The store to write (store; a path or URL) or the directory of bulk files (dr3-bulk).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="TOML file of MockConfig settings (giant_fraction, bp_missing_fraction, ...).",
)
@click.option(
    "--rare",
    multiple=True,
    metavar="POPULATION=FRACTION",
    help="Inject a rare population (binary, emission_line, white_dwarf) into this fraction of "
    "the rows, labelled in the labels' population column; repeatable; overrides --config.",
)
@config_options(
    MockConfig,
    flags={
        "n": Flag(names=("-n",), type=click.IntRange(min=1)),
        "seed": Flag(type=click.IntRange(min=0)),
    },
)
@storage_option
def mock_command(
    output: str,
    config_file: str | None,
    rare: tuple[str, ...],
    storage_options: str | None,
    **options: Any,
) -> None:
    """Write a realistic synthetic catalogue of N sources with known labels (Teff, log g, ...).

    The same N and --seed give the same rows in both formats, so ingesting the dr3-bulk files
    reproduces the store. The labels are saved beside the output (OUTPUT.labels.parquet for a
    store, mock_labels.parquet in the bulk directory); read them with xpbatch.read_mock_labels.
    """
    from xpbatch.mock import make_mock

    settings = read_toml(config_file) if config_file else {}
    storage = storage_options or settings.pop("storage", None)  # a [storage] table
    settings.update(_rare_fractions(rare))
    where = config_file or "mock configuration"
    config = config_from_options(MockConfig, options, base=settings, where=where)
    target = located(output, storage)
    check_output_storage(target)
    click.echo(str(make_mock(target, config=config)))


def _rare_fractions(options: tuple[str, ...]) -> dict[str, float]:
    """``('binary=0.002', ...)`` -> ``{'binary_fraction': 0.002, ...}``."""
    from xpbatch.mock import POPULATIONS

    fractions = {}
    for option in options:
        name, _, value = option.partition("=")
        if name not in POPULATIONS[1:]:
            raise click.BadParameter(
                f"{option!r}: the rare populations are {', '.join(POPULATIONS[1:])}",
                param_hint="--rare",
            )
        try:
            fractions[f"{name}_fraction"] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"{option!r}: expected POPULATION=FRACTION, e.g. binary=0.002", param_hint="--rare"
            ) from None
    return fractions


@main.command("ingest")
@click.argument("xp_files", nargs=-1, required=True, type=click.Path())
@click.option(
    "--gaia-source",
    "gaia_source",
    multiple=True,
    type=click.Path(),
    help="gaia_source companion file, directory or quoted glob ('gaia/*.csv.gz'); one per "
    "use, repeat it for several (an unquoted glob would make the other files XP inputs): the "
    "same-suffix "
    "GaiaSource_*.csv.gz, or any CSV/Parquet with source_id and phot_g_mean_flux/_mag (and "
    "optionally ra, dec). Not needed for XP files that carry phot_g_mean_flux or _mag; a "
    "companion's value wins over the XP file's.",
)
@click.option(
    "-o", "--output", type=PathOrURL(), required=True, help="The store to write (a path or URL)."
)
@config_options(IngestConfig, flags={"columns": Flag(metavar="DR3_NAME=FILE_NAME,...")})
@cluster_options
@storage_option
def ingest_command(xp_files: tuple[str, ...], gaia_source: tuple[str, ...], **kwargs: Any) -> None:
    """Ingest Gaia DR3 XP continuous-spectrum files (or directories of them) into an XP store.

    Reads bulk XpContinuousMeanSpectrum_*.csv.gz files, the archive's CSV, ECSV, VOTable and
    FITS (astroquery's downloads), DPAC AVRO, Parquet and zip bundles of these, gzipped or not,
    recognised from their content.
    An interrupted or failed run continues with --resume: files already parsed are reused.
    """
    from xpbatch.ingest import ingest_files
    from xpbatch.runtime.cluster import lazy_connect

    output = located(kwargs.pop("output"), kwargs.pop("storage_options"))
    cluster = cluster_config(kwargs)
    config = config_from_options(IngestConfig, kwargs)
    check_output_storage(output)  # wrong credentials or a missing bucket: one line, now
    with lazy_connect(cluster, on_start=_show_dashboard) as client:
        summary = ingest_files(xp_files, gaia_source, output, client=client, config=config)
    click.echo(str(summary))


main.add_command(bench_group)
