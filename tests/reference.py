"""A float64 NumPy reference for batch normalization with ghost batches.

Written from the definitions, one ghost batch at a time, and independently of
the package's vectorized code.
"""

import numpy as np


def _feature_axes(axis, ndim):
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % ndim for a in axes)


def _param(value, x, features, fill):
    """A parameter of the feature axes' shape, shaped to broadcast with x."""
    shape = [x.shape[a] if a in features else 1 for a in range(x.ndim)]
    if value is None:
        return np.full(shape, fill)
    value = np.asarray(value, np.float64)
    return np.broadcast_to(value, [x.shape[a] for a in features]).reshape(shape)


def _layout(x, axis, mask):
    """x in float64, its feature and reduced axes, and the mask (all True
    when None) broadcast to x. A mask of one axis less than x has a last
    axis of size 1, as in Keras."""
    x = np.asarray(x, np.float64)
    features = _feature_axes(axis, x.ndim)
    reduce = tuple(a for a in range(x.ndim) if a not in features)
    if mask is None:
        mask = np.ones(x.shape, bool)
    mask = np.asarray(mask, bool)
    if mask.ndim == x.ndim - 1:
        mask = mask[..., None]
    mask = np.broadcast_to(mask, x.shape)
    return x, features, reduce, mask


def one_value_per_feature(shape, axis):
    """Whether a sample of `shape` has one value per feature (every reduced
    axis but the batch axis of size 1), the batch axis being reduced."""
    features = _feature_axes(axis, len(shape))
    return 0 not in features and all(
        shape[a] == 1 for a in range(1, len(shape)) if a not in features
    )


def single_value_batch(shape, axis, virtual_batch_size=None):
    """Whether a training batch of `shape` has one value per feature in
    each of its groups: one sample of one value per feature. The layer then
    normalizes with the moving statistics and leaves them as they are."""
    return one_value_per_feature(shape, axis) and (
        shape[0] == 1 or virtual_batch_size == 1
    )


def _groups(shape, axis, virtual_batch_size):
    """The rows of each group of a batch: ghost batches of
    `virtual_batch_size` consecutive samples, a last one of one sample of
    one value per feature joined to the one before it."""
    batch = shape[0]
    size = virtual_batch_size or batch
    starts = list(range(0, batch, size))
    if (
        len(starts) > 1
        and batch - starts[-1] == 1
        and one_value_per_feature(shape, axis)
    ):
        starts.pop()
    ends = starts[1:] + [batch]
    return [slice(start, end) for start, end in zip(starts, ends, strict=True)]


def _group_moments(x, mask, reduce):
    """Two-pass mean and variance of x over `reduce`, counting only the
    positions where mask (of x's shape) is True."""
    mean, variance, count, _ = _group_deviations(x, mask, reduce)
    return mean, variance, count


def _group_deviations(x, mask, reduce):
    """`_group_moments`, and `x` minus the mean. The mean is the float64
    sum over the count, corrected by the mean deviation from it, and the
    deviations are from both: at an offset of 1e8, float64 rounds the mean
    by up to 7e-9, which a reference for float64 layers cannot carry."""
    weights = np.broadcast_to(mask, x.shape).astype(np.float64)
    count = weights.sum(axis=reduce, keepdims=True)
    safe = np.maximum(count, 1.0)

    def masked_mean(values):
        return (
            np.where(weights > 0, values, 0.0).sum(reduce, keepdims=True) / safe
        )

    mean = masked_mean(x)
    residual = masked_mean(x - mean)
    centered = (x - mean) - residual
    variance = masked_mean(centered**2)
    return mean + residual, variance, count, centered


def batch_norm(
    x,
    axis=-1,
    mask=None,
    virtual_batch_size=None,
    gamma=None,
    beta=None,
    epsilon=1e-3,
    renorm=None,
):
    """Training-mode batch norm in float64.

    Args:
        x: Input array.
        axis: Feature axis or axes.
        mask: Boolean array that broadcasts to x: of x's rank, or of one
            axis less (then read with a last axis of size 1, as in Keras).
        virtual_batch_size: Ghost batch size; None for the whole batch. A
            last ghost batch of one value per feature joins the one before.
        gamma, beta: Parameters of the feature axes' shape.
        epsilon: Variance epsilon.
        renorm: Optional dict with `mean`, `stddev` (the renorm moving
            statistics before the step) and optional `rmin`, `rmax`, `dmax`.
            With `corrections`, a list of `(r, d)` per ghost batch as
            returned by an earlier call, those are used instead: the layer
            treats them as constants for the gradient.

    Returns:
        A dict with `outputs`; `output_terms`, the sum of the absolute values
        of the terms of each output (the scale that bounds its rounding
        errors); the renorm `corrections`; and the
        count-weighted averages over ghost batches `mean`, `variance`,
        `unbiased_variance` (of the Bessel-corrected variances) and
        `count`, of the feature axes' shape.
    """
    x, features, reduce, mask = _layout(x, axis, mask)
    gamma = _param(gamma, x, features, 1.0)
    beta = _param(beta, x, features, 0.0)
    outputs = np.empty_like(x)
    terms = np.empty_like(x)
    corrections = []
    total_mean = 0.0
    total_variance = 0.0
    total_unbiased = 0.0
    total_count = 0.0
    for rows in _groups(x.shape, axis, virtual_batch_size):
        mean, variance, count, centered = _group_deviations(
            x[rows], mask[rows], reduce
        )
        stddev = np.sqrt(variance + epsilon)
        normalized = centered / stddev
        # The mean's rounding scales with its terms, the |x| of its group.
        mean_terms, _, _ = _group_moments(np.abs(x[rows]), mask[rows], reduce)
        d_terms = 0.0
        if renorm is not None:
            moving_stddev = np.maximum(
                _param(renorm["stddev"], x, features, 1.0), np.sqrt(epsilon)
            )
            r = stddev / moving_stddev
            d = (mean - _param(renorm["mean"], x, features, 0.0)) / (
                moving_stddev
            )
            # d carries the mean's rounding, whatever its own size.
            d_terms = (
                mean_terms + np.abs(_param(renorm["mean"], x, features, 0.0))
            ) / moving_stddev
            r = np.clip(r, renorm.get("rmin"), renorm.get("rmax"))
            dmax = renorm.get("dmax")
            if dmax is not None:
                d = np.clip(d, -dmax, dmax)
            if "corrections" in renorm:
                r, d = renorm["corrections"][len(corrections)]
            corrections.append((r, d))
            normalized = normalized * r + d
        else:
            r, d = 1.0, 0.0
        outputs[rows] = normalized * gamma + beta
        terms[rows] = (
            np.abs(gamma * r / stddev) * (np.abs(x[rows]) + mean_terms)
            + np.abs(gamma) * np.maximum(np.abs(d), d_terms)
            + np.abs(beta)
        )
        total_mean = total_mean + mean * count
        total_variance = total_variance + variance * count
        # Bessel's correction: n / (n - 1), none for a group of one.
        total_unbiased = total_unbiased + variance * count * count / np.where(
            count > 1, count - 1, 1
        )
        total_count = total_count + count

    safe = np.maximum(total_count, 1.0)
    param_shape = [x.shape[a] for a in features]
    shape = np.shape(total_mean)
    return {
        "outputs": outputs,
        "output_terms": terms,
        "corrections": corrections,
        "mean": (total_mean / safe).reshape(param_shape),
        "variance": (total_variance / safe).reshape(param_shape),
        "unbiased_variance": (total_unbiased / safe).reshape(param_shape),
        "count": np.broadcast_to(total_count, shape).reshape(param_shape),
    }


def batch_norm_gradients(
    x,
    upstream,
    axis=-1,
    mask=None,
    virtual_batch_size=None,
    gamma=None,
    epsilon=1e-3,
    corrections=None,
):
    """Analytic gradients of `sum(batch_norm(x) * upstream)`, in float64.

    Per ghost batch `G` with `n` unmasked elements per feature,
    `y = gamma * (r * xhat + d) + beta` with `xhat = (x - mean) * inv`,
    `inv = 1 / sqrt(variance + epsilon)`, and `r`, `d` constants (renorm's
    `corrections`, else 1 and 0). Every output of `G`, masked or not,
    depends on its statistics; only unmasked inputs enter them, so with
    `w` = 1 on unmasked positions and 0 elsewhere:

        dx = gamma * r * inv * (dy - w * (S(dy) + xhat * S(dy * xhat)) / n)
        dgamma = sum dy * (r * xhat + d),  dbeta = sum dy

    where `S` sums over `G` and the reduced axes.

    Returns:
        A dict with the gradients `x`, `gamma` and `beta` (the last two of
        the feature axes' shape), and for each, under `x_terms`,
        `gamma_terms` and `beta_terms`, the same sums taken over the
        absolute values of their terms: the scale that bounds their
        rounding errors.
    """
    x, features, reduce, mask = _layout(x, axis, mask)
    upstream = np.asarray(upstream, np.float64)
    gamma = _param(gamma, x, features, 1.0)

    def total(values):
        return values.sum(axis=reduce, keepdims=True)

    gradients = {"x": np.empty_like(x), "x_terms": np.empty_like(x)}
    for name in ("gamma", "gamma_terms", "beta", "beta_terms"):
        gradients[name] = 0.0
    groups = _groups(x.shape, axis, virtual_batch_size)
    for group, rows in enumerate(groups):
        mean, variance, count, centered = _group_deviations(
            x[rows], mask[rows], reduce
        )
        inv = 1.0 / np.sqrt(variance + epsilon)
        xhat = centered * inv
        r, d = (1.0, 0.0) if corrections is None else corrections[group]
        dy = upstream[rows]
        weights = np.broadcast_to(mask[rows], dy.shape) / np.maximum(count, 1)
        factor = gamma * r * inv
        gradients["x"][rows] = factor * (
            dy - weights * (total(dy) + xhat * total(dy * xhat))
        )
        # The rounding of x - mean is what the terms must carry.
        mean_terms, _, _ = _group_moments(np.abs(x[rows]), mask[rows], reduce)
        xhat_terms = (np.abs(x[rows]) + mean_terms) * inv
        gradients["x_terms"][rows] = np.abs(factor) * (
            np.abs(dy)
            + weights
            * (total(abs(dy)) + xhat_terms * total(abs(dy) * xhat_terms))
        )
        gradients["gamma"] += total(dy * (r * xhat + d))
        gradients["gamma_terms"] += total(
            np.abs(dy) * (np.abs(r) * xhat_terms + np.abs(d))
        )
        gradients["beta"] += total(dy)
        gradients["beta_terms"] += total(np.abs(dy))
    param_shape = [x.shape[a] for a in features]
    for name in ("gamma", "gamma_terms", "beta", "beta_terms"):
        gradients[name] = gradients[name].reshape(param_shape)
    return gradients


def segments_step(x, upstream, mask, segments, gamma, beta, momentum):
    """One training step of a layer whose statistics are those of each of
    `segments` (slices of the batch: replicas, or groups of them), from
    moving statistics 0 and 1, axis -1: the outputs, the gradients of
    `sum(outputs * upstream)` with respect to `x`, `gamma` and `beta`, and
    the moving statistics, which average the segments' statistics weighted
    by their counts."""
    expected = {
        "outputs": np.zeros(x.shape),
        "x": np.zeros(x.shape),
        "gamma": 0.0,
        "beta": 0.0,
    }
    counts, means, variances = [], [], []
    for rows in segments:
        statistics = batch_norm(
            x[rows], mask=mask[rows], gamma=gamma, beta=beta
        )
        gradients = batch_norm_gradients(
            x[rows], upstream[rows], mask=mask[rows], gamma=gamma
        )
        expected["outputs"][rows] = statistics["outputs"]
        expected["x"][rows] = gradients["x"]
        expected["gamma"] = expected["gamma"] + gradients["gamma"]
        expected["beta"] = expected["beta"] + gradients["beta"]
        counts.append(statistics["count"])
        means.append(statistics["mean"])
        variances.append(statistics["variance"])
    total = np.sum(counts, axis=0)
    for name, values, initial in (
        ("moving_mean", means, 0.0),
        ("moving_variance", variances, 1.0),
    ):
        batch = np.sum(np.multiply(counts, values), axis=0) / total
        expected[name] = moving_average(initial, batch, momentum)
    return expected


def inference(x, mean, variance, axis=-1, gamma=None, beta=None, epsilon=1e-3):
    """Inference-mode batch norm with given statistics, in float64."""
    x = np.asarray(x, np.float64)
    features = _feature_axes(axis, x.ndim)
    mean = _param(mean, x, features, 0.0)
    variance = _param(variance, x, features, 1.0)
    gamma = _param(gamma, x, features, 1.0)
    beta = _param(beta, x, features, 0.0)
    return (x - mean) / np.sqrt(variance + epsilon) * gamma + beta


def moving_average(moving, value, momentum):
    return np.asarray(moving) * momentum + np.asarray(value) * (1 - momentum)


def moving_update(moving, value, momentum, kind="ema", weight=0.0):
    """One update of a moving statistic by its recursion; returns it and
    the total weight of the batches in it. `kind` is the layer's
    `moving_average` (see `averaged`)."""
    moving = np.asarray(moving, np.float64)
    value = np.asarray(value, np.float64)
    if kind == "ema":
        return moving_average(moving, value, momentum), weight
    if kind == "debiased":
        old, new = momentum * weight, 1.0 - momentum
    else:
        old, new = weight, 1.0
    total = old + new
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, (old * moving + new * value) / safe, moving), (
        total
    )


def averaged(batches, momentum, moving_average, initial):
    """The moving statistic after updates with the statistics `batches`,
    one after another, from `initial`, by its definition rather than by
    the layer's recursion: `"ema"` weights the initial value `m^t` and
    batch `i` of `t` `(1 - m) m^(t - i)`; `"debiased"` weights only the
    batches so, normalized to sum to 1; `"cumulative"` weights each batch
    alike. `momentum` is a float, or one per update."""
    batches = [np.asarray(batch, np.float64) for batch in batches]
    steps = len(batches)
    momenta = np.broadcast_to(np.asarray(momentum, np.float64), (steps,))
    if moving_average == "cumulative":
        return np.mean(batches, axis=0)
    # The weight of batch i: (1 - m_i) times the momenta of the updates
    # after it.
    weights = [
        (1.0 - momenta[i]) * np.prod(momenta[i + 1 :]) for i in range(steps)
    ]
    total = sum(w * b for w, b in zip(weights, batches, strict=True))
    if moving_average == "debiased":
        return total / sum(weights)
    return np.prod(momenta) * np.asarray(initial, np.float64) + total


def numerical_gradient(fn, x, delta=1e-6):
    """Central finite differences of the scalar function fn at x (float64)."""
    x = np.array(x, np.float64)
    gradient = np.empty_like(x)
    for index in np.ndindex(*x.shape):
        saved = x[index]
        x[index] = saved + delta
        plus = fn(x)
        x[index] = saved - delta
        minus = fn(x)
        x[index] = saved
        gradient[index] = (plus - minus) / (2 * delta)
    return gradient
