"""Shared fixtures: the read-only ../shared reference data, small stores, a Dask cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XPBATCH_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} is absent: this test needs the project's shared reference data beside the "
            "checkout (../shared); a fresh clone without it skips the test"
        )
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference/xp_vae_apogee: the published checkpoint and reference outputs."""
    return shared_path("reference", "xp_vae_apogee")


@pytest.fixture(scope="session")
def dr3_samples_dir() -> Path:
    """../shared/dr3/samples: real DR3 XP rows in three encodings."""
    return shared_path("dr3", "samples")
