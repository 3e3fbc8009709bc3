"""The output catalogue on its own: layout, template, region writes, records, resume rules,
open and verify. Outputs are synthetic here (no model); the pipeline tests use real ones."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.core import array as zarr_array
from zarr.storage import StorePath

from xpbatch import schema
from xpbatch.catalog import verify as catalog_verify
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.catalog.layout import CHECKSUM_MISSING, CatalogLayout, ChunkRecord, create_catalog
from xpbatch.catalog.output import mark_complete, prepare_output
from xpbatch.catalog.writer import CatalogWriter
from xpbatch.errors import CatalogError, InputShapeError, OutputExistsError, ResumeRefusedError
from xpbatch.schema import CatalogFlag
from xpbatch.storage import zarr_arrays

ATTRS = {
    schema.CATALOG_ATTR_MODEL_HASH: "m" * 64,
    schema.CATALOG_ATTR_STORE_ID: "s1",
    schema.CATALOG_ATTR_RUN_ID: "r1",
}
ATTRS[schema.CATALOG_ATTR_OPTIONS] = {"batch_size": 4096}


def _outputs(layout: CatalogLayout, index: int) -> dict[str, np.ndarray]:
    """Deterministic outputs of one chunk; every 7th row is not encoded (NaN, flagged)."""
    rows = np.arange(layout.rows(index).start, layout.rows(index).stop)
    n = rows.size
    dead = rows % 7 == 3
    values = {
        schema.SOURCE_ID: rows.astype(np.int64) * 10 + 1,
        schema.LATENT_MEAN: np.repeat(rows[:, None] / 10, layout.latent_dim, 1).astype("f4"),
        schema.LATENT_STD: np.full((n, layout.latent_dim), 0.5, np.float32),
        schema.SCATTER: np.full((n, layout.n_coeff), 2.0, np.float32),
        schema.RMSE: np.ones(n, np.float32),
        schema.FLAGS: np.where(dead, CatalogFlag.NOT_ENCODED | CatalogFlag.G_FLUX_MISSING, 0),
        schema.ANOMALY_SCORE: np.full(n, 3.0, np.float32),
    }
    values[schema.FLAGS] = values[schema.FLAGS].astype(np.uint16)
    if layout.with_reconstruction:
        values[schema.RECONSTRUCTION] = np.ones((n, layout.n_coeff), np.float32)
    for name in (
        schema.LATENT_MEAN,
        schema.LATENT_STD,
        schema.SCATTER,
        schema.RMSE,
        schema.ANOMALY_SCORE,
    ):
        values[name][dead] = np.nan
    return values


def _write_catalog(path: Path, layout: CatalogLayout, *, complete: bool = True) -> Path:
    create_catalog(path, layout, attrs=ATTRS)
    writer = CatalogWriter(path)
    for index in range(layout.n_chunks):
        writer.write_chunk(index, _outputs(layout, index))
    if complete:
        mark_complete(path)
    return path


LAYOUT = CatalogLayout(n_rows=50, chunk_rows=16, latent_dim=3, n_coeff=4)


@pytest.fixture
def written(tmp_path: Path) -> Path:
    return _write_catalog(tmp_path / "c.zarr", LAYOUT)


@pytest.mark.parametrize(
    ("n_rows", "chunk_rows", "n_chunks", "last"),
    [(50, 16, 4, slice(48, 50)), (48, 16, 3, slice(32, 48)), (5, 16, 1, slice(0, 5))],
    ids=["ragged-end", "exact", "one-short-chunk"],
)
def test_layout_rows(n_rows: int, chunk_rows: int, n_chunks: int, last: slice) -> None:
    layout = CatalogLayout(n_rows=n_rows, chunk_rows=chunk_rows)
    assert layout.n_chunks == n_chunks
    assert layout.rows(n_chunks - 1) == last
    with pytest.raises(IndexError):
        layout.rows(n_chunks)


def test_written_catalogue_opens_lazily_with_units_and_records(written: Path) -> None:
    ds = catalog.open_catalog(written)
    assert dict(ds.sizes) == {"source": 50, "latent": 3, "coeff": 4}
    assert ds[schema.SCATTER].chunks[0] == (16, 16, 16, 2)  # still lazy, in the store's chunks
    assert schema.SOURCE_ID in ds.coords
    for name, variable in ds.variables.items():
        assert {"units", "description"} <= set(variable.attrs), name
    np.testing.assert_array_equal(ds.source_id.values, np.arange(50) * 10 + 1)
    records = catalog.read_records(written)
    assert [r.rows for r in records] == [16, 16, 16, 2]
    assert sum(r.flag_counts["not_encoded"] for r in records) == np.sum(np.arange(50) % 7 == 3)
    assert ds.attrs[schema.CATALOG_ATTR_COMPLETE] is True


def test_record_round_trips_through_its_row() -> None:
    outputs = _outputs(LAYOUT, 1)
    record = ChunkRecord.from_outputs(1, outputs)
    assert ChunkRecord.from_row(1, record.to_row()) == record
    assert record.rows - record.rows_encoded == record.flag_counts["not_encoded"] > 0


def test_write_refuses_wrong_shapes(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    create_catalog(path, LAYOUT, attrs=ATTRS)
    outputs = _outputs(LAYOUT, 0)
    outputs[schema.SCATTER] = outputs[schema.SCATTER][:-1]
    with pytest.raises(InputShapeError, match="scatter must have shape"):
        CatalogWriter(path).write_chunk(0, outputs)
    assert catalog.completed_chunks(path) == set()


def test_writer_refuses_arrays_not_chunked_like_the_layout(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    create_catalog(path, LAYOUT, attrs=ATTRS)
    group = zarr.open_group(path, mode="r+")
    group.attrs[schema.CATALOG_ATTR_LAYOUT] = {**LAYOUT.to_attrs(), "chunk_rows": 8}
    with pytest.raises(CatalogError, match="would not be aligned"):
        CatalogWriter(path).write_chunk(0, _outputs(LAYOUT, 0))


# --- existing outputs ---------------------------------------------------------------------------
def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "incomplete"])
def test_existing_output_is_never_touched_without_resume_or_overwrite(
    tmp_path: Path, complete: bool
) -> None:
    path = _write_catalog(tmp_path / "c.zarr", LAYOUT, complete=complete)
    before = _snapshot(path)
    with pytest.raises(OutputExistsError, match=r"--resume .* --overwrite"):
        prepare_output(path, LAYOUT, attrs=ATTRS, resume=False, overwrite=False)
    assert _snapshot(path) == before


def test_overwrite_replaces_a_catalogue_but_never_another_directory(tmp_path: Path) -> None:
    path = _write_catalog(tmp_path / "c.zarr", LAYOUT)
    assert prepare_output(path, LAYOUT, attrs=ATTRS, resume=False, overwrite=True) == set()
    assert catalog.completed_chunks(path) == set()
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not an xpbatch catalogue"):
        prepare_output(precious, LAYOUT, attrs=ATTRS, resume=False, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({schema.CATALOG_ATTR_MODEL_HASH: "other"}, "model_hash"),
        ({schema.CATALOG_ATTR_STORE_ID: "other"}, "input_store_id"),
        ({schema.CATALOG_ATTR_OPTIONS: {"batch_size": 512}}, "options"),
    ],
    ids=["other-model", "other-store", "other-options"],
)
def test_resume_refuses_another_run(tmp_path: Path, change: dict, key: str) -> None:
    path = _write_catalog(tmp_path / "c.zarr", LAYOUT, complete=False)
    before = _snapshot(path)
    with pytest.raises(ResumeRefusedError, match=key):
        prepare_output(path, LAYOUT, attrs={**ATTRS, **change}, resume=True, overwrite=False)
    assert _snapshot(path) == before


def test_resume_returns_done_chunks_and_clears_interrupted_writes(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    create_catalog(path, LAYOUT, attrs=ATTRS)
    CatalogWriter(path).write_chunk(2, _outputs(LAYOUT, 2))
    partial = path / "scatter" / "c" / "1" / "0.0123abcd.partial"  # as zarr leaves after a kill
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half")
    done = prepare_output(path, LAYOUT, attrs=ATTRS, resume=True, overwrite=False)
    assert done == {2}
    assert not partial.exists()


def test_resume_rebuilds_a_template_killed_before_its_records(tmp_path: Path) -> None:
    """The records array is created last; a template without it was killed at creation."""
    path = tmp_path / "c.zarr"
    create_catalog(path, LAYOUT, attrs=ATTRS)
    shutil.rmtree(path / schema.RECORDS_ARRAY)  # as if killed just before creating it
    assert prepare_output(path, LAYOUT, attrs=ATTRS, resume=True, overwrite=False) == set()
    assert catalog.completed_chunks(path) == set()


def test_resume_never_touches_what_is_not_a_catalogue(
    tmp_path: Path, make_xp_store: Callable[..., Path]
) -> None:
    store = make_xp_store(tmp_path / "s.zarr", 20)
    before = _snapshot(store)
    with pytest.raises(ResumeRefusedError, match="an xpbatch XP store, not the catalogue"):
        prepare_output(store, LAYOUT, attrs=ATTRS, resume=True, overwrite=False)
    with pytest.raises(OutputExistsError, match="an xpbatch XP store, not the catalogue"):
        prepare_output(store, LAYOUT, attrs=ATTRS, resume=False, overwrite=True)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "zarr.json").write_text("not zarr")
    with pytest.raises(ResumeRefusedError, match="not an xpbatch catalogue"):
        prepare_output(foreign, LAYOUT, attrs=ATTRS, resume=True, overwrite=False)
    assert _snapshot(store) == before and (foreign / "zarr.json").read_text() == "not zarr"


def test_resume_rebuilds_a_template_killed_at_creation(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    create_catalog(path, LAYOUT, attrs=ATTRS)
    zarr.open_group(path, mode="r+").__delitem__(schema.BOOKKEEPING_GROUP)
    assert prepare_output(path, LAYOUT, attrs=ATTRS, resume=True, overwrite=False) == set()
    assert isinstance(zarr.open_group(path)[schema.BOOKKEEPING_GROUP], zarr.Group)


# --- open ----------------------------------------------------------------------------------------
def test_open_refuses_an_incomplete_catalogue_and_says_how_to_finish(tmp_path: Path) -> None:
    path = _write_catalog(tmp_path / "c.zarr", LAYOUT, complete=False)
    with pytest.raises(CatalogError, match=r"incomplete: 4 of 4 chunks.*--resume"):
        catalog.open_catalog(path)
    with pytest.warns(UserWarning, match="incomplete"):
        assert catalog.open_catalog(path, allow_incomplete=True).sizes["source"] == 50


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: p, FileNotFoundError),
        (lambda p: (p.mkdir(), p)[1], CatalogError),
        (lambda p: (zarr.open_group(p, mode="w"), p)[1], CatalogError),
    ],
    ids=["missing", "empty-directory", "other-zarr-group"],
)
def test_open_refuses_what_is_not_a_catalogue(
    tmp_path: Path, make: Callable[[Path], Path], error: type[Exception]
) -> None:
    with pytest.raises(error):
        catalog.open_catalog(make(tmp_path / "x.zarr"))


# --- verify --------------------------------------------------------------------------------------
def _delete_scatter_chunk(path: Path) -> None:
    (path / "scatter" / "c" / "2" / "0").unlink()


def _drop_record(path: Path) -> None:
    (path / schema.RECORDS_ARRAY / "c" / "1" / "0").unlink()


def _flip_a_byte(path: Path) -> None:
    chunk = path / "latent_mean" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def _unexplained_nan(path: Path) -> None:
    rmse = zarr.open_array(path / "rmse", mode="r+")
    rmse[16] = np.nan  # row 16 is encoded (16 % 7 != 3)


def _value_without_encoding(path: Path) -> None:
    rmse = zarr.open_array(path / "rmse", mode="r+")
    rmse[17] = 1.0  # row 17 is not encoded (17 % 7 == 3)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_delete_scatter_chunk, r"chunk 2 .*scatter chunk file scatter/c/2/0 is missing"),
        (_drop_record, r"chunk 1 .*no completion record"),
        (_flip_a_byte, r"chunk 0 .*unreadable.*checksum"),
        (_unexplained_nan, r"chunk 1 .*rmse is NaN in 1 row\(s\) without the not_encoded flag"),
        (_value_without_encoding, r"chunk 1 .*rmse has values in 1 row\(s\) flagged not_encoded"),
    ],
    ids=[
        "deleted-chunk-file",
        "missing-record",
        "flipped-byte",
        "nan-without-flag",
        "value-without-encoding",
    ],
)
def test_verify_finds_damage(written: Path, damage: Callable[[Path], None], message: str) -> None:
    assert catalog_verify.verify_catalog(written).ok
    damage(written)
    report = catalog_verify.verify_catalog(written)
    assert not report.ok
    assert any(__import__("re").search(message, p) for p in report.problems), report.problems
    with pytest.raises(CatalogError, match="problem"):
        report.raise_if_failed()


def test_verify_compares_with_the_input_store(
    tmp_path: Path, make_xp_store: Callable[..., Path]
) -> None:
    store = make_xp_store(tmp_path / "s.zarr", 50, chunk_rows=16)
    path = _write_catalog(tmp_path / "c.zarr", LAYOUT)
    report = catalog_verify.verify_catalog(path, store)
    assert any("store id" in p for p in report.problems)
    group = zarr.open_group(path, mode="r+")
    from xpbatch.store.reader import store_id

    group.attrs[schema.CATALOG_ATTR_STORE_ID] = store_id(store)
    report = catalog_verify.verify_catalog(path, store)
    differs = [p for p in report.problems if "source_id differs" in p]
    assert len(differs) == LAYOUT.n_chunks  # every chunk; its flags differ too (another store)


def test_verify_reads_one_chunk_at_a_time(written: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client never holds more than one chunk of a variable (memory flat in size)."""
    largest = 0
    original = zarr_array._get_selection  # every read: from files, or from bytes already read

    async def spy(store_path: StorePath, *args: Any, **kwargs: Any) -> Any:
        nonlocal largest
        value = await original(store_path, *args, **kwargs)
        if store_path.path != schema.RECORDS_ARRAY and hasattr(value, "shape") and value.shape:
            largest = max(largest, value.shape[0])
        return value

    monkeypatch.setattr(zarr_array, "_get_selection", spy)
    assert catalog_verify.verify_catalog(written).ok
    assert largest == LAYOUT.chunk_rows


def test_the_writer_refuses_values_that_break_the_rules(tmp_path: Path) -> None:
    """A NaN without the not_encoded flag is never written: verification may trust checksums."""
    path = tmp_path / "c.zarr"
    create_catalog(path, LAYOUT, attrs=ATTRS)
    outputs = _outputs(LAYOUT, 1)
    outputs[schema.RMSE][0] = np.nan  # row 16 is encoded (16 % 7 != 3)
    with pytest.raises(CatalogError, match=r"chunk 1 .* not written: rmse is NaN in 1 row\(s\)"):
        CatalogWriter(path).write_chunk(1, outputs)
    assert not (path / "rmse" / "c" / "1").exists()
    assert catalog.completed_chunks(path) == set()


def test_each_chunk_records_the_checksums_of_its_files(written: Path) -> None:
    checksums = zarr.open_array(written / schema.CHECKSUMS_ARRAY, mode="r")
    names = checksums.attrs[schema.ATTR_CHUNK_FILE_VARIABLES]
    assert names == [spec.name for spec in LAYOUT.variables()]
    arrays = catalog.open_arrays(written, names)
    for index in range(LAYOUT.n_chunks):
        for name, value in zip(names, checksums[index], strict=True):
            file = zarr_arrays.chunk_file(written, arrays[name], index)
            assert zarr_arrays.has_checksum(file.read_bytes(), value), (name, index)
        assert len(set(checksums[index])) == len(names)  # each file its own


def _decoded_variables(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The names of the arrays read (decoded) from now on."""
    seen: set[str] = set()
    original = zarr_array._get_selection  # every read: from files, or from bytes already read

    async def spy(store_path: StorePath, *args: Any, **kwargs: Any) -> Any:
        seen.add(store_path.path)
        return await original(store_path, *args, **kwargs)

    monkeypatch.setattr(zarr_array, "_get_selection", spy)
    return seen


def test_verify_by_checksum_decodes_only_ids_and_flags(
    written: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _decoded_variables(monkeypatch)
    report = catalog_verify.verify_catalog(written, decode=False)
    assert report.ok, report.problems
    assert seen == {schema.SOURCE_ID, schema.FLAGS, schema.RECORDS_ARRAY, schema.CHECKSUMS_ARRAY}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_flip_a_byte, r"chunk 0 .*latent_mean chunk file .* unreadable.*checksum"),
        (_unexplained_nan, r"chunk 1 .*rmse is NaN in 1 row\(s\) without the not_encoded flag"),
        (_delete_scatter_chunk, r"chunk 2 .*scatter chunk file scatter/c/2/0 is missing"),
    ],
    ids=["flipped-byte", "rewritten-with-nan", "deleted-chunk-file"],
)
def test_verify_by_checksum_decodes_a_chunk_whose_files_changed(
    written: Path, damage: Callable[[Path], None], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that is not what its writer wrote (and checked) gets its chunk decoded in full,
    and the damage is named as a full verification names it."""
    damage(written)
    seen = _decoded_variables(monkeypatch)
    report = catalog_verify.verify_catalog(written, decode=False)
    assert not report.ok
    assert any(re.search(message, p) for p in report.problems), report.problems
    assert schema.SCATTER in seen or damage is _delete_scatter_chunk


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "by-checksum"])
def test_a_file_rewritten_with_sound_values_is_refused(written: Path, decode: bool) -> None:
    """A file that is not the one its record names is never accepted by its values alone."""
    rmse = zarr.open_array(written / "rmse", mode="r+")
    rmse[16] = 0.5  # row 16 is encoded: a different but sound value, a valid new file
    report = catalog_verify.verify_catalog(written, decode=decode)
    assert [p for p in report.problems if "rmse chunk 1: file rmse/c/1 is not the file" in p]
    assert list(catalog.chunk_file_problems(written)) == [1]


def _swap(a: Path, b: Path) -> None:
    """Copy each of two chunk files over the other (valid files with valid checksums)."""
    data_a = a.read_bytes()
    shutil.copyfile(b, a)
    b.write_bytes(data_a)


POSITIONS = dataclasses.replace(LAYOUT, with_positions=True, n_rows=64)


def _with_positions(layout: CatalogLayout, index: int) -> dict[str, np.ndarray]:
    outputs = _outputs(layout, index)
    rows = np.arange(layout.rows(index).start, layout.rows(index).stop)
    outputs[schema.RA], outputs[schema.DEC] = rows * 1.5, rows * 0.5 - 10
    return outputs


@pytest.mark.parametrize("name", [schema.RA, schema.DEC, schema.LATENT_MEAN, schema.FLAGS])
@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "by-checksum"])
def test_verify_refuses_a_chunk_file_swapped_with_another(
    tmp_path: Path, name: str, decode: bool
) -> None:
    """Two chunks' files of one variable swapped: same NaN pattern, valid crc32c, every value
    plausible; their records tell them apart (ra and dec included). Resume re-derives them."""
    path = tmp_path / "c.zarr"
    create_catalog(path, POSITIONS, attrs=ATTRS)
    for index in range(POSITIONS.n_chunks):
        CatalogWriter(path).write_chunk(index, _with_positions(POSITIONS, index))
    assert catalog_verify.verify_catalog(path, decode=decode).ok
    key = "c/0" if name != schema.LATENT_MEAN else "c/0/0"
    _swap(path / name / key, path / name / key.replace("0", "2", 1))
    report = catalog_verify.verify_catalog(path, decode=decode)
    for index in (0, 2):
        assert any(
            f"{name} chunk {index}: file {name}/c/{index}" in p and "refused" in p
            for p in report.problems
        ), report.problems
    done = prepare_output(path, POSITIONS, attrs=ATTRS, resume=True, overwrite=False)
    assert done == {1, 3}  # the swapped chunks are encoded again


def _other_device(layout: CatalogLayout, index: int) -> dict[str, np.ndarray]:
    """Valid outputs of the same chunk that differ in their bytes (as CPU and GPU results do)."""
    outputs = _outputs(layout, index)
    outputs[schema.LATENT_MEAN] = outputs[schema.LATENT_MEAN] + np.float32(1e-3)
    outputs[schema.FLAGS][1] |= np.uint16(CatalogFlag.LATENT_OUTLIER)
    return outputs


def _files_of(path: Path, index: int) -> dict[str, bytes]:
    return {
        spec.name: zarr_arrays.chunk_file(
            path, catalog.open_arrays(path, [spec.name])[spec.name], index
        ).read_bytes()
        for spec in LAYOUT.variables()
    }


@pytest.mark.parametrize("order", ["a-then-b", "b-then-a", "b-inside-a", "a-inside-b"])
def test_two_attempts_at_a_chunk_end_verified_and_consistent(
    tmp_path: Path, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dask may run a chunk's task twice, on devices that write different (valid) bytes; the
    attempts may interleave. Whichever writes last, its files, checksums and record are what
    stays, and the catalogue verifies."""
    path = _write_catalog(tmp_path / "c.zarr", LAYOUT, complete=False)
    a, b = _outputs(LAYOUT, 1), _other_device(LAYOUT, 1)
    first, second = (a, b) if order in ("a-then-b", "b-inside-a") else (b, a)
    if order.endswith("inside-a") or order.endswith("inside-b"):
        # The second attempt runs whole between the first's data files and its records.
        write_chunks = zarr_arrays.write_chunks
        calls = 0

        def interleaved(*args: object) -> dict[int, list[int]]:
            nonlocal calls
            written = write_chunks(*args)  # type: ignore[arg-type]
            calls += 1
            if calls == 1:
                CatalogWriter(path).write_chunk(1, second)
            return written

        monkeypatch.setattr(zarr_arrays, "write_chunks", interleaved)
        CatalogWriter(path).write_chunk(1, first)
        last = first  # the first attempt found its files replaced and wrote them again
    else:
        CatalogWriter(path).write_chunk(1, first)
        CatalogWriter(path).write_chunk(1, second)
        last = second
    report = catalog_verify.verify_catalog(path, decode=False)
    assert report.ok, report.problems
    assert catalog_verify.verify_catalog(path).ok
    expected = tmp_path / "expected.zarr"
    create_catalog(expected, LAYOUT, attrs=ATTRS)
    CatalogWriter(expected).write_chunk(1, last)
    assert _files_of(path, 1) == _files_of(expected, 1)
    assert catalog.read_records(path)[1] == ChunkRecord.from_outputs(1, last)


def test_verify_finds_duplicated_and_unordered_source_ids_without_a_store(written: Path) -> None:
    """Read from the data, not an attribute: a repeat inside a chunk and across chunks."""
    source_id = zarr.open_array(written / schema.SOURCE_ID, mode="r+")
    source_id[5] = source_id[4]  # a repeat in chunk 0
    source_id[16] = source_id[15]  # chunk 1 starts with chunk 0's last id
    problems = catalog_verify.verify_catalog(written).problems
    assert any("chunk 0" in p and "source_id repeats at row 5" in p for p in problems), problems
    assert any("chunk 1" in p and "not above the previous chunk's last" in p for p in problems)


def test_a_chunk_without_checksums_is_decoded_in_full(
    written: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk whose checksums were not taken is still checked value by value."""
    checksums = zarr.open_array(written / schema.CHECKSUMS_ARRAY, mode="r+")
    checksums[:] = CHECKSUM_MISSING
    _unexplained_nan(written)
    seen = _decoded_variables(monkeypatch)
    report = catalog_verify.verify_catalog(written, decode=False)
    assert schema.SCATTER in seen
    assert any("rmse is NaN in 1 row(s)" in p for p in report.problems), report.problems


def test_catalog_nbytes_counts_files(written: Path) -> None:
    assert catalog.catalog_nbytes(written) == sum(
        os.path.getsize(p) for p in written.rglob("*") if p.is_file()
    )
