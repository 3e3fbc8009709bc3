"""A training run's files, its resumable state and what a resume must match.

``MODEL.checkpoint.safetensors`` beside the model holds the resumable state. Tensors: the weights
and the AdamW moments; JSON metadata: completed epochs, optimizer hyperparameters, scheduler
state, the history and a fingerprint of the run (store, split, settings). Loaded with
safetensors, so nothing is ever unpickled. The run's manifest is the model file's and the
checkpoint's own headers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xpbatch.config import TrainConfig
from xpbatch.errors import TrainingError, XPBatchError
from xpbatch.model.files import write_safetensors
from xpbatch.model.network import ScatterVAE
from xpbatch.storage.manifest import COMPLETE, FINGERPRINT, KIND, RunManifest, RunRecord
from xpbatch.train.data import Selection
from xpbatch.train.summary import EpochRecord

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "xpbatch-train-checkpoint"
CHECKPOINT_VERSION = 1


# Settings that change the result: a checkpoint only resumes under the same ones. (epochs,
# checkpoint_every and the device options may change; sample and source_ids are covered by the
# fingerprint of the split.)
_RESULT_KEYS = (
    "learning_rate",
    "weight_decay",
    "cycle_epochs",
    "min_learning_rate",
    "batch_size",
    "kl_weight",
    "seed",
    "validation_fraction",
    "partial_rows",
    "model",
)


@dataclass(frozen=True)
class RunPaths:
    """The files of one training run."""

    model: Path
    checkpoint: Path
    metrics: Path

    @classmethod
    def for_model(cls, model: str | os.PathLike[str]) -> RunPaths:
        """``m.safetensors`` -> ``m.checkpoint.safetensors`` and ``m.metrics.jsonl`` beside it."""
        model = Path(model)
        stem = model.name.removesuffix(".safetensors")
        return cls(
            model,
            model.with_name(f"{stem}.checkpoint.safetensors"),
            model.with_name(f"{stem}.metrics.jsonl"),
        )


MODEL_KIND = "model"
"""What train writes (a model file, its checkpoint and metrics beside it), as manifests say."""


class _TrainRecord(RunRecord):
    """A training run's manifest is its files' own headers: the model file's xpbatch metadata
    and the checkpoint's (its fingerprint and epochs done)."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths
        self.where = paths.checkpoint

    def read(self) -> dict[str, Any] | None:
        from xpbatch.model.files import read_model_metadata

        model, checkpoint = self.paths.model, self.paths.checkpoint
        if not model.exists() and not checkpoint.exists():
            return None
        try:
            if model.exists():
                read_model_metadata(model)
            run = _Snapshot.read_run(checkpoint) if checkpoint.exists() else {}
        except (XPBatchError, OSError, ValueError, KeyError):
            return {KIND: None}  # not a model file or checkpoint xpbatch wrote
        return {KIND: MODEL_KIND, FINGERPRINT: run.get("fingerprint"), COMPLETE: model.exists()}

    def write(self, fields: Mapping[str, Any]) -> None:
        """Nothing: the loop writes the checkpoint and the model file themselves."""


def _claim_outputs(paths: RunPaths, config: TrainConfig) -> RunManifest:
    """The training run's manifest, the model and its checkpoint claimed under the one output
    rule; resumed when the checkpoint is continued (its fingerprint is checked when it is
    loaded)."""
    existing = [p for p in (paths.model, paths.checkpoint) if p.exists()]
    run = RunManifest(paths.model, kind=MODEL_KIND, record=_TrainRecord(paths))
    run.claim(
        resume=config.resume,
        overwrite=config.overwrite,
        exists=bool(existing),
        found=f"{existing[0].name} of an earlier run" if existing else "",
        remove=lambda: None,  # files xpbatch names after the model; each is replaced whole
    )
    if run.resumed and not paths.checkpoint.is_file():
        raise TrainingError(
            f"--resume: {paths.model} has no checkpoint beside it ({paths.checkpoint}) to "
            "continue from; pass --overwrite to train again"
        )
    return run


def _fingerprint(
    store: str, selection: Selection, config: TrainConfig, device: torch.device, placement: str
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the store, the split, the settings, and the
    device type and data placement (they change the random stream and the arithmetic, so a
    resumed run would not continue the same trajectory)."""
    settings = {k: getattr(config, k) for k in _RESULT_KEYS}
    settings["model"] = dataclasses.asdict(config.model)
    return _json_roundtrip(
        {
            "store_id": store,
            "split_sha256": selection.fingerprint(),
            "settings": settings,
            "device": device.type,
            "data_placement": placement,
        }
    )


def _json_roundtrip(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def make_optimizer(
    network: ScatterVAE, config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts]:
    """AdamW and its cosine schedule with warm restarts every ``config.cycle_epochs`` epochs."""
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.cycle_epochs, eta_min=config.min_learning_rate
    )
    return optimizer, scheduler


@dataclass
class _TrainingState:
    """Everything that evolves during training, and its (safe) serialisation."""

    network: ScatterVAE
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts
    epoch: int = 0
    """Epochs completed."""

    @classmethod
    def new(cls, config: TrainConfig, device: torch.device) -> _TrainingState:
        """Initial weights from ``config.seed`` (without touching the caller's global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            network = ScatterVAE(config.model).to(device)
        return cls(network, *make_optimizer(network, config))

    def capture(self) -> _Snapshot:
        """A copy of the current state (on the device: no host synchronisation)."""
        tensors = {f"network.{k}": v.detach().clone() for k, v in self.network.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for key, value in values.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().clone()
        meta = {
            "epoch": self.epoch,
            "param_groups": _json_roundtrip(optimizer["param_groups"]),
            "scheduler": _json_roundtrip(self.scheduler.state_dict()),
        }
        return _Snapshot(tensors, meta)

    def restore(self, snapshot: _Snapshot) -> None:
        """Load a snapshot (from :meth:`capture` or a checkpoint file)."""
        network: dict[str, torch.Tensor] = {}
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in snapshot.tensors.items():
            kind, _, rest = name.partition(".")
            if kind == "network":
                network[rest] = tensor
            else:
                index, _, key = rest.partition(".")
                optimizer_state.setdefault(int(index), {})[key] = tensor
        self.network.load_state_dict(network, strict=True)
        self.optimizer.load_state_dict(
            {"state": optimizer_state, "param_groups": snapshot.meta["param_groups"]}
        )
        self.scheduler.load_state_dict(snapshot.meta["scheduler"])
        self.epoch = int(snapshot.meta["epoch"])

    def load_checkpoint(self, path: Path, run: RunManifest, *, epochs: int) -> list[EpochRecord]:
        """Restore a checkpoint of this run (its fingerprint checked by ``run``); returns its
        history."""
        snapshot, extra = _Snapshot.read(path)
        run.check(_flat(extra["fingerprint"]), what=f"training run (checkpoint {path})")
        epoch = int(snapshot.meta["epoch"])
        if epoch > epochs:
            raise TrainingError(
                f"--resume: checkpoint {path} has already done {epoch} epochs, more than "
                f"--epochs {epochs}; raise --epochs to continue training"
            )
        try:
            self.restore(snapshot)
        except (RuntimeError, KeyError, ValueError) as e:
            raise TrainingError(f"--resume: checkpoint {path} does not fit this model: {e}") from e
        logger.info("resumed %s at epoch %d", path, epoch)
        return [EpochRecord(**r) for r in extra["records"]]


@dataclass(frozen=True)
class _Snapshot:
    """Training state as tensors plus JSON-able scalars."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def write(self, path: Path, extra: dict[str, Any]) -> None:
        """Atomically write a checkpoint file (safetensors; scalars in its JSON metadata)."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "format_version": str(CHECKPOINT_VERSION),
            "state": json.dumps(self.meta),
            "run": json.dumps(extra),
        }
        write_safetensors(tensors, path, metadata=metadata)  # a full disk: an OSError

    @staticmethod
    def read_run(path: Path) -> dict[str, Any]:
        """A checkpoint file's run description (history, fingerprint), without its tensors."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise TrainingError(f"checkpoint {path} is truncated or corrupt: {e}") from e
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not an xpbatch training checkpoint")
        run: dict[str, Any] = json.loads(metadata["run"])
        return run

    @classmethod
    def read(cls, path: Path) -> tuple[_Snapshot, dict[str, Any]]:
        """A checkpoint file's snapshot and run description (history, fingerprint)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise TrainingError(f"checkpoint {path} is truncated or corrupt: {e}") from e
        if metadata.get("format") != CHECKPOINT_FORMAT or metadata.get("format_version") != str(
            CHECKPOINT_VERSION
        ):
            raise TrainingError(
                f"{path} is not an xpbatch training checkpoint (version {CHECKPOINT_VERSION})"
            )
        return cls(tensors, json.loads(metadata["state"])), json.loads(metadata["run"])


def _flat(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A training fingerprint with its settings at the top, so a difference names the setting."""
    settings = fingerprint.get("settings", {})
    return {**settings, **{k: v for k, v in fingerprint.items() if k != "settings"}}
