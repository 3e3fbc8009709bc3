"""Model files: save, load and import a scatter VAE. Never unpickles anything we wrote.

A model file is one safetensors file (``.safetensors``):

- tensors ``network.<key>``: the network's state dict, with the authors' key names;
- tensors ``normalisation.mean`` / ``normalisation.std``: the input recipe's arrays;
- tensors ``latent_reference.mean`` / ``.std``: training-set distribution of latent means;
- tensors ``split.train_source_id`` / ``split.validation_source_id``: which sources it saw;
- tensors ``latent_density.*`` and the description's ``latent_density``: per-dimension KL, the
  training latents' Gaussian mixture (or the prior) and outlier threshold
  (:mod:`xpbatch.model.density`);
- metadata ``xpbatch`` (JSON): name, architecture, input recipe, provenance, latent density and
  ``fit_statistics``, what the training data looked like to the model (null when not measured;
  :mod:`xpbatch.model.fit_check`);
- metadata ``format`` and ``format_version`` (:data:`~xpbatch.schema.MODEL_FORMAT_VERSION`): a
  file of another version is refused;
- metadata ``content_sha256``: sha256 over the JSON and every tensor (name, dtype, shape,
  bytes). Loading recomputes it, so a tampered file is refused; a truncated one fails to parse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xpbatch import __version__, schema
from xpbatch.config import ModelConfig, OutputOptions
from xpbatch.errors import ModelFileError, OutputExistsError
from xpbatch.model.density import LatentDensity, latent_kl
from xpbatch.model.file_checks import (
    DENSITY_PREFIX as _DENSITY,
)
from xpbatch.model.file_checks import (
    FIT_STATISTICS,
    check_description,
    check_tensors,
)
from xpbatch.model.file_checks import (
    NETWORK_PREFIX as _NETWORK,
)
from xpbatch.model.fit_check import FitStatistics
from xpbatch.model.network import ScatterVAE
from xpbatch.model.trained import Normalisation, TrainedModel, standardise
from xpbatch.storage.outputs import locked_output
from xpbatch.storage.paths import atomic_path

INPUT_RECIPE = {
    "coefficient_order": "BP 0-54 then RP 0-54",
    "normaliser": "phot_g_mean_flux",
    "steps": [
        "divide coefficients and coefficient_errors by phot_g_mean_flux",
        "x = (coefficients - normalisation.mean) / normalisation.std",
        "x_err = coefficient_errors / normalisation.std",
    ],
    "units": "electron/s",
}

_DESCRIPTION_KEYS = (
    "name",
    "architecture",
    "input_recipe",
    "provenance",
    "latent_density",
    FIT_STATISTICS,
)
"""Keys of the JSON description, every one in the content hash."""
_MAX_HEADER_BYTES = 100_000_000  # a sane bound: real headers are a few kB


def runtime_versions() -> dict[str, str]:
    """Versions recorded in provenance: python, xpbatch, torch, numpy."""
    return {
        "python": platform.python_version(),
        "xpbatch": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _tensors(model: TrainedModel) -> dict[str, torch.Tensor]:
    tensors = {_NETWORK + k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    assert model.latent_reference_mean is not None and model.latent_reference_std is not None
    arrays = {
        "normalisation.mean": model.normalisation.mean,
        "normalisation.std": model.normalisation.std,
        "latent_reference.mean": model.latent_reference_mean,
        "latent_reference.std": model.latent_reference_std,
        "split.train_source_id": model.train_source_id,
        "split.validation_source_id": model.validation_source_id,
    }
    assert model.density is not None
    arrays.update({_DENSITY + k: v for k, v in model.density.to_tensors().items()})
    tensors.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return {k: v.contiguous() for k, v in tensors.items()}


def _content_hash(description: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(description.encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def save_model(model: TrainedModel, path: str | os.PathLike[str]) -> str:
    """Write ``model`` to one safetensors file and return its content hash.

    The write is atomic (temporary file, then rename), so a killed process never leaves a
    half-written model under ``path``.

    Examples
    --------
    >>> import tempfile, os
    >>> from xpbatch.model.trained import TrainedModel
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> len(save_model(TrainedModel.untrained(), path))
    64
    """
    path = Path(path)
    described: dict[str, Any] = {
        "name": model.name,
        "architecture": dataclasses.asdict(model.config),
        "input_recipe": INPUT_RECIPE,
        "provenance": model.provenance,
        "latent_density": model.density.describe() if model.density else None,
        FIT_STATISTICS: model.fit_statistics,
    }
    description = json.dumps(described, sort_keys=True)
    tensors = _tensors(model)
    content_hash = _content_hash(description, tensors)
    metadata = {
        "format": schema.MODEL_FORMAT_NAME,
        schema.MODEL_ATTR_FORMAT_VERSION: str(schema.MODEL_FORMAT_VERSION),
        "xpbatch": description,
        "content_sha256": content_hash,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path, metadata=metadata)
    model.content_hash = content_hash
    return content_hash


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str]
) -> None:
    """Write a safetensors file atomically; a full disk is an ``OSError`` like any other write.

    safetensors reports its I/O failures as ``SafetensorError`` with the OS error in the text;
    they become ``OSError`` with that errno and the file's name, so the CLI says "the disk is
    full (PATH)" as it does for every stage.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"code: (\d+)|os error (\d+)", str(e))
        if code is None:
            raise
        number = int(code.group(1) or code.group(2))
        raise OSError(number, os.strerror(number), str(path)) from e


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The description stored in a model file (name, architecture, provenance, hash), cheaply.

    Reads only the safetensors header (plain JSON), so it needs neither torch nor the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist (or is not a file)")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if head.startswith(b"PK\x03\x04"):  # what torch.save writes: a zip archive
            raise ModelFileError(
                f"{path} is a PyTorch checkpoint, not an xpbatch model file; convert it once "
                f"with `xpbatch import-xpvae {path} --norm NORM.npz -o MODEL.safetensors` "
                "(NORM.npz: the authors' normalisation, arrays 'mu' and 'sig')"
            )
        if len(head) < 8:
            raise ModelFileError(f"model file {path} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise ModelFileError(
                f"model file {path} is truncated or not a safetensors file "
                f"(header says {n} bytes, file has {size}); a PyTorch checkpoint is converted "
                "with `xpbatch import-xpvae`"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # UnicodeDecodeError included: a header length off by bytes
            raise ModelFileError(f"model file {path} has a corrupt header: {e}") from e
    if not isinstance(header, dict):
        raise ModelFileError(
            f"model file {path} has a corrupt header: a safetensors header is a JSON object, "
            f"found a {type(header).__name__}"
        )
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ModelFileError(
            f"model file {path} has corrupt metadata: '__metadata__' must be a JSON object of "
            f"strings, found a {type(meta).__name__}"
        )
    if meta.get("format") != schema.MODEL_FORMAT_NAME:
        raise ModelFileError(
            f"{path} is a safetensors file but not an xpbatch model (format "
            f"{meta.get('format')!r}); convert the authors' checkpoint with `xpbatch import-xpvae`"
        )
    problem = schema.format_version_problem(
        meta.get(schema.MODEL_ATTR_FORMAT_VERSION),
        schema.MODEL_FORMAT_VERSION,
        what=f"model file {path}",
        redo="re-export it (train it again with `xpbatch train`, or convert the authors' "
        "checkpoint again with `xpbatch import-xpvae`)",
    )
    if problem:
        raise ModelFileError(problem)
    return check_description(path, meta)


def load_model(
    path: str | os.PathLike[str], *, expect_config: ModelConfig | None = None
) -> TrainedModel:
    """Load a model file written by :func:`save_model` (or ``xpbatch import-xpvae``/``train``).

    Parameters
    ----------
    path
        The ``.safetensors`` model file.
    expect_config
        When given, refuse a file whose architecture differs.

    Raises
    ------
    ModelFileError
        Missing, truncated, tampered with, not an xpbatch model, or of another architecture.

    Examples
    --------
    >>> import tempfile, os
    >>> from xpbatch.model.trained import TrainedModel
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> _ = save_model(TrainedModel.untrained(), path)
    >>> load_model(path).config.latent_dim
    6
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    description = read_model_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"model file {path} is truncated or corrupt: {e}") from e
    stored_hash = description.pop("content_sha256")
    try:
        plain = {k: description[k] for k in _DESCRIPTION_KEYS}
    except KeyError as e:
        raise ModelFileError(f"model file {path} has no {e} in its description") from e
    actual = _content_hash(json.dumps(plain, sort_keys=True), tensors)
    if actual != stored_hash:
        raise ModelFileError(
            f"model file {path} has been modified since it was written: its content hash is "
            f"{actual[:16]}…, the file records {stored_hash[:16]}…. Use the original file."
        )
    try:
        config = ModelConfig(**description["architecture"])
        if not all(isinstance(n, int) for n in (config.input_dim, config.latent_dim)):
            raise ValueError(f"input_dim and latent_dim must be integers, got {config}")
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"model file {path} has an unreadable architecture: {e}") from e
    if expect_config is not None and config != expect_config:
        raise ModelFileError(
            f"model file {path} has architecture {config}, expected {expect_config}"
        )
    with torch.device("meta"):  # shapes only: no memory for an architecture not yet checked
        shapes = ScatterVAE(config)
    check_tensors(path, tensors, shapes, description.get("latent_density"))
    network = ScatterVAE(config)
    state = {k[len(_NETWORK) :]: v for k, v in tensors.items() if k.startswith(_NETWORK)}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(
            f"model file {path}: weights do not fit the recorded architecture {config}: {e}"
        ) from e
    return TrainedModel(
        network=network,
        normalisation=Normalisation(
            tensors["normalisation.mean"].numpy(), tensors["normalisation.std"].numpy()
        ),
        name=description["name"],
        provenance=description["provenance"],
        latent_reference_mean=tensors["latent_reference.mean"].numpy(),
        latent_reference_std=tensors["latent_reference.std"].numpy(),
        train_source_id=tensors["split.train_source_id"].numpy(),
        validation_source_id=tensors["split.validation_source_id"].numpy(),
        content_hash=stored_hash,
        fit_statistics=description[FIT_STATISTICS],
        density=LatentDensity.from_stored(
            {k[len(_DENSITY) :]: v.numpy() for k, v in tensors.items() if k.startswith(_DENSITY)},
            description["latent_density"],
        ),
    )


def _architecture_from_state_dict(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Read input size, widths and latent size off the authors' state-dict shapes."""
    try:
        widths = []
        i = 0
        while f"encoder.{i}.0.weight" in state:
            widths.append(int(state[f"encoder.{i}.0.weight"].shape[0]))
            i += 1
        return ModelConfig(
            input_dim=int(state["encoder.0.0.weight"].shape[1]),
            hidden_widths=tuple(widths),
            latent_dim=int(state["mu.weight"].shape[0]),
        )
    except KeyError as e:
        raise ModelFileError(
            f"checkpoint state dict lacks {e}; expected the keys of the published scatter VAE "
            "(encoder.{i}.0/.1, mu, log_var, decoder.*, scatter.*)"
        ) from e


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@locked_output("out", "import-xpvae")
def import_xpvae(
    weight: str | os.PathLike[str],
    norm: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    store: str | os.PathLike[str] | None = None,
    config: OutputOptions | None = None,
) -> TrainedModel:
    """Convert the authors' checkpoint and normalisation file into an xpbatch model file.

    The checkpoint has no record of its training set, so the file gets the prior N(0, I) as its
    latent density (:meth:`LatentDensity.prior`) and per-dimension KLs measured on ``store`` when
    one is given (its first :data:`KL_ROWS` encodable rows: real spectra, the best stand-in for
    the training set), else on :data:`KL_ROWS` spectra the model itself generates
    (``x = decoder(z) + noise``, ``z ~ N(0, I)``, errors 0.05; the recipe of the authors'
    reference outputs). Both find the checkpoint's two collapsed dimensions (KL ≈ 0).

    Parameters
    ----------
    weight
        ``weight.pt`` of Laroche & Speagle (a dict with ``model_state_dict``), loaded with
        ``torch.load(weights_only=True)``: no arbitrary objects are unpickled.
    norm
        ``.npz`` with arrays ``mu`` and ``sig`` (110 values each): the per-coefficient mean and
        std of G-flux-normalised coefficients. Loaded with ``allow_pickle=False``.
    out
        Model file to write.
    name
        Model name recorded in the file; default the output file's stem.
    store
        An XP store whose rows measure the per-dimension KL (optional, see above).
    config
        The output rule: an existing ``out`` is replaced only with ``overwrite`` and only when it
        is an xpbatch model file (never a file xpbatch did not write).
    """
    weight, norm, out = Path(weight), Path(norm), Path(out)
    _claim_model_file(out, overwrite=(config or OutputOptions()).overwrite)
    try:
        checkpoint = torch.load(weight, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (UnpicklingError, RuntimeError, EOF)
        raise ModelFileError(
            f"cannot read checkpoint {weight} safely (weights_only=True): {e}. Only plain "
            "tensors and containers are accepted."
        ) from e
    state = checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelFileError(f"checkpoint {weight} holds no state dict (found {type(checkpoint)})")
    architecture = _architecture_from_state_dict(state)
    network = ScatterVAE(architecture)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"checkpoint {weight} does not fit {architecture}: {e}") from e

    try:
        with np.load(norm, allow_pickle=False) as npz:
            mean, std = npz["mu"], npz["sig"]
    except KeyError as e:
        raise ModelFileError(f"normalisation file {norm} must contain arrays 'mu' and 'sig'") from e
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read normalisation file {norm}: {e}") from e
    expected = (architecture.input_dim,)
    if mean.shape != expected or std.shape != expected:
        raise ModelFileError(
            f"normalisation arrays must have {architecture.input_dim} values each (BP then RP), "
            f"got mu {mean.shape} and sig {std.shape} in {norm}"
        )
    normalisation = Normalisation(mean, std)
    kl, kl_source = (
        _prior_predictive_kl(network) if store is None else _store_kl(network, normalisation, store)
    )
    model = TrainedModel(
        network=network,
        normalisation=normalisation,
        name=name or out.stem,
        density=LatentDensity.prior(architecture.latent_dim, kl),
        provenance={
            "latent_kl_source": kl_source,
            "source": "imported",
            "checkpoint": weight.name,
            "checkpoint_sha256": _sha256_file(weight),
            "normalisation_sha256": _sha256_file(norm),
            "epochs": checkpoint.get("epoch"),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": runtime_versions(),
        },
        # The published training rows are not available: record what the normalisation
        # file implies about them (their standardised values spread about 1).
        fit_statistics=FitStatistics.from_normalisation().to_dict(),
    )
    save_model(model, out)
    return model


def _claim_model_file(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite`` and it is an xpbatch model file."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise OutputExistsError(
            f"{out} exists; pass --overwrite to replace it (only an xpbatch model file is "
            "replaced), or choose another --output. Nothing was changed."
        )
    try:
        read_model_metadata(out)
    except ModelFileError as e:
        raise OutputExistsError(
            f"{out} is not an xpbatch model file, so it is never replaced, even with "
            f"--overwrite ({e}); choose another --output. Nothing was changed."
        ) from e


KL_ROWS = 20_000
"""Spectra on which an imported model's per-dimension KL is measured."""


@torch.no_grad()
def _prior_predictive_kl(network: ScatterVAE) -> tuple[np.ndarray, str]:
    """Mean KL per dimension over spectra the model generates from its prior (seeded)."""
    generator = torch.Generator().manual_seed(0)
    network.eval()
    z = torch.randn(KL_ROWS, network.config.latent_dim, generator=generator)
    xhat, shat = network.decode(z)  # (rows, input) each
    x_err = torch.full_like(xhat, 0.05)
    noise = torch.randn(xhat.shape, generator=generator)
    mu, log_var = network.encode(xhat + noise * torch.sqrt(x_err**2 + shat**2))
    kl = (latent_kl(mu, log_var) / KL_ROWS).numpy()
    return kl, f"{KL_ROWS} spectra generated by the model from N(0, I) (seed 0)"


@torch.no_grad()
def _store_kl(
    network: ScatterVAE, normalisation: Normalisation, store: str | os.PathLike[str]
) -> tuple[np.ndarray, str]:
    """Mean KL per dimension over the first KL_ROWS encodable rows of an XP store."""
    from xpbatch import schema
    from xpbatch.store.reader import open_xp_store, store_id

    ds = open_xp_store(Path(store)).isel({schema.SOURCE: slice(0, KL_ROWS)})
    inp = standardise(
        ds[schema.COEFFICIENTS].values,
        ds[schema.COEFFICIENT_ERRORS].values,
        ds[schema.PHOT_G_MEAN_FLUX].values,
        normalisation,
    )
    ok = inp.encodable
    if not ok.any():
        raise ModelFileError(f"no row of the first {KL_ROWS} of {store} can be encoded")
    network.eval()
    mu, log_var = network.encode(torch.from_numpy(inp.x[ok]))  # (rows, latent) each
    kl = (latent_kl(mu, log_var) / int(ok.sum())).numpy()
    return kl, f"the first {int(ok.sum())} encodable rows of store {store_id(ds)}"
