"""Connecting to clusters: the refusals that must be clear without a GPU or a scheduler."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from xpbatch.cluster import connect
from xpbatch.config import ClusterConfig
from xpbatch.errors import ClusterError


@pytest.mark.skipif(
    importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda is installed here"
)
def test_local_cuda_without_dask_cuda_says_how_to_get_it() -> None:
    with (
        pytest.raises(ClusterError, match=r"pip install 'xpbatch\[cuda\]'.*omit --cluster"),
        connect(ClusterConfig(cluster="local-cuda")),
    ):
        pass


def test_a_missing_scheduler_file_is_a_clear_error(tmp_path: Path) -> None:
    with (
        pytest.raises(ClusterError, match="does not exist; start the scheduler"),
        connect(ClusterConfig(scheduler_file=str(tmp_path / "scheduler.json"))),
    ):
        pass


def test_distributed_logs_follow_the_application_level() -> None:
    root, distributed = logging.getLogger(), logging.getLogger("distributed")
    levels = root.level, distributed.level
    try:
        root.setLevel(logging.WARNING)
        with connect(ClusterConfig(n_workers=1, dashboard_address=":0")) as client:
            assert client.nthreads()
        assert distributed.level == logging.WARNING
    finally:
        root.setLevel(levels[0])
        distributed.setLevel(levels[1])
