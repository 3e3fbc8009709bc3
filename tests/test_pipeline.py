"""encode_catalog end to end: fidelity to the published model, equivalences (serial == cluster,
any number of workers, any input chunking, CLI == API) and refusals before any work."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import xarray as xr
import zarr

from xpbatch import schema
from xpbatch.catalog.zarr_catalog import open_catalog, read_attrs
from xpbatch.config import EncodeConfig, ModelConfig
from xpbatch.encode.stage import ChunkJob, encode_catalog
from xpbatch.encode.workers import tune_malloc
from xpbatch.errors import (
    ModelMismatchError,
    OutputExistsError,
    ResumeRefusedError,
    StoreError,
    StoreNotFoundError,
)
from xpbatch.model.files import import_xpvae, load_model, save_model
from xpbatch.model.trained import Normalisation, TrainedModel
from xpbatch.store.xp_store import write_xp_store

if TYPE_CHECKING:
    from distributed import Client

N_ROWS = 3000
CHUNK_ROWS = 256
BATCH = 128  # small passes: the test chunks are small, every pass is padded to this size
CONFIG = EncodeConfig(batch_size=BATCH, progress_bar=False)


class Inputs:
    """A store, a model file and the serial catalogue of them (the reference)."""

    def __init__(self, root: Path, make_xp_store: Callable[..., Path]) -> None:
        self.root = root
        self.store = make_xp_store(root / "store.zarr", N_ROWS, chunk_rows=CHUNK_ROWS, seed=5)
        source_id = np.asarray(zarr.open_group(self.store)[schema.SOURCE_ID][:])
        self.model_obj = TrainedModel.untrained(seed=3).with_updates(
            name="test-model",
            train_source_id=source_id[::10],
            validation_source_id=source_id[5::10],
        )
        self.model = root / "model.safetensors"
        save_model(self.model_obj, self.model)
        self.serial = root / "serial.zarr"
        self.summary = encode_catalog(self.store, self.model, self.serial, config=CONFIG)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, make_xp_store: Callable[..., Path]) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("pipeline"), make_xp_store)


# --- fidelity ------------------------------------------------------------------------------------
def test_catalogue_reproduces_the_published_reference(reference_dir: Path, tmp_path: Path) -> None:
    ref = np.load(reference_dir / "reference_outputs.npz")
    n = ref["x"].shape[0]
    norm = tmp_path / "identity.npz"
    np.savez(norm, mu=np.zeros(110, np.float32), sig=np.ones(110, np.float32))
    model = tmp_path / "published.safetensors"
    import_xpvae(reference_dir / "weight.pt", norm, model)
    store = write_xp_store(
        tmp_path / "reference.zarr",
        source_id=np.arange(1, n + 1),
        coefficients=ref["x"],
        coefficient_errors=ref["x_err"],
        phot_g_mean_flux=np.ones(n),
        chunk_rows=1024,
    )
    encode_catalog(store, model, tmp_path / "c.zarr", config=EncodeConfig(progress_bar=False))
    ds = open_catalog(tmp_path / "c.zarr")
    expected = {
        schema.LATENT_MEAN: ref["mu"],
        schema.LATENT_STD: np.exp(0.5 * ref["log_var"]),
        schema.SCATTER: ref["shat"],  # G flux 1 and identity normalisation: e-/s = model space
        schema.RMSE: ref["rmse"],
    }
    for name, values in expected.items():
        # 1e-4 absolute, and for rmse 1e-5 relative too (see test_trained)
        rtol = 1e-5 if name == schema.RMSE else 0.0
        np.testing.assert_allclose(ds[name].values, values, atol=1e-4, rtol=rtol, err_msg=name)


# --- equivalences --------------------------------------------------------------------------------
def test_cluster_writes_the_same_bytes_as_serial(
    inputs: Inputs,
    dask_client: Client,
    tmp_path: Path,
    assert_same_catalogue: Callable[[Path, Path], None],
) -> None:
    report = tmp_path / "report.html"
    config = EncodeConfig(batch_size=BATCH, progress_bar=False, performance_report=str(report))
    summary = encode_catalog(
        inputs.store, inputs.model, tmp_path / "c.zarr", client=dask_client, config=config
    )
    assert_same_catalogue(inputs.serial, tmp_path / "c.zarr")
    assert summary.verified and summary.rows_this_run == N_ROWS
    assert report.stat().st_size > 10_000  # Dask's performance report


@pytest.mark.slow  # its own one-worker cluster
def test_one_worker_and_an_in_memory_model_give_the_same_bytes(
    inputs: Inputs, tmp_path: Path, assert_same_catalogue: Callable[[Path, Path], None]
) -> None:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        encode_catalog(
            inputs.store, inputs.model_obj, tmp_path / "c.zarr", client=client, config=CONFIG
        )
    assert_same_catalogue(inputs.serial, tmp_path / "c.zarr")


def test_a_write_interrupted_by_a_killed_worker_leaves_no_file_behind(
    inputs: Inputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    assert_same_catalogue: Callable[[Path, Path], None],
) -> None:
    import xpbatch.encode.stage as pipeline

    out = tmp_path / "c.zarr"
    leftover = out / schema.ANOMALY_SCORE / "c" / "2.0123abcd.partial"
    real_run_chunk = pipeline.run_chunk

    def run_chunk_then_die_mid_write(job: ChunkJob) -> object:
        record = real_run_chunk(job)
        if job.index == 1:  # what zarr leaves when a worker dies between write and rename
            leftover.write_bytes(b"half a chunk")
        return record

    monkeypatch.setattr(pipeline, "run_chunk", run_chunk_then_die_mid_write)
    assert encode_catalog(inputs.store, inputs.model, out, config=CONFIG).verified
    assert not leftover.exists()
    assert_same_catalogue(inputs.serial, out)


def test_result_does_not_depend_on_the_input_chunking(
    inputs: Inputs, make_xp_store: Callable[..., Path], tmp_path: Path
) -> None:
    store = make_xp_store(tmp_path / "s.zarr", N_ROWS, chunk_rows=1000, seed=5)
    encode_catalog(store, inputs.model, tmp_path / "c.zarr", config=CONFIG)
    rechunked = open_catalog(tmp_path / "c.zarr")
    assert rechunked.scatter.chunks[0] == (1000, 1000, 1000)
    xr.testing.assert_identical(
        open_catalog(inputs.serial).drop_attrs().compute(), rechunked.drop_attrs().compute()
    )


@pytest.mark.slow  # a CLI run with its own cluster
def test_cli_writes_the_same_bytes_as_the_api(
    inputs: Inputs, tmp_path: Path, assert_same_catalogue: Callable[[Path, Path], None]
) -> None:
    out = tmp_path / "c.zarr"
    command = [
        *(str(Path(sys.executable).parent / "xpbatch"), "encode-catalog", str(inputs.store)),
        *("--model", str(inputs.model), "--output", str(out), "--batch-size", str(BATCH)),
        *("--n-workers", "1", "--dashboard-address", ":0"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Dask dashboard: http://" in done.stderr
    assert f"rows           {N_ROWS:,} in 12 chunks" in done.stdout
    assert_same_catalogue(inputs.serial, out)
    assert read_attrs(out)["command_line"].endswith("--dashboard-address :0")


# --- what a catalogue records --------------------------------------------------------------------
def test_summary_and_attributes_describe_the_run(inputs: Inputs) -> None:
    summary = inputs.summary
    g_flux = np.asarray(zarr.open_group(inputs.store)[schema.PHOT_G_MEAN_FLUX][:])
    n_missing = int(np.isnan(g_flux).sum())
    assert summary.rows == N_ROWS and summary.chunks == 12 and summary.verified
    assert summary.rows_encoded == N_ROWS - n_missing
    assert summary.flag_counts["g_flux_missing"] == summary.flag_counts["not_encoded"] == n_missing
    assert summary.flag_counts["in_training_set"] == N_ROWS // 10
    assert f"rows encoded   {N_ROWS - n_missing:,}" in str(summary)
    attrs = read_attrs(inputs.serial)
    assert attrs["model_hash"] == load_model(inputs.model).content_hash
    assert attrs["model_name"] == "test-model"
    assert {"xpbatch", "torch", "zarr", "xarray", "dask", "distributed"} <= set(attrs["versions"])
    assert attrs["complete"] is True and attrs["end_time"] >= attrs["start_time"]


def test_reconstruction_is_written_when_asked(inputs: Inputs, tmp_path: Path) -> None:
    config = EncodeConfig(batch_size=BATCH, progress_bar=False, with_reconstruction=True)
    encode_catalog(inputs.store, inputs.model, tmp_path / "c.zarr", config=config)
    ds = open_catalog(tmp_path / "c.zarr")
    assert ds[schema.RECONSTRUCTION].attrs["units"] == schema.FLUX_UNITS
    assert ds[schema.RECONSTRUCTION].shape == (N_ROWS, 110)
    xr.testing.assert_identical(
        ds.drop_vars(schema.RECONSTRUCTION).drop_attrs(), open_catalog(inputs.serial).drop_attrs()
    )


def test_a_task_carries_no_model(inputs: Inputs) -> None:
    """The network goes to each worker once (plugin); a task is a few strings and numbers."""
    job = ChunkJob(
        str(inputs.store), "s" * 32, "out.zarr", "r" * 32, 3, "k" * 64, str(inputs.model),
        "auto", 4096,
    )  # fmt: skip
    assert len(pickle.dumps(job)) < 1000


def test_workers_allocator_is_tuned_where_glibc_allows_it() -> None:
    import platform

    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")


def test_resume_of_a_complete_catalogue_does_nothing(inputs: Inputs) -> None:
    config = EncodeConfig(batch_size=BATCH, progress_bar=False, resume=True)
    summary = encode_catalog(inputs.store, inputs.model, inputs.serial, config=config)
    assert summary.chunks_skipped == 12 and summary.rows_this_run == 0


# --- refusals before any work --------------------------------------------------------------------
def _wrong_input_size(root: Path) -> Path:
    model = TrainedModel.untrained(ModelConfig(input_dim=100))
    save_model(model, root / "m100.safetensors")
    return root / "m100.safetensors"


def _wrong_normalisation(root: Path) -> Path:
    # Trained on inputs a million times smaller: standardised values ~1e6.
    model = TrainedModel.untrained(seed=3)
    model = model.with_updates(normalisation=Normalisation(np.zeros(110), np.full(110, 1e-6)))
    save_model(model, root / "tiny.safetensors")
    return root / "tiny.safetensors"


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (_wrong_input_size, "takes 100 coefficients per spectrum, the store has 110"),
        (_wrong_normalisation, "normalisation does not fit this store"),
    ],
    ids=["input-size", "normalisation"],
)
def test_a_model_that_does_not_fit_is_refused_before_any_work(
    inputs: Inputs, tmp_path: Path, make_model: Callable[[Path], Path], message: str
) -> None:
    with pytest.raises(ModelMismatchError, match=message):
        encode_catalog(inputs.store, make_model(tmp_path), tmp_path / "c.zarr", config=CONFIG)
    assert not (tmp_path / "c.zarr").exists()


def _not_zarr(root: Path) -> Path:
    (root / "s.zarr").mkdir()
    (root / "s.zarr" / "notes.txt").write_text("hello")
    return root / "s.zarr"


def _unfinished_store(root: Path) -> Path:
    group = zarr.open_group(root / "s.zarr", mode="w")
    group.attrs.update(
        {schema.STORE_ATTR_SCHEMA_VERSION: schema.STORE_SCHEMA_VERSION, "complete": False}
    )
    return root / "s.zarr"


@pytest.mark.parametrize(
    ("make_store", "error", "message"),
    [
        (lambda root: root / "nowhere.zarr", StoreNotFoundError, "does not exist"),
        (_not_zarr, StoreError, "not a Zarr v3 group"),
        (_unfinished_store, StoreError, "not complete"),
    ],
    ids=["missing", "not-zarr", "unfinished"],
)
def test_a_missing_or_malformed_store_is_a_clear_error(
    inputs: Inputs,
    tmp_path: Path,
    make_store: Callable[[Path], Path],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        encode_catalog(make_store(tmp_path), inputs.model, tmp_path / "c.zarr", config=CONFIG)
    assert not (tmp_path / "c.zarr").exists()


def test_existing_output_and_another_model_are_refused(inputs: Inputs, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in inputs.serial.rglob("*")}
    with pytest.raises(OutputExistsError):
        encode_catalog(inputs.store, inputs.model, inputs.serial, config=CONFIG)
    other = tmp_path / "other.safetensors"
    save_model(TrainedModel.untrained(seed=4), other)
    config = EncodeConfig(batch_size=BATCH, progress_bar=False, resume=True)
    with pytest.raises(ResumeRefusedError, match="model_hash"):
        encode_catalog(inputs.store, other, inputs.serial, config=config)
    assert {p: p.stat().st_mtime_ns for p in inputs.serial.rglob("*")} == before


def test_output_on_the_input_is_refused(inputs: Inputs) -> None:
    with pytest.raises(ValueError, match="is the input store"):
        encode_catalog(inputs.store, inputs.model, inputs.store, config=CONFIG)
    assert os.path.isdir(inputs.store)
