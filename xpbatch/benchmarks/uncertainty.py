"""``xpbatch bench uncertainty``: are the latent uncertainties calibrated, measured on repeats?

A mock observes every star twice (:attr:`xpbatch.config.MockConfig.repeats`): the same true
spectrum with two independent noise draws. The two latent means of a star then differ only
because of the measurement noise, so for an uncertainty ``σ`` of the latent mean the normalised
repeat difference ``z = (μ₁ − μ₂) / √(σ₁² + σ₂²)`` has a standard deviation of 1 when ``σ`` is
right, below 1 when it is too large, above 1 when it is too small. It is measured per active
latent dimension (the model's, as ``xpbatch info`` shows them) and per bin of true G magnitude,
with a robust standard deviation (1.4826 × the median absolute deviation) beside it, which a few
wild pairs cannot move.

The computation (:func:`repeat_z`, :func:`z_table`, :func:`pair_rows`) is pure NumPy; the run
(:func:`run_uncertainty_benchmark`) builds the mock, trains a quick model unless one is given,
encodes, pairs the rows by the labels' ``star_id`` and tabulates each uncertainty on offer.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from xpbatch import schema
from xpbatch.config import EncodeConfig, MockConfig, TrainConfig

BAR = (0.9, 1.15)
"""std(z) must lie in this range in every active dimension and counted magnitude bin."""
MIN_STARS = 500
"""A magnitude bin counts for the bar when it holds at least this many stars (pairs)."""
G_EDGES = (9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 17.6)
"""Edges of the true-G bins (the bar's range, G 9 to 17.6)."""
INCOMPLETE = int(
    schema.InputFlag.BP_MISSING
    | schema.InputFlag.RP_MISSING
    | schema.InputFlag.G_FLUX_MISSING
    | schema.InputFlag.NON_FINITE
)
"""Input flags that make an observation incomplete: a pair is compared only when neither row has
one (a star seen once with both bands and once with one is not measured twice the same way)."""
MAD_TO_STD = 1.4826
"""A normal distribution's standard deviation over its median absolute deviation."""
PAIRS_MOCK = MockConfig(
    g_mag_min=G_EDGES[0],
    g_mag_limit=G_EDGES[-1],
    counts_slope=0.0,
    faint_fraction=0.0,
)
"""The stars: G spread evenly over the bar's range (so every bin is populated), DR3-like
errors, correlations and defects otherwise (a pair with an incomplete row is not compared)."""
TRAINING = TrainConfig.from_toml(
    None,
    {"epochs": 20, "cycle_epochs": 20, "early_stopping": None, "checkpoint_every": 1000},
    preset="quick",
)
"""The model trained when none is given: the quick preset in one fixed cosine cycle (a first
model, not the published one; pass ``model`` to calibrate another)."""
MC_SAMPLES = 32
"""Monte-Carlo draws per spectrum by default (the issue's K)."""
TRAIN_ROWS = 20_000
"""Rows of the training mock (another seed than the pairs, no repeats)."""


# --- the computation --------------------------------------------------------------------------
def robust_std(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """1.4826 × the median absolute deviation from the median: a normal's std, robustly."""
    median = np.median(values, axis=axis, keepdims=True)
    return MAD_TO_STD * np.median(np.abs(values - median), axis=axis)


def repeat_z(
    mu_a: np.ndarray, mu_b: np.ndarray, sigma_a: np.ndarray, sigma_b: np.ndarray
) -> np.ndarray:
    """(pairs, dims) the normalised repeat difference (μ₁ − μ₂) / √(σ₁² + σ₂²), float64."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    return (mu_a - mu_b) / np.sqrt(sigma_a**2 + sigma_b**2)


def pair_rows(star_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(a, b)`` of the first two observations of every star seen at least twice.

    ``star_id`` is per row (the mock labels' column); rows of a star keep their order.
    """
    star_id = np.asarray(star_id)
    order = np.argsort(star_id, kind="stable")
    ids = star_id[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # first row of each star
    seen_twice = starts[(starts + 1 < len(ids))]
    seen_twice = seen_twice[ids[seen_twice + 1] == ids[seen_twice]]
    return order[seen_twice], order[seen_twice + 1]


def comparable_pairs(
    star_id: np.ndarray, latent_mean: np.ndarray, flags: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pair_rows` less the pairs with a row not encoded or :data:`INCOMPLETE`."""
    a, b = pair_rows(star_id)
    usable = np.isfinite(latent_mean).all(axis=1) & ((np.asarray(flags) & INCOMPLETE) == 0)
    keep = usable[a] & usable[b]
    return a[keep], b[keep]


@dataclasses.dataclass(frozen=True)
class ZTable:
    """std(z) of one choice of (μ, σ), per latent dimension and true-G bin."""

    name: str
    """Which σ (and μ) this is, as printed."""
    dims: tuple[int, ...]
    """The latent dimensions (the model's active ones), the table's rows."""
    edges: tuple[float, ...]
    """True-G bin edges; the bins are the columns, then one column of every pair."""
    counts: np.ndarray
    """(bins + 1,) pairs in each bin, then in all."""
    std: np.ndarray
    """(dims, bins + 1) std(z); NaN in an empty bin."""
    robust: np.ndarray
    """(dims, bins + 1) 1.4826 × MAD of z."""

    def counted(self, min_stars: int = MIN_STARS) -> np.ndarray:
        """(bins,) bool: the bins that hold enough pairs to count for the bar."""
        return self.counts[:-1] >= min_stars

    def worst(self, bar: tuple[float, float] = BAR, min_stars: int = MIN_STARS) -> float:
        """The counted cell's std(z) furthest outside the bar (closest to leaving it if none)."""
        cells = self.std[:, :-1][:, self.counted(min_stars)]
        if cells.size == 0:
            return float("nan")
        low, high = bar
        excess = np.maximum(low - cells, cells - high)  # > 0 outside, <= 0 inside
        return float(cells.flat[int(np.argmax(excess))])

    def passes(self, bar: tuple[float, float] = BAR, min_stars: int = MIN_STARS) -> bool:
        """Whether every counted cell's std(z) lies in the bar (False with no counted cell)."""
        cells = self.std[:, :-1][:, self.counted(min_stars)]
        return bool(cells.size) and bool(np.all((cells >= bar[0]) & (cells <= bar[1])))

    def lines(self, min_stars: int = MIN_STARS) -> list[str]:
        """The table as text: a header of bins and counts, one row per dimension."""
        labels = [f"{a:g}-{b:g}" for a, b in zip(self.edges[:-1], self.edges[1:], strict=True)]
        marks = [*("*" if c else " " for c in self.counted(min_stars)), " "]
        width = 12
        head = "G bin   " + "".join(f"{t:>{width}}" for t in [*labels, "all"])
        counts = "stars   " + "".join(
            f"{f'{c:,}{m}':>{width}}" for c, m in zip(self.counts, marks, strict=True)
        )
        rows = [
            f"dim {d:<4}"
            + "".join(
                f"{_cell(s, r):>{width}}" for s, r in zip(self.std[i], self.robust[i], strict=True)
            )
            for i, d in enumerate(self.dims)
        ]
        if not rows:
            rows = ["(no active latent dimension: the model has not learned yet; train longer)"]
        return [f"sigma = {self.name}", head, counts, *rows]


def _cell(std: float, robust: float) -> str:
    """``std (robust)`` of one cell, or '-' for an empty bin."""
    return "-" if not np.isfinite(std) else f"{std:.2f} ({robust:.2f})"


def z_table(
    name: str,
    z: np.ndarray,
    g_mag: np.ndarray,
    *,
    dims: tuple[int, ...] | None = None,
    edges: tuple[float, ...] = G_EDGES,
) -> ZTable:
    """std(z) and its robust twin of the normalised differences ``z`` (pairs, latent).

    Parameters
    ----------
    name
        What σ is, for the printed table.
    z
        (pairs, latent) :func:`repeat_z`; pairs with a non-finite value in a kept dimension
        are left out.
    g_mag
        (pairs,) the stars' G magnitude, binned by ``edges`` (pairs outside are only in 'all').
    dims
        The latent dimensions to tabulate (default: all).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sigma = np.full((20_000, 1), 0.3)
    >>> mu_a, mu_b = rng.normal(0, sigma), rng.normal(0, sigma)
    >>> table = z_table("right", repeat_z(mu_a, mu_b, sigma, sigma), np.full(20_000, 12.5))
    >>> round(float(table.std[0, -1]), 1)
    1.0
    """
    dims = tuple(range(z.shape[1])) if dims is None else tuple(dims)
    z = np.asarray(z, np.float64)[:, list(dims)]
    g_mag = np.asarray(g_mag, np.float64)
    keep = np.isfinite(z).all(axis=1)
    z, g_mag = z[keep], g_mag[keep]
    bins = np.digitize(g_mag, edges) - 1  # -1 and len(edges) - 1: outside
    groups = [*(bins == b for b in range(len(edges) - 1)), np.ones(len(z), bool)]
    counts = np.array([int(g.sum()) for g in groups])
    std = np.full((len(dims), len(groups)), np.nan)
    robust = np.full_like(std, np.nan)
    for j, rows in enumerate(groups):
        if rows.sum() >= 2:
            std[:, j] = z[rows].std(axis=0, ddof=1)
            robust[:, j] = robust_std(z[rows])
    return ZTable(name, dims, tuple(edges), counts, std, robust)


# --- the σ on offer ---------------------------------------------------------------------------
Choice = tuple[str, np.ndarray, np.ndarray]
"""(name, μ, σ) over the catalogue's rows, each (rows, latent)."""


POSTERIOR = "latent_std (posterior width)"
MC_SPREAD = "latent_std_mc (MC spread)"
MC_ON_MC_MEANS = "latent_std_mc on the MC means (mu = latent_mean_mc)"
QUADRATURE = "sqrt(latent_std^2 + latent_std_mc^2)"
RECOMMENDED = MC_SPREAD
"""The σ recommended for a latent mean used as a measurement (docs/uncertainty.md says why)."""


def uncertainty_choices(ds: Mapping[str, np.ndarray]) -> list[Choice]:
    """Every σ the catalogue ``ds`` (variable name -> rows' values) offers for its latent means.

    ``latent_std``, the encoder's posterior width, always; the Monte-Carlo ones when the
    catalogue has them (:func:`mc_choices`).
    """
    return [(POSTERIOR, ds[schema.LATENT_MEAN], ds[schema.LATENT_STD]), *mc_choices(ds)]


def mc_choices(ds: Mapping[str, np.ndarray]) -> list[Choice]:
    """The Monte-Carlo uncertainties, when ``encode-catalog --mc-samples`` wrote them
    (:data:`xpbatch.schema.LATENT_STD_MC`, :data:`xpbatch.schema.LATENT_MEAN_MC`).

    The catalogue's value is ``latent_mean``, so every σ is tried on it: the MC spread, and the
    spread added in quadrature to the posterior width. The MC spread on the MC means is shown
    too, for comparison only (it is not the published value).
    """
    if schema.LATENT_STD_MC not in ds:
        return []
    mean, std, mc_std = ds[schema.LATENT_MEAN], ds[schema.LATENT_STD], ds[schema.LATENT_STD_MC]
    return [
        (MC_SPREAD, mean, mc_std),
        (QUADRATURE, mean, np.hypot(std, mc_std)),
        (MC_ON_MC_MEANS, ds[schema.LATENT_MEAN_MC], mc_std),
    ]


# --- the run ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UncertaintyBenchmark:
    """The tables of one ``bench uncertainty`` run and what they were measured on."""

    stars: int
    pairs: int
    """Pairs compared: both rows complete (no :data:`INCOMPLETE` flag) and encoded."""
    model: str
    mc_samples: int
    """Monte-Carlo draws per spectrum (0: none)."""
    tables: tuple[ZTable, ...]
    recommended: str
    """The name of the table the verdict is about."""

    def report(self) -> str:
        """The tables and the verdict, for the terminal."""
        lines = [
            f"{self.stars:,} mock stars observed twice, {self.pairs:,} pairs complete and "
            f"encoded; model {self.model}; {self.mc_samples or 'no'} Monte-Carlo draws per "
            "spectrum",
            f"z = (mu1 - mu2) / sqrt(s1^2 + s2^2) per active latent dim and true-G bin: "
            f"std(z) (1.4826 MAD); * bins with >= {MIN_STARS} stars count for the bar",
        ]
        for table in self.tables:
            lines += ["", *table.lines()]
        lines += ["", *(self.verdict(t) for t in self.tables)]
        return "\n".join(lines)

    def verdict(self, table: ZTable) -> str:
        """One line: does ``table`` meet the bar, and its worst counted cell."""
        low, high = BAR
        ok = "meets" if table.passes() else "misses"
        role = "recommended" if table.name == self.recommended else "shown beside"
        return (
            f"{role}: sigma = {table.name} {ok} the bar {low} <= std(z) <= {high} "
            f"(worst counted cell {table.worst():.3f})"
        )


def run_uncertainty_benchmark(
    stars: int = 20_000,
    *,
    model: str | Path | None = None,
    mc_samples: int = MC_SAMPLES,
    train_rows: int = TRAIN_ROWS,
    training: TrainConfig = TRAINING,
    workdir: str | Path | None = None,
    seed: int = 1,
    echo: Callable[[str], None] = print,
) -> UncertaintyBenchmark:
    """Build the repeat mock, train a model unless given one, encode, tabulate std(z).

    Parameters
    ----------
    stars
        Stars of the mock, each observed twice (``2 * stars`` rows).
    model
        The model to calibrate; default: one trained on a ``train_rows`` mock with
        ``training`` (kept in ``workdir`` and reused when its settings are the same).
    mc_samples
        Monte-Carlo draws per spectrum (``encode-catalog --mc-samples``); 0: ``latent_std`` only.
    workdir
        Where the mocks, the model and the catalogue go (default: a temporary directory).
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if model is None:
            model = _train(root, train_rows, training, seed, echo)
        return _measure(root, stars, Path(model), mc_samples, seed, echo)


def _train(
    root: Path, rows: int, training: TrainConfig, seed: int, echo: Callable[[str], None]
) -> Path:
    """A model trained on a ``rows`` mock without repeats (reused when already in ``root``)."""
    from xpbatch.mock import write_mock_store
    from xpbatch.train.stage import train_model

    path = root / f"model-{rows}-{training.epochs}ep-seed{seed}.safetensors"
    if path.is_file():
        echo(f"model {path} (reused)")
        return path
    store = root / f"train-{rows}.zarr"
    echo(f"training mock of {rows:,} rows ...")
    write_mock_store(store, rows, seed=seed + 1, config=PAIRS_MOCK, overwrite=True)
    echo(f"training {training.epochs} epochs ...")
    config = dataclasses.replace(
        training, seed=seed, device="cpu", progress_bar=False, overwrite=True
    )
    train_model(store, path, config=config)
    return path


def _measure(
    root: Path, stars: int, model: Path, mc_samples: int, seed: int, echo: Callable[[str], None]
) -> UncertaintyBenchmark:
    """Encode the repeat mock with ``model`` and tabulate every σ on offer."""
    from xpbatch.catalog.zarr_catalog import open_catalog
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.mock import read_mock_labels, write_mock_store
    from xpbatch.products.neighbours import LatentMetric

    store = root / f"pairs-{stars}.zarr"
    echo(f"mock of {stars:,} stars observed twice ({2 * stars:,} rows) ...")
    config = dataclasses.replace(PAIRS_MOCK, repeats=2)
    # With the packed correlations, so that Monte-Carlo draws follow the mock's correlated noise.
    write_mock_store(
        store, 2 * stars, seed=seed, config=config, with_correlations=True, overwrite=True
    )
    draws = f", {mc_samples} Monte-Carlo draws per spectrum" if mc_samples else ""
    echo(f"encoding with {model}{draws} ...")
    catalog = root / f"pairs-{stars}.catalog.zarr"
    encode = EncodeConfig(overwrite=True, progress_bar=False, mc_samples=mc_samples)
    encode_catalog(store, model, catalog, config=encode)

    ds = open_catalog(catalog)
    values = {str(name): ds[name].values for name in ds.data_vars}
    labels = read_mock_labels(store).loc[ds[schema.SOURCE_ID].values]
    a, b = comparable_pairs(
        labels["star_id"].to_numpy(), values[schema.LATENT_MEAN], values[schema.FLAGS]
    )
    g_mag = labels["g_mag"].to_numpy()[a]
    dims = tuple(int(d) for d in np.flatnonzero(LatentMetric.from_catalog(catalog).active))
    tables = tuple(
        z_table(name, repeat_z(mu[a], mu[b], sigma[a], sigma[b]), g_mag, dims=dims)
        for name, mu, sigma in uncertainty_choices(values)
    )
    return UncertaintyBenchmark(
        stars=stars,
        pairs=len(a),
        model=str(model),
        mc_samples=mc_samples,
        tables=tables,
        recommended=RECOMMENDED if any(t.name == RECOMMENDED for t in tables) else POSTERIOR,
    )
