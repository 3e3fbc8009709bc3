"""The anomaly score and the neighbour search on a mock with injected rare populations, end to
end: mock -> train -> encode-catalog -> rank and search (a small ``xpbatch bench anomalies``).

The bar of the issue is measured at full size by ``xpbatch bench anomalies`` (240,000 rows, 0.5 %
rare, 40 epochs on 60,000 of them; docs/performance.md); this run is smaller and shorter so
that it fits a test, and checks the same relations with margins suited to its size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from xpbatch.benchmarks.anomalies import TRAINING, run_anomaly_benchmark


@pytest.mark.slow
def test_rare_sources_rank_first_and_neighbours_share_labels(tmp_path: Path) -> None:
    training = dataclasses.replace(TRAINING, epochs=4, cycle_epochs=4)
    result = run_anomaly_benchmark(
        16_000, rare_fraction=0.02, n_queries=200, training=training, workdir=tmp_path
    )
    print(result.report())
    assert result.rare == pytest.approx(320, rel=0.2)
    assert result.auc_anomaly_score >= 0.85  # 0.915 measured
    assert result.auc_anomaly_score > result.auc_five_sigma
    assert result.median_dteff_neighbours < 0.5 * result.median_dteff_random
    assert result.median_dmh_neighbours < 0.7 * result.median_dmh_random  # 0.39 measured
