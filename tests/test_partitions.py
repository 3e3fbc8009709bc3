"""DR3 partition ranges: the type, the loaders (lo-hi text, _MD5SUM.txt, a directory of bulk
files), their refusals, and the ranges a store records (ingest of DR3-named files, mock)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from xpbatch import schema
from xpbatch.errors import ConfigError
from xpbatch.ingest import ingest_files
from xpbatch.mock import bulk_file_plan, write_mock_dr3_bulk, write_mock_store
from xpbatch.storage.partitions import (
    PartitionRanges,
    file_name,
    ranges_from_file_names,
    read_partition_ranges,
)
from xpbatch.store.reader import open_xp_store

FIRST_THREE = [[0, 3111], [3112, 5263], [5264, 6601]]
# The first lines of the CDN's _MD5SUM.txt for XP spectra, with a GaiaSource name mixed in.
MD5SUM = """\
01d6a4c0bc7a8a2a1f5bbd0bbd4bba9c  XpContinuousMeanSpectrum_000000-003111.csv.gz
9b1d0c23f1e0c1f2d5d8a44b2c9a0e61  XpContinuousMeanSpectrum_003112-005263.csv.gz
5c4d0b7b2a3c0d1e8f9a0b1c2d3e4f50  GaiaSource_003112-005263.csv.gz
e3b0c44298fc1c149afbf4c8996fb924  XpContinuousMeanSpectrum_005264-006601.csv.gz
d41d8cd98f00b204e9800998ecf8427e  _citation.txt
"""
LO_HI = """\
# Gaia DR3 bulk partition ranges, e.g. XpContinuousMeanSpectrum_<lo>-<hi>.csv.gz
# lo hi source_id_min source_id_max
000000 003111 0 27373441485111295
003112 005263 27373441485111296 46302633668902911

5264 6601  # a trailing comment
"""


def test_the_dr3_table_reads_as_3386_contiguous_ranges_over_the_sky() -> None:
    ranges = read_partition_ranges(shared_path("dr3", "partition_ranges.txt"))
    assert len(ranges) == 3386
    assert ranges.ranges[0, 0] == 0 and ranges.ranges[-1, 1] == 786431
    assert np.all(ranges.ranges[1:, 0] == ranges.ranges[:-1, 1] + 1)
    assert ranges.to_list()[:3] == FIRST_THREE


def _bulk_directory(path: Path) -> Path:
    """Empty files named like a DR3 bulk download, with other files beside them."""
    path.mkdir()
    for suffix in ("000000-003111", "003112-005263", "005264-006601"):
        (path / f"XpContinuousMeanSpectrum_{suffix}.csv.gz").touch()
        (path / f"GaiaSource_{suffix}.csv.gz").touch()
    (path / "_MD5SUM.txt").touch()
    (path / "mock_labels.parquet").touch()
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: (p / "_MD5SUM.txt", MD5SUM), id="md5sum-listing"),
        pytest.param(lambda p: (p / "ranges.txt", LO_HI), id="lo-hi-text"),
        pytest.param(lambda p: (_bulk_directory(p / "dr3"), None), id="bulk-directory"),
    ],
)
def test_loaders_read_the_same_ranges(tmp_path: Path, make) -> None:
    path, text = make(tmp_path)
    if text is not None:
        path.write_text(text)
    ranges = read_partition_ranges(path)
    assert ranges.to_list() == FIRST_THREE
    assert str(path) in ranges.origin


def test_file_names_collapse_duplicates_and_ignore_other_names() -> None:
    names = [
        "GaiaSource_003112-005263.csv.gz",
        "XpContinuousMeanSpectrum_000000-003111.csv.gz",
        "GaiaSource_000000-003111.csv.gz",
        "XpLatent_005264-006601.parquet",
        "README.md",
    ]
    assert ranges_from_file_names(names).to_list() == FIRST_THREE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            "XpContinuousMeanSpectrum_000000-003111.csv.gz\n"
            "XpContinuousMeanSpectrum_003000-005263.csv.gz\n",
            r"range \[3000, 5263\] overlaps \[0, 3111\]",
            id="overlapping-names",
        ),
        pytest.param("10 20\n0 5\n", r"\[0, 5\] comes before \[10, 20\]", id="unsorted-lo-hi"),
        pytest.param("0 5\n7 3\n", r"\[7, 3\] has lo > hi", id="lo-above-hi"),
        pytest.param("0 786432\n", "outside the level-8 pixels 0..786431", id="off-the-sky"),
        pytest.param("0 5\n6 x\n", r"line 2: expected 'lo hi'.*'6 x'", id="bad-lo-hi-line"),
        pytest.param("README.md\nnotes.txt\n", "no DR3 bulk file names found", id="no-names"),
        pytest.param("# only a comment\n\n", "lists no partition ranges", id="only-comments"),
    ],
)
def test_bad_text_inputs_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "ranges.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_partition_ranges(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda p: p / "absent.txt", "no such file or directory", id="missing"),
        pytest.param(
            lambda p: (p / "d").mkdir() or (p / "d" / "notes.txt").touch() or p / "d",
            "no DR3 bulk file names found",
            id="directory-without-bulk-files",
        ),
        pytest.param(
            lambda p: (p / "b.bin").write_bytes(b"\xff\xfe\x00\x81") and p / "b.bin",
            "not a text file",
            id="binary-file",
        ),
    ],
)
def test_bad_paths_are_refused(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_partition_ranges(make(tmp_path))


@pytest.mark.parametrize(
    ("source_id", "partition"),
    [
        (0, 0),
        ((3112 << 43) - 1, 0),
        (3112 << 43, 1),
        (46302633668902912, 2),  # the first source_id of DR3's third partition
        ((6602 << 43) - 1, 2),
    ],
    ids=["first", "last-of-first", "first-of-second", "real-dr3-bound", "last"],
)
def test_index_of(source_id: int, partition: int) -> None:
    assert PartitionRanges(FIRST_THREE).index_of(np.array([source_id]))[0] == partition


@pytest.mark.parametrize(
    "source_id",
    [-1, 6602 << 43, 100 << 43],
    ids=["negative", "beyond-the-last-range", "in-a-gap"],
)
def test_a_source_in_no_range_is_named(source_id: int) -> None:
    ranges = PartitionRanges([[0, 99], [101, 200], [5264, 6601]], "three ranges")
    with pytest.raises(ConfigError, match=rf"source_id {source_id} .* none of the 3 .*three"):
        ranges.index_of(np.array([5, source_id]))


def test_file_name_pads_like_dr3() -> None:
    assert file_name("XpLatent", 0, 3111) == "XpLatent_000000-003111.parquet"
    assert file_name("GaiaSource", 786097, 786431, ".csv.gz") == "GaiaSource_786097-786431.csv.gz"


# --- the ranges a store records ---------------------------------------------------------------
MOCK_ROWS, ROWS_PER_FILE = 240, 80


@pytest.fixture(scope="module")
def mock_bulk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk")
    write_mock_dr3_bulk(out, MOCK_ROWS, seed=3, rows_per_file=ROWS_PER_FILE)
    return out


def test_ingest_of_dr3_named_files_records_their_ranges_like_the_mock_store(
    mock_bulk: Path, tmp_path: Path
) -> None:
    plan = [[f.lo, f.hi] for f in bulk_file_plan(MOCK_ROWS, ROWS_PER_FILE)]
    assert len(plan) >= 3
    ingested = ingest_files([mock_bulk], [mock_bulk], tmp_path / "in.zarr").path
    direct = write_mock_store(
        tmp_path / "mock.zarr", MOCK_ROWS, seed=3, rows_per_file=ROWS_PER_FILE
    )
    attr = schema.STORE_ATTR_PARTITION_RANGES
    assert open_xp_store(ingested).attrs[attr] == open_xp_store(direct).attrs[attr] == plan
    assert read_partition_ranges(mock_bulk).to_list() == plan  # the directory says the same


def test_ingest_of_files_not_named_like_dr3_records_no_ranges(
    mock_bulk: Path, tmp_path: Path
) -> None:
    xp = sorted(mock_bulk.glob("XpContinuousMeanSpectrum_*"))
    renamed = shutil.copy(xp[0], tmp_path / "my_extract.csv.gz")
    gaia = sorted(mock_bulk.glob("GaiaSource_*"))
    store = ingest_files([renamed, *xp[1:]], gaia, tmp_path / "in.zarr").path
    assert schema.STORE_ATTR_PARTITION_RANGES not in open_xp_store(store).attrs
