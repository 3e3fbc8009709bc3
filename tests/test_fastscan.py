"""xpbatch.ingest.fastscan: what the compiled scanner accepts it converts exactly like the general
(pyarrow) reader, it gives up on what it cannot prove, and it is really taken on DR3 files."""

from __future__ import annotations

import decimal
import gzip
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpbatch import schema
from xpbatch.config import MockConfig
from xpbatch.ingest import ReadRequest, array_cells, fast_layout, fastscan, parse_xp_file
from xpbatch.ingest import text as ingest
from xpbatch.mock import write_mock_dr3_bulk
from xpbatch.store.xp_store import n_correlations

SCALARS = tuple(schema.DR3_SCALARS)
_BAND_COLUMNS = (
    "basis_function_id",
    "degrees_of_freedom",
    "n_parameters",
    "n_measurements",
    "n_rejected_measurements",
    "standard_deviation",
    "chi_squared",
    "coefficients",
    "coefficient_errors",
    "coefficient_correlations",
    "n_relevant_bases",
    "relative_shrinking",
)
COLUMNS = ["source_id", "solution_id", *(f"{b}_{c}" for b in schema.BANDS for c in _BAND_COLUMNS)]
"""The columns of gaiadr3.xp_continuous_mean_spectrum, in file order (FORMAT.md)."""

F32 = np.finfo(np.float32)


# --- 1. one number: float32(float64(text)) or give up -----------------------------------------
def _scan_number(text: str) -> np.float32 | None:
    """The scanner's float32 of a whole token; None where it gives up."""
    token = np.frombuffer(text.encode(), dtype=np.uint8)
    value, end = fastscan._parse_number(token, 0, len(token))
    if end == -1:
        return None
    assert end == len(token), f"{text!r}: the scanner stopped at {end} of {len(token)}"
    return np.float32(value)


def _reference(text: str) -> np.float32:
    """What the general reader makes of a number: the float32 of its float64."""
    with np.errstate(over="ignore"):
        return np.float32(float(text))


def _general_reader(texts: list[str]) -> np.ndarray:
    """The general reader's own parse of array values (pyarrow), as float32."""
    lines = np.frombuffer("".join(t + "\n" for t in texts).encode(), dtype=np.uint8).copy()
    values = array_cells._parse_number_lines(lines, 1)
    assert values is not None, f"pyarrow cannot parse one of {texts[:5]}..."
    return values[:, 0].astype(np.float32)


def _bits(value: np.floating | np.ndarray) -> Any:
    return np.asarray(value, dtype=np.float32).view(np.uint32)


def _assert_converts_exactly(text: str) -> bool:
    """The scanner gives up on ``text`` or gives its reference float32, bit for bit (the sign of
    zero included); whether it accepted."""
    value = _scan_number(text)
    if value is not None:
        shown = text if len(text) < 80 else f"{text[:40]}...{text[-30:]}"
        assert _bits(value) == _bits(_reference(text)), (
            f"{shown!r}: scanner {value!r}, float32(float64(text)) {_reference(text)!r}"
        )
    return value is not None


@st.composite
def _decimals(draw: st.DrawFn) -> str:
    """Decimal text of many shapes: sign, 1-25 digits (leading zeros too), a point anywhere,
    an exponent (either letter, signed or not, zero-padded) from float32 subnormals to beyond
    its maximum."""
    digits = draw(st.text("0123456789", min_size=1, max_size=25))
    point = draw(st.none() | st.integers(0, len(digits)))
    text = digits if point is None else f"{digits[:point]}.{digits[point:]}"
    if draw(st.booleans()):
        exponent = draw(st.integers(-75, 60))
        sign = "-" if exponent < 0 else draw(st.sampled_from(["", "+"]))
        width = draw(st.integers(1, 4))
        text += f"{draw(st.sampled_from('eE'))}{sign}{abs(exponent):0{width}d}"
    return draw(st.sampled_from(["", "-", "+"])) + text


@st.composite
def _near_float32_limits(draw: st.DrawFn) -> str:
    """Values around float32's largest, smallest normal and smallest subnormal numbers."""
    limit = draw(st.sampled_from([float(F32.max), float(F32.tiny), float(F32.smallest_subnormal)]))
    factor = draw(st.floats(0.5, 2.0))
    return f"{limit * factor:.{draw(st.integers(0, 20))}e}"


_NUMBER_TEXTS = st.one_of(
    _decimals(),
    _near_float32_limits(),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: repr(float(x))),
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda x: repr(float(x))),
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(
        lambda x: str(np.float32(x))  # the shortest text of a float32 (DR3's errors)
    ),
)


@settings(max_examples=400, deadline=None)
@given(_NUMBER_TEXTS)
def test_a_number_is_the_float32_of_its_float64_or_the_scanner_gives_up(text: str) -> None:
    if _assert_converts_exactly(text):
        # ...and the general reader (pyarrow) reads the same number the same way
        assert _bits(_general_reader([text])[0]) == _bits(_reference(text))


_SHAPES_OF_TEXT: dict[str, Callable[[np.ndarray], list[str]]] = {
    "float64-repr": lambda x: [repr(float(v)) for v in x],
    "float32-repr": lambda x: [repr(float(v)) for v in x.astype(np.float32)],
    "float32-shortest": lambda x: [str(v) for v in x.astype(np.float32)],
    "9-significant-digits": lambda x: [f"{v:.9g}" for v in x],
}
# Short texts of values above 2**21 can be exact float32 midpoints (numpy's shortest float32
# text is one whenever round-half-even reads it back), which the scanner rightly gives up on.
_BELOW_2_21 = 6.3


@pytest.mark.parametrize(
    ("shape", "decades"),
    [
        pytest.param("float64-repr", (-28, 30), id="float64-repr"),
        pytest.param("float32-repr", (-28, 30), id="float32-repr"),
        pytest.param("float32-shortest", (-30, _BELOW_2_21), id="float32-shortest"),
        pytest.param("9-significant-digits", (-30, _BELOW_2_21), id="9-significant-digits"),
        pytest.param(
            "float64-repr",
            (-30, 30),
            id="float64-repr-down-to-1e-30",
        ),
    ],
)
def test_ordinary_numbers_are_accepted_and_read_like_pyarrow(
    shape: str, decades: tuple[float, float]
) -> None:
    """Giving up is allowed but must be rare: at most 1 in 1000 values, log-uniform."""
    rng = np.random.default_rng(list(_SHAPES_OF_TEXT).index(shape))
    values = rng.choice([-1.0, 1.0], 5000) * 10.0 ** rng.uniform(*decades, 5000)
    texts = _SHAPES_OF_TEXT[shape](values)
    scanned = [_scan_number(t) for t in texts]
    given_up = [t for t, v in zip(texts, scanned, strict=True) if v is None]
    assert len(given_up) <= len(texts) // 1000, f"{len(given_up)} given up: {given_up[:5]}"
    accepted = [(t, v) for t, v in zip(texts, scanned, strict=True) if v is not None]
    expected = np.array([_reference(t) for t, _ in accepted])
    np.testing.assert_array_equal(_bits(np.array([v for _, v in accepted])), _bits(expected))
    np.testing.assert_array_equal(_bits(_general_reader([t for t, _ in accepted])), _bits(expected))


def _decimal_text(value: Fraction, digits: int, notation: str = "e") -> str:
    """``value`` written with ``digits`` significant digits (exact when it has no more)."""
    with decimal.localcontext() as context:
        context.prec = digits
        number = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
    return f"{number:{notation}}"


_NEAR = [Fraction(1, 10**17), Fraction(1, 10**20), Fraction(1, 2**47), Fraction(1, 2**45)]
"""Relative distances from a midpoint that the double rounding cannot see or barely sees."""


@pytest.mark.parametrize(
    "low",
    [
        pytest.param(np.float32(1.0), id="one"),
        pytest.param(np.float32(0.1), id="tenth"),
        pytest.param(np.float32(np.pi), id="pi"),
        pytest.param(np.float32(0.0123456), id="dr3-error-size"),
        pytest.param(np.float32(16777216.0), id="2**24-ulp-2"),
        pytest.param(np.float32(56947.036), id="dr3-coefficient-size"),
        pytest.param(np.float32(1e-30), id="1e-30"),
        pytest.param(np.float32(1e30), id="1e30"),
        pytest.param(F32.tiny, id="smallest-normal"),
        pytest.param(np.nextafter(F32.max, np.float32(0)), id="below-largest"),
    ],
)
def test_near_a_float32_rounding_midpoint_the_scanner_gives_up_or_rounds_twice(
    low: np.float32,
) -> None:
    """Decimals on, or within 1e-17 relative of, the midpoint between two float32s: the general
    reader rounds to float64 first (a tie there goes to even), so only a scanner that proves its
    float32 may accept them."""
    high = np.nextafter(low, np.float32(np.inf))
    midpoint = (Fraction(float(low)) + Fraction(float(high))) / 2
    near = [midpoint * (1 + s * rel) for s in (1, -1) for rel in _NEAR]
    texts = [_decimal_text(midpoint, 200), _decimal_text(midpoint, 200, "f")]
    texts += [_decimal_text(v, 40) for v in near]
    texts += [_decimal_text(midpoint, digits) for digits in (9, 12, 17, 18, 19, 20, 25)]
    for text in texts + ["-" + t for t in texts]:
        _assert_converts_exactly(text)
    # Away from a midpoint (8 ulp) it must accept: inside float32's range, and above the
    # scanner's reach for 17 digits (~1e-28, see float64-repr-down-to-1e-30).
    for s in (1, -1):
        value = midpoint * (1 + s * Fraction(1, 10**6))
        if Fraction(1, 10**28) <= value <= Fraction(float(F32.max)):
            assert _assert_converts_exactly(_decimal_text(value, 17)), value


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("0." + "0" * 40 + "15e41", id="40-leading-fraction-zeros"),
        pytest.param("0" * 30 + "1.5", id="30-leading-zeros"),
        pytest.param("1234567890123456789012345", id="25-digit-integer"),
        pytest.param("1.234567890123456789012345e-20", id="25-digits-exponent"),
        pytest.param("1" + "0" * 38 + ".5", id="40-digits-near-largest"),
        pytest.param("1.5e-0000000000000000000005", id="zero-padded-exponent"),
        pytest.param("0e999999999", id="zero-huge-exponent"),
        pytest.param("-0.0e-99999", id="negative-zero-huge-exponent"),
        pytest.param("-0", id="negative-zero-integer"),
        pytest.param("3.4028235e38", id="largest-float32"),
        pytest.param("3.4028236e38", id="just-above-largest"),
        pytest.param("1.1754944e-38", id="smallest-normal"),
        pytest.param("1e-45", id="subnormal"),
        pytest.param("1e39", id="overflow"),
        pytest.param(
            "0." + "0" * 100_000 + "1e100001",
            id="exponent-beyond-the-clamp",
        ),
    ],
)
def test_crafted_numbers_convert_exactly_or_give_up(text: str) -> None:
    _assert_converts_exactly(text)


# --- 2 and 3. whole files: identical to the general reader, and the fast path taken ------------
@pytest.fixture
def fast_blocks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each block of the test's parses was read by the scanner (a spy on the fast path:
    scan_block and the checks after it)."""
    taken: list[bool] = []
    parse = fast_layout.FastLayout.parse

    def spy(self: Any, buffer: np.ndarray, quotes: np.ndarray) -> dict[str, np.ndarray] | None:
        piece = parse(self, buffer, quotes)
        taken.append(piece is not None)
        return piece

    monkeypatch.setattr(fast_layout.FastLayout, "parse", spy)
    return taken


def _parse(path: Path, *, with_correlations: bool, general: bool = False, **kw: Any) -> Any:
    """parse_xp_file with every DR3 scalar; ``general``: with the scanner switched off."""
    with pytest.MonkeyPatch.context() as patch:
        if general:
            patch.setattr(fast_layout, "fastscan", None)  # every block through the general reader
        return parse_xp_file(path, scalars=SCALARS, with_correlations=with_correlations, **kw)


def _assert_identical(fast: Any, general: Any) -> None:
    """Two ParsedFiles hold the same rows, bit for bit (NaN payloads and -0.0 included)."""
    fields = ("source_id", "line", "coefficients", "coefficient_errors")
    arrays = {n: (getattr(fast, n), getattr(general, n)) for n in fields}
    assert fast.scalars.keys() == general.scalars.keys()
    arrays |= {n: (fast.scalars[n], general.scalars[n]) for n in fast.scalars}
    assert (fast.correlations is None) == (general.correlations is None)
    for band in fast.correlations or {}:
        arrays[band] = (fast.correlations[band], general.correlations[band])
    for name, (a, b) in arrays.items():
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        differ = np.flatnonzero(a.view(np.uint8).ravel() != b.view(np.uint8).ravel())
        assert not len(differ), (
            f"{name} differs at {np.unravel_index(differ[0] // a.itemsize, a.shape)}: "
            f"{a.ravel()[differ[0] // a.itemsize]!r} (scanner) != "
            f"{b.ravel()[differ[0] // b.itemsize]!r} (general reader)"
        )
    assert fast.bad_rows == general.bad_rows
    assert fast.file_info == general.file_info


@pytest.fixture(scope="module")
def mock_xp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mock bulk file of 300 rows (three 4 MB scanner blocks and the two lines cut between
    them), with many defective rows."""
    config = MockConfig(bp_missing_fraction=0.05, rp_missing_fraction=0.05, non_finite_fraction=0.2)
    folder = tmp_path_factory.mktemp("bulk")
    (path,) = write_mock_dr3_bulk(
        folder, 300, seed=5, rows_per_file=1000, config=config, overwrite=True
    )
    return path


@pytest.mark.parametrize("with_correlations", [False, True], ids=["coefficients", "correlations"])
def test_mock_bulk_file_reads_the_same_through_the_fast_path(
    mock_xp_file: Path, fast_blocks: list[bool], with_correlations: bool
) -> None:
    fast = _parse(mock_xp_file, with_correlations=with_correlations)
    assert len(fast_blocks) >= 3 and all(fast_blocks), fast_blocks
    general = _parse(mock_xp_file, with_correlations=with_correlations, general=True)
    _assert_identical(fast, general)
    # The file holds what the comparison is meant to cover.
    bp, rp = fast.coefficients[:, :55], fast.coefficients[:, 55:]
    assert np.isnan(bp).all(axis=1).any() and np.isnan(rp).all(axis=1).any()  # missing bands
    assert np.isinf(fast.coefficients).any()
    assert (np.isnan(fast.coefficients).sum(axis=1) == 1).any()  # a single NaN value
    assert len(fast.source_id) == 300 and not fast.bad_rows


@pytest.mark.parametrize(
    "sample",
    ["XP_CONTINUOUS_RAW.csv", "XP_CONTINUOUS_RAW.ecsv", "XP_CONTINUOUS_bulk_style_null.ecsv"],
)
@pytest.mark.parametrize("with_correlations", [False, True], ids=["coefficients", "correlations"])
def test_real_samples_read_the_same_through_the_fast_path(
    dr3_samples_dir: Path, fast_blocks: list[bool], sample: str, with_correlations: bool
) -> None:
    path = dr3_samples_dir / sample
    fast = _parse(path, with_correlations=with_correlations)
    assert fast_blocks == [True]
    _assert_identical(fast, _parse(path, with_correlations=with_correlations, general=True))


# Text of one DR3 row: bulk-style float64 coefficients, float32 errors and correlations.
_RNG = np.random.default_rng(2024)
_COEFFICIENTS = [repr(float(v)) for v in _RNG.normal(0, 300, 55)]
_ERRORS = [str(v) for v in _RNG.uniform(0.01, 5, 55).astype(np.float32)]
_CORRELATIONS = [str(v) for v in _RNG.uniform(-1, 1, n_correlations(55)).astype(np.float32)]


def _json(values: list[str]) -> str:
    return '"[' + ",".join(values) + ']"'


def _archive(values: list[str]) -> str:
    return '"(' + ", ".join(values) + ')"'


def _xp_line(source_id: int, cells: dict[str, str]) -> str:
    row = {"source_id": str(source_id), "solution_id": "4545469030156206080"}
    for band in schema.BANDS:
        row |= {
            f"{band}_basis_function_id": "56" if band == "bp" else "57",
            f"{band}_degrees_of_freedom": "4646",
            f"{band}_n_parameters": "55",
            f"{band}_n_measurements": "4701",
            f"{band}_n_rejected_measurements": "19",
            f"{band}_standard_deviation": "1.1224667",
            f"{band}_chi_squared": "5853.6416",
            f"{band}_coefficients": _json(_COEFFICIENTS),
            f"{band}_coefficient_errors": _json(_ERRORS),
            f"{band}_coefficient_correlations": _json(_CORRELATIONS),
            f"{band}_n_relevant_bases": "48",
            f"{band}_relative_shrinking": "0.12345",
        }
    return ",".join({**row, **cells}[c] for c in COLUMNS)


def _missing_band(band: str, *, integer: str, floating: str, array: str) -> dict[str, str]:
    cells = {f"{band}_{c}": integer for c in _BAND_COLUMNS}
    cells |= {f"{band}_{c}": floating for c in ("standard_deviation", "chi_squared")}
    cells[f"{band}_relative_shrinking"] = floating
    cells |= {f"{band}_{c}": array for c in _BAND_COLUMNS if "coefficient" in c}
    return cells


def _with(values: list[str], replacements: dict[int, str]) -> list[str]:
    return [replacements.get(i, v) for i, v in enumerate(values)]


_NON_FINITE = {0: "Infinity", 1: "-Infinity", 2: "inf", 3: "-INF", 4: "+inf", 5: "NaN"}
_NON_FINITE |= {6: "nan", 7: "null", 8: "NULL", 9: "iNfInItY"}
_SHAPES = {0: "+1.5", 1: "1.", 2: ".5", 3: "1.e5", 4: "007.5", 5: "1E-3", 6: "-2.5E+02"}
_SHAPES |= {7: "1234567890123456789012345e-20", 8: "0.000000000000000000000012345", 9: "-.5"}
_WELL_FORMED_ROWS = [
    pytest.param({}, "\n", id="plain"),
    pytest.param({"bp_coefficients": _archive(_COEFFICIENTS)}, "\n", id="archive-parentheses"),
    pytest.param(
        _missing_band("bp", integer="", floating="", array=""), "\n", id="archive-missing-band"
    ),
    pytest.param(
        _missing_band("bp", integer='""', floating="nan", array='""'), "\n", id="ecsv-missing-band"
    ),
    pytest.param(
        _missing_band("rp", integer="null", floating="null", array="null"),
        "\n",
        id="bulk-missing-band",
    ),
    pytest.param(
        {"bp_coefficients": '""', "rp_coefficient_errors": "NULL"}, "\n", id="one-array-missing"
    ),
    pytest.param(
        {"bp_coefficients": _json(_with(_COEFFICIENTS, _NON_FINITE))}, "\n", id="non-finite"
    ),
    pytest.param(
        {"rp_coefficients": _json(_with(_COEFFICIENTS, {0: "-0.0", 1: "-0", 2: "0.0"}))}
        | {"bp_standard_deviation": "-0.0", "rp_chi_squared": "-0"},
        "\n",
        id="negative-zero",
    ),
    pytest.param(
        {"bp_coefficient_errors": _json(_with(_ERRORS, _SHAPES)), "bp_chi_squared": "+1.5"}
        | {"rp_chi_squared": "1.e3", "rp_standard_deviation": ".5"},
        "\n",
        id="number-shapes",
    ),
    pytest.param(
        {"bp_standard_deviation": "nan", "bp_chi_squared": "NaN", "rp_chi_squared": ""}
        | {"rp_standard_deviation": "NULL", "bp_relative_shrinking": '""'}
        | {"bp_n_measurements": "null", "rp_n_measurements": "", "bp_n_relevant_bases": "nan"}
        | {"rp_n_relevant_bases": "NaN", "solution_id": '""'},
        "\n",
        id="missing-scalars",
    ),
    pytest.param(
        {"source_id": "0000123", "solution_id": "-0", "bp_n_measurements": "007"},
        "\n",
        id="integer-shapes",
    ),
    pytest.param(
        {"rp_coefficients": '"[ ' + " , ".join(_COEFFICIENTS) + ' ]"'},
        "\n",
        id="spaces-inside-brackets",
    ),
    pytest.param({}, "\r\n", id="crlf"),
    pytest.param({"rp_relative_shrinking": '""'}, "\r\n", id="crlf-after-a-quoted-cell"),
]


@pytest.mark.parametrize("with_correlations", [False, True], ids=["coefficients", "correlations"])
@pytest.mark.parametrize(("cells", "newline"), _WELL_FORMED_ROWS)
def test_well_formed_rows_read_the_same_through_the_fast_path(
    tmp_path: Path,
    fast_blocks: list[bool],
    cells: dict[str, str],
    newline: str,
    with_correlations: bool,
) -> None:
    """Each encoding detail in the middle line of three."""
    lines = [_xp_line(11, {}), _xp_line(12, cells), _xp_line(13, {})]
    path = tmp_path / "xp.csv"
    path.write_bytes(newline.join([",".join(COLUMNS), *lines, ""]).encode())
    fast = _parse(path, with_correlations=with_correlations)
    assert fast_blocks == [True]
    _assert_identical(fast, _parse(path, with_correlations=with_correlations, general=True))


# Rows the scanner must leave to the general reader: (cells, bad rows the general reader records).
_LEFT_TO_THE_GENERAL_READER = [
    pytest.param(
        {"rp_coefficients": '" ' + _json(_COEFFICIENTS)[1:-1] + ' "'},
        1,
        id="spaces-outside-brackets",
    ),
    pytest.param(
        {"bp_coefficients": _archive(_with(_COEFFICIENTS, {3: "null", 4: "NULL "}))},
        1,
        id="null-token-with-spaces",
    ),
    pytest.param({"bp_n_measurements": "+5"}, 0, id="integer-with-plus"),  # read as a float: 5
    pytest.param({"bp_n_measurements": " 5"}, 1, id="integer-with-space"),
    pytest.param({"bp_n_measurements": "99999999999999999999"}, 1, id="integer-beyond-int64"),
    pytest.param({"bp_n_measurements": "70000"}, 1, id="integer-beyond-int16"),
    pytest.param({"rp_chi_squared": " 1.5"}, 1, id="float-with-space"),
    pytest.param({"rp_chi_squared": "1e39"}, 0, id="float-beyond-float32"),
    pytest.param({"bp_coefficients": _json(_with(_COEFFICIENTS, {0: "1e39"}))}, 0, id="array-1e39"),
]


@pytest.mark.parametrize(("cells", "n_bad"), _LEFT_TO_THE_GENERAL_READER)
def test_rows_left_to_the_general_reader_read_as_without_the_scanner(
    tmp_path: Path, fast_blocks: list[bool], cells: dict[str, str], n_bad: int
) -> None:
    """The scanner gives up; the general reader records the bad row (or reads the odd value)
    with a clear reason, exactly as it does without the scanner."""
    lines = [_xp_line(11, {}), _xp_line(12, cells), _xp_line(13, {})]
    path = tmp_path / "xp.csv"
    path.write_bytes("\n".join([",".join(COLUMNS), *lines, ""]).encode())
    fast = _parse(path, with_correlations=False, on_bad_row="skip")
    assert fast_blocks == [False]
    _assert_identical(fast, _parse(path, with_correlations=False, general=True, on_bad_row="skip"))
    assert [(b.line, bool(b.reason)) for b in fast.bad_rows] == [(3, True)] * n_bad
    assert len(fast.source_id) == 3 - n_bad


def test_columns_not_asked_for_are_not_read(tmp_path: Path, fast_blocks: list[bool]) -> None:
    """Without correlations, their cells may hold anything well-quoted (as for pyarrow)."""
    cells = {"bp_coefficient_correlations": '"not, an array"', "rp_coefficient_correlations": "x"}
    path = tmp_path / "xp.csv"
    path.write_text("\n".join([",".join(COLUMNS), _xp_line(11, cells), ""]))
    fast = _parse(path, with_correlations=False)
    assert fast_blocks == [True]
    _assert_identical(fast, _parse(path, with_correlations=False, general=True))


# --- 4. blocks the scanner gives up on, and edge cases it accepts ------------------------------
_MINI_COLUMNS = ["id", "n", "x", "skip", "a", "b"]
_MINI = fastscan.make_layout(
    _MINI_COLUMNS, integers=[("id", 0), ("n", -1)], floats=["x"], arrays=[("a", 3), ("b", 2)]
)
_MINI_CELLS = {"id": "7", "n": "3", "x": "1.5", "skip": "any", "a": '"[1.0,2.0,3.0]"'}
_MINI_CELLS["b"] = '"(4.0, 5.0)"'


def _mini(**cells: str) -> str:
    """A line of the small layout: id, n (integers), x (float), skip, a[3], b[2] (arrays)."""
    return ",".join({**_MINI_CELLS, **cells}[c] for c in _MINI_COLUMNS)


def _scan_block(text: str) -> fastscan.ScannedBlock | None:
    data = text.encode()
    buffer = np.frombuffer(data, dtype=np.uint8)
    return fastscan.scan_block(buffer, ingest._quote_positions(data, 0, len(data)), _MINI)


_GOOD = _mini()
_UNCLOSED = _mini(a='"[1.0,2.0,3.0]')
_GIVE_UP = {
    "array-too-short": _mini(a='"[1.0,2.0]"'),
    "array-too-long": _mini(a='"[1.0,2.0,3.0,4.0]"'),
    "array-trailing-comma": _mini(a='"[1.0,2.0,3.0,]"'),
    "array-empty-value": _mini(a='"[1.0,,2.0]"'),
    "array-value-abc": _mini(a='"[1.0,abc,3.0]"'),
    "array-value-1.5e": _mini(a='"[1.0,1.5e,3.0]"'),
    "array-value--1": _mini(a='"[1.0,--1,3.0]"'),
    "array-value-1.5x": _mini(a='"[1.0,1.5x,3.0]"'),
    "array-value-NAN": _mini(a='"[1.0,NAN,3.0]"'),
    "array-value--nan": _mini(a='"[1.0,-nan,3.0]"'),
    "array-value-tab": _mini(a='"[1.0,\t2.0,3.0]"'),
    "array-value-overflow": _mini(a='"[1.0,1e39,3.0]"'),
    "array-value-subnormal": _mini(a='"[1.0,1e-40,3.0]"'),
    "array-value-midpoint": _mini(a='"[1.0,16777217,3.0]"'),
    "array-newline-inside": _mini(a='"[1.0,\n2.0,3.0]"'),
    "array-no-brackets": _mini(a='"1.0,2.0,3.0"'),
    "array-mismatched-brackets": _mini(a='"[1.0,2.0,3.0)"'),
    "array-quoted-null": _mini(a='"null"'),
    "array-unquoted": _mini(b="[4.0]"),
    "float-abc": _mini(x="abc"),
    "float-1.5e": _mini(x="1.5e"),
    "float--1": _mini(x="--1"),
    "float-inf": _mini(x="inf"),
    "float-space": _mini(x=" 1.5"),
    "float-quoted": _mini(x='"1.5"'),
    "integer-plus": _mini(n="+3"),
    "integer-space": _mini(n="3 "),
    "integer-20-digits": _mini(n="12345678901234567890"),
    "integer-above-int64": _mini(n="9223372036854775808"),
    "integer-decimal": _mini(n="3.0"),
    "integer-exponent": _mini(n="3e0"),
    "integer-quoted": _mini(n='"3"'),
    "text-after-closing-quote": _mini(a='"[1.0,2.0,3.0]"x'),
    "quote-inside-unquoted": _mini(skip='a""b'),
    "escaped-quote-in-quoted": _mini(skip='"a""b"'),
    "too-few-fields": _mini().rsplit(",", 1)[0],
    "too-many-fields": _mini() + ",1",
    "empty-line": "",
    "comment-line": "# a comment",
    "bare-carriage-return": _mini(x="1.5\r2.5"),
}


@pytest.mark.parametrize(
    "block",
    [pytest.param(f"{_GOOD}\n{line}\n{_GOOD}\n", id=name) for name, line in _GIVE_UP.items()]
    + [
        pytest.param(f"{_GOOD}\n{_GOOD}", id="no-final-newline"),
        pytest.param("", id="empty-block"),
        pytest.param(f"{_GOOD}\n{_UNCLOSED}\n", id="odd-quotes"),
    ],
)
def test_the_scanner_gives_up_on_what_it_does_not_fully_understand(block: str) -> None:
    assert _scan_block(block) is None


NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize(
    ("line", "integers", "floats", "values", "present"),
    [
        pytest.param(_GOOD, [7, 3], [1.5], [1, 2, 3, 4, 5], [1, 1], id="plain"),
        pytest.param(
            _mini(a='"( 1.0 ,  2.0,3.0 )"', b='"(4.0 , 5.0)"'),
            [7, 3],
            [1.5],
            [1, 2, 3, 4, 5],
            [1, 1],
            id="archive-spaces",
        ),
        pytest.param(_mini(a='""'), [7, 3], [1.5], [NAN] * 3 + [4, 5], [0, 1], id="empty-quoted"),
        pytest.param(_mini(b="null"), [7, 3], [1.5], [1, 2, 3, NAN, NAN], [1, 0], id="bare-null"),
        pytest.param(_mini(b="NULL"), [7, 3], [1.5], [1, 2, 3, NAN, NAN], [1, 0], id="bare-NULL"),
        pytest.param(_mini(b=""), [7, 3], [1.5], [1, 2, 3, NAN, NAN], [1, 0], id="empty-array"),
        pytest.param(
            _mini(a='"[Infinity,-inf,+INF]"', b='"[ -Infinity , inf ]"'),
            [7, 3],
            [1.5],
            [INF, -INF, INF, -INF, INF],
            [1, 1],
            id="infinities",
        ),
        pytest.param(
            _mini(a='"[null,NaN,nan]"', b='"[NULL, 1e0]"'),
            [7, 3],
            [1.5],
            [NAN, NAN, NAN, NAN, 1],
            [1, 1],
            id="null-tokens-inside",
        ),
        pytest.param(
            _mini(x="-0.0", a='"[-0.0,0.0,-0]"', b='"(-0e5, +0)"'),
            [7, 3],
            [-0.0],
            [-0.0, 0.0, -0.0, -0.0, 0.0],
            [1, 1],
            id="negative-zero",
        ),
        pytest.param(_mini(n="", x="NaN"), [7, -1], [NAN], [1, 2, 3, 4, 5], [1, 1], id="nulls-1"),
        pytest.param(
            _mini(n="NULL", x='""'), [7, -1], [NAN], [1, 2, 3, 4, 5], [1, 1], id="nulls-2"
        ),
        pytest.param(
            _mini(n="nan", x="null"), [7, -1], [NAN], [1, 2, 3, 4, 5], [1, 1], id="nulls-3"
        ),
        pytest.param(
            _mini(id="9223372036854775807", n="-007"),
            [2**63 - 1, -7],
            [1.5],
            [1, 2, 3, 4, 5],
            [1, 1],
            id="integer-limits",
        ),
        pytest.param(
            _mini(skip='"a, quoted, cell"'), [7, 3], [1.5], [1, 2, 3, 4, 5], [1, 1], id="skip"
        ),
        pytest.param(
            _mini() + "\r", [7, 3], [1.5], [1, 2, 3, 4, 5], [1, 1], id="crlf-after-quoted"
        ),
        pytest.param(
            _mini(b="null") + "\r", [7, 3], [1.5], [1, 2, 3, NAN, NAN], [1, 0], id="crlf-unquoted"
        ),
    ],
)
def test_accepted_edge_cases_give_these_values(
    line: str, integers: list[int], floats: list[float], values: list[float], present: list[int]
) -> None:
    block = _scan_block(f"{_GOOD}\r\n{line}\n" if line.endswith("\r") else f"{_GOOD}\n{line}\n")
    assert block is not None
    np.testing.assert_array_equal(block.integers[1], np.array(integers, dtype=np.int64))
    for got, expected in ((block.floats[1], floats), (block.values[1], values)):
        expected_array = np.array(expected, dtype=np.float32)
        np.testing.assert_array_equal(got, expected_array)  # NaN where NaN
        np.testing.assert_array_equal(np.signbit(got), np.signbit(expected_array))
    np.testing.assert_array_equal(block.present[1], np.array(present, dtype=bool))
    assert block.integers.shape[0] == 2  # and the first line is read as well


@pytest.mark.parametrize(
    "cells",
    [
        pytest.param({"source_id": "0"}, id="source-id-zero"),
        pytest.param({"source_id": "-5"}, id="source-id-negative"),
        pytest.param({"source_id": "null"}, id="source-id-missing"),
        pytest.param({"bp_n_parameters": "54"}, id="n-parameters-other-than-55"),
        pytest.param({"rp_n_parameters": "null"}, id="n-parameters-missing"),
    ],
)
def test_the_fast_path_leaves_rows_the_general_reader_must_judge(cells: dict[str, str]) -> None:
    """What the scanner reads but ingest must report as a bad row goes to the general reader."""
    data = "\n".join([_xp_line(11, {}), _xp_line(12, cells), ""]).encode()
    buffer = np.frombuffer(data, dtype=np.uint8)
    quotes = ingest._quote_positions(data, 0, len(data))
    fast = fast_layout.FastLayout.of(COLUMNS, COLUMNS, ReadRequest(SCALARS))
    assert fast is not None
    assert fastscan.scan_block(buffer, quotes, fast.layout) is not None  # the scanner reads it
    assert fast.parse(buffer, quotes) is None  # the checks after it refuse


# --- 5. a malformed row in one block of many ----------------------------------------------------
def test_a_bad_row_sends_only_its_block_to_the_general_reader(
    mock_xp_file: Path, tmp_path: Path, fast_blocks: list[bool]
) -> None:
    """With on_bad_row='skip' every good row of every block is kept, the bad one recorded."""
    lines = gzip.decompress(mock_xp_file.read_bytes()).decode().split("\n")
    first_data = next(i for i, line in enumerate(lines) if not line.startswith("#")) + 1
    bad = first_data + 150  # in the second 4 MB block
    lines[bad] = lines[bad].replace('"[', '"[abc,', 1)
    path = tmp_path / "corrupt.csv"
    path.write_text("\n".join(lines))
    fast = _parse(path, with_correlations=True, on_bad_row="skip")
    assert len(fast_blocks) >= 3 and fast_blocks.count(False) == 1, fast_blocks
    _assert_identical(fast, _parse(path, with_correlations=True, general=True, on_bad_row="skip"))
    assert len(fast.source_id) == 299
    assert [row.line for row in fast.bad_rows] == [bad + 1]  # 1-based
