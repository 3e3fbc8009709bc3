"""``xpbatch bench anomalies``: does the latent space find rare spectra and similar stars?

On a mock catalogue with injected rare populations (unresolved binaries, emission-line stars,
white dwarfs; ``rare_fraction`` of the rows, a third each), a model trained on a random sample of
``train_rows`` of it (as on DR3: train on a sample, encode everything), and its catalogue:

- ROC AUC of three ways to rank the rare sources first: ``anomaly_score``, ``rmse`` alone, and
  the old per-dimension 5σ rule (a yes/no flag: its AUC is (TPR + 1 - FPR) / 2);
- for ``n_queries`` normal stars, the median |ΔTeff| and |Δ[M/H]| between a star and its 10
  latent neighbours (:func:`xpbatch.products.neighbours.find_neighbours`), against the same medians
  over
  random pairs of normal stars. The denser the catalogue, the closer a star's 10 nearest
  neighbours lie in latent space and so in labels (on DR3 there are 219 million to choose
  from): the catalogue is four times the training sample by default.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xpbatch.config import EncodeConfig, MockConfig, TrainConfig

FIVE_SIGMA = 5.0
"""The rule LATENT_OUTLIER used before: some |latent - training mean| > 5 training std."""
N_NEIGHBOURS = 10
TRAINING = TrainConfig(
    epochs=40,
    cycle_epochs=40,
    learning_rate=3e-3,  # 1e-3 leaves the loss falling steeply at 20 epochs (docs/performance.md)
    batch_size=256,
    kl_weight=0.1,  # short runs with the full KL term leave latent dimensions unused
    seed=2,
    device="cpu",
    checkpoint_every=1000,
)
"""A short run that learns the mock: tests/test_train.py's learning test at a higher learning
rate and for longer: 20 epochs of a cosine cycle from 1e-3 stop well short of convergence, and
how well latent neighbours share [M/H], the mock's subtlest label, grows with training
(docs/performance.md)."""
TRAIN_ROWS = 60_000
"""Rows of the mock the model is trained on (a seeded sample when the mock is larger)."""


@dataclasses.dataclass(frozen=True)
class AnomalyBenchmark:
    """The numbers of one ``bench anomalies`` run."""

    rows: int
    rare: int
    auc_anomaly_score: float
    auc_rmse: float
    auc_five_sigma: float
    auc_by_population: dict[str, float]
    """anomaly_score's AUC for each rare population against the normal stars."""
    queries: int
    median_dteff_neighbours: float
    median_dteff_random: float
    median_dmh_neighbours: float
    median_dmh_random: float

    def report(self) -> str:
        """A few lines for the terminal."""
        by_population = ", ".join(f"{k} {v:.3f}" for k, v in self.auc_by_population.items())
        return "\n".join(
            [
                f"{self.rows:,} mock spectra, {self.rare:,} of them rare "
                f"({100 * self.rare / self.rows:.2f} %)",
                f"ROC AUC, rare vs normal: anomaly_score {self.auc_anomaly_score:.3f}, "
                f"rmse {self.auc_rmse:.3f}, 5-sigma rule {self.auc_five_sigma:.3f}",
                f"  anomaly_score by population: {by_population}",
                f"{self.queries:,} query stars, {N_NEIGHBOURS} latent neighbours each:",
                f"  median |dTeff|  neighbours {self.median_dteff_neighbours:7.1f} K    random "
                f"pairs {self.median_dteff_random:7.1f} K    ratio "
                f"{self.median_dteff_neighbours / self.median_dteff_random:.3f}",
                f"  median |d[M/H]| neighbours {self.median_dmh_neighbours:7.3f} dex  random "
                f"pairs {self.median_dmh_random:7.3f} dex  ratio "
                f"{self.median_dmh_neighbours / self.median_dmh_random:.3f}",
            ]
        )


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2)."""
    import pandas as pd

    ranks = pd.Series(score).rank(method="average").to_numpy()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def run_anomaly_benchmark(
    rows: int = 240_000,
    *,
    train_rows: int = TRAIN_ROWS,
    rare_fraction: float = 0.005,
    n_queries: int = 1000,
    training: TrainConfig = TRAINING,
    workdir: str | Path | None = None,
    seed: int = 1,
    echo: Callable[[str], None] = print,
) -> AnomalyBenchmark:
    """Build the mock, train, encode, and measure (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if rows > train_rows:
            training = dataclasses.replace(training, sample=train_rows)
        return _run(root, rows, rare_fraction, n_queries, training, seed, echo)


def _run(
    root: Path,
    rows: int,
    rare_fraction: float,
    n_queries: int,
    training: TrainConfig,
    seed: int,
    echo: Callable[[str], None],
) -> AnomalyBenchmark:
    from xpbatch.catalog.zarr_catalog import open_catalog
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.mock import POPULATIONS, read_mock_labels, write_mock_store
    from xpbatch.model.files import load_model
    from xpbatch.products.neighbours import find_neighbours
    from xpbatch.train.stage import train_model

    third = rare_fraction / 3
    config = MockConfig(
        binary_fraction=third, emission_line_fraction=third, white_dwarf_fraction=third
    )
    echo(f"mock store of {rows:,} rows ({rare_fraction:.2%} rare) ...")
    store = write_mock_store(root / "mock.zarr", rows, seed=seed, config=config, overwrite=True)
    echo(f"training {training.epochs} epochs on {training.sample or rows:,} rows ...")
    model_path = root / "model.safetensors"
    train_model(
        store, model_path, config=dataclasses.replace(training, progress_bar=False, overwrite=True)
    )
    echo("encoding ...")
    catalog_path = root / "catalog.zarr"
    encode_catalog(
        store, model_path, catalog_path, config=EncodeConfig(overwrite=True, progress_bar=False)
    )

    ds = open_catalog(catalog_path).compute()
    labels = read_mock_labels(store).loc[ds.source_id.values]
    encoded = np.isfinite(ds.anomaly_score.values)
    population = labels["population"].to_numpy()[encoded]
    rare = population > 0
    score = ds.anomaly_score.values[encoded]
    model = load_model(model_path)
    assert model.density is not None
    latent = ds.latent_mean.values[encoded]
    five_sigma = (np.abs(latent - model.density.centre) / model.density.scale > FIVE_SIGMA).any(
        axis=1
    )
    by_population = {
        name: roc_auc(score[(population == code) | ~rare], rare[(population == code) | ~rare])
        for code, name in enumerate(POPULATIONS)
        if code and (population == code).any()
    }

    echo(f"neighbours of {n_queries:,} stars ...")
    normal_ids = ds.source_id.values[encoded][~rare]
    rng = np.random.default_rng(seed)
    queries = rng.choice(normal_ids, n_queries, replace=False)
    found = find_neighbours(catalog_path, queries, k=N_NEIGHBOURS)

    def median_difference(column: str, a: np.ndarray, b: np.ndarray) -> float:
        values = labels[column]
        return float(np.median(np.abs(values.loc[a].to_numpy() - values.loc[b].to_numpy())))

    pairs = rng.choice(normal_ids, (2, 100_000))
    return AnomalyBenchmark(
        rows=rows,
        rare=int(rare.sum()),
        auc_anomaly_score=roc_auc(score, rare),
        auc_rmse=roc_auc(ds.rmse.values[encoded], rare),
        auc_five_sigma=roc_auc(five_sigma.astype(float), rare),
        auc_by_population=by_population,
        queries=n_queries,
        median_dteff_neighbours=median_difference(
            "teff", found.query_source_id.to_numpy(), found.source_id.to_numpy()
        ),
        median_dteff_random=median_difference("teff", pairs[0], pairs[1]),
        median_dmh_neighbours=median_difference(
            "m_h", found.query_source_id.to_numpy(), found.source_id.to_numpy()
        ),
        median_dmh_random=median_difference("m_h", pairs[0], pairs[1]),
    )
