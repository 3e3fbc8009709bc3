"""The ``xpbatch`` command line. It only translates: parse, build a config, call one function.

Heavy modules (torch, dask, zarr) are imported inside the commands so ``xpbatch --help`` is instant.
Shared options are defined once (``cluster_options``) and their defaults come from
:mod:`xpbatch.config`.
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

from xpbatch import __version__
from xpbatch.config import (
    DEFAULT_CHUNK_ROWS,
    ENCODE_DEVICES,
    GPU_THREADS_PER_WORKER,
    MOCK_FORMATS,
    MOCK_ROWS_PER_FILE,
    ON_BAD_ROW_CHOICES,
    TRAIN_DATA_PLACEMENTS,
    TRAIN_DEVICES,
    TRAIN_PRECISIONS,
    ClusterConfig,
    EncodeConfig,
    HatsExportConfig,
    IngestConfig,
    MockConfig,
    TrainConfig,
    from_mapping,
    read_toml,
)
from xpbatch.errors import (
    ChunkError,
    ClusterError,
    ClusterUnavailableError,
    StoreError,
    XPBatchError,
)

F = TypeVar("F", bound=Callable[..., Any])

_CLUSTER_DEFAULTS = ClusterConfig()


def cluster_options(func: F) -> F:
    """The ``--cluster`` family of options, shared by every command that uses Dask."""
    options = [
        click.option(
            "--cluster",
            default=None,
            metavar="local-cuda|tcp://HOST:PORT",
            help="Omit for a LocalCluster of CPU worker processes; 'local-cuda' for one "
            "dask-cuda worker per GPU; or the address of a running scheduler.",
        ),
        click.option(
            "--scheduler-file",
            type=click.Path(dir_okay=False),
            default=None,
            help="Connect to the scheduler described by this file (Slurm, shared filesystem).",
        ),
        click.option(
            "--n-workers",
            type=int,
            default=_CLUSTER_DEFAULTS.n_workers,
            help="Worker processes of the local cluster [default: one per core].",
        ),
        click.option(
            "--threads-per-worker",
            type=int,
            default=_CLUSTER_DEFAULTS.threads_per_worker,
            help="Chunk tasks at once per local worker [default: 1 per CPU worker, "
            f"{GPU_THREADS_PER_WORKER} per GPU worker of --cluster local-cuda].",
        ),
        click.option(
            "--dashboard-address",
            default=_CLUSTER_DEFAULTS.dashboard_address,
            show_default=True,
            help="Where the local cluster's dashboard listens (':0' for any free port).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def cluster_config(kwargs: dict[str, Any]) -> ClusterConfig:
    """Pop the ``cluster_options`` from a command's kwargs into a :class:`ClusterConfig`."""
    return ClusterConfig(
        cluster=kwargs.pop("cluster"),
        scheduler_file=kwargs.pop("scheduler_file"),
        n_workers=kwargs.pop("n_workers"),
        threads_per_worker=kwargs.pop("threads_per_worker"),
        dashboard_address=kwargs.pop("dashboard_address"),
    )


def holds_output(command: str, output: str = "output") -> Callable[[F], F]:
    """Add ``--break-lock`` and hold the output's lock (:mod:`xpbatch.outputs`) for the command.

    Taken here, before a cluster starts, so a second run on the same output is refused at once;
    the stage function's own hold is then free (nested in the same process).
    """

    def decorate(func: F) -> F:
        @click.option(
            "--break-lock",
            is_flag=True,
            help="Take over the output's lock from a run on another host that you checked is "
            "gone (a dead run on this host is recognised by itself).",
        )
        @functools.wraps(func)
        def wrapper(*args: Any, break_lock: bool, **kwargs: Any) -> Any:
            if kwargs.get(output) is None:  # e.g. --demo picks its output itself
                return func(*args, **kwargs)
            from xpbatch.outputs import output_lock

            with output_lock(kwargs[output], command=command, break_lock=break_lock):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


_RERUN = {
    "encode-catalog": "rerun with --resume to continue (finished chunks are kept)",
    "train": "rerun with --resume to continue from the last checkpoint",
    "ingest": "rerun the same command to continue (finished files are reused)",
    "export-parquet": "rerun the same command to continue (finished files are kept)",
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
    from xpbatch.artifact import import_xpvae

    model = import_xpvae(weight, norm, output, name=name, store=store)
    click.echo(f"wrote {output} (model {model.name}, sha256 {model.content_hash[:16]}…)")


@main.command("info")
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_command(path: str, as_json: bool) -> None:
    """Summarise an XP store, a catalogue or a model file (kind detected from PATH)."""
    import json

    from xpbatch.info import format_summary, summarize

    summary = summarize(path)
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@main.command("export-parquet")
@holds_output("export-parquet")
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
@click.option(
    "--overwrite", is_flag=True, help="Replace an export of a different catalogue in OUTPUT."
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="Threads [default: one per core]."
)
def export_parquet_command(
    catalog: str,
    output: str,
    partitions: str | None,
    store: str | None,
    overwrite: bool,
    threads: int | None,
) -> None:
    """Write CATALOG's latents, rmse and flags as Parquet, one file per DR3 partition.

    Files are named XpLatent_<lo>-<hi>.parquet like the DR3 bulk files; rerunning the same
    command completes an interrupted export.
    """
    from xpbatch.export import export_parquet

    result = export_parquet(
        catalog,
        output,
        partitions=partitions,
        store=store,
        overwrite=overwrite,
        n_threads=threads,
    )
    click.echo(
        f"wrote {result.n_rows:,} rows in {len(result.files):,} files to {result.output_dir}"
        + (f" ({result.n_reused:,} kept from an earlier run)" if result.n_reused else "")
        + f"; partition ranges from {result.partitions.origin}"
    )


_HATS_DEFAULTS = HatsExportConfig()


@main.command("export-hats")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o", "--output", type=click.Path(file_okay=False), required=True, help="Collection to write."
)
@click.option(
    "--name", default=_HATS_DEFAULTS.name, show_default=True, help="Name of the HATS catalogue."
)
@click.option(
    "--pixel-threshold",
    type=click.IntRange(min=1),
    default=_HATS_DEFAULTS.pixel_threshold,
    show_default=True,
    help="Most rows per HEALPix partition (denser sky gets smaller partitions).",
)
@click.option(
    "--highest-order",
    type=click.IntRange(0, 19),
    default=_HATS_DEFAULTS.highest_order,
    show_default=True,
    help="Highest HEALPix order of a partition.",
)
@click.option(
    "--margin-arcsec",
    type=float,
    default=None,
    help="Also write a margin cache this wide (arcsec) for cross-matches [default: none].",
)
@click.option("--with-scatter", is_flag=True, help="Also export the scatter (110 columns).")
@click.option(
    "--positions-from-source-id",
    is_flag=True,
    help="For rows without ra/dec: use the centre of the source_id's HEALPix level-12 pixel "
    "(~0.86 arcmin), marked in the column position_from_source_id.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted export (same options).")
@click.option("--overwrite", is_flag=True, help="Replace an existing export at OUTPUT.")
@cluster_options
def export_hats_command(catalog: str, output: str, **kwargs: Any) -> None:
    """Write CATALOG as a HATS collection (catalogue, source_id index, optional margin) that
    lsdb.open_catalog opens, cone-searches and joins; hats-import does the partitioning."""
    cluster = cluster_config(kwargs)
    config = HatsExportConfig(**kwargs)
    from xpbatch.cluster import connect
    from xpbatch.hats_export import export_hats

    with connect(cluster) as client:
        summary = export_hats(catalog, output, client=client, config=config)
    click.echo(str(summary))


@main.command("skymap")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), required=True, help="PNG to write."
)
@click.option(
    "--order",
    type=click.IntRange(0, 12),
    default=5,
    show_default=True,
    help="HEALPix order of the maps (5: 12,288 pixels of ~1.8 degrees).",
)
@cluster_options
def skymap_command(catalog: str, output: str, order: int, **kwargs: Any) -> None:
    """Draw HEALPix maps of CATALOG (sources, fraction encoded, median rmse, mean of each
    latent) in Mollweide, accumulated chunk by chunk on a Dask cluster."""
    cluster = cluster_config(kwargs)
    from xpbatch.cluster import connect
    from xpbatch.skymap import compute_sky_maps, draw_sky_maps

    with connect(cluster) as client:
        maps = compute_sky_maps(catalog, order=order, client=client)
    draw_sky_maps(maps, output, title=catalog)
    click.echo(f"wrote {output}: {int(maps.count.sum()):,} sources on {len(maps.count):,} pixels")


_ENCODE_DEFAULTS = EncodeConfig()


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
@holds_output("encode-catalog")
@click.argument("store", type=click.Path(), required=False)
@click.option("-m", "--model", type=click.Path(dir_okay=False), help="Model file (.safetensors).")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Catalogue to write.")
@click.option(
    "--demo",
    is_flag=True,
    help="No input needed: build (once, cached) a mock store and a small model, and encode them.",
)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted run (same store, model and options)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing catalogue at OUTPUT.")
@click.option(
    "--with-reconstruction",
    is_flag=True,
    help="Also store the decoder's reconstruction in e-/s (about twice the output size).",
)
@click.option(
    "--batch-size",
    type=int,
    default=_ENCODE_DEFAULTS.batch_size,
    show_default=True,
    help="Rows per forward pass.",
)
@click.option(
    "--device",
    type=click.Choice(ENCODE_DEVICES),
    default=_ENCODE_DEFAULTS.device,
    show_default=True,
    help="Torch device of each worker; auto = its GPU when it has one.",
)
@click.option("--no-verify", is_flag=True, help="Skip the final verification (not recommended).")
@click.option(
    "--skip-fit-check",
    is_flag=True,
    help="Encode even when the store's first rows do not look like the model's training data "
    "(scaled coefficients, another normalisation): only if you know why they differ.",
)
@click.option(
    "--performance-report",
    type=click.Path(dir_okay=False),
    default=None,
    help="Save Dask's performance report to this HTML file.",
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
    if demo:
        from xpbatch.demo import demo_inputs

        if store or model:
            raise click.UsageError("--demo brings its own store and model; omit STORE and --model")
        inputs = demo_inputs(echo=click.echo)
        store, model = str(inputs.store), str(inputs.model)
        if output is None:
            output, kwargs["overwrite"] = str(inputs.catalog), not kwargs["resume"]
    if store is None or model is None or output is None:
        raise click.UsageError("give STORE, --model and --output (or --demo)")
    config = EncodeConfig(
        batch_size=kwargs["batch_size"],
        with_reconstruction=kwargs["with_reconstruction"],
        resume=kwargs["resume"],
        overwrite=kwargs["overwrite"],
        device=kwargs["device"],
        verify=not kwargs["no_verify"],
        check_fit=not kwargs["skip_fit_check"],
        performance_report=kwargs["performance_report"],
    )
    from xpbatch.artifact import read_model_metadata
    from xpbatch.cluster import connect
    from xpbatch.pipeline import encode_catalog

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
@click.option("-k", type=click.IntRange(min=1), default=100, show_default=True, help="Neighbours.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the table here (.parquet, else CSV) [default: CSV on stdout].",
)
@click.option(
    "-m",
    "--model",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The catalogue's model; needed only for catalogues that do not record their latent "
    "density (written before it existed).",
)
@cluster_options
def neighbours_command(
    catalog: str,
    source_ids: tuple[str, ...],
    k: int,
    output: str | None,
    model: str | None,
    **kwargs: Any,
) -> None:
    """The K nearest sources of CATALOG to each query source in latent space (exact scan)."""
    try:
        ids = [int(part) for text in source_ids for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise click.BadParameter(f"source ids are integers: {e}", param_hint="--source-id") from e
    from xpbatch.artifact import load_model
    from xpbatch.cluster import connect
    from xpbatch.neighbours import find_neighbours, write_table

    trained = load_model(model) if model else None
    with connect(cluster_config(kwargs)) as client:
        table = find_neighbours(catalog, ids, k=k, client=client, model=trained)
    if output is None:
        click.echo(table.to_csv(index=False), nl=False)
    else:
        write_table(table, output)
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
    from xpbatch.catalog import verify_catalog

    report = verify_catalog(catalog, store)
    click.echo(str(report))
    if not report.ok:
        sys.exit(1)


_TRAIN_DEFAULTS = TrainConfig()

# (flag, TrainConfig field, click type, help); every default comes from TrainConfig.
_TRAIN_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--epochs", "epochs", click.IntRange(min=1), "Passes over the training rows."),
    ("--learning-rate", "learning_rate", float, "AdamW learning rate at each cycle's start."),
    ("--min-learning-rate", "min_learning_rate", float, "Learning rate at each cycle's end."),
    ("--cycle-epochs", "cycle_epochs", click.IntRange(min=1), "Epochs per cosine cycle."),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay."),
    ("--batch-size", "batch_size", click.IntRange(min=2), "Spectra per optimisation step."),
    ("--kl-weight", "kl_weight", float, "Weight of the KL term (1: the published loss)."),
    ("--seed", "seed", click.IntRange(min=0), "Seed of sample, split, weights and shuffles."),
    ("--validation-fraction", "validation_fraction", float, "Share of rows held out."),
    ("--sample", "sample", click.IntRange(min=2), "Train on a random sample of N usable rows."),
    (
        "--source-ids",
        "source_ids",
        click.Path(exists=True, dir_okay=False),
        "Train on these sources only (one id per line, or a CSV/Parquet column source_id).",
    ),
    (
        "--checkpoint-every",
        "checkpoint_every",
        click.IntRange(min=1),
        "Epochs between checkpoints.",
    ),
    ("--device", "device", click.Choice(TRAIN_DEVICES), "Where to train."),
    ("--precision", "precision", click.Choice(TRAIN_PRECISIONS), "fp32; tf32 or bf16 on CUDA."),
    (
        "--data-placement",
        "data_placement",
        click.Choice(TRAIN_DATA_PLACEMENTS),
        "Rows resident on the device, streamed from the store, or auto (device when they fit).",
    ),
]


def _with_default(text: str, default: Any) -> str:
    return text if default is None else f"{text} [default: {default}]"


def train_options(func: F) -> F:
    """The TrainConfig options of ``xpbatch train``; unset ones leave the file's value alone."""
    options = [
        click.option(
            flag,
            field,
            type=kind,
            default=None,
            help=_with_default(text, getattr(_TRAIN_DEFAULTS, field)),
        )
        for flag, field, kind, text in _TRAIN_OPTIONS
    ]
    options.append(
        click.option(
            "--partial-rows/--complete-rows",
            "partial_rows",
            default=None,
            help="Also train on rows with a missing band or non-finite values (masked in the "
            "loss) [default: complete rows only, as published].",
        )
    )
    for option in reversed(options):
        func = option(func)
    return func


@main.command("train")
@holds_output("train")
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
@train_options
@click.option("--resume", is_flag=True, help="Continue the run from the checkpoint beside OUTPUT.")
@click.option(
    "--overwrite", is_flag=True, help="Start again even if OUTPUT or its checkpoint exist."
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Show a progress bar (epoch, losses, samples/s).",
)
def train_command(
    store: str,
    output: str,
    config_file: str | None,
    resume: bool,
    overwrite: bool,
    progress: bool,
    **options: Any,
) -> None:
    """Fit the scatter VAE on the usable rows of STORE (an XP store) and write a model file.

    The defaults reproduce the published optimisation (AdamW, learning rate 1e-4, cosine warm
    restarts every 500 epochs down to 1e-10, batch 1024, 5000 epochs).
    """
    from xpbatch.train import RunPaths, train_model

    overrides = {k: v for k, v in options.items() if v is not None}
    config = TrainConfig.from_toml(config_file, overrides)
    try:
        history = train_model(
            store, output, config, resume=resume, overwrite=overwrite, progress=progress
        )
    except KeyboardInterrupt:
        checkpoint = RunPaths.for_model(output).checkpoint
        click.echo(f"interrupted; checkpoint in {checkpoint}; continue with --resume", err=True)
        sys.exit(130)
    counts = history.counts
    click.echo(
        f"trained {len(history.records)} epochs on {counts['train']:,} rows "
        f"({counts['validation']:,} validation) on {history.device} ({history.data_placement})"
    )
    if counts["excluded"]:
        reasons = ", ".join(
            f"{k.removeprefix('excluded_')} {v:,}"
            for k, v in counts.items()
            if k.startswith("excluded_") and v
        )
        click.echo(f"excluded {counts['excluded']:,} unusable rows ({reasons})")
    if counts.get("unknown_source_ids"):
        click.echo(f"{counts['unknown_source_ids']:,} listed source ids are not in the store")
    last = history.records[-1]
    validation = "-" if last.validation_loss is None else f"{last.validation_loss:.4g}"
    click.echo(f"final train loss {last.train_loss:.4g}, validation loss {validation}")
    click.echo(f"wrote {history.model_path}; metrics {history.metrics_path}")


@main.command("mock")
@click.option("-n", "n_rows", type=click.IntRange(min=1), required=True, help="Number of sources.")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    required=True,
    help="The store to write (store) or the directory of bulk files (dr3-bulk).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(MOCK_FORMATS),
    default="store",
    show_default=True,
    help="An XP store, or Gaia DR3 bulk files (XpContinuousMeanSpectrum_*.csv.gz + GaiaSource "
    "companions + _MD5SUM.txt) to feed `xpbatch ingest`.",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed."
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    default=DEFAULT_CHUNK_ROWS,
    show_default=True,
    help="Rows per store chunk (store).",
)
@click.option(
    "--rows-per-file",
    type=click.IntRange(min=1),
    default=MOCK_ROWS_PER_FILE,
    show_default=True,
    help="Rows per bulk file, about: files hold whole HEALPix pixels (dr3-bulk).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Bulk files written at once, in threads (dr3-bulk).",
)
@click.option(
    "--with-correlations",
    is_flag=True,
    help="Also store the packed correlation arrays, like `xpbatch ingest --with-correlations`.",
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
@click.option("--overwrite", is_flag=True, help="Replace an existing store or bulk files.")
def mock_command(
    n_rows: int,
    output: str,
    output_format: str,
    seed: int,
    chunk_rows: int,
    rows_per_file: int,
    workers: int,
    with_correlations: bool,
    config_file: str | None,
    rare: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Write a realistic synthetic catalogue of N sources with known labels (Teff, log g, ...).

    The same N and --seed give the same rows in both formats, so ingesting the dr3-bulk files
    reproduces the store. The labels are saved beside the output (OUTPUT.labels.parquet for a
    store, mock_labels.parquet in the bulk directory); read them with xpbatch.read_mock_labels.
    """
    from xpbatch.mock import labels_path, write_mock_dr3_bulk, write_mock_store

    settings = read_toml(config_file) if config_file else {}
    settings.update(_rare_fractions(rare))
    config = from_mapping(MockConfig, settings, where=config_file or "mock configuration")
    if output_format == "store":
        path = write_mock_store(
            output,
            n_rows,
            seed=seed,
            chunk_rows=chunk_rows,
            rows_per_file=rows_per_file,  # the partition plan the store records
            config=config,
            with_correlations=with_correlations,
            overwrite=overwrite,
        )
        click.echo(f"wrote {n_rows:,} mock sources to {path}; labels {labels_path(path)}")
    else:
        if with_correlations:
            raise click.UsageError("--with-correlations applies to --format store only")
        files = write_mock_dr3_bulk(
            output,
            n_rows,
            seed=seed,
            rows_per_file=rows_per_file,
            config=config,
            overwrite=overwrite,
            workers=workers,
        )
        click.echo(
            f"wrote {n_rows:,} mock sources in {len(files):,} XpContinuousMeanSpectrum files "
            f"(+ GaiaSource companions, _MD5SUM.txt, labels) to {output}"
        )


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


_INGEST_DEFAULTS = IngestConfig()


@main.command("ingest")
@holds_output("ingest")
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
@click.option(
    "--on-bad-row",
    type=click.Choice(ON_BAD_ROW_CHOICES),
    default=_INGEST_DEFAULTS.on_bad_row,
    show_default=True,
    help="error: a malformed row stops the ingest; skip: leave it out (recorded in the store).",
)
@click.option(
    "--with-correlations",
    is_flag=True,
    help="Also parse and store the 1485 packed correlations per band (15x the size).",
)
@click.option(
    "--scalars",
    default=None,
    metavar="NAMES",
    help="Comma-separated DR3 scalar columns to keep when the files have them (e.g. "
    "bp_chi_squared), or 'none' [default: all present].",
)
@click.option(
    "--columns",
    default=None,
    metavar="MAPPING",
    help="DR3 names of XP columns named otherwise, comma-separated DR3_NAME=FILE_NAME; {i} "
    "stands for the coefficient index of one-column-per-coefficient tables (e.g. "
    "'bp_coefficients=BPc{i},bp_coefficient_errors=BPe{i}').",
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    default=_INGEST_DEFAULTS.chunk_rows,
    show_default=True,
    help="Rows per store chunk.",
)
@click.option("--no-verify-md5", is_flag=True, help="Do not check files against _MD5SUM.txt.")
@click.option("--keep-parts", is_flag=True, help="Keep the per-file staging parts afterwards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at OUTPUT.")
@cluster_options
def ingest_command(xp_files: tuple[str, ...], gaia_source: tuple[str, ...], **kwargs: Any) -> None:
    """Ingest Gaia DR3 XP continuous-spectrum files (or directories of them) into an XP store.

    Reads bulk XpContinuousMeanSpectrum_*.csv.gz files, the archive's CSV, ECSV, VOTable and
    FITS (astroquery's downloads), DPAC AVRO, Parquet and zip bundles of these, gzipped or not,
    recognised from their content.
    Interrupted or failed runs resume: rerun the same command and finished files are reused.
    """
    from xpbatch.cluster import connect
    from xpbatch.ingest import (
        GAIA_SOURCE_GLOB,
        XP_GLOB,
        expand_inputs,
        ingest_files,
        pair_files,
    )

    cluster = cluster_config(kwargs)
    scalars = kwargs["scalars"]
    config = IngestConfig(
        chunk_rows=kwargs["chunk_rows"],
        on_bad_row=kwargs["on_bad_row"],
        with_correlations=kwargs["with_correlations"],
        scalars=None if scalars is None else tuple(s for s in scalars.split(",") if s != "none"),
        verify_md5=not kwargs["no_verify_md5"],
        overwrite=kwargs["overwrite"],
        keep_parts=kwargs["keep_parts"],
        columns=_column_mapping(kwargs["columns"]),
    )
    xp = expand_inputs(xp_files, XP_GLOB)
    gs = expand_inputs(gaia_source, GAIA_SOURCE_GLOB)
    pair_files(xp, gs)  # refuse missing companions before starting a cluster
    with connect(cluster) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
        out = ingest_files(xp, gs, kwargs["output"], client=client, config=config)
    from xpbatch.store import open_xp_store

    attrs = open_xp_store(out).attrs
    click.echo(f"wrote {out}: {attrs['row_count']:,} rows from {len(xp):,} XP file(s)")
    if attrs["skipped_row_count"]:
        click.echo(f"skipped {attrs['skipped_row_count']:,} malformed row(s), e.g.:", err=True)
        for row in attrs["skipped_rows"][:5]:
            click.echo(f"  {row['file']}, line {row['line']}: {row['reason']}", err=True)


def _column_mapping(text: str | None) -> tuple[tuple[str, str], ...]:
    """'a=b,c=d' -> (('a', 'b'), ('c', 'd'))."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        target, sep, given = item.partition("=")
        if not sep or not target.strip() or not given.strip():
            raise click.BadParameter(
                f"{item!r} is not DR3_NAME=FILE_NAME (e.g. bp_coefficients=BPc{{i}})",
                param_hint="--columns",
            )
        pairs.append((target.strip(), given.strip()))
    return tuple(pairs)


@main.group("bench")
def bench_group() -> None:
    """Measure throughput on mock data (CPU time is per core; shared machines add noise)."""


@bench_group.command("ingest")
@click.option(
    "--rows",
    type=click.IntRange(min=100),
    default=48_000,
    show_default=True,
    help="Mock sources to generate (dr3-bulk files, cached in --workdir).",
)
@click.option(
    "--rows-per-file",
    type=click.IntRange(min=50),
    default=12_000,
    show_default=True,
    help="Rows per mock bulk file (a DR3 file holds 64.7k on average; small files add "
    "per-file costs).",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Repeat every measurement, in turn with the others, and keep the best (a shared "
    "machine's speed varies).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to keep the mock files between runs [default: a temporary directory].",
)
@cluster_options
def bench_ingest_command(
    rows: int, rows_per_file: int, rounds: int, workdir: str | None, **kwargs: Any
) -> None:
    """Ingest rows/s per core against a plain pandas + np.fromstring reader, and the DR3 time."""
    from xpbatch.benchmarks.ingest import run_ingest_benchmark
    from xpbatch.cluster import connect

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
@click.option(
    "--rows",
    type=click.IntRange(min=1000),
    default=1_000_000,
    show_default=True,
    help="Mock spectra to encode (generated once per size in --workdir).",
)
@click.option(
    "--memory-rows",
    type=click.IntRange(min=1000),
    default=None,
    help="Second, larger size for the memory comparison [default: 4 x --rows].",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Alternating runs of each contender; the fastest of each is reported.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to keep the mock stores between runs [default: a temporary directory].",
)
@cluster_options
def bench_encode_command(
    rows: int, memory_rows: int | None, repeats: int, workdir: str | None, **kwargs: Any
) -> None:
    """encode-catalog spectra/s against a bare loop, worker memory at two sizes, DR3 time."""
    from xpbatch.benchmarks.encode import run_encode_benchmark
    from xpbatch.cluster import connect

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
@click.option(
    "--rows",
    type=click.IntRange(min=1000),
    default=100_000,
    show_default=True,
    help="Mock spectra to train on (generated once per size in --workdir).",
)
@click.option("--epochs", type=click.IntRange(min=2), default=4, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=_TRAIN_DEFAULTS.batch_size,
    show_default=True,
)
@click.option("--device", type=click.Choice(TRAIN_DEVICES), default="auto", show_default=True)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Run each this many times, alternately, and keep each one's best round.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads on CPU [default: torch's choice, one per core]; on a machine shared "
    "with other jobs use 1: spinning OpenMP threads make rates swing 30-fold.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to keep the mock store between runs [default: a temporary directory].",
)
def bench_train_command(
    rows: int,
    epochs: int,
    batch_size: int,
    device: str,
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
@click.option(
    "--rows",
    type=click.IntRange(min=10_000),
    default=60_000,
    show_default=True,
    help="Mock spectra to build, train on and encode.",
)
@click.option(
    "--rare-fraction",
    type=click.FloatRange(0.0005, 0.5),
    default=0.005,
    show_default=True,
    help="Fraction of rare sources (binaries, emission-line stars, white dwarfs, a third each).",
)
@click.option("--queries", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep the mock, model and catalogue here [default: a temporary directory].",
)
def bench_anomalies_command(
    rows: int, rare_fraction: float, queries: int, epochs: int, workdir: str | None
) -> None:
    """ROC AUC of anomaly_score, rmse and the 5-sigma rule; neighbours' label differences."""
    import dataclasses

    from xpbatch.benchmarks.anomalies import TRAINING, run_anomaly_benchmark

    training = dataclasses.replace(TRAINING, epochs=epochs, cycle_epochs=epochs)
    result = run_anomaly_benchmark(
        rows,
        rare_fraction=rare_fraction,
        n_queries=queries,
        training=training,
        workdir=workdir,
        echo=click.echo,
    )
    click.echo(result.report())


@bench_group.command("neighbours")
@click.option(
    "--rows",
    type=click.IntRange(min=1000),
    default=4_000_000,
    show_default=True,
    help="Rows of the synthetic catalogue (written once per size in --workdir).",
)
@click.option("--queries", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("-k", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep the synthetic catalogue here [default: a temporary directory].",
)
@cluster_options
def bench_neighbours_command(
    rows: int, queries: int, k: int, workdir: str | None, **kwargs: Any
) -> None:
    """Time and peak memory of the exact latent search, and its equality with NumPy."""
    from xpbatch.benchmarks.neighbours import run_neighbours_benchmark
    from xpbatch.cluster import connect

    with connect(cluster_config(kwargs)) as client:
        click.echo(
            run_neighbours_benchmark(rows, client=client, queries=queries, k=k, workdir=workdir)
        )
