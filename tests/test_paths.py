"""atomic_path: the target holds the old content or the whole new one, never a partial file."""

from __future__ import annotations

from pathlib import Path

import pytest

from xpbatch.storage.paths import TMP_MARK, atomic_path


def _content(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


@pytest.fixture(params=[None, "old"], ids=["new-file", "existing-file"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """``out.json`` in an empty directory, absent or holding "old"."""
    path = tmp_path / "out.json"
    if request.param is not None:
        path.write_text(request.param)
    return path


def test_success_publishes_the_whole_file_and_leaves_no_temporary(target: Path) -> None:
    old = _content(target)
    with atomic_path(str(target)) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(f".out.json{TMP_MARK}")
        tmp.write_text("whole")
        assert _content(target) == old  # untouched until the block ends
    assert target.read_text() == "whole"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failure_removes_the_temporary_and_keeps_the_target(target: Path) -> None:
    old = _content(target)
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert _content(target) == old
    assert [p.name for p in target.parent.iterdir()] == ([] if old is None else ["out.json"])


def test_a_killed_writers_temporary_is_recognisable(tmp_path: Path) -> None:
    """Cleanup code (export's rerun) finds leftovers with the glob ``.*<TMP_MARK>*``."""
    with atomic_path(tmp_path / "part.parquet") as tmp:
        tmp.write_bytes(b"partial")
        assert list(tmp_path.glob(f".*{TMP_MARK}*")) == [tmp]
