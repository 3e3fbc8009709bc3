"""The per-chunk kernel: outputs, flags, and bitwise independence of how rows are blocked."""

from __future__ import annotations

import numpy as np
import pytest

from xpbatch import schema
from xpbatch.encode.kernel import BATCHES_PER_BLOCK, encode_arrays, encode_chunk, output_variables
from xpbatch.errors import InputShapeError
from xpbatch.model.trained import TrainedModel
from xpbatch.schema import CatalogFlag, InputFlag


def _chunk(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.lognormal(size=n)
    return {
        schema.SOURCE_ID: np.arange(n, dtype=np.int64) * 10 + 1,
        schema.COEFFICIENTS: (rng.normal(size=(n, 110)) * g[:, None]).astype(np.float32),
        schema.COEFFICIENT_ERRORS: np.full((n, 110), 0.1, np.float32) * g[:, None],
        schema.PHOT_G_MEAN_FLUX: g,
        schema.INPUT_FLAGS: np.zeros(n, np.uint8),
    }


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    return TrainedModel.untrained(seed=1).with_updates(
        train_source_id=np.array([5, 21]), validation_source_id=np.array([31])
    )


@pytest.mark.parametrize("with_reconstruction", [False, True], ids=["plain", "reconstruction"])
def test_outputs_have_the_catalogue_shapes_and_dtypes(
    model: TrainedModel, with_reconstruction: bool
) -> None:
    out = encode_chunk(model, _chunk(7), with_reconstruction=with_reconstruction)
    expected = {
        schema.SOURCE_ID: ((7,), np.int64),
        schema.LATENT_MEAN: ((7, 6), np.float32),
        schema.LATENT_STD: ((7, 6), np.float32),
        schema.SCATTER: ((7, 110), np.float32),
        schema.RMSE: ((7,), np.float32),
        schema.FLAGS: ((7,), np.uint16),
        schema.ANOMALY_SCORE: ((7,), np.float32),
    }
    if with_reconstruction:
        expected[schema.RECONSTRUCTION] = ((7, 110), np.float32)
    assert list(out) == list(output_variables(with_reconstruction=with_reconstruction))
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == expected


def test_blocks_give_bitwise_the_result_of_one_call(model: TrainedModel) -> None:
    batch = 16
    n = 3 * batch * BATCHES_PER_BLOCK + 5  # several blocks and a ragged end
    chunk = _chunk(n, seed=2)
    out = encode_chunk(model, chunk, batch_size=batch, with_reconstruction=True)
    direct = encode_arrays(
        model,
        chunk[schema.COEFFICIENTS],
        chunk[schema.COEFFICIENT_ERRORS],
        chunk[schema.PHOT_G_MEAN_FLUX],
        batch_size=batch,
    )
    for name in ("latent_mean", "latent_std", "scatter", "rmse", "reconstruction"):
        np.testing.assert_array_equal(out[name], getattr(direct, name), err_msg=name)


@pytest.mark.parametrize(
    ("row", "input_flags", "expected"),
    [
        (0, 0, CatalogFlag(0)),
        (1, InputFlag.G_FLUX_FROM_MAG, CatalogFlag.G_FLUX_FROM_MAG),  # store-only knowledge
        (2, 0, CatalogFlag.IN_TRAINING_SET),  # source_id 21
        (3, InputFlag.G_FLUX_FROM_MAG, CatalogFlag.G_FLUX_FROM_MAG | CatalogFlag.IN_VALIDATION_SET),
    ],
    ids=["clean", "input-bit-kept", "training-member", "input-bit-and-validation-member"],
)
def test_flags_combine_store_model_and_membership_bits(
    model: TrainedModel, row: int, input_flags: int, expected: CatalogFlag
) -> None:
    chunk = _chunk(4)
    chunk[schema.INPUT_FLAGS][row] = input_flags
    flags = encode_chunk(model, chunk)[schema.FLAGS]
    ignore = np.uint16(CatalogFlag.LATENT_OUTLIER)  # an untrained model's latents are arbitrary
    assert CatalogFlag(int(flags[row] & ~ignore)) == expected


def test_a_row_without_g_flux_is_nan_and_flagged(model: TrainedModel) -> None:
    chunk = _chunk(3)
    chunk[schema.PHOT_G_MEAN_FLUX][1] = np.nan
    chunk[schema.INPUT_FLAGS][1] = InputFlag.G_FLUX_MISSING
    out = encode_chunk(model, chunk)
    assert out[schema.FLAGS][1] & CatalogFlag.NOT_ENCODED
    assert np.isnan(out[schema.LATENT_MEAN][1]).all() and np.isnan(out[schema.RMSE][1])
    assert np.isfinite(out[schema.LATENT_MEAN][[0, 2]]).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop(schema.INPUT_FLAGS), "missing input_flags"),
        (lambda c: c.update({schema.PHOT_G_MEAN_FLUX: np.ones(2)}), "must have 4 rows"),
    ],
    ids=["missing-variable", "ragged"],
)
def test_malformed_chunks_are_refused(model: TrainedModel, change, message: str) -> None:  # type: ignore[no-untyped-def]
    chunk = _chunk(4)
    change(chunk)
    with pytest.raises(InputShapeError, match=message):
        encode_chunk(model, chunk)
