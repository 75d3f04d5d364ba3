"""Batch and ghost-batch moments: the numerics behind the layer.

Every statistic is a two-pass one: the mean first, then the mean of squared
deviations from it. `E[x^2] - E[x]^2` is never formed, so inputs with a large
common offset keep their variance (in float32, `1e4 + N(0, 1)` loses every
significant digit of its variance to that cancellation).

Ghost batches are the consecutive groups of `virtual_batch_size` samples along
axis 0; the last one is smaller when the batch is not a multiple. The data is
reduced once per pass to per-sample sums, and only those small per-sample
tensors are grouped, so no pass copies the input or loops over ghost batches.
"""

import collections

from keras import ops

Moments = collections.namedtuple(
    "Moments", ["mean", "variance", "batch_mean", "batch_variance", "count"]
)
Moments.__doc__ = """Statistics of one training batch.

`mean` and `variance` are what each sample is normalized with: shaped like the
input with its reduced axes kept as 1, except axis 0, which keeps the batch
size when there are ghost batches. `batch_mean` and `batch_variance` are their
averages over the ghost batches, each weighted by its number of (unmasked)
elements; `count` is that number of elements in the whole batch. These three
keep every axis as 1 except the feature axes.
"""


def ghost_batch_sum(values, virtual_batch_size):
    """Sums `values` over consecutive ghost batches along axis 0.

    Args:
        values: Tensor of shape `(batch, ...)`.
        virtual_batch_size: Python int, the number of samples per ghost batch.

    Returns:
        Tensor of shape `(ceil(batch / virtual_batch_size), ...)`.
    """
    batch = ops.shape(values)[0]
    num_groups = (batch + virtual_batch_size - 1) // virtual_batch_size
    padding = num_groups * virtual_batch_size - batch
    padded = ops.pad(values, [[0, padding]] + [[0, 0]] * (values.ndim - 1))
    grouped = ops.reshape(
        padded, (-1, virtual_batch_size) + tuple(values.shape[1:])
    )
    return ops.sum(grouped, axis=1)


def ghost_batch_broadcast(values, batch, virtual_batch_size):
    """Gives each sample the value of its ghost batch: the inverse layout of
    `ghost_batch_sum`, from `(num_groups, ...)` to `(batch, ...)`."""
    return ops.repeat(values, virtual_batch_size, axis=0)[:batch]


def moments(x, axes, mask=None, virtual_batch_size=None, batch_sum=None):
    """Mean and variance of `x` over `axes`, per ghost batch if asked.

    Args:
        x: Floating tensor; statistics are computed in its dtype.
        axes: Axes to reduce; axis 0 (the batch axis) must be one of them
            when `virtual_batch_size` is set.
        mask: Optional boolean tensor broadcastable to `x`, with size 1 on the
            feature axes. Positions where it is `False` are left out.
        virtual_batch_size: Optional Python int. When set, every ghost batch
            of that many consecutive samples gets its own statistics.
        batch_sum: Optional function applied to whole-batch sums before they
            are used (a cross-replica sum for synchronized statistics). With
            ghost batches, which stay within a replica, only the totals
            behind `batch_mean`, `batch_variance` and `count` go through it.

    Returns:
        A `Moments` tuple. An empty (fully masked) group has mean and
        variance 0 and a count of 0.
    """
    ghost = virtual_batch_size is not None
    if ghost:
        batch = ops.shape(x)[0]
        sample_axes = [axis for axis in axes if axis != 0]

        def group_sum(values):
            return ghost_batch_sum(values, virtual_batch_size)

        def per_sample(values):
            return ghost_batch_broadcast(values, batch, virtual_batch_size)
    else:
        sample_axes = list(axes)
        group_sum = batch_sum or (lambda values: values)

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
    group_sums = group_sum(sums)
    group_counts = group_sum(counts)
    safe_counts = ops.maximum(group_counts, 1)
    group_means = group_sums / safe_counts

    mean = per_sample(group_means)
    deviations = masked(x - mean)
    squares = ops.sum(deviations * deviations, axis=sample_axes, keepdims=True)
    group_squares = group_sum(squares)
    variance = per_sample(group_squares / safe_counts)

    if ghost:
        total = batch_sum or (lambda values: values)
        group_sums = total(ops.sum(group_sums, axis=0, keepdims=True))
        group_squares = total(ops.sum(group_squares, axis=0, keepdims=True))
        group_counts = total(ops.sum(group_counts, axis=0, keepdims=True))
        safe_counts = ops.maximum(group_counts, 1)
    batch_mean = group_sums / safe_counts
    batch_variance = group_squares / safe_counts
    return Moments(mean, variance, batch_mean, batch_variance, group_counts)
