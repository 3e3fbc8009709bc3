"""Checks of a model file's description and tensors against its architecture.

A file whose content hash matches can still be wrong (written by another tool, or forged with
a recomputed hash): every tensor's name, shape and dtype is checked against the architecture
it records, and the latent density's arrays against its description, before anything uses them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xpbatch.errors import ModelFileError
from xpbatch.model.density import ACTIVE_KL_NATS
from xpbatch.model.network import ScatterVAE

FIT_STATISTICS = "fit_statistics"
"""Key of the training-data statistics in a model file's description."""
NETWORK_PREFIX = "network."
DENSITY_PREFIX = "latent_density."
Shape = tuple[int | None, ...]
"""A tensor's expected shape; None: any length."""


def check_description(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata's ``xpbatch`` JSON (the file's description), its keys and types checked."""
    text = meta.get("xpbatch")
    if not isinstance(text, str):
        found = "nothing" if text is None else f"a {type(text).__name__}"
        raise ModelFileError(
            f"model file {path} lacks its description (metadata 'xpbatch' must be a JSON "
            f"string, found {found}); was it written by xpbatch?"
        )
    try:
        description = json.loads(text)
    except ValueError as e:
        raise ModelFileError(f"model file {path}: its description is not JSON ({e})") from e
    if not isinstance(description, dict):
        raise ModelFileError(
            f"model file {path}: its description must be a JSON object, "
            f"found a {type(description).__name__}"
        )
    expected = {"name": str, "architecture": dict, "input_recipe": dict, "provenance": dict}
    optional = {"latent_density": dict, FIT_STATISTICS: dict}
    for key, kind in {**expected, **optional}.items():
        value = description.get(key)
        if value is None and key in optional:
            continue
        if not isinstance(value, kind):
            found = "nothing" if value is None else f"a {type(value).__name__}"
            raise ModelFileError(
                f"model file {path}: description key {key!r} must be a JSON "
                f"{'string' if kind is str else 'object'}, found {found}"
            )
    content_hash = meta.get("content_sha256")
    if not isinstance(content_hash, str):
        raise ModelFileError(f"model file {path} lacks its content hash (metadata content_sha256)")
    description["content_sha256"] = content_hash
    return description


def _expected_tensors(
    network: ScatterVAE, density: dict[str, Any] | None
) -> dict[str, tuple[Shape, tuple[torch.dtype, ...]]]:
    """Every tensor a model file of ``network``'s architecture holds: name -> (shape, dtypes).

    ``None`` in a shape: any length. The density's shapes follow its description (components,
    active dimensions, whether ln rmse joins them).
    """
    config = network.config
    floats = (torch.float32, torch.float64)
    ids = (torch.int64,)
    expected: dict[str, tuple[Shape, tuple[torch.dtype, ...]]] = {
        NETWORK_PREFIX + k: (tuple(v.shape), (v.dtype,)) for k, v in network.state_dict().items()
    }
    expected.update(
        {
            "normalisation.mean": ((config.input_dim,), floats),
            "normalisation.std": ((config.input_dim,), floats),
            "latent_reference.mean": ((config.latent_dim,), floats),
            "latent_reference.std": ((config.latent_dim,), floats),
            "split.train_source_id": ((None,), ids),
            "split.validation_source_id": ((None,), ids),
        }
    )
    if density is None:
        return expected
    k = density.get("components")
    active = density.get("active_dims")
    if not isinstance(k, int) or k < 1 or not isinstance(active, list):
        raise ValueError("its latent density's description lacks 'components' or 'active_dims'")
    d = len(active) + bool(density.get("with_rmse"))
    f64 = (torch.float64,)
    latent = config.latent_dim
    expected.update(
        {
            DENSITY_PREFIX + "centre": ((latent,), f64),
            DENSITY_PREFIX + "scale": ((latent,), f64),
            DENSITY_PREFIX + "weights": ((k,), f64),
            DENSITY_PREFIX + "means": ((k, d), f64),
            DENSITY_PREFIX + "precision_cholesky": ((k, d, d), f64),
        }
    )
    return expected


def check_tensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    network: ScatterVAE,
    density: dict[str, Any] | None,
) -> None:
    """Refuse a file whose tensors' names, shapes or dtypes do not fit its architecture.

    A density of the wrong shape would otherwise load, and the compiled score loop would read
    past its arrays.
    """
    f64 = torch.float64
    try:
        expected = _expected_tensors(network, density)
        if density is not None:
            for key in ("threshold", "outlier_quantile"):
                if not isinstance(density.get(key), int | float):
                    raise ValueError(f"its latent density's {key!r} is not a number")
            if density.get("kind") not in ("gaussian_mixture", "prior"):
                raise ValueError(f"its latent density's kind {density.get('kind')!r} is unknown")
            latent = network.config.latent_dim
            optional: dict[str, Shape] = {
                DENSITY_PREFIX + "kl": (latent,),
                DENSITY_PREFIX + "log_rmse": (2,),
            }
            for name, shape in optional.items():
                if name in tensors:
                    expected[name] = (shape, (torch.float64,))
            if bool(density.get("with_rmse")) != (DENSITY_PREFIX + "log_rmse" in tensors):
                raise ValueError("its latent density's 'with_rmse' does not match its tensors")
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"tensor {missing[0]} is missing ({len(missing)} missing in all)")
        for name, tensor in sorted(tensors.items()):
            if name not in expected:
                raise ValueError(f"tensor {name} is not part of an xpbatch model")
            shape, dtypes = expected[name]
            fits = len(shape) == tensor.dim() and all(
                want is None or want == got for want, got in zip(shape, tensor.shape, strict=True)
            )
            if not fits or tensor.dtype not in dtypes:
                want_shape = tuple("n" if n is None else n for n in shape)
                raise ValueError(
                    f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                    f"{'/'.join(str(d) for d in dtypes)} {want_shape}"
                )
            arrays = not name.startswith(NETWORK_PREFIX) and tensor.dtype in (torch.float32, f64)
            if arrays and not torch.isfinite(tensor).all():
                raise ValueError(f"tensor {name} holds NaN or infinite values")
        if density is not None:  # shapes checked: the active dimensions follow the KL
            kl = tensors.get(DENSITY_PREFIX + "kl")
            active = (
                list(range(network.config.latent_dim))
                if kl is None
                else [int(i) for i in torch.nonzero(kl >= ACTIVE_KL_NATS).flatten()]
            )
            if active != density["active_dims"]:
                raise ValueError(
                    f"its latent density's active_dims {density['active_dims']} do not match "
                    f"its KL (active: {active})"
                )
    except ValueError as e:
        raise ModelFileError(
            f"model file {path} does not fit its architecture {network.config}: {e}"
        ) from e
