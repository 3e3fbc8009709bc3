"""One resolver of the ``device`` option (training and encoding), its rules as a table."""

from __future__ import annotations

import pytest
import torch

from xpbatch.errors import ConfigError
from xpbatch.model.device import resolve_device

CASES = {
    # name: (device, precision, on_dask_cuda, torch sees a GPU, device or error pattern)
    "cpu": ("cpu", "fp32", False, False, "cpu"),
    "cpu with a GPU": ("cpu", "fp32", False, True, "cpu"),
    "cpu on dask-cuda": ("cpu", "fp32", True, False, "cpu"),
    "auto with a GPU": ("auto", "fp32", False, True, "cuda"),
    "auto without": ("auto", "fp32", False, False, "cpu"),
    "auto bf16 with a GPU": ("auto", "bf16", False, True, "cuda"),
    "auto bf16 without": ("auto", "bf16", False, False, r"precision 'bf16' needs a CUDA GPU"),
    "auto on dask-cuda with a GPU": ("auto", "fp32", True, True, "cuda"),
    "auto on dask-cuda without": ("auto", "fp32", True, False, r"started by dask-cuda .* sees no"),
    "cuda with a GPU": ("cuda", "fp32", False, True, "cuda"),
    "cuda:1 with a GPU": ("cuda:1", "fp32", False, True, "cuda:1"),
    "cuda without": ("cuda", "fp32", False, False, r"'cuda' was asked for, but torch sees no"),
    "cuda:0 without": ("cuda:0", "tf32", False, False, r"'cuda:0' was asked for, but torch sees"),
    "unknown": (
        "gpu",
        "fp32",
        False,
        True,
        r"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'",
    ),
}


@pytest.mark.parametrize(
    ("device", "precision", "on_dask_cuda", "gpu", "expected"), CASES.values(), ids=CASES.keys()
)
def test_resolve_device(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    precision: str,
    on_dask_cuda: bool,
    gpu: bool,
    expected: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if expected in {"cpu", "cuda", "cuda:1"}:
        found = resolve_device(device, precision=precision, on_dask_cuda=on_dask_cuda)
        assert found == torch.device(expected)
    else:
        with pytest.raises(ConfigError, match=expected):
            resolve_device(device, precision=precision, on_dask_cuda=on_dask_cuda)


def test_the_real_machine() -> None:
    """Without patching: 'auto' is what torch sees."""
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
