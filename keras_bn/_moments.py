"""Batch and ghost-batch moments: the numerics behind the layer.

Every statistic is a two-pass one: the mean first, then the mean of squared
deviations from it. `E[x^2] - E[x]^2` is never formed, so inputs with a large
common offset keep their variance (in float32, `1e4 + N(0, 1)` loses every
significant digit of its variance to that cancellation).

Statistics are computed per group of samples. A group is the whole batch,
or a ghost batch: `virtual_batch_size` consecutive samples along axis 0, the
last one smaller when the batch is not a multiple. When the batch axis is
split over devices (`num_shards`), groups never cross a device boundary:
each device's shard is split into ghost batches, or is one group itself.
The data is reduced once per pass to per-sample sums, and only those small
per-sample tensors are grouped, so no pass copies the input or loops over
groups.
"""

import collections

from keras import ops

Moments = collections.namedtuple(
    "Moments", ["mean", "variance", "batch_mean", "batch_variance", "count"]
)
Moments.__doc__ = """Statistics of one training batch.

`mean` and `variance` are what each sample is normalized with: shaped like the
input with its reduced axes kept as 1, except axis 0, which keeps the batch
size when there are several groups. `batch_mean` and `batch_variance` are
their averages over the groups of every replica, each weighted by its number
of (unmasked) elements; `count` is that number of elements in all of them.
These three keep every axis as 1 except the feature axes.
"""


def ghost_batch_sum(values, group_size, num_shards=1):
    """Sums `values` over consecutive groups along axis 0, per shard.

    Args:
        values: Tensor of shape `(batch, ...)`, `batch` a multiple of
            `num_shards`.
        group_size: Python int, the number of samples per group; the last
            group of each shard is smaller when the shard is not a multiple.
        num_shards: Python int, the number of equal consecutive shards that
            axis 0 is split into; no group crosses a shard boundary.

    Returns:
        Tensor of shape `(num_shards * ceil(shard / group_size), ...)`, the
        groups in order.
    """
    rest = tuple(values.shape[1:])
    shards = ops.reshape(values, (num_shards, -1) + rest)
    shard = ops.shape(shards)[1]
    num_groups = (shard + group_size - 1) // group_size
    padding = num_groups * group_size - shard
    padded = ops.pad(shards, [[0, 0], [0, padding]] + [[0, 0]] * len(rest))
    grouped = ops.reshape(padded, (num_shards, -1, group_size) + rest)
    return ops.reshape(ops.sum(grouped, axis=2), (-1,) + rest)


def ghost_batch_broadcast(values, batch, group_size, num_shards=1):
    """Gives each sample the value of its group: the inverse layout of
    `ghost_batch_sum`, from `(num_groups, ...)` to `(batch, ...)`."""
    rest = tuple(values.shape[1:])
    groups = ops.reshape(values, (num_shards, -1) + rest)
    spread = ops.repeat(groups, group_size, axis=1)[:, : batch // num_shards]
    return ops.reshape(spread, (-1,) + rest)


def moments(
    x,
    axes,
    mask=None,
    virtual_batch_size=None,
    synchronized=False,
    num_shards=1,
    replica_sum=None,
):
    """Mean and variance of `x` over `axes`, per group of samples.

    Args:
        x: Floating tensor; statistics are computed in its dtype.
        axes: Axes to reduce, axis 0 (the batch axis) among them.
        mask: Optional boolean tensor broadcastable to `x`, with size 1 on the
            feature axes. Positions where it is `False` are left out.
        virtual_batch_size: Optional Python int. When set, every ghost batch
            of that many consecutive samples of a shard is a group.
        synchronized: Python bool. Without `virtual_batch_size`, `True`
            makes the global batch (every shard of every replica) one group;
            `False` makes each shard of each replica a group.
        num_shards: Python int, the number of devices axis 0 is split over
            (equal consecutive shards); the static batch size must be a
            multiple of it.
        replica_sum: Optional function that sums a tensor over replicas
            which each see their own batch (an all-reduce). The sums of a
            synchronized group go through it, and so do the totals behind
            `batch_mean`, `batch_variance` and `count`.

    Returns:
        A `Moments` tuple. An empty (fully masked) group has mean and
        variance 0 and a count of 0.
    """
    batch = x.shape[0]
    if num_shards > 1 and (batch is None or batch % num_shards):
        raise ValueError(
            "The batch size must be a multiple of the number of devices the "
            f"batch is split over. Received: batch size {batch} on "
            f"{num_shards} devices"
        )
    synchronized = synchronized and virtual_batch_size is None
    group_size = None
    if not synchronized:
        shard = None if batch is None else batch // num_shards
        group_size = virtual_batch_size or shard
        if group_size is not None and shard is not None:
            group_size = min(group_size, shard)
    grouped = group_size is not None and (num_shards > 1 or group_size != batch)
    if grouped:
        sample_axes = [axis for axis in axes if axis != 0]

        def group_sum(*values):
            return [
                ghost_batch_sum(value, group_size, num_shards)
                for value in values
            ]

        def per_sample(values):
            return ghost_batch_broadcast(
                values, ops.shape(x)[0], group_size, num_shards
            )
    else:
        sample_axes = list(axes)

        def group_sum(*values):
            return _replica_sum(replica_sum if synchronized else None, values)

        def per_sample(values):
            return values

    def masked(values):
        return values if mask is None else ops.where(mask, values, 0)

    sums = ops.sum(masked(x), axis=sample_axes, keepdims=True)
    if mask is None:
        elements = 1
        for axis in sample_axes:
            elements *= ops.shape(x)[axis]
        counts = ops.ones_like(sums) * ops.cast(elements, x.dtype)
    else:
        counts = ops.sum(ops.cast(mask, x.dtype), sample_axes, keepdims=True)
    group_sums, group_counts = group_sum(sums, counts)
    safe_counts = _at_least_one(group_counts)
    group_means = group_sums / safe_counts

    mean = per_sample(group_means)
    deviations = masked(x - mean)
    squares = ops.sum(deviations * deviations, axis=sample_axes, keepdims=True)
    (group_squares,) = group_sum(squares)
    variance = per_sample(group_squares / safe_counts)

    if not synchronized:
        if grouped:
            group_sums, group_squares, group_counts = (
                ops.sum(values, axis=0, keepdims=True)
                for values in (group_sums, group_squares, group_counts)
            )
        group_sums, group_squares, group_counts = _replica_sum(
            replica_sum, (group_sums, group_squares, group_counts)
        )
        safe_counts = _at_least_one(group_counts)
    batch_mean = group_sums / safe_counts
    batch_variance = group_squares / safe_counts
    return Moments(mean, variance, batch_mean, batch_variance, group_counts)


def _at_least_one(counts):
    """`max(counts, 1)` for counts of elements, in their dtype (the torch
    backend's `ops.maximum` returns float32 for float64 tensors)."""
    return counts + ops.cast(counts < 1, counts.dtype)


def _replica_sum(replica_sum, values):
    """Sums same-shaped tensors over replicas with one all-reduce instead of
    one per tensor; without `replica_sum`, returns them as they are."""
    if replica_sum is None:
        return values
    return ops.unstack(replica_sum(ops.stack(values)), len(values))
