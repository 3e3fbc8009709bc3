"""Stage entry point of ``encode-catalog``: map the model over every chunk of a store.

One task per input chunk: read the chunk (its arrays read concurrently by
:class:`xpbatch.store.reader.ChunkReader`), run the encode kernel
(:func:`xpbatch.encode.kernel.encode_chunk`)
on the worker's device, write its aligned region of the catalogue (the variables written
concurrently) and then its completion record (:class:`xpbatch.catalog.writer.CatalogWriter`).
Without
a client the same function runs serially in this process, which the tests use as the reference.

The Dask machinery is not here: :class:`xpbatch.runtime.executor.Executor` runs the tasks
(bounded, retried, failures named) and draws the progress bar, as for every stage, and
:mod:`xpbatch.encode.workers`
holds what each worker process keeps (the model on its device, loaded once by
:class:`~xpbatch.encode.workers.ModelPlugin`; opened arrays). What keeps a long run cheap and safe:

- the model goes to each worker once, never into a task's graph;
- at most ``tasks_per_thread`` chunks per worker thread are in flight, and results are released
  as soon as counted: memory is flat in catalogue size;
- a worker runs several chunks at once (its threads share one model and, on a GPU, each has its
  own CUDA stream), so one chunk's reads and writes overlap another's device work;
- every task is idempotent, so Dask rerunning one after a worker dies is harmless, and a chunk
  whose worker died too often is simply submitted again (up to ``max_attempts``);
- progress lives only in the catalogue's records, so ``--resume`` after any kill redoes only
  unrecorded chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zarr

from xpbatch import schema
from xpbatch.catalog import verify as catalog_verify
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.catalog.layout import CatalogLayout, ChunkRecord
from xpbatch.catalog.output import mark_complete, prepare_output, remove_interrupted_writes
from xpbatch.catalog.writer import CatalogWriter
from xpbatch.config import EncodeConfig
from xpbatch.encode import workers
from xpbatch.encode.kernel import encode_chunk
from xpbatch.encode.mc import MonteCarlo
from xpbatch.encode.outputs import INPUT_VARIABLES, PASSTHROUGH_VARIABLES
from xpbatch.errors import (
    CatalogError,
    ChunkError,
    ConfigError,
    ModelMismatchError,
    StoreError,
)
from xpbatch.runtime.executor import Executor, LazyClient, Progress, storage_credentials
from xpbatch.schema import CatalogFlag
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.manifest import real_place
from xpbatch.storage.outputs import check_lock, locked_output
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import Place
from xpbatch.store.reader import ChunkReader, open_variables, present_variables

if TYPE_CHECKING:
    import torch
    import xarray as xr
    from distributed import Client

    from xpbatch.model.trained import TrainedModel

logger = logging.getLogger(__name__)


# --- the run's result ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EncodeSummary:
    """What :func:`encode_catalog` did."""

    path: str
    rows: int
    """Rows in the catalogue (all of the input's)."""
    rows_encoded: int
    """Rows with model outputs (the others are flagged not_encoded)."""
    flag_counts: dict[str, int]
    """CatalogFlag name -> rows carrying it."""
    chunks: int
    chunks_skipped: int
    """Chunks already recorded by an earlier run (``--resume``)."""
    rows_this_run: int
    wall_s: float
    output_bytes: int
    verified: bool
    """Whether verification (:mod:`xpbatch.catalog.verify`) ran on every chunk and passed."""
    checks: str = ""
    """What the verification checked, or why nothing was checked (printed by ``str()``)."""

    @property
    def spectra_per_s(self) -> float:
        """Rows encoded by this run per second of wall time (verification included)."""
        return self.rows_this_run / self.wall_s if self.wall_s > 0 else float("nan")

    def __str__(self) -> str:
        flagged = ", ".join(f"{k} {v:,}" for k, v in self.flag_counts.items() if v) or "none"
        resumed = f" ({self.chunks_skipped} done before, skipped)" if self.chunks_skipped else ""
        return "\n".join(
            [
                f"catalogue      {self.path}",
                f"rows           {self.rows:,} in {self.chunks} chunks{resumed}",
                f"rows encoded   {self.rows_encoded:,}"
                f" ({self.rows - self.rows_encoded:,} not encoded)",
                f"rows flagged   {flagged}",
                f"wall time      {self.wall_s:.1f} s for {self.rows_this_run:,} rows "
                f"({self.spectra_per_s:,.0f} spectra/s)",
                f"output size    {self.output_bytes / 1e6:,.1f} MB"
                + (", verified complete" if self.verified else ", NOT verified"),
                f"checks         {self.checks or 'none'}",
            ]
        )


# --- one chunk -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkJob:
    """Everything a task needs besides the model: a few strings and numbers."""

    store: Place
    """The input store: an absolute path or a Location (its options pickle without secrets)."""
    store_id: str
    out: Place
    run_id: str
    index: int
    model_key: str
    model_path: str | None
    device: str
    batch_size: int
    mc: MonteCarlo | None = None
    """The Monte-Carlo latents' draws, or None."""


def _passthrough(store: PathLike | Location) -> tuple[str, ...]:
    """The store's variables that the catalogue copies (``ra``, ``dec`` when it has them)."""
    return present_variables(store, PASSTHROUGH_VARIABLES)


def _model_for(job: ChunkJob) -> tuple[TrainedModel, torch.device]:
    """The model of this process, loading it if no plugin did (e.g. a worker that missed it)."""
    found = workers.installed_model(job.model_key)
    if found is None:
        if job.model_path is None:
            raise ChunkError(f"model {job.model_key[:16]}… is not loaded in this process")
        workers.ModelPlugin(job.model_key, path=job.model_path, device=job.device).load()
        found = workers.installed_model(job.model_key)
        assert found is not None
    return found


def run_chunk(job: ChunkJob) -> ChunkRecord:
    """Read, encode and write one chunk, then record it (the body of every task).

    Raises
    ------
    ChunkError
        Naming the chunk, its rows, the store and the catalogue.
    """
    try:
        model, device = _model_for(job)
        names = (
            *INPUT_VARIABLES,
            *_passthrough(job.store),
            *(job.mc.store_variables() if job.mc else ()),
        )
        reader = workers.cached(
            ("reader", str(job.store) + job.store_id + ",".join(names)),
            lambda: ChunkReader(job.store, names),
        )
        writer = workers.cached(
            ("writer", str(job.out) + job.run_id), lambda: CatalogWriter(job.out)
        )
        rows = writer.layout.rows(job.index)
        outputs = encode_chunk(
            model,
            reader.read(rows),
            batch_size=job.batch_size,
            device=device,
            # The catalogue's layout decides, so a task always writes what its template holds.
            with_reconstruction=writer.layout.with_reconstruction,
            mc=job.mc,
        )
        return writer.write_chunk(job.index, outputs, device=workers.device_name(device))
    except (ChunkError, StoreError):  # a damaged input chunk names itself; no rerun mends it
        raise
    except Exception as e:
        raise ChunkError(
            f"chunk {job.index} of {job.store} -> {job.out}: {type(e).__name__}: {e}"
        ) from e


# --- checks before any work ----------------------------------------------------------------------
def _open_store(store: Place) -> xr.Dataset:
    from xpbatch.store.reader import open_xp_store

    return open_xp_store(store)


def check_model_fits(
    model: TrainedModel, ds: xr.Dataset, *, store: PathLike | Location | None = None
) -> None:
    """Refuse a model whose input size, coefficient order, units or normalisation do not fit.

    With ``store`` (the path of ``ds``), also measure rows of every chunk against what the model's
    training data looked like (:func:`xpbatch.model.fit_check.check_fit`).

    Raises
    ------
    ModelMismatchError
        Naming what the model expects and what the store has.
    """
    n_coeff = ds.sizes[schema.COEFF]
    n_in = model.config.input_dim
    if n_coeff != n_in:
        raise ModelMismatchError(
            f"model {model.name!r} takes {n_in} coefficients per spectrum, the store has "
            f"{n_coeff}; use a model trained on stores like this one"
        )
    if schema.COEFF in ds.coords:
        labels = [str(v) for v in ds[schema.COEFF].values]
        expected = schema.coeff_labels(n_in // 2, n_in - n_in // 2)
        if labels != expected:
            raise ModelMismatchError(
                f"the model reads coefficients in the order {expected[0]} … {expected[-1]} "
                f"(BP then RP), the store's coeff axis is {labels[:2]} … {labels[-1:]}"
            )
    units = ds[schema.COEFFICIENTS].attrs.get(schema.ATTR_UNITS)
    if units not in (None, schema.FLUX_UNITS):
        raise ModelMismatchError(
            f"the model's input recipe expects coefficients in {schema.FLUX_UNITS}, the store "
            f"has {units!r}"
        )
    if store is not None:
        _check_normalisation(model, store)


def _check_normalisation(model: TrainedModel, store: PathLike | Location) -> None:
    """Measure rows from every chunk of the store as the model's training rows were
    (:mod:`xpbatch.model.fit_check`)."""
    from xpbatch.model import fit_check as fit
    from xpbatch.store.reader import sample_rows

    source_id = open_variables(store, [schema.SOURCE_ID])[schema.SOURCE_ID]
    n_chunks = -(-source_id.shape[0] // source_id.chunks[0])
    names = [n for n in INPUT_VARIABLES if n != schema.SOURCE_ID]
    sample = sample_rows(store, names, per_chunk=fit.rows_per_chunk(n_chunks))
    fit.check_store_sample(model, sample, where="the store")


def _input_layout(
    store: Place, model: TrainedModel, with_reconstruction: bool, *, with_mc: bool = False
) -> CatalogLayout:
    """The catalogue layout: the store's rows in the store's chunks."""
    coefficients = open_variables(store, [schema.COEFFICIENTS])[schema.COEFFICIENTS]
    return CatalogLayout(
        n_rows=int(coefficients.shape[0]),
        chunk_rows=int(coefficients.chunks[0]),
        latent_dim=model.config.latent_dim,
        n_coeff=model.config.input_dim,
        with_reconstruction=with_reconstruction,
        with_positions=_passthrough(store) == PASSTHROUGH_VARIABLES,
        with_mc=with_mc,
    )


def _versions() -> dict[str, str]:
    """The model's provenance versions plus the libraries that write the catalogue."""
    import importlib.metadata

    import dask
    import xarray

    from xpbatch.model.files import runtime_versions

    return {
        **runtime_versions(),
        "zarr": zarr.__version__,
        "xarray": xarray.__version__,
        "dask": dask.__version__,
        "distributed": importlib.metadata.version("distributed"),
    }


def _run_attrs(
    model: TrainedModel,
    model_hash: str,
    store: Place,
    store_attrs: Mapping[str, Any],
    store_id: str,
    config: EncodeConfig,
    mc: MonteCarlo | None,
) -> dict[str, Any]:
    # The DR3 partition ranges travel with the rows, so export-parquet finds them here.
    partitions = store_attrs.get(schema.STORE_ATTR_PARTITION_RANGES)
    return {
        **({schema.STORE_ATTR_PARTITION_RANGES: partitions} if partitions else {}),
        "title": "Gaia DR3 BP/RP (XP) scatter-VAE catalogue (xpbatch encode-catalog)",
        "references": "Laroche & Speagle (2024), arXiv:2407.15016",
        schema.CATALOG_ATTR_MODEL_HASH: model_hash,
        "model_name": model.name,
        "model_provenance": model.provenance,
        schema.ATTR_LATENT_DENSITY: model.density.attrs() if model.density else None,
        schema.CATALOG_ATTR_STORE_ID: store_id,
        schema.CATALOG_ATTR_INPUT_STORE: str(_absolute(store)),
        # Monte-Carlo options only when drawn: a plain run's attributes stay as they were.
        schema.CATALOG_ATTR_OPTIONS: {
            "batch_size": config.batch_size,
            **(mc.options() if mc else {}),
        },
        "versions": _versions(),
        "command_line": shlex.join(sys.argv),
        schema.CATALOG_ATTR_RUN_ID: uuid.uuid4().hex,
    }


def _model_and_hash(model: TrainedModel | PathLike) -> tuple[TrainedModel, str, str | None]:
    """(model, content hash, file path or None) for a model file or an in-memory model."""
    from xpbatch.model.files import load_model, save_model

    if not hasattr(model, "network"):  # a path, not a TrainedModel
        path = str(Path(model).resolve())  # type: ignore[arg-type]
        loaded = load_model(path)
        return loaded, loaded.content_hash, path
    trained: TrainedModel = model  # type: ignore[assignment]
    if not trained.content_hash:  # never saved: hash its would-be file content
        with tempfile.TemporaryDirectory() as tmp:
            save_model(trained, Path(tmp) / "model.safetensors")
    return trained, trained.content_hash, None


# --- the stage ---------------------------------------------------------------------------------
def _absolute(place: Place) -> Place:
    """A local path made absolute (workers of a remote cluster do not share this process's
    directory); a URL as it is."""
    return place.resolve() if isinstance(place, Path) else place


@locked_output("out", "encode-catalog")
def encode_catalog(
    store: PathLike | Location,
    model: TrainedModel | PathLike,
    out: PathLike | Location,
    *,
    client: Client | LazyClient | None = None,
    config: EncodeConfig | None = None,
) -> EncodeSummary:
    """Encode every row of an XP store into a catalogue, resumably.

    Parameters
    ----------
    store
        The input XP store (``xpbatch ingest`` / ``xpbatch mock``): a path, an ``s3://`` URL or a
        :class:`~xpbatch.storage.location.Location` carrying storage options.
    model
        A model file (``.safetensors``) or a :class:`~xpbatch.model.trained.TrainedModel`.
    out
        The catalogue to write: a directory on a filesystem every worker sees, or an ``s3://``
        URL (or Location) that every worker can reach; there the lock is a lease object and
        each chunk object is one atomic PUT.
    client
        A ``distributed.Client``: one task per chunk on its workers. None: serially here.
    config
        Options (resume, overwrite, batch size, ...); see :class:`~xpbatch.config.EncodeConfig`.

    Returns
    -------
    EncodeSummary
        Rows, flags, wall time, spectra/s and output size; ``str()`` gives a readable summary.

    Raises
    ------
    StoreNotFoundError, StoreError
        The store is missing or malformed (checked before anything is written).
    ModelMismatchError
        The model does not fit the store (checked before anything is written).
    OutputExistsError, ResumeRefusedError
        ``out`` exists without ``resume``/``overwrite``, or belongs to another run.
    ChunkError
        A chunk failed ``max_attempts`` times; finished chunks are kept for ``--resume``.

    Examples
    --------
    >>> summary = encode_catalog("dr3.zarr", "model.safetensors", "catalog.zarr")  # doctest: +SKIP
    >>> print(summary)  # doctest: +SKIP
    """
    config = config or EncodeConfig()
    started = time.perf_counter()
    out = real_place(out)  # through a symlink: the target is written (and replaced)
    store = zarr_arrays.where(store)
    executor = _executor(client, config)
    report: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if config.performance_report:  # checked before anything is written
        report = executor.performance_report(config.performance_report)
    plan = _plan(store, model, out, config)
    with report, storage_credentials(executor, out, store):
        rows_this_run = 0
        for record in _records(executor, plan, config):
            rows_this_run += record.rows
            check_lock(out)  # a run that lost its lease stops here (object storage)
        if not plan.was_complete:
            # A worker killed mid-write leaves a temporary file; the retry wrote the chunk.
            remove_interrupted_writes(out)
        # A catalogue found complete is verified again (not trusted): it may have been damaged
        # since; it is not marked again, so its files stay as they were.
        verified = _verify(out, store, executor, config, mark=not plan.was_complete)
    summary = _summarise(out, plan, rows_this_run, started, verified)
    if not verified:
        summary = dataclasses.replace(
            summary,
            checks=f"none (--no-verify); `xpbatch verify {out} --store {store}` checks it all",
        )
    logger.info("encode-catalog finished:\n%s", summary)
    return summary


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run will do, decided (and checked) before any task starts."""

    model: TrainedModel
    model_hash: str
    model_path: str | None
    layout: CatalogLayout
    done: set[int]
    """Chunks recorded by an earlier run."""
    jobs: list[ChunkJob]
    was_complete: bool


def _plan(store: Place, model: TrainedModel | PathLike, out: Place, config: EncodeConfig) -> _Plan:
    """Check store, model and output, create (or reopen) the catalogue, list the chunks to do."""
    from xpbatch.store.reader import store_id

    if zarr_arrays.same_place(out, store):
        raise ConfigError(f"the output {out} is the input store; choose another output path")
    if zarr_arrays.inside(out, store):
        raise ConfigError(
            f"the output {out} is inside the input store {store}: the store would then carry the "
            "catalogue's files; choose an output path outside it"
        )
    ds = _open_store(store)
    trained, model_hash, model_path = _model_and_hash(model)
    check_model_fits(trained, ds, store=store if config.check_fit else None)
    mc = MonteCarlo.of_run(config, ds.attrs)
    layout = _input_layout(store, trained, config.with_reconstruction, with_mc=mc is not None)
    input_id = store_id(ds)
    attrs = _run_attrs(trained, model_hash, store, ds.attrs, input_id, config, mc)
    done = prepare_output(
        out, layout, attrs=attrs, resume=config.resume, overwrite=config.overwrite
    )
    out_attrs = catalog.read_attrs(out)
    # Absolute paths: workers of a remote cluster do not share this process's directory.
    template = ChunkJob(
        store=_absolute(store),
        store_id=input_id,
        out=_absolute(out),
        run_id=out_attrs[schema.CATALOG_ATTR_RUN_ID],
        index=-1,
        model_key=model_hash,
        model_path=model_path,
        device=config.device,
        batch_size=config.batch_size,
        mc=mc,
    )
    jobs = [dataclasses.replace(template, index=i) for i in range(layout.n_chunks) if i not in done]
    logger.info("encoding %d of %d chunks of %s into %s", len(jobs), layout.n_chunks, store, out)
    return _Plan(
        trained,
        model_hash,
        model_path,
        layout,
        done,
        jobs,
        out_attrs[schema.CATALOG_ATTR_COMPLETE] is True,
    )


def _executor(client: Client | LazyClient | Executor | None, config: EncodeConfig) -> Executor:
    """The executor of ``client`` (serial without one) with the bounds and retries of ``config``."""
    return Executor.of(
        client,
        tasks_per_thread=config.tasks_per_thread,
        max_attempts=config.max_attempts,
        no_workers_timeout=config.no_workers_timeout,
    )


def _records(executor: Executor, plan: _Plan, config: EncodeConfig) -> Iterator[ChunkRecord]:
    """Put the model in every process that runs chunks, then map :func:`run_chunk` over the jobs."""
    done_rows = sum(plan.layout.rows(i).stop - plan.layout.rows(i).start for i in plan.done)
    progress = Progress(
        plan.layout.n_rows,
        desc="encode-catalog",
        unit="spectra",
        initial=done_rows,
        enabled=config.progress_bar,
        count=lambda record: record.rows,
    )
    key = plan.model_hash
    in_memory = None if plan.model_path else plan.model
    plugin = workers.ModelPlugin(key, path=plan.model_path, model=in_memory, device=config.device)
    model_loaded: contextlib.AbstractContextManager[None] = executor.per_process(
        plugin,
        name=f"xpbatch-model-{key[:16]}",
        here=lambda: workers.install_model(key, plan.model, config.device),
    )
    with model_loaded if plan.jobs else contextlib.nullcontext():  # no chunk, no model to load
        yield from executor.map(run_chunk, plan.jobs, name="xpbatch-encode", progress=progress)


def _verify(
    out: Place, store: Place, executor: Executor, config: EncodeConfig, *, mark: bool
) -> bool:
    """Verify the catalogue (on the executor that encoded it), then mark it complete."""
    if not config.verify:
        return False
    # Checksums, not a second decode: each task checked its values before writing them.
    report = catalog_verify.verify_catalog(out, store, executor=executor, decode=False)
    if not report.ok:
        raise CatalogError(
            f"verification FAILED, the catalogue is not sound: {report}\nEncode it again with "
            "--overwrite (or restore the damaged files from a backup)."
        )
    if mark:
        check_lock(out)  # never mark complete what another writer may have touched
        mark_complete(out)
    return True


def _summarise(
    out: Place, plan: _Plan, rows_this_run: int, started: float, verified: bool
) -> EncodeSummary:
    records = catalog.read_records(out)
    counts = {str(f.name).lower(): 0 for f in CatalogFlag}
    for record in records:
        for name, value in record.flag_counts.items():
            counts[name] += value
    return EncodeSummary(
        path=str(out),
        rows=plan.layout.n_rows,
        rows_encoded=sum(r.rows_encoded for r in records),
        flag_counts=counts,
        chunks=plan.layout.n_chunks,
        chunks_skipped=len(plan.done),
        rows_this_run=rows_this_run,
        wall_s=time.perf_counter() - started,
        output_bytes=catalog.catalog_nbytes(out),
        verified=verified,
        checks=catalog_verify.CHECKSUM_CHECKS + " and against the input store" if verified else "",
    )


def verify(
    path: PathLike | Location,
    store: PathLike | Location | None = None,
    *,
    client: Client | LazyClient | Executor | None = None,
) -> catalog_verify.VerifyReport:
    """:func:`xpbatch.catalog.verify.verify_catalog`, on ``client``'s workers when one is given."""
    executor = _executor(client, EncodeConfig())
    return catalog_verify.verify_catalog(path, store, executor=executor)
