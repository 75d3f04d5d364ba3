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

Groups are a layout, not a loop: the input is viewed as `(groups,
group_size, ...)` (a reshape, which copies nothing) and every statistic is
one reduction over that view. When a shard is not a multiple of the group
size, its last, smaller group is a second view, `(shards, rest, ...)`, with
statistics of its own: nothing is padded and nothing masked.

Each layout has a class of its own, and `_layout` picks one per call:
`InputLayout` (the whole batch as it comes), `WholeBatch` (the whole batch
as one group view, on TensorFlow), `EqualGroups`, `RaggedGroups` (two
views, outputs joined), `RowGroups` (two views, their statistics stacked
one row per group and spread to the input's layout inside the gradient, on
JAX) and `SpreadGroups` (two views, statistics spread back to the input's
layout).
"""

import collections

import keras
from keras import ops

Moments = collections.namedtuple(
    "Moments", ["parts", "batch_mean", "batch_variance", "count", "ungroup"]
)
Moments.__doc__ = """Statistics of one training batch.

`parts` holds the statistics each sample is normalized with, as `Part`s:
one for a single group, or one per view of a grouped layout (see
`InputLayout`). `ungroup` takes a tensor per part, shaped like that part's
`inputs`, and returns them as one tensor in the input's layout.

`batch_mean` and `batch_variance` are the averages of the groups' means and
variances over every replica, each weighted by its number of (unmasked)
elements; `count` is that number of elements in all of them. These three
have the input's rank, with size 1 on every axis but the feature axes.
"""

Part = collections.namedtuple(
    "Part",
    [
        "mean",
        "residual",
        "variance",
        "inputs",
        "centered",
        "feature_shape",
        "spread",
    ],
    defaults=(None,),
)
Part.__doc__ = """The statistics of a tensor of groups, in a layout of its own.

The mean is kept as two floats: `mean`, the sum over the count, and
`residual`, the mean of the deviations from it. At a large offset, `mean`
is off by up to half a unit in its last place (5e-4 at 1e4 in float32),
and every output would carry that error; `mean + residual` is the mean to
the input's own precision. `residual` is a constant (see `center`);
`variance` is the mean square deviation from `mean + residual`.

The grouped layout merges each run of adjacent reduced axes, and of
adjacent kept axes, into one axis: `(groups, 32, 16, 16, 64)` reduced over
the axes of size 32 and 16 becomes `(groups, 8192, 64)`. XLA on CPU
reduces a few long axes several times faster than many short ones, in the
forward pass and in the reductions of the backward pass alike (six times
for this one on TensorFlow).

`inputs` is the view of the input the part normalizes, and `centered` is
`inputs` minus `mean`, as a constant `mean` (see `center`); `mean`,
`residual` and `variance` are shaped like it with size 1 on the reduced
axes.
`feature_shape` is the shape that a tensor of the feature axes (a weight)
takes to broadcast with them.

`spread` is `None`, or a `Spread` when the statistics are in a layout of
their own, one row per group, and `inputs` and `centered` in the input's:
the multiplier and offset computed from the statistics are spread to the
input's layout by it (see `RowGroups`).
"""


class Groups:
    """The grouped layout of `(batch, ...)`: axis 0 split into `num_shards`
    equal shards, each split into groups of `group_size` consecutive
    samples, the last group of a shard smaller when it is not a multiple.

    `split` views a tensor as `(num_shards * full_groups, group_size, ...)`
    and, unless the shard is known to be a multiple of `group_size`, as
    `(num_shards, rest, ...)` for the last groups; `merge` undoes it, and
    `spread` gives each sample the statistics of its group.

    A last group of one sample, when a sample has one value per feature
    (`single_values`), joins the group before it: a group of one value has
    variance 0, and would normalize to `beta` whatever its value.

    Args:
        batch: The batch size: a Python int, or a scalar tensor when it is
            only known at run time. A multiple of `num_shards`.
        group_size: Python int.
        num_shards: Python int.
        single_values: Python bool, whether a sample has one value per
            feature.
    """

    def __init__(self, batch, group_size, num_shards, single_values=False):
        self.group_size = group_size
        self.num_shards = num_shards
        shard = batch // num_shards
        self.shard = shard
        full = shard // group_size * group_size
        if single_values:
            if ops.is_tensor(shard):
                alone = ops.cast(
                    ops.logical_and(shard - full == 1, full > 0), full.dtype
                )
                full = full - group_size * alone
            elif shard - full == 1 and full > 0:
                full = full - group_size
        self.full = full
        self.exact = isinstance(shard, int) and shard == self.full

    def split(self, values, merged=True):
        """The views of `values`; `merged` says whether tensors computed
        from them are merged back (and make its whole gradient), rather
        than only reduced to statistics."""
        rest = tuple(values.shape[1:])
        if self.exact:
            return [ops.reshape(values, (-1, self.group_size) + rest)]
        shards = ops.reshape(values, (self.num_shards, -1) + rest)
        full, last = _split(shards, self.full, merged)
        full = ops.reshape(full, (-1, self.group_size) + rest)
        return [full, last]

    def spread(self, statistics):
        """Gives each sample the statistic of its group: the inverse of
        `split` for statistics, which have size 1 on the group axis."""
        full, last = statistics
        rest = tuple(full.shape[2:])
        full = ops.reshape(full, (self.num_shards, -1, 1) + rest)
        full = ops.broadcast_to(
            full,
            (self.num_shards, ops.shape(full)[1], self.group_size) + rest,
        )
        full = ops.reshape(full, (self.num_shards, -1) + rest)
        last = ops.broadcast_to(
            last, (self.num_shards, self.shard - self.full) + rest
        )
        merged = ops.concatenate([full, last], axis=1)
        return ops.reshape(merged, (-1,) + rest)

    def merge(self, parts):
        rest = tuple(parts[0].shape[2:])
        if self.exact:
            return ops.reshape(parts[0], (-1,) + rest)
        full = ops.reshape(parts[0], (self.num_shards, -1) + rest)
        merged = ops.concatenate([full, parts[1]], axis=1)
        return ops.reshape(merged, (-1,) + rest)


def moments(
    x,
    axes,
    mask=None,
    virtual_batch_size=None,
    num_shards=1,
    group_sum=None,
    total_sum=None,
    unbiased=False,
):
    """Mean and variance of `x` over `axes`, per group of samples.

    Args:
        x: Floating tensor; statistics are computed in its dtype.
        axes: Axes to reduce, axis 0 (the batch axis) among them.
        mask: Optional boolean tensor of `x`'s rank that broadcasts to it.
            Positions where it is `False` are left out; a mask that varies
            along the kept axes gives each feature a count of its own.
        virtual_batch_size: Optional Python int. When set, every ghost batch
            of that many consecutive samples of a shard is a group.
        num_shards: Python int, the number of equal consecutive shards axis
            0 is split into (devices, or groups of them); the static batch
            size must be a multiple of it. Without `virtual_batch_size`,
            each shard is a group.
        group_sum: Optional function that sums a tensor over the replicas
            that share a group, which each see their own batch (an
            all-reduce): the sums, counts and squares of the groups go
            through it.
        total_sum: Optional function that turns the totals behind
            `batch_mean`, `batch_variance` and `count` into those of every
            replica.
        unbiased: If `True`, `batch_variance` averages the groups'
            Bessel-corrected variances, `n / (n - 1)` times theirs for a
            group of `n` elements (1 for a group of one); the parts keep the
            biased variance.

    Returns:
        A `Moments` tuple. An empty (fully masked) group has mean and
        variance 0 and a count of 0.
    """
    layout = _layout(x, axes, virtual_batch_size, num_shards)
    masks = [None] * len(layout.views)
    if mask is not None:
        masks = layout.split(_broadcast_mask(mask, x, axes))
    parts, totals = [], []
    for view, view_mask in zip(layout.views, masks, strict=True):
        part, *sums = _group_moments(
            view, layout.axes, view_mask, layout.grouped, group_sum, unbiased
        )
        parts.append(part)
        totals.append([layout.total(value) for value in sums])
    sums, squares, counts = (
        sum(values[1:], values[0]) for values in zip(*totals, strict=True)
    )
    sums, squares, counts = _replica_sum(total_sum, (sums, squares, counts))
    safe_counts = _at_least_one(counts)
    return Moments(
        layout.parts(parts),
        sums / safe_counts,
        squares / safe_counts,
        counts,
        layout.ungroup,
    )


def _broadcast_mask(mask, x, axes):
    """`mask` broadcast to `x`, but for size 1 on the kept axes where it is
    the same for every feature: counts and selections stay that small."""
    kept = [axis for axis in range(len(x.shape)) if axis not in axes]
    per_feature = any(mask.shape[axis] != 1 for axis in kept)

    def target(sizes):
        return [
            1 if axis in kept and not per_feature else size
            for axis, size in enumerate(sizes)
        ]

    # An axis of unknown size in both is the batch axis: the same size.
    if list(mask.shape) == target(x.shape):
        return mask
    return ops.broadcast_to(mask, target(ops.shape(x)))


def _layout(x, axes, virtual_batch_size, num_shards):
    """The layout `moments` reduces `x` in: the groups it asks for, and
    the fastest view of them."""
    batch = x.shape[0]
    if num_shards > 1 and (batch is None or batch % num_shards):
        raise ValueError(
            "The batch size must be a multiple of the number of devices the "
            f"batch is split over. Received: batch size {batch} on "
            f"{num_shards} devices"
        )
    if 0 not in axes:
        # Every sample has statistics of its own already.
        return InputLayout(x, axes)
    shard = None if batch is None else batch // num_shards
    group_size = virtual_batch_size or shard
    if group_size is not None and shard is not None:
        group_size = min(group_size, shard)
        if shard == group_size + 1 and _single_values(x, axes):
            # A last group of one joins the one before (see `Groups`):
            # here, the whole shard.
            group_size = shard
    if group_size is None or (num_shards == 1 and group_size == batch):
        # See `WholeBatch` for why TensorFlow reduces a view of its own.
        if keras.backend.backend() == "tensorflow":
            return WholeBatch(x, axes)
        return InputLayout(x, axes)
    groups = Groups(
        ops.shape(x)[0], group_size, num_shards, _single_values(x, axes)
    )
    if groups.exact:
        return EqualGroups(x, axes, groups)
    if len(axes) > 1:
        return SpreadGroups(x, axes, groups)
    if keras.backend.backend() == "jax":
        # See `RowGroups`; elsewhere, the spread multiplier and offset
        # would be tensors of the input's size that autodiff keeps.
        return RowGroups(x, axes, groups)
    return RaggedGroups(x, axes, groups)


def _single_values(x, axes):
    """Whether a sample of `x` has one value per feature: no reduced axis
    but the batch axis has a size other than 1."""
    return all(x.shape[axis] == 1 for axis in axes if axis != 0)


def single_value_groups(x, axes, virtual_batch_size=None, num_shards=1):
    """Whether every group of `x` (see `moments`) has one value per feature,
    which would give it variance 0: `x`'s samples have one value per
    feature, and each shard holds one sample (a last ghost batch of one
    joins the one before it, see `Groups`). A Python bool, or a scalar
    boolean tensor where the batch size is known only at run time.

    `virtual_batch_size` of 1 is refused on such inputs when the layer is
    built; it can reach here where the layer was built with sizes unknown.
    """
    if 0 not in axes or not _single_values(x, axes):
        return False
    if virtual_batch_size == 1:
        return True
    batch = x.shape[0]
    if batch is None:
        return ops.shape(x)[0] // num_shards == 1
    # A branch, not `bool()`: torch.compile's symbolic sizes then guard on
    # it, where `bool()` can stay symbolic.
    if batch // num_shards == 1:
        return True
    return False


class InputLayout:
    """One group, the whole batch, in the input's own layout: XLA for JAX
    reduces it as fast as any view, and merging its axes makes it
    materialize converted copies of 16-bit inputs. Also the layout when
    the batch axis is kept, each sample a group of its own.

    Every layout has `views` of the input, each reduced over `axes` into
    a `Part`; `grouped` says whether axis 0 of a view indexes its groups.
    `split` views another tensor (a mask) as the input; `total` makes a
    view's sums the sums of the whole batch, in the input's rank; `parts`
    gives the parts the input is normalized with; and `ungroup` takes a
    tensor per part, shaped like its `inputs`, and returns them as one
    tensor in the input's layout.
    """

    grouped = False

    def __init__(self, x, axes):
        self.x = x
        self.axes = list(axes)
        self.statistics_shape = [
            1 if axis in axes else size for axis, size in enumerate(x.shape)
        ]
        self.views = self.split(x)

    def split(self, values):
        return [values]

    def total(self, value):
        return ops.reshape(value, self.statistics_shape)

    def parts(self, parts):
        return parts

    def ungroup(self, outputs):
        return _only(outputs)


class WholeBatch(InputLayout):
    """One group, the whole batch, viewed as `(1, elements, features)`.

    XLA on CPU in TensorFlow reduces that view over axis 1 3.5 times faster
    than the input over all its other axes, or than `(elements, features)`
    over axis 0 (`benchmarks/reductions.py`; see `Part`).
    """

    grouped = True

    def __init__(self, x, axes):
        super().__init__(x, axes)
        self.axes = [1] + [axis + 1 for axis in axes if axis != 0]

    def split(self, values):
        return [ops.expand_dims(values, 0)]

    def total(self, value):
        return super().total(ops.sum(value, axis=0))

    def ungroup(self, outputs):
        return ops.reshape(_only(outputs), ops.shape(self.x))


class EqualGroups(WholeBatch):
    """Groups of equal size (see `Groups`), one view `(groups, size, ...)`:
    a reshape, which copies nothing."""

    def __init__(self, x, axes, groups):
        self.groups = groups
        super().__init__(x, axes)

    def split(self, values):
        return self.groups.split(values)

    def ungroup(self, outputs):
        return self.groups.merge(
            [
                ops.reshape(output, ops.shape(view))
                for output, view in zip(outputs, self.views, strict=True)
            ]
        )


class RaggedGroups(EqualGroups):
    """Groups whose last one in a shard is smaller: the full groups and the
    last ones are two views, each normalized on its own, and their
    outputs joined into one tensor."""


class Spread:
    """Statistics stacked one row per group, `(groups, 1, features)`, the
    groups of each shard in turn, spread to the samples of an input of
    shape `shape` (a view of its rows as `(batch, features)`).

    `__call__` gives each sample its group's row: a broadcast to whole
    groups, the last one cut to size (a slice, which XLA fuses into what
    reads it), and `sums` is its transpose, the sums of a tensor of the
    input's shape over each group. On JAX, `scale_deviations` spreads
    inside its own gradient, so that the backward pass keeps the rows
    rather than spread copies.
    """

    def __init__(self, groups, shape):
        self.groups = groups
        self.shape = shape
        # The full groups and the last one, which can be one sample longer
        # than the others (see `Groups`).
        self.per_shard = groups.full // groups.group_size + 1
        self.longer = groups.shard - groups.full > groups.group_size

    def stack(self, statistics):
        """The rows of the statistics of `Groups.split`'s views."""
        shards, per_shard = self.groups.num_shards, self.per_shard
        rest = tuple(statistics[0].shape[1:])
        rows = [ops.reshape(value, (shards, -1) + rest) for value in statistics]
        rows = ops.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]
        return ops.reshape(rows, (shards * per_shard,) + rest)

    def __call__(self, rows):
        groups = self.groups
        features = tuple(rows.shape[2:])
        rows = ops.reshape(
            rows, (groups.num_shards, self.per_shard, 1) + features
        )
        if self.longer:
            # The last row once more, for the last group's extra sample.
            rows = ops.concatenate([rows, rows[:, -1:]], axis=1)
        spread = ops.broadcast_to(
            rows,
            (groups.num_shards, ops.shape(rows)[1], groups.group_size)
            + features,
        )
        spread = ops.reshape(spread, (groups.num_shards, -1) + features)
        return ops.reshape(spread[:, : groups.shard], self.shape)

    def sums(self, values):
        groups = self.groups
        rows = ops.reshape(values, (groups.num_shards, groups.shard, -1))
        full, last = rows[:, : groups.full], rows[:, groups.full :]
        full = ops.reshape(full, (-1, groups.group_size, ops.shape(full)[-1]))
        return self.stack(
            [
                ops.sum(full, axis=1, keepdims=True),
                ops.sum(last, axis=1, keepdims=True),
            ]
        )


class RowGroups(RaggedGroups):
    """Ragged groups of samples that have one element per feature: the
    statistics of the two views stacked, one row per group
    (`Spread.stack`), and the input normalized in its own layout with its
    group's row spread to each sample (`Spread`).

    Joining two views' outputs would copy the whole output, and keep the
    full view of the input (a copy: XLA on CPU reduces no slice in place)
    for the backward pass; spread statistics as large as the input
    (`SpreadGroups`) would be kept instead.
    """

    def split(self, values):
        return self.groups.split(values, merged=False)

    def parts(self, parts):
        spread = Spread(self.groups, ops.shape(self.x))

        def stack(name):
            rows = []
            for part in parts:
                value = getattr(part, name)
                rows.append(ops.reshape(value, (ops.shape(value)[0], 1, -1)))
            return spread.stack(rows)

        mean = stack("mean")
        features = _product(self.x.shape[1:])
        return [
            Part(
                mean,
                stack("residual"),
                stack("variance"),
                self.x,
                center(self.x, spread(mean)),
                (1, 1, features),
                spread,
            )
        ]

    def ungroup(self, outputs):
        return _only(outputs)


class SpreadGroups(RaggedGroups):
    """Ragged groups of samples that have several elements per feature.

    Joining two views' outputs would copy the whole output; the statistics
    are much smaller than the input, so they are spread to every sample
    instead (`Groups.spread`), and the input normalized in its own layout.
    """

    def split(self, values):
        return self.groups.split(values, merged=False)

    def parts(self, parts):
        def spread(name):
            return self.groups.spread(
                [
                    ops.reshape(getattr(part, name), _kept(view, self.axes))
                    for part, view in zip(parts, self.views, strict=True)
                ]
            )

        mean = spread("mean")
        return [
            Part(
                mean,
                spread("residual"),
                spread("variance"),
                self.x,
                center(self.x, mean),
                self.statistics_shape,
            )
        ]

    def ungroup(self, outputs):
        return _only(outputs)


def _group_moments(x, axes, mask, grouped, group_sum, unbiased=False):
    """The `Part` of `x`, a group per index of axis 0 if `grouped` (axis 0
    is not in `axes` then), else one group, with the sums, squares and
    counts behind it; `group_sum` sums those over replicas. The sums,
    squares and counts are in the part's layout; with `unbiased`, the
    squares returned are Bessel-corrected (see `moments`)."""
    # The grouped layouts get merged axes (see `Part`); `InputLayout` keeps
    # the input's.
    runs = []
    for axis in range(len(x.shape)):
        if grouped and runs and (axis in axes) == (runs[-1][0] in axes):
            runs[-1].append(axis)
        else:
            runs.append([axis])

    def merged(values):
        shape = ops.shape(values)
        return ops.reshape(
            values, [_product([shape[axis] for axis in run]) for run in runs]
        )

    feature_shape = [
        1
        if run[0] in axes or (grouped and run[0] == 0)
        else _product([x.shape[axis] for axis in run])
        for run in runs
    ]
    axes = [index for index, run in enumerate(runs) if run[0] in axes]
    x = merged(x)
    mask = None if mask is None else merged(mask)

    def masked_sum(values):
        if mask is not None:
            values = ops.where(mask, values, 0)
        return ops.sum(values, axis=axes, keepdims=True)

    if mask is None:
        elements = 1
        for axis in axes:
            elements *= ops.shape(x)[axis]
        sums = ops.sum(x, axis=axes, keepdims=True)
        counts = ops.ones_like(sums) * ops.cast(elements, x.dtype)
        sums, counts = _replica_sum(group_sum, (sums, counts))
        safe_counts = _at_least_one(counts)
        mean = sums / safe_counts
    else:
        counts = ops.sum(ops.cast(mask, x.dtype), axes, keepdims=True)
        counts = ops.broadcast_to(counts, _kept(x, axes))
        (counts,) = _replica_sum(group_sum, (counts,))
        safe_counts = _at_least_one(counts)
        # A sum of `x / count` rather than a sum divided by the count: the
        # output of a reduction, which every use reads as it is. XLA on CPU
        # computes `sum * (1 / count)` again in each fused loop that uses
        # it, and contracts `x - sum * (1 / count)` into a fused
        # multiply-add, which does not round the mean: the deviations would
        # be from a mean one unit in its last place away from the one
        # `residual` corrects. (An unmasked count is a constant, and there
        # every use read the same quotient; `sum(x / count)` would make XLA
        # materialize that constant at the input's size.)
        (mean,) = _replica_sum(group_sum, (masked_sum(x / safe_counts),))
        sums = mean * counts
    centered = center(x, mean)
    # One masked copy feeds both sums: XLA then materializes no second
    # tensor of the input's size for them.
    kept = centered if mask is None else ops.where(mask, centered, 0)
    deviations = ops.sum(kept, axis=axes, keepdims=True)
    squares = ops.sum(kept * kept, axis=axes, keepdims=True)
    deviations, squares = _replica_sum(group_sum, (deviations, squares))
    residual = deviations / safe_counts
    # Squares about `mean + residual`; the gradient of `residual` here is
    # the variance's own (its gradient with respect to the mean is zero).
    squares = squares - deviations * residual
    part = Part(
        mean,
        ops.stop_gradient(residual),
        squares / safe_counts,
        x,
        centered,
        feature_shape,
    )
    if unbiased:
        one = ops.ones_like(counts)
        squares = squares * counts / ops.where(counts > 1, counts - 1, one)
    return part, sums, squares, counts


def _split(values, size, merged):
    """`values[:, :size]` and `values[:, size:]`.

    On PyTorch, when the outputs of both are `merged` back into a tensor of
    the input's size, as one `Tensor.split`, whose gradient is one
    concatenation: the gradient of two slices is two zero-filled tensors of
    the input's size, each with its slice copied in, then added. (When
    they only feed statistics, `torch.compile` fuses the slices' gradients,
    and not the concatenation: 1.6 times the memory.)
    """
    if merged and keras.backend.backend() == "torch":
        return values.split([size, values.shape[1] - size], dim=1)
    return values[:, :size], values[:, size:]


def _kept(values, axes):
    """The shape of `values` with size 1 on `axes`."""
    shape = ops.shape(values)
    return [1 if axis in axes else size for axis, size in enumerate(shape)]


def _product(sizes):
    """The product of sizes, Python ints or scalar tensors (`math.prod`
    stops torch.compile's tracing)."""
    product = 1
    for size in sizes:
        product = product * size
    return product


def _only(outputs):
    (output,) = outputs
    return output


def center(x, mean):
    """`x - mean`, through which no gradient reaches `mean`.

    The variance needs no gradient with respect to the mean: the deviations
    from a mean sum to zero, so that gradient is zero, yet computing it costs
    a reduction over the whole input in the backward pass. A normalization
    `center(x, mean) * multiplier + offset` gives the mean its gradient,
    `-multiplier * sum(upstream)`, with `shift_gradient`.
    """
    return x - ops.stop_gradient(mean)


def shift_gradient(offset, mean, multiplier):
    """`offset`, plus a term of value zero that gives `mean` the gradient of
    `(x - mean) * multiplier + offset` with respect to it.

    That gradient goes through tensors of the statistics' shape only: the
    sum of the upstream gradient over the reduced axes, which the gradient
    of `offset` needs anyway, times `-multiplier`.
    """
    zero = (mean - ops.stop_gradient(mean)) * multiplier
    return -zero if offset is None else offset - zero


def offset_of(part, multiplier, offset=None):
    """The offset that makes `part.centered * multiplier + offset_of(...)`
    the normalization of `part` about its exact mean `mean + residual`, for
    `offset`, the offset about the exact mean (`None` for zero).

    The residual goes into the offset, `-residual * multiplier`, a tensor of
    the statistics' shape: at no cost in the input's size, and with no
    cancellation (the residual is much smaller than the deviations). The
    mean gets its gradient through it too (`shift_gradient`).
    """
    correction = part.residual * multiplier
    offset = -correction if offset is None else offset - correction
    return shift_gradient(offset, part.mean, multiplier)


def scale_deviations(part, multiplier, offset=None):
    """`part.centered * multiplier`, with a backward pass that computes the
    deviations of `part.inputs` from `part.mean` again; plus `offset` when
    given.

    XLA keeps a tensor that the forward pass makes and the backward pass
    reads for as long as between the two: the deviations, which the
    multiplier's gradient `sum(upstream * centered)` reads, would be one
    more tensor of the input's size per batch normalization, kept through
    the whole backward pass (1.4 times the memory of Keras's layer on
    whole networks, on JAX). Computed again from `inputs` (which the
    network keeps anyway) inside that reduction, they are never stored.

    With statistics spread to the input's layout (`part.spread`), the
    mean, multiplier and offset are spread inside, and their gradients
    summed over each group there: the backward pass keeps their rows, not
    tensors of the input's size.
    """
    spread = part.spread
    if spread is None:
        reduced = [
            axis for axis, size in enumerate(multiplier.shape) if size == 1
        ]

        def spread(values):
            return values

        def sums(values):
            return ops.sum(values, axis=reduced, keepdims=True)

    else:
        sums = spread.sums

    @ops.custom_gradient
    def affine(inputs, mean, multiplier, offset):
        def gradients(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # The same mean, plus a zero computed from `upstream`: a value
            # XLA cannot merge with the forward pass's mean (it would then
            # reuse, and keep, the forward pass's deviations) nor compute
            # before the backward pass.
            total = sums(upstream)
            shift = spread(mean + 0.0 * total)
            return (
                upstream * spread(multiplier),
                ops.zeros_like(mean),
                sums(upstream * (inputs - shift)),
                total,
            )

        return (inputs - spread(mean)) * spread(multiplier) + spread(
            offset
        ), gradients

    if offset is None or part.spread is None:
        product = affine(
            part.inputs,
            ops.stop_gradient(part.mean),
            multiplier,
            ops.zeros_like(multiplier),
        )
        return product if offset is None else product + offset
    return affine(part.inputs, ops.stop_gradient(part.mean), multiplier, offset)


def _at_least_one(counts):
    """`max(counts, 1)` for counts of elements, in their dtype (the torch
    backend's `ops.maximum` returns float32 for float64 tensors)."""
    return counts + ops.cast(counts < 1, counts.dtype)


def _replica_sum(replica_sum, values):
    """Sums same-shaped tensors over replicas with `replica_sum`, one
    all-reduce instead of one per tensor; without it, returns them as they
    are."""
    if replica_sum is None:
        return values
    return ops.unstack(replica_sum(ops.stack(values)), len(values))
