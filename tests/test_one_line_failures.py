"""Failures that used to end in a traceback end in one line: a full disk in train (safetensors'
own error type) and export-hats (a stage of hats-import), export-hats on rows without a valid
position, binary files given where text is expected. Full disks are real: a small tmpfs
(mounting needs root; without it these tests skip)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xpbatch.cli.main import main


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 512 kB tmpfs, mounted for the test."""
    where = tmp_path / "tiny"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _one_line(result, *expected: str, code: int | None = None) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_train_on_a_full_disk_is_one_line(
    full_disk: Path, tmp_path: Path, make_xp_store: Callable[..., Path]
) -> None:
    store = make_xp_store(tmp_path / "s.zarr", 600)
    out = full_disk / "m.safetensors"
    command = ["train", str(store), "-o", str(out), "--epochs", "1", "--no-progress"]
    line = _one_line(CliRunner().invoke(main, command), "the disk is full", code=1)
    assert str(full_disk) in line
    assert not out.exists()


def test_export_hats_on_a_full_disk_is_one_line(
    full_disk: Path,
    tmp_path: Path,
    make_xp_store: Callable[..., Path],
    encode_untrained: Callable[[Path, Path], Path],
) -> None:
    store = make_xp_store(tmp_path / "s.zarr", 6000, chunk_rows=1000)
    catalog = encode_untrained(store, tmp_path / "c.zarr")
    command = ["export-hats", str(catalog), "-o", str(full_disk / "hats"), "--n-workers", "1"]
    command += ["--dashboard-address", ":0", "--positions-from-source-id"]
    _one_line(CliRunner().invoke(main, command), "the disk is full", code=1)


def test_export_hats_on_rows_without_a_position_is_one_line(
    tmp_path: Path,
    make_xp_store: Callable[..., Path],
    encode_untrained: Callable[[Path, Path], Path],
) -> None:
    from xpbatch.store.reader import open_xp_store
    from xpbatch.store.xp_store import write_xp_store

    plain = open_xp_store(make_xp_store(tmp_path / "p.zarr", 800, chunk_rows=400))
    n = plain.sizes["source"]
    ra = np.linspace(1, 359, n)
    dec = np.linspace(-80, 80, n)
    ra[10] = np.nan  # a store written by another tool: no flag, no check
    dec[500] = 95.0
    store = write_xp_store(
        tmp_path / "s.zarr",
        source_id=plain.source_id.values,
        coefficients=plain.coefficients.values,
        coefficient_errors=plain.coefficient_errors.values,
        phot_g_mean_flux=plain.phot_g_mean_flux.values,
        chunk_rows=400,
        positions={"ra": ra, "dec": dec},
    )
    catalog = encode_untrained(store, tmp_path / "c.zarr")
    command = ["export-hats", str(catalog), "-o", str(tmp_path / "hats"), "--n-workers", "1"]
    command += ["--dashboard-address", ":0"]
    _one_line(
        CliRunner().invoke(main, command), "no valid ra/dec", "--positions-from-source-id", code=2
    )


@pytest.mark.parametrize("option", ["--config", "--source-ids"])
def test_a_binary_file_where_text_is_expected_is_one_line(
    tmp_path: Path, make_xp_store: Callable[..., Path], option: str
) -> None:
    store = make_xp_store(tmp_path / "s.zarr", 600)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    command = ["train", str(store), "-o", str(tmp_path / "m.safetensors"), option, str(binary)]
    _one_line(CliRunner().invoke(main, command), str(binary), "is not text", code=2)


_PEAK = """
import resource, sys
from xpbatch.errors import ParseError
from xpbatch.ingest.reader import parse_xp_file
try:
    parse_xp_file(sys.argv[1])
except ParseError as e:
    print(e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
_HEADER = "source_id,bp_n_parameters,rp_n_parameters,bp_coefficients,bp_coefficient_errors,"
_HEADER += "rp_coefficients,rp_coefficient_errors\n"


def _parse_in_a_process(path: Path) -> tuple[str, int]:
    """The ParseError message and peak RSS (MB) of parsing ``path`` in a fresh process."""
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True
    )
    *message, peak = done.stdout.strip().splitlines()
    return "\n".join(message), int(peak)


@pytest.mark.parametrize("where", ["file", "zip member", "header"])
def test_a_huge_line_is_refused_with_bounded_memory(tmp_path: Path, where: str) -> None:
    """190 MB on one line: refused naming file and line, without holding it (3.8 GB before)."""
    import zipfile

    huge = "1," + "1" * (190 << 20) + "\n"
    text = huge + _HEADER if where == "header" else _HEADER + huge
    name = "XpContinuousMeanSpectrum_000000-003111.csv"
    if where == "zip member":
        path = tmp_path / "bundle.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(name, text)
    else:
        path = tmp_path / name
        path.write_text(text)
    small = tmp_path / "small.csv"
    small.write_text(_HEADER + "1,x\n")
    _, baseline = _parse_in_a_process(small)
    message, peak = _parse_in_a_process(path)
    line = 1 if where == "header" else 2
    assert f"{name}, line {line}: a line longer than 16 MB" in message
    held = 190 if where == "zip member" else 0  # a member is inflated into memory, then read
    assert peak - baseline < held + 150, (peak, baseline)
