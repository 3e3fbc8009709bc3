"""Where torch runs: one resolver of the ``device`` option for training and encoding.

=============================  ===========  =================================================
device                         torch sees   result
=============================  ===========  =================================================
``'cpu'``                      anything     the CPU
``'auto'``                     a GPU        ``cuda`` (the current GPU)
``'auto'``                     no GPU       the CPU; an error on a dask-cuda worker (it exists
                                            to drive a GPU) or for a precision other than fp32
``'cuda'`` / ``'cuda:N'``      a GPU        that GPU
``'cuda'`` / ``'cuda:N'``      no GPU       an error naming the likely cause
anything else                  -            an error naming the valid devices
=============================  ===========  =================================================
"""

from __future__ import annotations

import os
import re

import torch

from xpbatch.errors import ConfigError

_CUDA = re.compile(r"cuda(:\d+)?")


def resolve_device(
    device: str, *, precision: str = "fp32", on_dask_cuda: bool = False
) -> torch.device:
    """The torch device for ``device`` ('auto', 'cpu', 'cuda' or 'cuda:N') in this process.

    Parameters
    ----------
    device
        What was asked for (``EncodeConfig.device``, ``TrainConfig.device``).
    precision
        The training precision: 'tf32' and 'bf16' need a GPU, so 'auto' without one is an
        error rather than a silent fp32 run.
    on_dask_cuda
        This process is a worker that dask-cuda started: 'auto' without a GPU is an error
        naming the likely cause, never a silent CPU run.

    Raises
    ------
    ConfigError
        The device is not one of the above, or needs a GPU that torch does not see.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device == "cpu":
        return torch.device("cpu")
    if device != "auto" and not _CUDA.fullmatch(device):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if torch.cuda.is_available():
        return torch.device("cuda" if device == "auto" else device)
    if device != "auto":
        raise ConfigError(
            f"device {device!r} was asked for, but torch sees no CUDA GPU here "
            f"({_why_no_cuda()}); use device 'cpu' or 'auto'"
        )
    if on_dask_cuda:
        raise ConfigError(
            f"this worker was started by dask-cuda (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) but torch "
            f"{torch.__version__} sees no CUDA GPU ({_why_no_cuda()}); install a torch "
            "built for this driver's CUDA (see docs/clusters.md, 'GPU workers'), or pass "
            "--device cpu"
        )
    if precision != "fp32":
        raise ConfigError(
            f"precision {precision!r} needs a CUDA GPU and torch sees none "
            f"({_why_no_cuda()}); use fp32"
        )
    return torch.device("cpu")


def _why_no_cuda() -> str:
    """The likely reason torch has no CUDA: a CPU-only build, or no usable driver/GPU."""
    built = torch.version.cuda
    if built is None:
        return "this torch is a CPU-only build"
    return f"torch is built for CUDA {built}, but no GPU or no matching driver is usable"
