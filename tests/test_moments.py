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


def test_synchronized_sums_go_through_replica_sum():
    """A stand-in for a cross-replica sum over two identical replicas:
    doubling every sum leaves the moments as they are and doubles the
    count."""
    x = ops.convert_to_tensor(
        np.random.default_rng(1).normal(size=(6, 3)).astype("float32")
    )
    plain = _moments.moments(x, [0])
    for synchronized in (True, False):
        doubled = _moments.moments(
            x, [0], synchronized=synchronized, replica_sum=lambda v: 2 * v
        )
        for name in ("mean", "variance", "batch_mean", "batch_variance"):
            np.testing.assert_allclose(
                to_numpy(getattr(doubled, name)),
                to_numpy(getattr(plain, name)),
                rtol=1e-6,
                atol=1e-7,
            )
        np.testing.assert_allclose(
            to_numpy(doubled.count), 2 * to_numpy(plain.count)
        )


@pytest.mark.parametrize(
    "synchronized,virtual", [(True, None), (False, None), (True, 2)], ids=str
)
def test_replica_sum_reaches_the_statistics_it_should(synchronized, virtual):
    """Adding a constant to every cross-replica sum shows which statistics
    go through it: the normalizing ones only when synchronized without ghost
    batches, the moving-statistics totals always."""
    x = ops.convert_to_tensor(
        np.random.default_rng(1).normal(size=(6, 3)).astype("float32")
    )
    plain = _moments.moments(x, [0], virtual_batch_size=virtual)
    shifted = _moments.moments(
        x,
        [0],
        virtual_batch_size=virtual,
        synchronized=synchronized,
        replica_sum=lambda value: value + 1.0,
    )
    normalizing_changed = not np.allclose(
        to_numpy(shifted.mean), to_numpy(plain.mean)
    )
    assert normalizing_changed == (synchronized and virtual is None)
    assert not np.allclose(
        to_numpy(shifted.batch_mean), to_numpy(plain.batch_mean)
    )


@pytest.mark.parametrize(
    "batch,shards,virtual",
    [(12, 2, 3), (10, 2, 3), (12, 3, None), (8, 4, 5), (9, 3, 1)],
    ids=str,
)
def test_groups_stay_within_a_shard(batch, shards, virtual):
    values = np.arange(batch * 2, dtype="float32").reshape(batch, 1, 2)
    shard = batch // shards
    size = min(virtual or shard, shard)
    starts = [
        first + start
        for first in range(0, batch, shard)
        for start in range(0, shard, size)
    ]
    expected = np.stack(
        [
            values[
                start : min(start + size, start - start % shard + shard)
            ].sum(axis=0)
            for start in starts
        ]
    )
    sums = to_numpy(
        _moments.ghost_batch_sum(ops.convert_to_tensor(values), size, shards)
    )
    np.testing.assert_array_equal(sums, expected)
    spread = to_numpy(
        _moments.ghost_batch_broadcast(
            ops.convert_to_tensor(sums), batch, size, shards
        )
    )
    lengths = np.diff(starts + [batch])
    np.testing.assert_array_equal(spread, np.repeat(expected, lengths, 0))


@pytest.mark.parametrize("virtual", [None, 3], ids=["per_shard", "ghost"])
def test_sharded_moments_match_a_reference_per_shard(virtual):
    """Two shards of five: ghost batches of 3 are samples 0-2, 3-4, 5-7 and
    8-9, never 3-5; without ghost batches each shard is a group."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 4)).astype("float32")
    x[5:] = 3.0 * x[5:] + 7.0
    mask = rng.random((10, 1)) > 0.2
    stats = _moments.moments(
        ops.convert_to_tensor(x),
        [0],
        ops.convert_to_tensor(mask),
        virtual_batch_size=virtual,
        num_shards=2,
    )
    shards = [
        reference.batch_norm(
            x[rows],
            mask=mask[rows, 0],
            virtual_batch_size=virtual,
            epsilon=0.0,
        )
        for rows in (slice(0, 5), slice(5, 10))
    ]
    outputs = (x - to_numpy(stats.mean)) / np.sqrt(to_numpy(stats.variance))
    expected = np.concatenate([shard["outputs"] for shard in shards])
    np.testing.assert_allclose(
        np.where(mask, outputs, 0.0),
        np.where(mask, expected, 0.0),
        rtol=1e-4,
        atol=1e-4,
    )
    counts = np.array([shard["count"] for shard in shards])
    for name in ("mean", "variance"):
        expected = (np.array([shard[name] for shard in shards]) * counts).sum(
            axis=0
        ) / counts.sum(axis=0)
        np.testing.assert_allclose(
            to_numpy(getattr(stats, f"batch_{name}")).reshape(-1),
            expected,
            rtol=1e-5,
        )


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        _moments.moments(ops.ones((6, 2)), [0], num_shards=4)


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
