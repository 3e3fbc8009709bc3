"""atomic_path: the target holds the old content or the whole new one, never a partial file."""

from __future__ import annotations

from pathlib import Path

import pytest

from xpbatch.paths import TMP_MARK, atomic_path


@pytest.mark.parametrize(
    "old",
    [pytest.param(None, id="new-file"), pytest.param("old", id="replaces-existing")],
)
def test_success_publishes_the_whole_file_and_leaves_no_temporary(
    tmp_path: Path, old: str | None
) -> None:
    target = tmp_path / "out.json"
    if old is not None:
        target.write_text(old)
    with atomic_path(str(target)) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.json{TMP_MARK}")
        tmp.write_text("whole")
        # until the block ends, the target is untouched
        assert (target.read_text() if target.exists() else None) == old
    assert target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize(
    "old",
    [pytest.param(None, id="new-file"), pytest.param("old", id="keeps-existing")],
)
def test_failure_removes_the_temporary_and_keeps_the_target(
    tmp_path: Path, old: str | None
) -> None:
    target = tmp_path / "out.json"
    if old is not None:
        target.write_text(old)
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if old is None else ["out.json"])
    assert old is None or target.read_text() == old


def test_a_killed_writers_temporary_is_recognisable(tmp_path: Path) -> None:
    """Cleanup code (export's rerun) finds leftovers with the glob ``.*<TMP_MARK>*``."""
    with atomic_path(tmp_path / "part.parquet") as tmp:
        tmp.write_bytes(b"partial")
        assert list(tmp_path.glob(f".*{TMP_MARK}*")) == [tmp]
