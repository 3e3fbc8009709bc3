"""The ``xpbatch`` command line. It only translates: parse, build a config, call one function.

Heavy modules (torch, dask, zarr) are imported inside the commands so ``xpbatch --help`` is instant.
A stage's options are generated from its config's fields (:mod:`xpbatch.cli.options`): their
names, defaults and help live in :mod:`xpbatch.config` only. The benchmarks are in
:mod:`xpbatch.cli.bench`.
"""

from __future__ import annotations

import errno
import logging
import sys
import traceback
from typing import Any

import click

from xpbatch import __version__
from xpbatch.cli.bench import bench_group
from xpbatch.cli.options import (
    Flag,
    cluster_config,
    cluster_options,
    config_from_options,
    config_options,
    options_given,
)
from xpbatch.config import (
    EncodeConfig,
    HatsExportConfig,
    IngestConfig,
    MockConfig,
    NeighboursConfig,
    ParquetExportConfig,
    SkyMapConfig,
    TrainConfig,
    read_toml,
)
from xpbatch.errors import (
    ChunkError,
    ClusterError,
    ClusterUnavailableError,
    StoreError,
    XPBatchError,
)

_RERUN = {
    "encode-catalog": "rerun with --resume to continue (finished chunks are kept)",
    "train": "rerun with --resume to continue from the last checkpoint",
    "ingest": "rerun with --resume to continue (files already parsed are reused)",
    "export-parquet": "rerun with --resume to continue (finished files are kept)",
    "export-hats": "rerun with --resume to continue (finished tasks are kept)",
}
"""What to do after a failure that a rerun recovers from, per command."""


class _Group(click.Group):
    """Turns every failure a user can cause into one message and an exit code, not a traceback.

    xpbatch's own errors, Ctrl-C, the operating system's refusals (read-only or full disk,
    permissions) and a lost Dask scheduler each end in one line saying what happened and, where
    a rerun continues the work, how. ``-v`` also prints the traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BaseException as e:
            message, code = _failure_message(e, ctx.invoked_subcommand or "")
            if message is None:
                raise
            if ctx.params.get("verbose"):
                traceback.print_exc()
            click.secho(f"error: {message}", fg="red", err=True)
            sys.exit(code)


def _failure_message(error: BaseException, command: str) -> tuple[str | None, int]:
    """The one-line message and exit code of ``error``; (None, 0) to let it propagate."""
    rerun = _RERUN.get(command)
    then = f"; {rerun}" if rerun else ""
    if isinstance(error, XPBatchError):
        message = str(error)
        mendable = not isinstance(error.__cause__, StoreError)  # a damaged store stays damaged
        began = not isinstance(error, ClusterUnavailableError)  # else nothing to continue
        resumable = isinstance(error, ChunkError | ClusterError) and mendable and began
        if resumable and "rerun" not in message:
            message += then  # a failed task or a lost cluster: a rerun continues
        return message, 2
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted (Ctrl-C){then}", 130
    if isinstance(error, OSError) and error.errno in _OS_ERRORS:
        where = f" ({error.filename})" if error.filename else ""
        return f"{_OS_ERRORS[error.errno]}{where}: {error.strerror}{then}", 1
    if isinstance(error, ValueError) and "checksum" in str(error):  # zarr's crc32c codec
        return (
            f"a chunk file failed its crc32c checksum ({error}): the data is damaged; for a "
            "catalogue `xpbatch verify` names the file, -v shows where it was read",
            2,
        )
    if _is_lost_cluster(error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"lost the Dask scheduler or its workers ({type(error).__name__}: {first}){then}", 1
    return None, 0


_OS_ERRORS = {
    errno.EROFS: "cannot write: the filesystem is read-only",
    errno.EACCES: "cannot write: permission denied",
    errno.EPERM: "cannot write: operation not permitted",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file grew beyond the allowed size",
}
"""OS errors a user causes (and fixes), with what to say."""


def _is_lost_cluster(error: BaseException) -> bool:
    """A Dask communication failure: the scheduler or every worker went away mid-run."""
    module = type(error).__module__ or ""
    return module.startswith(("distributed", "tornado")) or (
        isinstance(error, OSError | TimeoutError) and "scheduler" in str(error).lower()
    )


@click.group(cls=_Group)
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
def import_xpvae_command(
    weight: str, norm: str, output: str, name: str | None, store: str | None
) -> None:
    """Convert the published scatter-VAE checkpoint (WEIGHT.pt) into an xpbatch model file."""
    from xpbatch.model.files import import_xpvae

    model = import_xpvae(weight, norm, output, name=name, store=store)
    click.echo(f"wrote {output} (model {model.name}, sha256 {model.content_hash[:16]}…)")


@main.command("info")
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_command(path: str, as_json: bool) -> None:
    """Summarise an XP store, a catalogue or a model file (kind detected from PATH)."""
    import json

    from xpbatch.cli.info import format_summary, summarize

    summary = summarize(path)
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@main.command("export-parquet")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o", "--output", type=click.Path(file_okay=False), required=True, help="Directory to write."
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
def export_parquet_command(
    catalog: str, output: str, partitions: str | None, store: str | None, **options: Any
) -> None:
    """Write CATALOG's latents, rmse and flags as Parquet, one file per DR3 partition.

    Files are named XpLatent_<lo>-<hi>.parquet like the DR3 bulk files; rerunning the same
    command with --resume completes an interrupted export.
    """
    from xpbatch.products.parquet_export import export_parquet

    config = config_from_options(ParquetExportConfig, options)
    summary = export_parquet(catalog, output, partitions=partitions, store=store, config=config)
    click.echo(str(summary))


@main.command("export-hats")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o", "--output", type=click.Path(file_okay=False), required=True, help="Collection to write."
)
@config_options(HatsExportConfig)
@cluster_options
def export_hats_command(catalog: str, output: str, **kwargs: Any) -> None:
    """Write CATALOG as a HATS collection (catalogue, source_id index, optional margin) that
    lsdb.open_catalog opens, cone-searches and joins; hats-import does the partitioning."""
    cluster = cluster_config(kwargs)
    config = config_from_options(HatsExportConfig, kwargs)
    from xpbatch.products.hats_export import export_hats
    from xpbatch.runtime.cluster import connect

    with connect(cluster) as client:
        summary = export_hats(catalog, output, client=client, config=config)
    click.echo(str(summary))


@main.command("skymap")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), required=True, help="PNG to write."
)
@config_options(SkyMapConfig, flags={"order": Flag(type=click.IntRange(0, 12))})
@cluster_options
def skymap_command(catalog: str, output: str, **kwargs: Any) -> None:
    """Draw HEALPix maps of CATALOG (sources, fraction encoded, median rmse, mean of each
    latent) in Mollweide, accumulated chunk by chunk on a Dask cluster."""
    cluster = cluster_config(kwargs)
    config = config_from_options(SkyMapConfig, kwargs)
    from xpbatch.products.sky_maps import write_sky_maps
    from xpbatch.runtime.cluster import connect

    with connect(cluster) as client:
        maps = write_sky_maps(catalog, output, client=client, config=config)
    click.echo(
        f"wrote {output}: {int(maps.count.sum()):,} sources on {len(maps.count):,} pixels "
        f"(HEALPix order {maps.order})"
    )


def _exit_on_sigterm() -> None:
    """Make SIGTERM (Slurm or Kubernetes preemption) a normal exit that closes the cluster.

    Finished chunks are recorded already; ``--resume`` continues from them.
    """
    import signal

    def leave(signum: int, frame: object) -> None:
        click.echo("terminated: rerun with --resume to finish", err=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


@main.command("encode-catalog")
@click.argument("store", type=click.Path(), required=False)
@click.option("-m", "--model", type=click.Path(dir_okay=False), help="Model file (.safetensors).")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Catalogue to write.")
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
    from xpbatch.model.files import read_model_metadata
    from xpbatch.runtime.cluster import connect

    read_model_metadata(model)  # a wrong file is refused before a cluster starts
    with connect(cluster) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
        summary = encode_catalog(store, model, output, client=client, config=config)
    click.echo(str(summary))
    if demo:
        click.echo(
            "\nOpen it with xarray:\n"
            "  import xpbatch\n"
            f"  ds = xpbatch.open_catalog({output!r})  # or xarray.open_zarr({output!r})\n"
            "  ds.latent_mean.isel(source=slice(0, 5)).values"
        )


@main.command("neighbours")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
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
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the table here (.parquet, else CSV) [default: CSV on stdout].",
)
@config_options(NeighboursConfig, flags={"k": Flag(names=("-k",), type=click.IntRange(min=1))})
@cluster_options
def neighbours_command(
    catalog: str, source_ids: tuple[str, ...], output: str | None, **kwargs: Any
) -> None:
    """The K nearest sources of CATALOG to each query source in latent space (exact scan)."""
    try:
        ids = [int(part) for text in source_ids for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise click.BadParameter(f"source ids are integers: {e}", param_hint="--source-id") from e
    config = config_from_options(NeighboursConfig, kwargs)
    from xpbatch.products.neighbours import find_neighbours, write_neighbours
    from xpbatch.runtime.cluster import connect

    with connect(cluster_config(kwargs)) as client:
        if output is None:
            table = find_neighbours(catalog, ids, k=config.k, client=client)
            click.echo(table.to_csv(index=False), nl=False)
            return
        table = write_neighbours(catalog, ids, output, client=client, config=config)
    click.echo(f"wrote {len(table):,} neighbours of {len(set(ids)):,} sources to {output}")


@main.command("verify")
@click.argument("catalog", type=click.Path())
@click.option(
    "--store",
    type=click.Path(),
    default=None,
    help="The input XP store: also check the row count, store id and source_id values.",
)
def verify_command(catalog: str, store: str | None) -> None:
    """Check that every chunk of CATALOG was written completely and consistently.

    Exit code 0 when sound, 1 when a problem was found (each one is listed).
    """
    from xpbatch.catalog.verify import verify_catalog

    report = verify_catalog(catalog, store)
    click.echo(str(report))
    if not report.ok:
        sys.exit(1)


@main.command("train")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
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
@config_options(
    TrainConfig,
    exclude=("model",),  # the architecture: a [model] table of the --config file
    flags={
        "source_ids": Flag(type=click.Path(exists=True, dir_okay=False)),
        "partial_rows": Flag(("--partial-rows/--complete-rows",)),
        "progress_bar": Flag(("--progress/--no-progress",)),
    },
)
def train_command(store: str, output: str, config_file: str | None, **options: Any) -> None:
    """Fit the scatter VAE on the usable rows of STORE (an XP store) and write a model file.

    The defaults reproduce the published optimisation (AdamW, learning rate 1e-4, cosine warm
    restarts every 500 epochs down to 1e-10, batch 1024, 5000 epochs).
    """
    from xpbatch.train.stage import RunPaths, train_model

    config = TrainConfig.from_toml(config_file, options_given(TrainConfig, options))
    try:
        summary = train_model(store, output, config=config)
    except KeyboardInterrupt:
        checkpoint = RunPaths.for_model(output).checkpoint
        click.echo(f"interrupted; checkpoint in {checkpoint}; continue with --resume", err=True)
        sys.exit(130)
    click.echo(str(summary))


@main.command("mock")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    required=True,
    help="The store to write (store) or the directory of bulk files (dr3-bulk).",
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
def mock_command(
    output: str, config_file: str | None, rare: tuple[str, ...], **options: Any
) -> None:
    """Write a realistic synthetic catalogue of N sources with known labels (Teff, log g, ...).

    The same N and --seed give the same rows in both formats, so ingesting the dr3-bulk files
    reproduces the store. The labels are saved beside the output (OUTPUT.labels.parquet for a
    store, mock_labels.parquet in the bulk directory); read them with xpbatch.read_mock_labels.
    """
    from xpbatch.mock import make_mock

    settings = read_toml(config_file) if config_file else {}
    settings.update(_rare_fractions(rare))
    where = config_file or "mock configuration"
    config = config_from_options(MockConfig, options, base=settings, where=where)
    click.echo(str(make_mock(output, config=config)))


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
    help="gaia_source companion file or directory (repeat for several): the same-suffix "
    "GaiaSource_*.csv.gz, or any CSV/Parquet with source_id and phot_g_mean_flux/_mag (and "
    "optionally ra, dec). Not needed for XP files that carry phot_g_mean_flux or _mag; a "
    "companion's value wins over the XP file's.",
)
@click.option("-o", "--output", type=click.Path(), required=True, help="The store to write.")
@config_options(IngestConfig, flags={"columns": Flag(metavar="DR3_NAME=FILE_NAME,...")})
@cluster_options
def ingest_command(xp_files: tuple[str, ...], gaia_source: tuple[str, ...], **kwargs: Any) -> None:
    """Ingest Gaia DR3 XP continuous-spectrum files (or directories of them) into an XP store.

    Reads bulk XpContinuousMeanSpectrum_*.csv.gz files, the archive's CSV, ECSV, VOTable and
    FITS (astroquery's downloads), DPAC AVRO, Parquet and zip bundles of these, gzipped or not,
    recognised from their content.
    An interrupted or failed run continues with --resume: files already parsed are reused.
    """
    from xpbatch.ingest import (
        GAIA_SOURCE_GLOB,
        XP_GLOB,
        expand_inputs,
        ingest_files,
        pair_files,
    )
    from xpbatch.runtime.cluster import connect

    cluster = cluster_config(kwargs)
    config = config_from_options(IngestConfig, kwargs)
    xp = expand_inputs(xp_files, XP_GLOB)
    gs = expand_inputs(gaia_source, GAIA_SOURCE_GLOB)
    pair_files(xp, gs)  # refuse missing companions before starting a cluster
    with connect(cluster) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
        summary = ingest_files(xp, gs, kwargs["output"], client=client, config=config)
    click.echo(str(summary))


main.add_command(bench_group)
