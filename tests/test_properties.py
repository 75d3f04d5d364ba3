"""Randomized equivalence with the float64 reference, over the whole
parameter space of `keras_bn.BatchNormalization`.

Hypothesis draws a configuration (rank 2 to 5, `axis` as any valid int or a
list, ghost batches of 1 to batch + 3, batches of 1 to 70, groups of one
sample, masks with empty rows and empty ghost batches, `center`/`scale`,
momentum, epsilon, renorm with and without clipping, momenta and clipping
set after the first step, float32, float64 and the mixed and 16-bit
policies, inputs of scale 1e-3 to 1e4 with offsets up to 1e4) and checks
it against
`tests/reference.py`: training outputs and moving statistics over several
steps, inference outputs, gradients, and `.keras` round-trips.

Profiles (`tests/conftest.py`): `ci`, the default, runs a fixed, bounded
number of examples deterministically; `--hypothesis-profile=thorough` runs
many more with fresh randomness.
"""

import contextlib
import os
import tempfile

import keras
import numpy as np
from hypothesis import assume
from hypothesis import example
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import keras_bn
from tests import reference
from tests.backend import float64_enabled
from tests.backend import to_numpy
from tests.backend import value_and_gradients

BACKEND = keras.backend.backend()

# Tolerances, all in one place. A computed value may be off by `FACTOR`
# roundings (`UNIT`, the relative spacing of floats near 1, of the dtype it
# is computed in, plus one rounding of a 16-bit output) of the sum of the
# absolute values of its terms, which the reference returns with each value:
# `x - mean` on an input far from its mean carries the rounding of `x`, and
# that is what no float32 computation can avoid. Moving statistics, in the
# inputs' units, are compared relative to `offset + scale` of the inputs
# (`condition` = 1 + offset / scale); float32 inputs beyond a condition of
# 1e4 keep too few significant digits of their deviations to compare and are
# not drawn. On a GPU, where reductions run in another order, the same
# bounds hold; the suite disables TF32 (see conftest.py).
UNIT = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}
FACTOR = 64
MAX_CONDITION = 1e4
# float16 values below its smallest normal number are spaced 2**-24 apart.
FLOOR = {"float16": 2.0**-24}

MOVING_AVERAGES = ("ema", "debiased", "cumulative")
TRAINING_STATISTICS = ("batch", "batch", "batch", "moving")
POLICIES = {
    # policy: (input and output dtype, dtype the statistics are computed in)
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "mixed_float16": ("float16", "float32"),
    "mixed_bfloat16": ("bfloat16", "float32"),
    # Full 16-bit policies: gamma and beta in 16 bits too, the statistics
    # still in float32.
    "float16": ("float16", "float32"),
    "bfloat16": ("bfloat16", "float32"),
}


def tolerance(policy, condition=1.0, output=True):
    """The relative error allowed to a value of `policy`, relative to the
    sum of the absolute values of its terms."""
    io_dtype, compute_dtype = POLICIES[policy]
    tol = FACTOR * UNIT[compute_dtype] * condition
    if output:
        tol += 2 * UNIT[io_dtype]
    return tol


CLIPPINGS = st.fixed_dictionaries(
    {},
    optional={
        "rmin": st.floats(0.1, 1.0),
        "rmax": st.floats(1.0, 3.0),
        "dmax": st.floats(0.0, 2.0),
    },
)


@st.composite
def configurations(draw):
    """A layer configuration, the inputs' shape, offset and scale, a mask
    kind, and a seed for the arrays."""
    rank = draw(st.integers(2, 5))
    batch = draw(st.integers(1, 70))
    shape = (batch,) + tuple(draw(st.integers(1, 4)) for _ in range(rank - 1))
    virtual = draw(st.none() | st.integers(1, batch + 3))
    # Ghost batches split axis 0, which then cannot be a feature axis. The
    # last axis comes first: hypothesis simplifies towards it.
    positions = list(range(rank - 1, 0 if virtual else -1, -1))
    if draw(st.booleans()):
        axes = [draw(st.sampled_from(positions))]
        axis = draw(st.sampled_from([axes[0], axes[0] - rank]))
    else:
        axes = sorted(
            draw(
                st.lists(
                    st.sampled_from(positions),
                    min_size=1,
                    max_size=rank - 1,
                    unique=True,
                )
            )
        )
        axis = [draw(st.sampled_from([a, a - rank])) for a in axes]
    assume(len(axes) < rank)
    if virtual == 1 and reference.one_value_per_feature(shape, axes):
        # Refused by the layer (tested elsewhere): ghost batches of one
        # value have variance 0.
        virtual = 2
    kwargs = {
        "axis": axis,
        "virtual_batch_size": virtual,
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "momentum": draw(st.floats(0.0, 1.0)),
        "epsilon": 10.0 ** draw(st.floats(-6.0, -1.0)),
        "moving_average": draw(st.sampled_from(MOVING_AVERAGES)),
        "bessel_correction": draw(st.booleans()),
        # Mostly the batch's: the moving ones leave the rest undrawn.
        "training_statistics": draw(st.sampled_from(TRAINING_STATISTICS)),
    }
    if draw(st.booleans()):
        kwargs.update(
            renorm=True,
            renorm_clipping=draw(CLIPPINGS) or None,
            renorm_momentum=draw(st.floats(0.0, 1.0)),
        )
    # Settings set on the layer after its first step, which the next steps
    # read as a compiled step would (see `_settings`).
    later = {}
    if draw(st.booleans()):
        later["momentum"] = draw(st.floats(0.0, 1.0))
        if kwargs.get("renorm"):
            later["renorm_momentum"] = draw(st.floats(0.0, 1.0))
            later["renorm_clipping"] = draw(CLIPPINGS) or None
    policy = draw(st.sampled_from(list(POLICIES)))
    scale = 10.0 ** draw(st.floats(-3.0, 4.0))
    offset = draw(st.sampled_from([0.0, 1.0, -1.0])) * 10.0 ** draw(
        st.floats(-3.0, 4.0)
    )
    condition = 1.0 + abs(offset) / scale
    assume(policy == "float64" or condition <= MAX_CONDITION)
    if POLICIES[policy][0] == "float16":
        assume(abs(offset) + 6.0 * scale < 6e4)
    # Masks of every form the layer reads (see `_mask`).
    mask_kinds = ["none", "random", "per_feature", "keras"]
    if 0 not in axes:
        mask_kinds.append("empty_rows")
    if virtual is not None and virtual < batch:
        mask_kinds.append("empty_ghost_batch")
    return {
        "kwargs": kwargs,
        "shape": shape,
        "axes": axes,
        "policy": policy,
        "scale": scale,
        "offset": offset,
        "condition": condition,
        "mask": draw(st.sampled_from(mask_kinds)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "later": later,
    }


def _mask(config, rng):
    """A mask of the configuration's kind: `random`, of the input's rank
    with size 1 on the feature axes (the same for every feature), with
    empty rows or an empty ghost batch in `empty_rows` and
    `empty_ghost_batch`; `per_feature`, of the input's shape; `keras`,
    Keras's form, without the last axis."""
    kind = config["mask"]
    if kind == "none":
        return None
    shape = config["shape"]
    if kind == "per_feature":
        mask_shape = shape
    elif kind == "keras":
        mask_shape = shape[:-1]
    else:
        mask_shape = [
            1 if axis in config["axes"] else size
            for axis, size in enumerate(shape)
        ]
    mask = rng.random(mask_shape) > rng.uniform(0.1, 0.7)
    if kind == "empty_rows":
        mask[rng.random(shape[0]) < 0.3] = False
    elif kind == "empty_ghost_batch":
        virtual = config["kwargs"]["virtual_batch_size"]
        start = virtual * rng.integers(0, -(-shape[0] // virtual))
        mask[start : start + virtual] = False
    return mask


def _inputs(config, rng):
    """Inputs in the layer's dtype, and the same values in float64."""
    dtype = POLICIES[config["policy"]][0]
    x = config["offset"] + config["scale"] * rng.normal(size=config["shape"])
    if dtype != "float64":
        x = x.astype("float32")
    x = ops.cast(ops.convert_to_tensor(x), dtype)
    return x, _float64(x)


def _float64(tensor):
    """A tensor's values in float64, from any float dtype and backend."""
    if keras.backend.standardize_dtype(tensor.dtype) != "float64":
        tensor = ops.cast(tensor, "float32")
    return to_numpy(tensor).astype(np.float64)


def _dtype_available(policy):
    """A context in which the backend computes in `policy`'s dtype."""
    if policy == "float64":
        return float64_enabled()
    return contextlib.nullcontext()


def _layer(config, rng):
    layer = keras_bn.BatchNormalization(
        dtype=config["policy"], **config["kwargs"]
    )
    layer.build(config["shape"])
    if layer.scale:
        gamma = rng.uniform(0.5, 2.0, layer.gamma.shape)
        gamma *= rng.choice([-1.0, 1.0], layer.gamma.shape)
        layer.gamma.assign(gamma.astype(layer.gamma.dtype))
    if layer.center:
        beta = rng.normal(size=layer.beta.shape)
        layer.beta.assign(beta.astype(layer.beta.dtype))
    gamma = to_numpy(layer.gamma) if layer.scale else None
    beta = to_numpy(layer.beta) if layer.center else None
    return layer, gamma, beta


def _assert_close(
    actual, expected, tol, what, terms=1.0, floor=0.0, finite_only=False
):
    """`|actual - expected| <= tol * (terms + |expected|) + floor`
    elementwise."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    terms = np.broadcast_to(terms, expected.shape)
    bound = tol * (terms + np.abs(expected)) + floor
    if finite_only:
        # A 16-bit value overflows where the float64 one is beyond its
        # range: an output where an empty ghost batch divides by
        # sqrt(epsilon), a gradient where a group has a tiny variance.
        keep = np.abs(expected) < 0.5 * np.finfo(np.float16).max
        actual, expected, bound = actual[keep], expected[keep], bound[keep]
    if expected.size == 0:
        return
    error = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (
        f"{what}: {np.sum(error > bound)} of {error.size} values off; worst "
        f"at {worst}: {actual[worst]!r} against {expected[worst]!r}, "
        f"allowed {bound[worst]:.3g}"
    )


class _Moving:
    """The moving statistics as the reference sees them, step by step."""

    def __init__(self, layer):
        self.layer = layer
        self.mean = to_numpy(layer.moving_mean).astype(np.float64)
        self.variance = to_numpy(layer.moving_variance).astype(np.float64)
        self.weight = np.zeros_like(self.mean)
        if layer.renorm:
            self.stddev = to_numpy(layer.moving_stddev).astype(np.float64)
            self.renorm_mean = to_numpy(layer.renorm_mean).astype(np.float64)
            self.renorm_stddev = to_numpy(layer.renorm_stddev).astype(
                np.float64
            )

    def renorm_argument(self):
        if not self.layer.renorm:
            return None
        return {
            "mean": self.renorm_mean,
            "stddev": self.renorm_stddev,
            **(self.layer.renorm_clipping or {}),
        }

    def update(self, expected):
        """One training step with the reference's statistics; channels
        without data keep theirs, and frozen statistics stay."""
        layer = self.layer
        if layer.training_statistics == "moving":
            return
        keep = expected["count"] == 0
        key = "unbiased_variance" if layer.bessel_correction else "variance"
        _, total = reference.moving_update(
            0.0, 0.0, layer.momentum, layer.moving_average, self.weight
        )

        def average(old, new, momentum=None):
            if momentum is None:
                value, _ = reference.moving_update(
                    old, new, layer.momentum, layer.moving_average, self.weight
                )
            else:
                value = reference.moving_average(old, new, momentum)
            return np.where(keep, old, value)

        if not layer.renorm:
            self.mean = average(self.mean, expected["mean"])
            self.variance = average(self.variance, expected[key])
        else:
            self._update_renorm(expected[key], expected["mean"], keep, average)
        self.weight = np.where(keep, self.weight, total)

    def _update_renorm(self, variance, mean, keep, average):
        layer = self.layer
        stddev = np.sqrt(variance + layer.epsilon)
        momentum = layer.renorm_momentum
        self.renorm_mean = average(self.renorm_mean, mean, momentum)
        self.renorm_stddev = average(self.renorm_stddev, stddev, momentum)
        self.mean = average(self.mean, mean)
        self.stddev = average(self.stddev, stddev)
        self.variance = np.where(
            keep,
            self.variance,
            np.maximum(self.stddev**2 - layer.epsilon, 0.0),
        )


def _reference_step(config, layer, x, mask, gamma, beta, moving):
    return reference.batch_norm(
        x,
        axis=config["kwargs"]["axis"],
        mask=mask,
        virtual_batch_size=config["kwargs"]["virtual_batch_size"],
        gamma=gamma,
        beta=beta,
        epsilon=layer.epsilon,
        renorm=moving.renorm_argument(),
    )


def _inference(config, layer, x64, moving, gamma, beta):
    """The reference's inference outputs, and the scale of their terms."""
    expected = reference.inference(
        x64,
        moving.mean,
        moving.variance,
        axis=config["kwargs"]["axis"],
        gamma=gamma,
        beta=beta,
        epsilon=layer.epsilon,
    )
    # The same formula over absolute values gives the terms' scale; the
    # moving mean carries the rounding of the mean |x| it averaged.
    terms = reference.inference(
        np.abs(x64),
        -(np.abs(moving.mean) + abs(config["offset"]) + config["scale"]),
        moving.variance,
        axis=config["kwargs"]["axis"],
        gamma=None if gamma is None else np.abs(gamma),
        beta=None if beta is None else np.abs(beta),
        epsilon=layer.epsilon,
    )
    return expected, terms


def _train_and_check(config, steps=3):
    """Trains `steps` steps, checking outputs and moving statistics against
    the reference at each, then inference; returns the layer."""
    rng = np.random.default_rng(config["seed"])
    policy = config["policy"]
    condition = config["condition"]
    scale = config["scale"]
    layer, gamma, beta = _layer(config, rng)
    moving = _Moving(layer)
    output_tol = tolerance(policy)
    stats_tol = tolerance(policy, condition, output=False)
    for step in range(steps):
        x, x64 = _inputs(config, rng)
        mask = _mask(config, rng)
        expected = _reference_step(
            config, layer, x64, mask, gamma, beta, moving
        )
        single = reference.single_value_batch(
            config["shape"], config["axes"], layer.virtual_batch_size
        )
        if layer.training_statistics == "moving" or single:
            # Training normalizes as inference does.
            expected["outputs"], expected["output_terms"] = _inference(
                config, layer, x64, moving, gamma, beta
            )
        if single:
            # And the moving statistics stay.
            expected["count"] = np.zeros_like(expected["count"])
        outputs = layer(x, training=True, mask=mask)
        assert (
            keras.backend.standardize_dtype(outputs.dtype)
            == (POLICIES[policy][0])
        )
        _assert_close(
            _float64(outputs),
            expected["outputs"],
            output_tol,
            f"training outputs, step {step}",
            terms=expected["output_terms"],
            floor=FLOOR.get(POLICIES[policy][0], 0.0),
            finite_only=POLICIES[policy][0] == "float16",
        )
        moving.update(expected)
        # The mean is in the inputs' units; the variance in their square.
        _assert_close(
            to_numpy(layer.moving_mean) / scale,
            moving.mean / scale,
            stats_tol,
            f"moving_mean, step {step}",
        )
        _assert_close(
            to_numpy(layer.moving_variance) / (scale**2 + layer.epsilon),
            moving.variance / (scale**2 + layer.epsilon),
            stats_tol,
            f"moving_variance, step {step}",
        )
        if step == 0:
            for name, value in config["later"].items():
                setattr(layer, name, value)
    x, x64 = _inputs(config, rng)
    expected, terms = _inference(config, layer, x64, moving, gamma, beta)
    _assert_close(
        _float64(layer(x)),
        expected,
        output_tol,
        "inference outputs",
        terms=terms,
        floor=FLOOR.get(POLICIES[policy][0], 0.0),
        finite_only=POLICIES[policy][0] == "float16",
    )
    return layer


def _config(
    shape,
    axes,
    policy="float32",
    mask="none",
    offset=0.0,
    input_scale=1.0,
    **kwargs,
):
    """An explicit configuration, for the cases the search once found."""
    kwargs = {
        "axis": axes,
        "virtual_batch_size": None,
        "center": True,
        "scale": True,
        "momentum": 0.0,
        "epsilon": 0.1,
        **kwargs,
    }
    return {
        "kwargs": kwargs,
        "shape": shape,
        "axes": axes,
        "policy": policy,
        "scale": input_scale,
        "offset": offset,
        "condition": 1.0 + abs(offset) / input_scale,
        "mask": mask,
        "seed": 0,
        "later": {},
    }


# Found by the search: float64 renorm corrections rounded to float32 on
# torch; ghost batches of one sample with two elements (nearly equal
# values); a feature near its mean among features far from theirs.
@example(_config((1, 1), [0], "float64", renorm=True, renorm_momentum=0.0))
@example(
    _config((45, 1, 2, 2), [3], virtual_batch_size=1, epsilon=1e-5, offset=1)
)
@example(_config((49, 3, 3, 4), [1, 2, 3], center=False))
# Groups of one value per feature: a batch of one sample, and a last ghost
# batch of one sample, which joins the one before it.
@example(_config((1, 1, 3), [2], momentum=0.5, offset=3.0))
@example(_config((9, 3), [1], virtual_batch_size=4, momentum=0.5))
@given(configurations())
def test_training_inference_and_saving_match_reference(config):
    """Training and inference match the reference, and the trained layer,
    saved in a model and loaded, predicts exactly the same."""
    with _dtype_available(config["policy"]):
        layer = _train_and_check(config)
        _check_round_trip(layer, config)


# Found by the search: float16 gradients below float16's smallest normal.
@example(
    _config(
        (22, 4, 3),
        [2],
        "mixed_float16",
        "random",
        input_scale=1000.0,
        center=False,
        scale=False,
    )
)
@given(configurations())
def test_gradients_match_reference(config):
    # Frozen statistics have the gradients of inference, tested elsewhere.
    assume(config["kwargs"].get("training_statistics", "batch") == "batch")
    # A batch of one value per feature too (see `_train_and_check`).
    assume(
        not reference.single_value_batch(
            config["shape"],
            config["axes"],
            config["kwargs"]["virtual_batch_size"],
        )
    )
    rng = np.random.default_rng(config["seed"])
    policy = config["policy"]
    with _dtype_available(policy):
        layer, gamma, beta = _layer(config, rng)
        x, x64 = _inputs(config, rng)
        mask = _mask(config, rng)
        upstream = rng.normal(size=config["shape"])
        moving = _Moving(layer)
        expected = _reference_step(
            config, layer, x64, mask, gamma, beta, moving
        )
        corrections = expected["corrections"] if layer.renorm else None
        expected = reference.batch_norm_gradients(
            x64,
            upstream,
            axis=config["kwargs"]["axis"],
            mask=mask,
            virtual_batch_size=config["kwargs"]["virtual_batch_size"],
            gamma=gamma,
            epsilon=layer.epsilon,
            corrections=corrections,
        )
        trainable = [w.value for w in layer.trainable_variables]
        non_trainable = [w.value for w in layer.non_trainable_variables]
        cotangent = ops.cast(
            ops.convert_to_tensor(upstream), POLICIES[policy][0]
        )

        def loss(x, *trainable):
            y, _ = layer.stateless_call(
                list(trainable), non_trainable, x, training=True, mask=mask
            )
            return ops.sum(ops.cast(y * cotangent, "float32"))

        _, gradients = value_and_gradients(loss, x, *trainable)
    tol = tolerance(policy)
    names = ["x"] + [
        name
        for name, present in (("gamma", layer.scale), ("beta", layer.center))
        if present
    ]
    for name, actual in zip(names, gradients, strict=True):
        _assert_close(
            actual,
            expected[name],
            tol,
            f"gradient with respect to {name}",
            terms=expected[f"{name}_terms"],
            floor=FLOOR.get(POLICIES[policy][0], 0.0),
            # The input's gradient is in the input's 16-bit dtype.
            finite_only=name == "x" and POLICIES[policy][0] == "float16",
        )


def _check_round_trip(layer, config):
    rng = np.random.default_rng(config["seed"])
    inputs = keras.Input(config["shape"][1:])
    model = keras.Model(inputs, layer(inputs))
    x, _ = _inputs(config, rng)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    assert loaded.layers[-1].get_config() == layer.get_config()
    np.testing.assert_array_equal(_float64(loaded(x)), _float64(model(x)))


def test_analytic_gradients_match_finite_differences():
    """The reference's analytic gradients, checked once by finite
    differences: ghost batches, a mask with an empty ghost batch, renorm
    corrections."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 2, 3)) * 2.0 + 1.0
    # Each feature has a count of its own.
    mask = rng.random((7, 2, 3)) > 0.3
    mask[3:6] = False
    upstream = rng.normal(size=x.shape)
    gamma = rng.normal(size=3)
    beta = rng.normal(size=3)
    corrections = [(rng.uniform(0.5, 2.0, 3), rng.normal(size=3))] * 3
    corrections = [
        (r.reshape(1, 1, 3), d.reshape(1, 1, 3)) for r, d in corrections
    ]

    def loss(x=x, gamma=gamma, beta=beta):
        outputs = reference.batch_norm(
            x,
            mask=mask,
            virtual_batch_size=3,
            gamma=gamma,
            beta=beta,
            renorm={"mean": 0, "stddev": 1, "corrections": corrections},
        )["outputs"]
        return np.sum(outputs * upstream)

    analytic = reference.batch_norm_gradients(
        x,
        upstream,
        mask=mask,
        virtual_batch_size=3,
        gamma=gamma,
        corrections=corrections,
    )
    for actual, numerical in (
        (analytic["x"], reference.numerical_gradient(loss, x)),
        (
            analytic["gamma"],
            reference.numerical_gradient(lambda g: loss(gamma=g), gamma),
        ),
        (
            analytic["beta"],
            reference.numerical_gradient(lambda b: loss(beta=b), beta),
        ),
    ):
        np.testing.assert_allclose(actual, numerical, rtol=1e-6, atol=1e-7)
