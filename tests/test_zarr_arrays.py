"""The Zarr layer under the store and the catalogue: errors that name the right kind of thing,
the store's concurrent chunk reader, and the catalogue's concurrent chunk writes that still
record a chunk only after all of its variables are on disk."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from xpbatch import schema
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.catalog.layout import RECORD_FIELDS, CatalogLayout, create_catalog
from xpbatch.catalog.writer import CatalogWriter
from xpbatch.encode.outputs import INPUT_VARIABLES
from xpbatch.errors import CatalogError, InputShapeError, StoreError, StoreNotFoundError
from xpbatch.storage import zarr_arrays
from xpbatch.store.reader import ChunkReader, open_variables, present_variables

CHUNK_ROWS = 128
N_ROWS = 3 * CHUNK_ROWS + 40  # a short last chunk


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, make_xp_store: Callable[..., Path]) -> Path:
    return make_xp_store(tmp_path_factory.mktemp("za") / "s.zarr", N_ROWS, chunk_rows=CHUNK_ROWS)


def _not_zarr(root: Path) -> Path:
    (root / "x.zarr").mkdir()
    (root / "x.zarr" / "notes.txt").write_text("hello")
    return root / "x.zarr"


# (kind, what the messages must say)
KINDS = {
    "store": (zarr_arrays.STORE, StoreError, "XP store", "is it an XP store?"),
    "catalogue": (zarr_arrays.CATALOG, CatalogError, "catalogue", "an xpbatch catalogue?"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_opening_errors_name_the_kind_and_the_path(tmp_path: Path, kind: str) -> None:
    which, error, noun, question = KINDS[kind]
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(StoreNotFoundError, match=re.escape(f"{noun} {missing} does not exist; ")):
        zarr_arrays.open_group(missing, which)
    with pytest.raises(error, match=rf"not a Zarr v3 group .*{re.escape(question)}"):
        zarr_arrays.open_group(_not_zarr(tmp_path), which)


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_array_names_the_kind_and_the_array(store: Path, kind: str) -> None:
    which, error, noun, _ = KINDS[kind]
    with pytest.raises(error, match=rf"{noun} .* has no array 'latent_mean'"):
        zarr_arrays.open_arrays(store, [schema.SOURCE_ID, schema.LATENT_MEAN], which)


def test_the_pipeline_input_speaks_of_a_store_not_a_catalogue(store: Path, tmp_path: Path) -> None:
    """Encode reads its input through the store module: its errors name the XP store."""
    not_a_store = tmp_path / "c.zarr"
    create_catalog(not_a_store, LAYOUT, attrs={})
    with pytest.raises(StoreError, match=r"XP store .* has no array 'coefficients'") as e:
        ChunkReader(not_a_store, INPUT_VARIABLES)
    assert "catalogue" not in str(e.value)
    assert present_variables(not_a_store, [schema.SOURCE_ID, schema.COEFFICIENTS]) == (
        schema.SOURCE_ID,
    )


@pytest.mark.parametrize(
    "rows",
    [slice(0, CHUNK_ROWS), slice(CHUNK_ROWS, 3 * CHUNK_ROWS), slice(3 * CHUNK_ROWS, N_ROWS)],
    ids=["first-chunk", "two-chunks", "short-last-chunk"],
)
def test_chunk_reader_reads_what_zarr_reads(store: Path, rows: slice) -> None:
    got = ChunkReader(store, INPUT_VARIABLES).read(rows)
    arrays = open_variables(store, INPUT_VARIABLES)
    assert list(got) == list(INPUT_VARIABLES)
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], array[rows], err_msg=name)


@pytest.mark.parametrize("endian", ["little", "big"])
def test_plain_chunks_decode_as_zarr_decodes_them_and_refuse_damage(
    tmp_path: Path, endian: str
) -> None:
    """Raw values + crc32c are viewed without Zarr's decode: same values, writable, and a
    flipped byte or a cut file is the ValueError Zarr's crc32c codec raises."""
    array = zarr.create_array(
        tmp_path / "a.zarr",
        shape=(10, 3),
        chunks=(4, 3),
        dtype="float32",
        serializer=zarr.codecs.BytesCodec(endian=endian),
        compressors=(zarr.codecs.Crc32cCodec(),),
    )
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    array[:] = values
    assert zarr_arrays.plain_dtype(array) is not None
    where = tmp_path / "a.zarr"
    read = [zarr_arrays.read_chunk_file(zarr_arrays.chunk_file(where, array, i)) for i in range(3)]
    files = {i: data for i, data in enumerate(read) if data is not None}
    assert len(files) == 3
    for rows in (slice(0, 4), slice(4, 10), slice(8, 10)):
        (got,) = zarr_arrays.decode_rows([(array, files)], rows)
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, values[rows])
        assert got.dtype == np.float32 and got.flags.writeable
    good = bytes(files[1])
    flipped = bytearray(good)
    flipped[5] ^= 1
    for damaged in (memoryview(flipped), good[:-1]):
        (error,) = zarr_arrays.decode_rows([(array, {1: damaged})], slice(4, 8))
        assert isinstance(error, ValueError)


def test_chunk_reader_names_a_damaged_chunk(store: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "s.zarr"
    shutil.copytree(store, damaged)
    reader = ChunkReader(damaged, INPUT_VARIABLES)
    (damaged / schema.PHOT_G_MEAN_FLUX / "c" / "1").unlink()
    with pytest.raises(StoreError, match=r"phot_g_mean_flux chunk 1 of .*is missing"):
        reader.read(slice(CHUNK_ROWS, 2 * CHUNK_ROWS))


LAYOUT = CatalogLayout(n_rows=N_ROWS, chunk_rows=CHUNK_ROWS, latent_dim=3)


def _outputs(index: int) -> dict[str, np.ndarray]:
    rows = LAYOUT.rows(index)
    n = rows.stop - rows.start
    rng = np.random.default_rng(index)
    outputs = {v.name: rng.normal(size=v.shape(n)).astype(v.dtype) for v in LAYOUT.variables()}
    outputs[schema.FLAGS] = np.zeros(n, np.uint16)
    outputs[schema.SOURCE_ID] = np.arange(rows.start, rows.stop, dtype=np.int64) + 1  # never -1
    return outputs


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "c.zarr"
    create_catalog(path, LAYOUT, attrs={})
    return path


def test_chunk_writes_land_in_their_region(template: Path) -> None:
    outputs = _outputs(3)
    CatalogWriter(template).write_chunk(3, outputs)
    arrays = catalog.open_arrays(template, outputs)
    for name, values in outputs.items():
        np.testing.assert_array_equal(arrays[name][LAYOUT.rows(3)], values, err_msg=name)
        assert np.isnan(arrays[name][LAYOUT.rows(2)]).all() or name in (
            schema.SOURCE_ID,
            schema.FLAGS,
        )
    assert catalog.completed_chunks(template) == {3}


def test_encoded_chunks_are_the_files_zarr_writes(template: Path, store: Path) -> None:
    """encode_chunks (whole chunks straight through the codec pipeline, a short last chunk
    padded through an in-memory array) gives byte for byte the files of Zarr's own writes, for
    the catalogue's codecs (Blosc, crc32c) and the store's (crc32c only)."""
    values = {
        name: np.concatenate([_outputs(i)[name] for i in range(LAYOUT.n_chunks)])
        for name in catalog.open_arrays(template, [s.name for s in LAYOUT.variables()])
    }
    group = zarr.open_group(template, mode="r+")
    catalogue = {name: zarr_arrays.get_array(group, name, zarr_arrays.CATALOG) for name in values}
    for name, array in catalogue.items():
        array[:] = values[name]  # Zarr's own write of every chunk
    inputs = open_variables(store, INPUT_VARIABLES)
    for place, arrays, data in (
        (template, catalogue, values),
        (store, inputs, {name: np.asarray(array[:]) for name, array in inputs.items()}),
    ):
        names = list(arrays)
        everything = slice(0, N_ROWS)
        encoded = zarr_arrays.encode_chunks([(arrays[n], data[n]) for n in names], everything)
        for name, chunks in zip(names, encoded, strict=True):
            assert sorted(chunks) == list(range(LAYOUT.n_chunks))
            for index, found in chunks.items():
                file = zarr_arrays.chunk_file(place, arrays[name], index)
                assert bytes(found) == Path(str(file)).read_bytes(), (name, index)


def test_a_bad_variable_writes_nothing_of_the_chunk(template: Path) -> None:
    """Every variable is checked before any is written (they are then written at once)."""
    outputs = _outputs(0)
    outputs[schema.FLAGS] = outputs[schema.FLAGS][:-1]
    with pytest.raises(InputShapeError, match=r"chunk 0 of .*flags must have shape"):
        CatalogWriter(template).write_chunk(0, outputs)
    assert not [v.name for v in LAYOUT.variables() if (template / v.name / "c" / "0").exists()]
    assert catalog.completed_chunks(template) == set()


def test_the_record_is_written_after_the_data_is_on_disk(
    template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer killed after writing its chunk files leaves no record: resume redoes it."""
    write_file = zarr_arrays._write_file
    written = 0

    def killed(file: Path, data: bytes) -> None:
        nonlocal written
        write_file(file, data)
        written += 1
        if written == len(LAYOUT.variables()):
            raise KeyboardInterrupt  # stands in for the process dying after its last file

    monkeypatch.setattr(zarr_arrays, "_write_file", killed)
    with pytest.raises(KeyboardInterrupt):
        CatalogWriter(template).write_chunk(1, _outputs(1))
    assert all((template / v.name / "c" / "1").exists() for v in LAYOUT.variables() if v.width == 0)
    assert catalog.completed_chunks(template) == set()


def test_template_arrays_name_their_coordinates(template: Path) -> None:
    group = zarr.open_group(template, mode="r")
    assert schema.ATTR_COORDINATES not in group[schema.SOURCE_ID].attrs
    assert group[schema.RMSE].attrs[schema.ATTR_COORDINATES] == schema.SOURCE_ID
    records = group[schema.RECORDS_ARRAY]
    assert records.attrs[schema.ATTR_RECORD_FIELDS] == list(RECORD_FIELDS)
