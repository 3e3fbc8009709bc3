"""Connecting to clusters: the refusals that must be clear without a GPU or a scheduler."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from xpbatch.cli.main import main
from xpbatch.config import ClusterConfig
from xpbatch.errors import ClusterError
from xpbatch.model.files import save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.runtime.cluster import connect


@pytest.mark.skipif(
    importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda is installed here"
)
def test_local_cuda_without_dask_cuda_says_how_to_get_it() -> None:
    with (
        pytest.raises(ClusterError, match=r"pip install 'xpbatch\[cuda13\]'.*omit --cluster"),
        connect(ClusterConfig(cluster="local-cuda")),
    ):
        pass


@pytest.mark.skipif(
    importlib.util.find_spec("dask_cuda") is None, reason="needs dask-cuda (the cuda13 extra)"
)
def test_local_cuda_without_a_gpu_says_why_in_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with (
        pytest.raises(ClusterError, match=r"needs a CUDA GPU, but .*omit --cluster") as caught,
        connect(ClusterConfig(cluster="local-cuda")),
    ):
        pass
    assert "\n" not in str(caught.value)


def test_a_dask_cuda_worker_without_cuda_is_an_error_not_a_cpu_run() -> None:
    import torch

    from xpbatch.errors import ConfigError
    from xpbatch.model.device import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"started by dask-cuda .* sees no CUDA GPU"):
        resolve_device("auto", on_dask_cuda=True)
    assert resolve_device("auto").type == "cpu"  # a CPU worker may well run on the CPU


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


def test_a_cluster_that_never_started_gets_no_resume_hint(
    tmp_path: Path, make_xp_store: Callable[..., Path]
) -> None:
    """Nothing ran, so the one-line message must not suggest --resume (nothing to continue)."""
    store = make_xp_store(tmp_path / "s.zarr", 64)
    model = tmp_path / "m.safetensors"
    save_model(TrainedModel.untrained(), model)
    missing = tmp_path / "scheduler.json"
    result = CliRunner().invoke(
        main,
        ["encode-catalog", str(store), "-m", str(model), "-o", str(tmp_path / "c.zarr"),
         "--scheduler-file", str(missing)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "does not exist; start the scheduler" in lines[0], result.output
    assert "--resume" not in result.output
