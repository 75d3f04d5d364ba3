import numpy as np
import pytest
from keras import ops

from keras_bn import _moments
from tests import reference
from tests.backend import to_numpy


@pytest.mark.parametrize(
    "batch,virtual", [(12, 4), (10, 4), (9, 4), (3, 4), (5, 1)], ids=str
)
def test_ghost_batch_sum_and_broadcast(batch, virtual):
    values = np.arange(batch * 2, dtype="float32").reshape(batch, 1, 2)
    sums = to_numpy(
        _moments.ghost_batch_sum(ops.convert_to_tensor(values), virtual)
    )
    expected = np.stack(
        [
            values[start : start + virtual].sum(axis=0)
            for start in range(0, batch, virtual)
        ]
    )
    np.testing.assert_array_equal(sums, expected)
    spread = to_numpy(
        _moments.ghost_batch_broadcast(
            ops.convert_to_tensor(sums), batch, virtual
        )
    )
    np.testing.assert_array_equal(
        spread, np.repeat(expected, virtual, axis=0)[:batch]
    )


@pytest.mark.parametrize("virtual", [None, 3], ids=["plain", "ghost"])
def test_moments_match_reference(virtual):
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(8, 5, 2))).astype("float32")
    mask = rng.random((8, 5, 1)) > 0.3
    stats = _moments.moments(
        ops.convert_to_tensor(x),
        [0, 1],
        ops.convert_to_tensor(mask),
        virtual_batch_size=virtual,
    )
    expected = reference.batch_norm(
        x, mask=mask[..., 0], virtual_batch_size=virtual, epsilon=0.0
    )
    np.testing.assert_allclose(
        to_numpy(stats.batch_mean).reshape(-1), expected["mean"], rtol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(stats.batch_variance).reshape(-1),
        expected["variance"],
        rtol=1e-5,
    )
    count = np.broadcast_to(to_numpy(stats.count), stats.batch_mean.shape)
    np.testing.assert_array_equal(count.reshape(-1), expected["count"])
    normalized = (x - to_numpy(stats.mean)) / np.sqrt(to_numpy(stats.variance))
    np.testing.assert_allclose(
        np.where(mask, normalized, 0.0),
        np.where(mask, expected["outputs"], 0.0),
        rtol=1e-4,
        atol=1e-4,
    )


def test_moments_of_an_empty_group_are_zero():
    x = ops.ones((4, 2))
    mask = ops.convert_to_tensor([[True], [True], [False], [False]])
    stats = _moments.moments(x, [0], mask, virtual_batch_size=2)
    np.testing.assert_array_equal(to_numpy(stats.mean)[2:], 0.0)
    np.testing.assert_array_equal(to_numpy(stats.variance)[2:], 0.0)
    np.testing.assert_array_equal(to_numpy(stats.count), [[2.0]])


def test_batch_sum_is_applied_to_every_whole_batch_sum():
    """A stand-in for a cross-replica sum over two identical replicas:
    doubling every sum leaves the moments as they are and doubles the
    count."""
    x = ops.convert_to_tensor(
        np.random.default_rng(1).normal(size=(6, 3)).astype("float32")
    )
    plain = _moments.moments(x, [0])
    doubled = _moments.moments(x, [0], batch_sum=lambda value: 2 * value)
    np.testing.assert_allclose(
        to_numpy(doubled.variance), to_numpy(plain.variance), rtol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(doubled.count), 2 * to_numpy(plain.count)
    )
    shifted = _moments.moments(x, [0], batch_sum=lambda value: value + 1.0)
    assert not np.allclose(to_numpy(shifted.mean), to_numpy(plain.mean)), (
        "batch_sum was not used"
    )


def test_two_pass_variance_survives_a_large_offset():
    x = (1e4 + np.random.default_rng(2).normal(size=(4096, 2))).astype(
        "float32"
    )
    stats = _moments.moments(ops.convert_to_tensor(x), [0])
    np.testing.assert_allclose(
        to_numpy(stats.batch_variance).reshape(-1),
        x.astype("float64").var(axis=0),
        rtol=1e-3,
    )
