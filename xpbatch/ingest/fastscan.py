"""The compiled fast path of ``xpbatch ingest``: one pass over a block of well-formed XP lines.

The general reader in :mod:`xpbatch.ingest` (pyarrow) reads every DR3 encoding and explains every
malformed row, at a cost per row several times this scanner's (docs: performance). Real DR3 files
are well-formed, so :func:`scan_block` parses a block of whole lines in one numba-compiled pass
and *gives up* on the block (returns None) at the first thing it does not fully understand: an
odd token, a wrong array length, a value whose float32 it cannot prove. The caller then reads
that block with the general reader. The scanner therefore never decides what is an error, and
what it accepts it converts exactly as the general reader does (checked by tests):

* a number becomes float32(float64(text)), the general reader's double rounding. The scanner
  computes x = m * 10**e in float64 (m: the first 18 significant digits, the rest truncated)
  with at most seven roundings (m, three powers of ten, three products), so within 2**-50 of
  the decimal value, and keeps float32(x) only
  when the interval x * (1 +- 2**-47), which holds both the decimal value and its float64,
  rounds to one float32. Otherwise (a value within 2**-47 of a float32 rounding midpoint: about
  one in several million, never for DR3's float32 errors) it gives up, as it does outside
  float32's normal range.
* ``null``, ``NULL``, ``nan``, ``NaN`` and an empty field mean missing (NaN for floats, the
  column's missing value for integers), as pyarrow's ``null_values`` in the general reader;
  inside arrays ``inf``/``Infinity`` (any case, signed, spaces around) are infinities, like
  pyarrow's parser. An empty array value gives up.
* integers are ``-?[0-9]+`` (what ``pyarrow.compute.cast`` accepts); float scalars take no
  spaces; array values may have spaces around them (the archive's ``"(1.0, 2.0)"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numba
import numpy as np

SKIP, INTEGER, FLOAT, ARRAY = 0, 1, 2, 3
"""What :func:`scan_block` does with a column."""

_QUOTE, _COMMA, _NL, _CR, _SPACE = 34, 44, 10, 13, 32
_POW10 = np.array([10.0**k for k in range(23)])  # exact in float64 up to 1e22
_NEG_POW10 = np.array([float(f"1e-{k}") for k in range(23)])  # correctly rounded
_FLOAT32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INFINITY = np.frombuffer(b"infinity", dtype=np.uint8)
_MARGIN = 2.0**-47  # 64 float64 ulps: covers the <= 7 roundings of x and the general reader's one


@dataclasses.dataclass(frozen=True)
class Layout:
    """What to take from each column of a file, and where to put it.

    ``kinds[c]`` is SKIP, INTEGER, FLOAT or ARRAY; ``slots[c]`` the column's index among the
    integers, floats or arrays; array ``a`` fills ``values[:, offsets[a]:offsets[a] + widths[a]]``.
    """

    kinds: np.ndarray
    slots: np.ndarray
    int_missing: np.ndarray
    """Value of each integer slot where the field is missing."""
    n_floats: int
    offsets: np.ndarray
    widths: np.ndarray


def make_layout(
    columns: Sequence[str],
    *,
    integers: Sequence[tuple[str, int]],
    floats: Sequence[str],
    arrays: Sequence[tuple[str, int]],
) -> Layout:
    """The :class:`Layout` of a file with ``columns``.

    ``integers`` are (name, missing value), ``arrays`` (name, length); arrays are laid side by
    side in the given order, so consecutive arrays form one (rows, sum of lengths) matrix.
    """
    kinds = np.zeros(len(columns), dtype=np.int64)
    slots = np.zeros(len(columns), dtype=np.int64)
    index = {name: i for i, name in enumerate(columns)}
    for kind, names in ((INTEGER, [n for n, _ in integers]), (FLOAT, floats)):
        for slot, name in enumerate(names):
            kinds[index[name]], slots[index[name]] = kind, slot
    for slot, (name, _) in enumerate(arrays):
        kinds[index[name]], slots[index[name]] = ARRAY, slot
    widths = np.array([w for _, w in arrays], dtype=np.int64)
    return Layout(
        kinds=kinds,
        slots=slots,
        int_missing=np.array([m for _, m in integers], dtype=np.int64),
        n_floats=len(floats),
        offsets=np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64),
        widths=widths,
    )


@dataclasses.dataclass
class ScannedBlock:
    """The columns of a block, one row per line."""

    integers: np.ndarray
    """(lines, integer slots) int64, the slot's missing value where missing."""
    floats: np.ndarray
    """(lines, float slots) float32, NaN where missing."""
    values: np.ndarray
    """(lines, sum of array widths) float32; a missing array is NaN."""
    present: np.ndarray
    """(lines, arrays) bool: the array cell was there (not null)."""


def scan_block(buffer: np.ndarray, quotes: np.ndarray, layout: Layout) -> ScannedBlock | None:
    """Parse whole lines ``buffer`` (uint8, ending with a line break); None to give up.

    ``quotes`` are the offsets of every double quote in ``buffer`` (found at memchr speed by the
    caller), which lets the scan jump over the quoted cells it does not want.
    """
    if len(quotes) % 2:
        return None
    n_lines = _count_lines(buffer, quotes)
    if n_lines < 0:
        return None
    block = ScannedBlock(
        integers=np.empty((n_lines, len(layout.int_missing)), dtype=np.int64),
        floats=np.empty((n_lines, layout.n_floats), dtype=np.float32),
        values=np.empty((n_lines, int(layout.widths.sum())), dtype=np.float32),
        present=np.empty((n_lines, len(layout.widths)), dtype=np.bool_),
    )
    ok = _scan(
        buffer,
        quotes,
        layout.kinds,
        layout.slots,
        layout.int_missing,
        layout.offsets,
        layout.widths,
        block.integers,
        block.floats,
        block.values,
        block.present,
    )
    return block if ok else None


@numba.njit(cache=True, nogil=True)
def _count_lines(buf: np.ndarray, quotes: np.ndarray) -> int:
    """Line breaks outside quoted cells; -1 when the block does not end with one."""
    n = len(buf)
    if n == 0 or buf[n - 1] != _NL:
        return -1
    count, pos = 0, 0
    for q in range(0, len(quotes) + 1, 2):
        stop = quotes[q] if q < len(quotes) else n
        for i in range(pos, stop):
            if buf[i] == _NL:
                count += 1
        if q < len(quotes):
            pos = quotes[q + 1] + 1
    return count


@numba.njit(cache=True, nogil=True, inline="always")
def _is_infinity(buf: np.ndarray, start: int, stop: int) -> bool:
    """buf[start:stop] is 'inf' or 'infinity', in any case."""
    n = stop - start
    if n != 3 and n != 8:
        return False
    for i in range(n):  # noqa: SIM110 - numba compiles loops, not all() of a generator
        if buf[start + i] | 32 != _INFINITY[i]:
            return False
    return True


@numba.njit(cache=True, nogil=True, inline="always")
def _is_null(buf: np.ndarray, start: int, stop: int) -> bool:
    """The general reader's null tokens: '', null, NULL, nan, NaN (exactly those spellings)."""
    n = stop - start
    if n == 0:
        return True
    if n == 4:  # null, NULL
        c = buf[start]
        if c == 110:
            return buf[start + 1] == 117 and buf[start + 2] == 108 and buf[start + 3] == 108
        return c == 78 and buf[start + 1] == 85 and buf[start + 2] == 76 and buf[start + 3] == 76
    if n == 3:  # nan, NaN
        return (
            (buf[start] == 110 or buf[start] == 78)
            and buf[start + 1] == 97
            and (buf[start + 2] == buf[start])
        )
    return False


@numba.njit(cache=True, nogil=True, inline="always")
def _to_float32(mantissa: int, exp10: int, negative: bool) -> tuple[np.float32, bool]:
    """float32(float64(mantissa * 10**exp10)) when provably that; (0, False) otherwise."""
    if mantissa == 0:
        return np.float32(-0.0 if negative else 0.0), True
    if exp10 > 66 or exp10 < -66:  # beyond float32 whatever the 18 digits are
        return np.float32(0.0), False
    x = np.float64(mantissa)
    while exp10 > 22:
        x *= 1e22
        exp10 -= 22
    while exp10 < -22:
        x *= 1e-22
        exp10 += 22
    x = x * _POW10[exp10] if exp10 >= 0 else x * _NEG_POW10[-exp10]
    if not (_FLOAT32_MIN_NORMAL <= x <= _FLOAT32_MAX):
        return np.float32(0.0), False
    slack = x * _MARGIN
    value = np.float32(x)
    if np.float32(x - slack) != value or np.float32(x + slack) != value:
        return np.float32(0.0), False
    return (-value if negative else value), True


@numba.njit(cache=True, nogil=True)
def _long_mantissa(buf: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """(m, e) with m * 10**e the digits of buf[start:stop] to 18 significant digits (the rest
    truncated: a relative error below 1e-17, inside the margin)."""
    mantissa = 0
    exp10 = 0
    significant = 0
    after_point = False
    for i in range(start, stop):
        c = buf[i]
        if c == 46:
            after_point = True
        elif 48 <= c <= 57:
            if significant < 18:
                mantissa = mantissa * 10 + (c - 48)
                significant += mantissa > 0
                exp10 -= after_point
            elif not after_point:
                exp10 += 1
    return mantissa, exp10


@numba.njit(cache=True, nogil=True)
def _parse_number(buf: np.ndarray, start: int, stop: int) -> tuple[np.float32, int]:
    """float32 of the number at buf[start:...], and where it ends; end -1 when there is none or
    its float32 is not certain. Reads ``[+-]digits[.digits][(e|E)[+-]digits]``, nothing more."""
    i = start
    negative = False
    if i < stop and (buf[i] == 45 or buf[i] == 43):  # - +
        negative = buf[i] == 45
        i += 1
    mantissa = 0
    exp10 = 0
    digits = 0
    while i < stop and 48 <= buf[i] <= 57:
        mantissa = mantissa * 10 + (buf[i] - 48)
        digits += 1
        i += 1
    if i < stop and buf[i] == 46:  # .
        i += 1
        fraction_start = i
        while i < stop and 48 <= buf[i] <= 57:
            mantissa = mantissa * 10 + (buf[i] - 48)
            i += 1
        exp10 = fraction_start - i
        digits += i - fraction_start
    if digits > 18:  # the int64 mantissa may have overflowed: count significant digits
        mantissa, exp10 = _long_mantissa(buf, start, i)
    if digits == 0:
        return np.float32(0.0), -1
    if i < stop and (buf[i] | 32) == 101:  # e E
        i += 1
        exp_negative = False
        if i < stop and (buf[i] == 45 or buf[i] == 43):
            exp_negative = buf[i] == 45
            i += 1
        exponent = 0
        exp_digits = 0
        while i < stop and 48 <= buf[i] <= 57:
            exponent = min(exponent * 10 + (buf[i] - 48), 100_000)
            exp_digits += 1
            i += 1
        if exp_digits == 0 or exponent == 100_000:  # clamped: leave it to the general reader
            return np.float32(0.0), -1
        exp10 += -exponent if exp_negative else exponent
    value, ok = _to_float32(mantissa, exp10, negative)
    return value, (i if ok else -1)


@numba.njit(cache=True, nogil=True)
def _parse_special(buf: np.ndarray, start: int, stop: int) -> tuple[np.float32, bool]:
    """A non-numeric array value: a null token, exactly (NaN: pyarrow's null_values match whole
    untrimmed tokens), or a signed infinity with spaces around it."""
    if start < stop and _is_null(buf, start, stop):
        return np.float32(np.nan), True
    while start < stop and buf[start] == _SPACE:
        start += 1
    while stop > start and buf[stop - 1] == _SPACE:
        stop -= 1
    negative = start < stop and buf[start] == 45
    if start < stop and (buf[start] == 45 or buf[start] == 43):
        start += 1
    if _is_infinity(buf, start, stop):
        return np.float32(-np.inf if negative else np.inf), True
    return np.float32(0.0), False


@numba.njit(cache=True, nogil=True)
def _parse_int(buf: np.ndarray, start: int, stop: int) -> tuple[np.int64, bool]:
    """The integer ``-?[0-9]+`` in buf[start:stop], within int64."""
    i = start
    negative = i < stop and buf[i] == 45
    if negative:
        i += 1
    if i == stop or stop - i > 19:
        return np.int64(0), False
    value = np.uint64(0)
    while i < stop:
        c = buf[i]
        if not 48 <= c <= 57:
            return np.int64(0), False
        value = value * np.uint64(10) + np.uint64(c - 48)
        i += 1
    if value > np.uint64(9223372036854775807):
        return np.int64(0), False
    return (-np.int64(value) if negative else np.int64(value)), True


@numba.njit(cache=True, nogil=True)
def _parse_array(
    buf: np.ndarray, start: int, stop: int, out: np.ndarray, offset: int, width: int
) -> bool:
    """'[a,b,...]' or '(a, b, ...)' of exactly ``width`` values into out[offset:offset+width]."""
    if stop - start < 2:
        return False
    first, last = buf[start], buf[stop - 1]
    if not ((first == 91 and last == 93) or (first == 40 and last == 41)):  # [] ()
        return False
    i = start + 1
    end = stop - 1
    for count in range(width):
        token_start = i
        while i < end and buf[i] == _SPACE:
            i += 1
        value, after = _parse_number(buf, i, end)
        if after < 0:  # not a plain number: a null token or an infinity, or give up
            after = token_start
            while after < end and buf[after] != _COMMA:
                after += 1
            value, ok = _parse_special(buf, token_start, after)
            if not ok:
                return False
        out[offset + count] = value
        i = after
        while i < end and buf[i] == _SPACE:
            i += 1
        if i == end:
            return count + 1 == width
        if buf[i] != _COMMA:
            return False
        i += 1
    return False  # more than width values


@numba.njit(cache=True, nogil=True)
def _scan(
    buf: np.ndarray,
    quotes: np.ndarray,
    kinds: np.ndarray,
    slots: np.ndarray,
    int_missing: np.ndarray,
    offsets: np.ndarray,
    widths: np.ndarray,
    integers: np.ndarray,
    floats: np.ndarray,
    values: np.ndarray,
    present: np.ndarray,
) -> bool:
    """Fill the outputs from every line of buf; False at the first field it cannot take."""
    n = len(buf)
    n_columns = len(kinds)
    n_quotes = len(quotes)
    q = 0
    pos = 0
    line = 0
    while pos < n:
        if line == len(integers):
            return False  # more lines than _count_lines found: never, but never write past
        column = 0
        while True:
            if column == n_columns:
                return False  # too many fields
            quoted = buf[pos] == _QUOTE
            if quoted:
                if q + 1 >= n_quotes or quotes[q] != pos:
                    return False
                start, stop = pos + 1, quotes[q + 1]
                q += 2
                pos = stop + 1
                if pos + 1 < n and buf[pos] == _CR and buf[pos + 1] == _NL:
                    pos += 1
            else:
                start = pos
                while buf[pos] != _COMMA and buf[pos] != _NL:
                    if buf[pos] == _QUOTE:
                        return False  # a quote inside an unquoted field
                    pos += 1
                stop = pos
                if buf[pos] == _NL and stop > start and buf[stop - 1] == _CR:
                    stop -= 1
            if pos >= n or (buf[pos] != _COMMA and buf[pos] != _NL):
                return False  # text after a closing quote
            kind = kinds[column]
            slot = slots[column]
            if kind == INTEGER:
                if quoted and stop > start:
                    return False
                if _is_null(buf, start, stop):
                    integers[line, slot] = int_missing[slot]
                else:
                    number, ok = _parse_int(buf, start, stop)
                    if not ok:
                        return False
                    integers[line, slot] = number
            elif kind == FLOAT:
                if quoted and stop > start:
                    return False
                if _is_null(buf, start, stop):
                    floats[line, slot] = np.nan
                else:
                    value, after = _parse_number(buf, start, stop)
                    if after != stop:
                        return False
                    floats[line, slot] = value
            elif kind == ARRAY:
                offset, width = offsets[slot], widths[slot]
                if (quoted and stop == start) or (not quoted and _is_null(buf, start, stop)):
                    values[line, offset : offset + width] = np.nan
                    present[line, slot] = False
                elif quoted:
                    if not _parse_array(buf, start, stop, values[line], offset, width):
                        return False
                    present[line, slot] = True
                else:
                    return False
            column += 1
            pos += 1
            if buf[pos - 1] == _NL:
                break
        if column != n_columns:
            return False  # too few fields
        line += 1
    return True
