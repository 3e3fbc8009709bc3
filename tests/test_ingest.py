"""xpbatch ingest: the real DR3 samples, malformed inputs, --on-bad-row skip, resume,
serial == Dask (through the CLI), and mock -> dr3-bulk -> ingest == mock -> store."""

from __future__ import annotations

import csv
import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from xpbatch import schema
from xpbatch.cli.main import main
from xpbatch.config import IngestConfig
from xpbatch.errors import ChecksumError, OutputExistsError, ParseError, ResumeRefusedError
from xpbatch.ingest import ingest_files
from xpbatch.mock import write_mock_dr3_bulk, write_mock_store
from xpbatch.schema import InputFlag
from xpbatch.store.reader import open_xp_store

BRIGHT = 5853498713190525696  # in gaia_source with a flux
RP_ONLY = 5405570973190252288  # DR3's only source without BP; gaia_source has only its magnitude
NO_GAIA = 5762406957886626816  # absent from the gaia_source companion
RP_ONLY_MAG = 15.0


@pytest.fixture
def gaia(tmp_path: Path) -> Path:
    """A small gaia_source companion (upper-case SOURCE_ID, as the archive once served)."""
    path = tmp_path / "gaia_source.csv"
    path.write_text(
        "# a comment line\nSOURCE_ID,phot_g_mean_flux,phot_g_mean_mag\n"
        f"{BRIGHT},123456.78,\n{RP_ONLY},null,{RP_ONLY_MAG}\n"
    )
    return path


def _reference(path: Path) -> dict[int, dict[str, np.ndarray | None]]:
    """The sample's arrays read the plain way: float32 of the text values, None when missing."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    rows = {}
    for row in csv.DictReader(lines):
        cells = {k.lower(): v for k, v in row.items()}
        arrays: dict[str, np.ndarray | None] = {}
        for name in ("bp_coefficients", "bp_coefficient_errors", "rp_coefficients"):
            text = cells[name].strip("[]()")
            arrays[name] = (
                None if text in ("", "null") else np.array(text.split(","), float).astype("f4")
            )
        text = cells["rp_coefficient_errors"].strip("[]()")
        arrays["rp_coefficient_errors"] = np.array(text.split(","), float).astype("f4")
        rows[int(cells["source_id"])] = arrays
    return rows


def _variant(samples: Path, tmp_path: Path, name: str) -> Path:
    """A sample file as is, gzipped, or with upper-case column names."""
    if name == "bulk-null-gz":
        out = tmp_path / "XP_CONTINUOUS_bulk_style_null.ecsv.gz"
        out.write_bytes(
            gzip.compress((samples / "XP_CONTINUOUS_bulk_style_null.ecsv").read_bytes())
        )
        return out
    if name == "raw-csv-upper-case":
        header, *rest = (samples / "XP_CONTINUOUS_RAW.csv").read_text().split("\n")
        out = tmp_path / "upper.csv"
        out.write_text("\n".join([header.upper(), *rest]))
        return out
    return (
        samples
        / {
            "raw-csv": "XP_CONTINUOUS_RAW.csv",
            "raw-ecsv": "XP_CONTINUOUS_RAW.ecsv",
            "bulk-null": "XP_CONTINUOUS_bulk_style_null.ecsv",
        }[name]
    )


SAMPLE_VARIANTS = ["raw-csv", "raw-ecsv", "bulk-null", "bulk-null-gz", "raw-csv-upper-case"]


@pytest.mark.parametrize("variant", SAMPLE_VARIANTS)
def test_real_samples_ingest_to_the_text_values(
    dr3_samples_dir: Path, tmp_path: Path, gaia: Path, variant: str
) -> None:
    xp = _variant(dr3_samples_dir, tmp_path, variant)
    ds = open_xp_store(ingest_files([xp], [gaia], tmp_path / "s.zarr").path)
    reference = _reference(
        xp if not variant.endswith("gz") else _variant(dr3_samples_dir, tmp_path, "bulk-null")
    )
    assert ds.source_id.values.tolist() == sorted(reference)
    for i, sid in enumerate(ds.source_id.values.tolist()):
        ref = reference[sid]
        bp = ref["bp_coefficients"]
        coefficients = ds.coefficients.values[i]
        errors = ds.coefficient_errors.values[i]
        if bp is None:
            assert np.isnan(coefficients[:55]).all() and np.isnan(errors[:55]).all()
        else:
            np.testing.assert_array_equal(coefficients[:55], bp)
            np.testing.assert_array_equal(errors[:55], ref["bp_coefficient_errors"])
        np.testing.assert_array_equal(coefficients[55:], ref["rp_coefficients"])
        np.testing.assert_array_equal(errors[55:], ref["rp_coefficient_errors"])
    flags = dict(zip(ds.source_id.values.tolist(), ds.input_flags.values.tolist(), strict=True))
    flux = dict(zip(ds.source_id.values.tolist(), ds.phot_g_mean_flux.values, strict=True))
    assert flags[BRIGHT] == 0 and flux[BRIGHT] == 123456.78
    assert flags[NO_GAIA] == InputFlag.G_FLUX_MISSING and np.isnan(flux[NO_GAIA])
    if RP_ONLY in flags:
        assert flags[RP_ONLY] == InputFlag.BP_MISSING | InputFlag.G_FLUX_FROM_MAG
        assert flux[RP_ONLY] == pytest.approx(10 ** ((schema.G_ZERO_POINT_MAG - RP_ONLY_MAG) / 2.5))
        assert ds.bp_n_parameters.values[list(flags).index(RP_ONLY)] == -1
    assert ds.attrs["input_files"][0]["rows"] == len(reference)
    assert ds.attrs["skipped_row_count"] == 0


def test_interleaved_files_parquet_companion_and_correlations(
    dr3_samples_dir: Path, tmp_path: Path
) -> None:
    """Files whose source_id ranges overlap are merged in order; correlations on request."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = (dr3_samples_dir / "XP_CONTINUOUS_bulk_style_null.ecsv").read_text().splitlines()
    header, (bright, rp_only, no_gaia) = lines[:167], lines[167:]
    (tmp_path / "a.csv").write_text("\n".join([*header, bright, rp_only]))  # ids 5853.., 5405..
    (tmp_path / "b.csv").write_text("\n".join([*header, no_gaia]))  # 5762.., inside a's range
    gaia = tmp_path / "gaia.parquet"
    table = {"Source_Id": [BRIGHT, NO_GAIA], "phot_g_mean_flux": [1e5, 2e4]}
    pq.write_table(pa.table(table), gaia)
    config = IngestConfig(with_correlations=True, scalars=("rp_chi_squared",))
    out = ingest_files(
        [tmp_path / "a.csv", tmp_path / "b.csv"], [gaia], tmp_path / "s.zarr", config=config
    ).path
    ds = open_xp_store(out)
    assert ds.source_id.values.tolist() == [RP_ONLY, NO_GAIA, BRIGHT]
    assert ds.phot_g_mean_flux.values[1:].tolist() == [2e4, 1e5]
    assert ds.input_flags.values[0] == InputFlag.BP_MISSING | InputFlag.G_FLUX_MISSING
    correlations = next(csv.reader([bright]))[11].strip("[]").split(",")
    expected = np.array(correlations, float).astype(np.float32)
    np.testing.assert_array_equal(ds.bp_coefficient_correlations.values[2], expected)
    assert np.isnan(ds.bp_coefficient_correlations.values[0]).all()
    assert sorted(v for v in ds.data_vars if v.startswith(("bp_", "rp_"))) == [
        "bp_coefficient_correlations",
        "rp_chi_squared",
        "rp_coefficient_correlations",
    ]


# --- malformed inputs -------------------------------------------------------------------------
# The bulk-style sample: 166 '#' lines, the column names on line 167, data on lines 168-170
# (BRIGHT, RP_ONLY, NO_GAIA).
def _edit_bulk_sample(samples: Path, edit: Callable[[list[str]], list[str]]) -> str:
    lines = (samples / "XP_CONTINUOUS_bulk_style_null.ecsv").read_text().splitlines(keepends=True)
    assert lines[166].startswith("source_id") and lines[167].startswith(str(BRIGHT))
    return "".join(edit(lines))


def _replace(line_no: int, old: str, new: str) -> Callable[[list[str]], list[str]]:
    def edit(lines: list[str]) -> list[str]:
        assert old in lines[line_no - 1]
        lines[line_no - 1] = lines[line_no - 1].replace(old, new, 1)
        return lines

    return edit


BAD_ROWS = {
    "wrong array length": (
        _replace(168, '"[56947.03696840172,', '"['),
        r"line 168: bp_coefficients has 54 values but n_parameters says 55",
    ),
    "non-numeric array token": (
        _replace(170, '"[7685.987865952477,', '"[7685.98x,'),
        r"line 170: bp_coefficients holds '7685.98x', which is not a number",
    ),
    "non-numeric scalar": (
        _replace(169, ",57,924,55,", ",57,924,5x5,"),
        r"line 169: rp_n_parameters is not a number: '5x5'",
    ),
    "missing field": (
        _replace(170, f"{NO_GAIA},4545469030156206080,", f"{NO_GAIA},"),
        r"line 170: expected 26 fields, found 25",
    ),
    "unbalanced quote": (
        _replace(168, '"[56947.03696840172,', "[56947.03696840172,"),
        r"line 168: unbalanced double quote",
    ),
    "duplicate source_id": (
        lambda lines: [*lines, lines[167]],
        r"source_id 5853498713190525696 appears twice \(lines 168 and 171\)",
    ),
}


def _assert_nothing_complete(out: Path) -> None:
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        assert zarr.open_group(partial, mode="r").attrs["complete"] is False


@pytest.mark.parametrize(("edit", "message"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_malformed_row_stops_the_ingest_naming_file_line_and_reason(
    dr3_samples_dir: Path,
    tmp_path: Path,
    gaia: Path,
    edit,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    xp = tmp_path / "bad.ecsv"
    xp.write_text(_edit_bulk_sample(dr3_samples_dir, edit))
    with pytest.raises(ParseError, match=rf"bad\.ecsv.*{message}"):
        ingest_files([xp], [gaia], tmp_path / "s.zarr")
    _assert_nothing_complete(tmp_path / "s.zarr")


def _truncated_gzip(samples: Path, tmp_path: Path) -> tuple[list[Path], list[Path]]:
    data = gzip.compress((samples / "XP_CONTINUOUS_bulk_style_null.ecsv").read_bytes())
    xp = tmp_path / "cut.ecsv.gz"
    xp.write_bytes(data[: len(data) - 300])
    return [xp], [tmp_path / "gaia_source.csv"]


def _dr3_names_without_companion(samples: Path, tmp_path: Path) -> tuple[list[Path], list[Path]]:
    xp = tmp_path / "XpContinuousMeanSpectrum_000001-000002.ecsv"
    xp.write_bytes((samples / "XP_CONTINUOUS_bulk_style_null.ecsv").read_bytes())
    gs = tmp_path / "GaiaSource_000003-000004.csv"
    gs.write_bytes((tmp_path / "gaia_source.csv").read_bytes())
    return [xp], [gs]


def _md5_mismatch(samples: Path, tmp_path: Path) -> tuple[list[Path], list[Path]]:
    xp = tmp_path / "XP_CONTINUOUS_RAW.csv"
    xp.write_bytes((samples / "XP_CONTINUOUS_RAW.csv").read_bytes())
    (tmp_path / "_MD5SUM.txt").write_text(f"{'0' * 32}  XP_CONTINUOUS_RAW.csv\n")
    return [xp], [tmp_path / "gaia_source.csv"]


BAD_FILES = {
    "truncated gzip": (_truncated_gzip, ParseError, r"cut\.ecsv\.gz.*truncated or corrupt"),
    "missing gaia_source file": (
        lambda s, t: ([s / "XP_CONTINUOUS_RAW.csv"], [t / "nope.csv"]),
        ParseError,
        r"nope\.csv: file not found",
    ),
    "missing same-suffix gaia_source": (
        _dr3_names_without_companion,
        ParseError,
        r"GaiaSource_000001-000002\.csv\.gz is not among the --gaia-source files",
    ),
    "no G flux anywhere": (
        lambda s, t: ([s / "XP_CONTINUOUS_RAW.csv"], []),
        ParseError,
        r"XP_CONTINUOUS_RAW\.csv: no G flux: .*neither phot_g_mean_flux nor phot_g_mean_mag",
    ),
    "duplicate source_id across files": (
        lambda s, t: (
            [s / "XP_CONTINUOUS_RAW.csv", s / "XP_CONTINUOUS_RAW.ecsv"],
            [t / "gaia_source.csv"],
        ),
        ParseError,
        r"source_id \d+ appears in .*XP_CONTINUOUS_RAW\.csv \(line \d\) and in .*RAW\.ecsv",
    ),
    "md5 mismatch": (
        _md5_mismatch,
        ChecksumError,
        r"XP_CONTINUOUS_RAW\.csv: MD5 .* does not match",
    ),
}


@pytest.mark.parametrize(("make", "error", "message"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_files_give_a_clear_error_and_no_store(
    dr3_samples_dir: Path,
    tmp_path: Path,
    gaia: Path,
    make,
    error: type,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    xp_files, gs_files = make(dr3_samples_dir, tmp_path)
    with pytest.raises(error, match=message):
        ingest_files(xp_files, gs_files, tmp_path / "s.zarr")
    _assert_nothing_complete(tmp_path / "s.zarr")


def test_md5_manifest_is_verified_when_present(
    dr3_samples_dir: Path, tmp_path: Path, gaia: Path
) -> None:
    xp = tmp_path / "XP_CONTINUOUS_RAW.csv"
    xp.write_bytes((dr3_samples_dir / "XP_CONTINUOUS_RAW.csv").read_bytes())
    (tmp_path / "_MD5SUM.txt").write_text(
        f"{hashlib.md5(xp.read_bytes()).hexdigest()}  XP_CONTINUOUS_RAW.csv\n"
    )
    ds = open_xp_store(ingest_files([xp], [gaia], tmp_path / "s.zarr").path)
    files = {f["name"]: f for f in ds.attrs["input_files"]}
    assert files["XP_CONTINUOUS_RAW.csv"]["md5_verified"] is True
    assert files["gaia_source.csv"]["md5_verified"] is False  # not listed in the manifest


def test_skip_leaves_bad_rows_out_and_records_them(
    dr3_samples_dir: Path, tmp_path: Path, gaia: Path
) -> None:
    def two_bad_rows(lines: list[str]) -> list[str]:
        lines = BAD_ROWS["wrong array length"][0](lines)
        return BAD_ROWS["non-numeric array token"][0](lines)

    xp = tmp_path / "bad.ecsv"
    xp.write_text(_edit_bulk_sample(dr3_samples_dir, two_bad_rows))
    out = ingest_files(
        [xp], [gaia], tmp_path / "s.zarr", config=IngestConfig(on_bad_row="skip")
    ).path
    ds = open_xp_store(out)
    assert ds.source_id.values.tolist() == [RP_ONLY]
    assert ds.attrs["skipped_row_count"] == 2
    skipped = ds.attrs["skipped_rows"]
    assert [(s["file"], s["line"]) for s in skipped] == [("bad.ecsv", 168), ("bad.ecsv", 170)]
    assert "54 values" in skipped[0]["reason"] and "7685.98x" in skipped[1]["reason"]


def test_a_resume_after_a_failure_reuses_the_finished_files(
    dr3_samples_dir: Path, tmp_path: Path, gaia: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xpbatch.ingest.parts as parts

    good = dr3_samples_dir / "XP_CONTINUOUS_RAW.csv"
    text = (dr3_samples_dir / "XP_CONTINUOUS_bulk_style_null.ecsv").read_text()
    for sid in (BRIGHT, RP_ONLY, NO_GAIA):  # other sources, so both files can be ingested
        text = text.replace(f"\n{sid},", f"\n{sid + 1},")
    second = tmp_path / "second.ecsv"
    second.write_text(text.replace('"[7685.987865952477,', '"[oops,'))
    out = tmp_path / "s.zarr"
    with pytest.raises(ParseError, match="oops"):
        ingest_files([good, second], [gaia], out)
    assert len(list((tmp_path / "s.zarr.parts").glob("*/done.json"))) == 1  # the good file
    second.write_text(text)
    with pytest.raises(OutputExistsError, match=r"interrupted ingest, 1 file.*--resume"):
        ingest_files([good, second], [gaia], out)  # the convention: --resume or --overwrite
    with pytest.raises(ResumeRefusedError, match="chunk_rows"):
        ingest_files([good, second], [gaia], out, config=IngestConfig(chunk_rows=2, resume=True))
    parsed: list[str] = []
    real_read = parts.read_xp_file
    monkeypatch.setattr(
        parts,
        "read_xp_file",
        lambda path, request: parsed.append(Path(path).name) or real_read(path, request),
    )
    resumed = open_xp_store(
        ingest_files([good, second], [gaia], out, config=IngestConfig(resume=True)).path
    )
    assert parsed == ["second.ecsv"]
    assert not (tmp_path / "s.zarr.parts").exists()
    fresh = open_xp_store(ingest_files([good, second], [gaia], tmp_path / "fresh.zarr").path)
    _assert_same_rows(resumed, fresh)
    assert resumed.sizes["source"] == 5
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = ingest_files([good, second], [gaia], out, config=IngestConfig(resume=True))
    assert again.checks.startswith("none") and again.files_reused == 2 and again.rows == 5
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # left as it is


def _assert_same_rows(a, b) -> None:  # type: ignore[no-untyped-def]
    assert sorted(a.variables) == sorted(b.variables)
    for name in b.variables:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


# --- mock bulk files: round trip, and serial == Dask through the CLI --------------------------
MOCK_ROWS, MOCK_SEED = 1500, 7


@pytest.fixture(scope="module")
def mock_bulk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk")
    write_mock_dr3_bulk(out, MOCK_ROWS, seed=MOCK_SEED, rows_per_file=400)
    return out


def test_mock_bulk_files_ingest_to_the_mock_store(mock_bulk: Path, tmp_path: Path) -> None:
    xp = sorted(mock_bulk.glob("XpContinuousMeanSpectrum_*"))
    gs = sorted(mock_bulk.glob("GaiaSource_*"))
    assert len(xp) >= 3
    ingested = ingest_files(xp, gs, tmp_path / "in.zarr", config=IngestConfig(chunk_rows=512)).path
    direct = write_mock_store(
        tmp_path / "mock.zarr",
        MOCK_ROWS,
        seed=MOCK_SEED,
        chunk_rows=512,
        scalars=list(schema.DR3_SCALARS),
    )
    a, b = open_xp_store(ingested), open_xp_store(direct)
    _assert_same_rows(a, b)
    assert all(f["md5_verified"] for f in a.attrs["input_files"])  # the mock writes _MD5SUM.txt


def test_cli_on_a_dask_cluster_equals_the_serial_api(
    mock_bulk: Path,
    tmp_path: Path,
    dask_client,  # type: ignore[no-untyped-def]
) -> None:
    serial = ingest_files([mock_bulk], [mock_bulk], tmp_path / "serial.zarr")
    address = dask_client.scheduler.address
    args = [
        "ingest",
        str(mock_bulk),
        "--gaia-source",
        str(mock_bulk),
        "-o",
        str(tmp_path / "d.zarr"),
    ]
    result = CliRunner().invoke(main, [*args, "--cluster", address, "--chunk-rows", "300"])
    assert result.exit_code == 0, result.output
    assert serial.rows == MOCK_ROWS  # the CLI prints the API's summary
    assert f"rows           {MOCK_ROWS:,} from {serial.xp_files} XP file(s)" in result.output
    distributed = open_xp_store(tmp_path / "d.zarr")
    assert distributed.chunks["source"][0] == 300
    _assert_same_rows(distributed, open_xp_store(serial.path))


def test_cli_reports_errors_in_one_line(dr3_samples_dir: Path, tmp_path: Path) -> None:
    args = ["ingest", str(dr3_samples_dir / "XP_CONTINUOUS_RAW.csv"), "-o", str(tmp_path / "s")]
    result = CliRunner().invoke(main, [*args, "--gaia-source", str(tmp_path / "missing.csv")])
    assert result.exit_code == 2
    assert "missing.csv" in result.output


def test_bench_ingest_runs_and_reports_the_ratio(tmp_path: Path) -> None:
    from xpbatch.benchmarks.ingest import run_ingest_benchmark

    result = run_ingest_benchmark(300, rows_per_file=100, workdir=tmp_path, echo=lambda _: None)
    assert result.rows == 300 and result.files >= 2
    assert result.plain_cpu_s > 0 and result.ingest_cpu_s > 0
    report = result.report()
    assert "x the plain reader" in report and "219,197,643 rows" in report
