import numpy as np
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_bn import _moments
from tests import reference
from tests.backend import to_numpy


def _normalized(stats, epsilon=0.0):
    """The input normalized with its statistics, in the input's layout."""

    def normalized(part):
        variance = part.variance
        if part.spread is not None:
            variance = part.spread(variance)
        return part.centered / ops.sqrt(variance + epsilon)

    return to_numpy(stats.ungroup([normalized(part) for part in stats.parts]))


@pytest.mark.parametrize(
    "batch,virtual", [(12, 4), (10, 4), (9, 4), (3, 3), (5, 1)], ids=str
)
def test_groups_split_and_merge(batch, virtual):
    values = np.arange(batch * 2, dtype="float32").reshape(batch, 1, 2)
    groups = _moments.Groups(batch, virtual, 1)
    views = groups.split(ops.convert_to_tensor(values))
    full = batch // virtual * virtual
    expected = [values[:full].reshape(-1, virtual, 1, 2)]
    if full < batch:
        expected.append(values[None, full:])
    assert len(views) == len(expected)
    for view, values_expected in zip(views, expected, strict=True):
        np.testing.assert_array_equal(to_numpy(view), values_expected)
    np.testing.assert_array_equal(to_numpy(groups.merge(views)), values)


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
    np.testing.assert_allclose(
        np.where(mask, _normalized(stats), 0.0),
        np.where(mask, expected["outputs"], 0.0),
        rtol=1e-4,
        atol=1e-4,
    )


def test_moments_of_an_empty_group_are_zero():
    x = ops.ones((4, 2))
    mask = ops.convert_to_tensor([[True], [True], [False], [False]])
    stats = _moments.moments(x, [0], mask, virtual_batch_size=2)
    # Two ghost batches, the second fully masked.
    (part,) = stats.parts
    np.testing.assert_array_equal(to_numpy(part.mean)[1], 0.0)
    np.testing.assert_array_equal(to_numpy(part.variance)[1], 0.0)
    np.testing.assert_array_equal(to_numpy(stats.count), [[2.0, 2.0]])


def _statistic(stats, name):
    """A total, or a statistic of the only part."""
    if name.startswith("batch_"):
        return getattr(stats, name)
    (part,) = stats.parts
    return getattr(part, name)


@pytest.mark.parametrize("sum_name", ["group_sum", "total_sum"])
def test_sums_over_two_identical_replicas(sum_name):
    """A stand-in for a cross-replica sum over two identical replicas:
    doubling every sum leaves the moments as they are and doubles the
    count."""
    x = ops.convert_to_tensor(
        np.random.default_rng(1).normal(size=(6, 3)).astype("float32")
    )
    plain = _moments.moments(x, [0])
    doubled = _moments.moments(x, [0], **{sum_name: lambda v: 2 * v})
    for name in ("mean", "variance", "batch_mean", "batch_variance"):
        np.testing.assert_allclose(
            to_numpy(_statistic(doubled, name)),
            to_numpy(_statistic(plain, name)),
            rtol=1e-6,
            atol=1e-7,
        )
    np.testing.assert_allclose(
        to_numpy(doubled.count), 2 * to_numpy(plain.count)
    )


@pytest.mark.parametrize(
    "sum_name,virtual",
    [("group_sum", None), ("total_sum", None), ("total_sum", 2)],
    ids=str,
)
def test_sums_reach_the_statistics_they_should(sum_name, virtual):
    """Adding a constant to every cross-replica sum shows which statistics
    go through it: the normalizing ones through `group_sum` only, the
    moving-statistics totals through either."""
    x = ops.convert_to_tensor(
        np.random.default_rng(1).normal(size=(6, 3)).astype("float32")
    )
    plain = _moments.moments(x, [0], virtual_batch_size=virtual)
    shifted = _moments.moments(
        x,
        [0],
        virtual_batch_size=virtual,
        **{sum_name: lambda value: value + 1.0},
    )
    normalizing_changed = not np.allclose(
        to_numpy(_statistic(shifted, "mean")),
        to_numpy(_statistic(plain, "mean")),
    )
    assert normalizing_changed == (sum_name == "group_sum")
    assert not np.allclose(
        to_numpy(shifted.batch_mean), to_numpy(plain.batch_mean)
    )


@pytest.mark.parametrize(
    "batch,shards,virtual",
    [(12, 2, 3), (10, 2, 3), (12, 3, None), (8, 4, 5), (9, 3, 1)],
    ids=str,
)
def test_groups_stay_within_a_shard(batch, shards, virtual):
    values = np.arange(1, batch * 2 + 1, dtype="float32").reshape(batch, 1, 2)
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
    groups = _moments.Groups(batch, size, shards)
    views = groups.split(ops.convert_to_tensor(values))
    # The full groups of every shard, then the last group of every shard.
    sums = np.concatenate([to_numpy(ops.sum(view, 1)) for view in views])
    full = [start for start in starts if start % shard + size <= shard]
    last = [start for start in starts if start not in full]
    order = [starts.index(start) for start in full + last]
    np.testing.assert_array_equal(sums, expected[order])
    np.testing.assert_array_equal(to_numpy(groups.merge(views)), values)


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
    outputs = _normalized(stats)
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


@st.composite
def _sharded_batches(draw):
    """Shards of a batch (devices) of 1 to 6 samples each, some of them
    without an unmasked element, with or without ghost batches."""
    shards = draw(st.integers(1, 4))
    shard = draw(st.integers(1, 6))
    time = draw(st.integers(1, 3))
    features = draw(st.integers(1, 3))
    virtual = draw(st.none() | st.integers(1, shard + 1))
    single = time == 1
    # The layer refuses or bypasses groups of one value (see
    # `single_value_groups`).
    assume(not (single and (virtual == 1 or shard == 1)))
    mask = draw(st.sampled_from(["none", "random", "empty_shards"]))
    return (
        shards,
        shard,
        time,
        features,
        virtual,
        mask,
        draw(st.integers(0, 99)),
    )


@settings(deadline=None)
@given(_sharded_batches())
def test_sharded_moments_with_empty_shards_match_the_reference(batch):
    """Per-shard statistics of shards of any size, with shards that hold no
    unmasked element: each shard's groups are the reference's, the totals
    weigh every shard by its count, and no statistic is NaN."""
    shards, shard, time, features, virtual, mask_kind, seed = batch
    rng = np.random.default_rng(seed)
    size = shards * shard
    x = rng.normal(size=(size, time, features)) * rng.uniform(0.5, 3.0)
    x = x + rng.normal(0.0, 5.0, (shards, 1, 1)).repeat(shard, 0)
    x = x.astype("float32")
    mask = np.ones((size, time), bool)
    if mask_kind == "random":
        mask = rng.random((size, time)) > 0.3
    elif mask_kind == "empty_shards":
        for index in rng.choice(shards, rng.integers(1, shards + 1), False):
            mask[index * shard : (index + 1) * shard] = False
    stats = _moments.moments(
        ops.convert_to_tensor(x),
        [0, 1],
        ops.convert_to_tensor(mask[..., None]),
        virtual_batch_size=virtual,
        num_shards=shards,
    )
    expected = [
        reference.batch_norm(
            x[rows], mask=mask[rows], virtual_batch_size=virtual, epsilon=0.1
        )
        for rows in (
            slice(index * shard, (index + 1) * shard) for index in range(shards)
        )
    ]
    counts = np.array([each["count"] for each in expected])
    total = counts.sum(axis=0)
    np.testing.assert_allclose(to_numpy(stats.count).reshape(-1), total, rtol=0)
    for name in ("mean", "variance"):
        computed = to_numpy(getattr(stats, f"batch_{name}")).reshape(-1)
        assert np.all(np.isfinite(computed)), name
        values = np.array([each[name] for each in expected])
        np.testing.assert_allclose(
            computed,
            (values * counts).sum(axis=0) / np.maximum(total, 1),
            rtol=1e-4,
            atol=1e-4,
        )
    for part in stats.parts:
        for name in ("mean", "residual", "variance"):
            assert np.all(np.isfinite(to_numpy(getattr(part, name)))), name
    # Masked positions included: their statistics are their group's.
    np.testing.assert_allclose(
        _normalized(stats, epsilon=0.1),
        np.concatenate([each["outputs"] for each in expected]),
        rtol=1e-4,
        atol=1e-4,
    )
