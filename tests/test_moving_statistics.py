"""The moving statistics: debiased and cumulative averages, Bessel's
correction, and training on frozen statistics, against their definitions
in float64 NumPy."""

import keras
import numpy as np
import pytest

import keras_bn
from tests import reference
from tests.backend import to_numpy
from tests.backend import value_and_gradients

AVERAGES = ("ema", "debiased", "cumulative")
MOMENTUM = 0.7
STEPS = 4
# Layer arguments and the mask of each case; every batch has 10 rows.
CASES = {
    "plain": ({}, None),
    "ghost_ragged": ({"virtual_batch_size": 4}, None),
    "masked": ({}, "rows"),
    "several_axes": ({"axis": [1, 2]}, None),
}


def _batches(shape=(10, 3), seed=0):
    """Batches whose statistics differ from one step to the next."""
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=shape) * (1.0 + step) + 2.0 * step).astype("float32")
        for step in range(STEPS)
    ]


def _mask(kind, x, step):
    if kind is None:
        return None
    # Keras's form, one axis less than the input; fewer rows each step.
    rows = np.arange(len(x)) < len(x) - 1 - step
    return np.broadcast_to(
        rows.reshape((-1,) + (1,) * (x.ndim - 2)), x.shape[:-1]
    )


def _layer(moving_average, **kwargs):
    # Initial moving statistics far from the batches' (an EMA keeps a
    # share of them; the others none).
    return keras_bn.BatchNormalization(
        momentum=MOMENTUM,
        moving_average=moving_average,
        moving_mean_initializer=keras.initializers.Constant(-5.0),
        moving_variance_initializer=keras.initializers.Constant(9.0),
        **kwargs,
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("moving_average", AVERAGES)
def test_moving_statistics_are_the_defined_average(moving_average, case):
    kwargs, mask_kind = CASES[case]
    shape = (10, 2, 3) if "axis" in kwargs else (10, 3)
    layer = _layer(moving_average, **kwargs)
    means, variances = [], []
    for step, x in enumerate(_batches(shape)):
        mask = _mask(mask_kind, x, step)
        layer(x, training=True, mask=mask)
        expected = reference.batch_norm(
            x,
            axis=kwargs.get("axis", -1),
            mask=mask,
            virtual_batch_size=kwargs.get("virtual_batch_size"),
        )
        means.append(expected["mean"])
        variances.append(expected["variance"])
        for name, values, initial in (
            ("moving_mean", means, -5.0),
            ("moving_variance", variances, 9.0),
        ):
            np.testing.assert_allclose(
                to_numpy(getattr(layer, name)),
                reference.averaged(values, MOMENTUM, moving_average, initial),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{name} after {step + 1} steps",
            )


@pytest.mark.parametrize("moving_average", ("debiased", "cumulative"))
def test_renorm_moving_statistics_are_the_defined_average(moving_average):
    """With renorm the moving standard deviation is averaged (as in
    Keras's layer), and the variance follows from it; the renorm
    statistics stay exponential averages with `renorm_momentum`."""
    layer = _layer(moving_average, renorm=True, renorm_momentum=0.5)
    stddevs, means = [], []
    for x in _batches():
        layer(x, training=True)
        expected = reference.batch_norm(x)
        means.append(expected["mean"])
        stddevs.append(np.sqrt(expected["variance"] + layer.epsilon))
    stddev = reference.averaged(stddevs, MOMENTUM, moving_average, 3.0)
    np.testing.assert_allclose(to_numpy(layer.moving_stddev), stddev, rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance),
        stddev**2 - layer.epsilon,
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        to_numpy(layer.renorm_mean),
        reference.averaged(means, 0.5, "ema", -5.0),
        rtol=1e-5,
    )


def test_debiased_average_is_exact_from_the_first_step():
    layer = _layer("debiased")
    x = _batches()[0]
    layer(x, training=True)
    expected = reference.batch_norm(x)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), expected["mean"], rtol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), expected["variance"], rtol=1e-6
    )
    np.testing.assert_allclose(to_numpy(layer.moving_weight), 1 - MOMENTUM)


@pytest.mark.parametrize("moving_average", ("debiased", "cumulative"))
def test_non_finite_batch_leaves_its_channel_alone(moving_average):
    """A channel whose batch holds a NaN keeps its moving statistics and
    their total weight; the other channels update."""
    layer = _layer(moving_average)
    first, second = _batches()[:2]
    layer(first, training=True)
    before = [to_numpy(w).copy() for w in layer.non_trainable_weights]
    second = second.copy()
    second[3, 0] = np.nan
    layer(second, training=True)
    after = [to_numpy(w) for w in layer.non_trainable_weights]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new[0], old[0])
        assert np.all(new[1:] != old[1:])
    assert np.all(np.isfinite(after))


def test_momentum_one_keeps_a_debiased_average_at_its_start():
    """With momentum 1 nothing is averaged in: the moving statistics keep
    their initial values, with no division by a zero weight."""
    layer = keras_bn.BatchNormalization(momentum=1.0, moving_average="debiased")
    layer(_batches()[0], training=True)
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), 0.0)
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), 1.0)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "jit"])
def test_moving_average_under_fit(jit_compile):
    """A debiased and a cumulative layer side by side in one model (one
    compilation for both)."""
    x = np.concatenate(_batches((8, 3)))
    layers = {a: _layer(a) for a in ("debiased", "cumulative")}
    inputs = keras.Input((3,))
    outputs = [layer(inputs) for layer in layers.values()]
    model = keras.Model(inputs, keras.layers.Concatenate()(outputs))
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    model.fit(x, np.tile(x, 2), batch_size=8, shuffle=False, verbose=0)
    means = [reference.batch_norm(b)["mean"] for b in np.split(x, STEPS)]
    for moving_average, layer in layers.items():
        np.testing.assert_allclose(
            to_numpy(layer.moving_mean),
            reference.averaged(means, MOMENTUM, moving_average, -5.0),
            rtol=1e-5,
            err_msg=moving_average,
        )
        weight = (
            STEPS if moving_average == "cumulative" else 1 - MOMENTUM**STEPS
        )
        np.testing.assert_allclose(
            to_numpy(layer.moving_weight), weight, 1e-6, err_msg=moving_average
        )


def test_weights_of_each_average():
    """A default layer has Keras's weights; a debiased or cumulative one
    adds its total weight after them, saved and restored with them."""
    names = {}
    for moving_average in AVERAGES:
        layer = keras_bn.BatchNormalization(moving_average=moving_average)
        layer.build((None, 3))
        names[moving_average] = [w.name for w in layer.weights]
    keras_layer = keras.layers.BatchNormalization()
    keras_layer.build((None, 3))
    assert names["ema"] == [w.name for w in keras_layer.weights]
    assert names["debiased"] == names["ema"] + ["moving_weight"]
    assert names["cumulative"] == names["debiased"]


def test_saved_average_resumes(tmp_path):
    """A saved cumulative layer, loaded, goes on averaging as if it had
    never stopped."""
    batches = _batches()
    inputs = keras.Input((3,))
    model = keras.Model(inputs, _layer("cumulative")(inputs))
    for x in batches[:2]:
        model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for x in batches[2:]:
        loaded(x, training=True)
    means = [reference.batch_norm(x)["mean"] for x in batches]
    layer = loaded.layers[-1]
    assert layer.moving_average == "cumulative"
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), np.mean(means, 0), rtol=1e-5
    )


@pytest.mark.parametrize(
    "argument,value",
    [
        ("moving_average", "adam"),
        ("moving_average", None),
        ("training_statistics", "frozen"),
        ("inference_statistics", "ema"),
    ],
)
def test_invalid_options(argument, value):
    with pytest.raises(ValueError, match=f"{argument}={value!r}"):
        keras_bn.BatchNormalization(**{argument: value})


def test_options_round_trip_through_the_config():
    layer = keras_bn.BatchNormalization(
        moving_average="debiased",
        training_statistics="moving",
        bessel_correction=True,
    )
    config = layer.get_config()
    assert config["moving_average"] == "debiased"
    assert config["training_statistics"] == "moving"
    assert config["bessel_correction"] is True
    assert keras_bn.BatchNormalization.from_config(config).get_config() == (
        config
    )


# ---------------------------------------------------------------------------
# Bessel's correction.


@pytest.mark.parametrize("case", list(CASES))
def test_bessel_correction_updates_with_the_unbiased_variance(case):
    """The moving variance takes each group's `n / (n - 1)` times its
    variance; the outputs keep the biased variance."""
    kwargs, mask_kind = CASES[case]
    shape = (10, 2, 3) if "axis" in kwargs else (10, 3)
    x = _batches(shape)[1]
    mask = _mask(mask_kind, x, 1)
    corrected = keras_bn.BatchNormalization(
        momentum=0.0, bessel_correction=True, **kwargs
    )
    plain = keras_bn.BatchNormalization(momentum=0.0, **kwargs)
    outputs = to_numpy(corrected(x, training=True, mask=mask))
    expected = reference.batch_norm(
        x,
        axis=kwargs.get("axis", -1),
        mask=mask,
        virtual_batch_size=kwargs.get("virtual_batch_size"),
    )
    np.testing.assert_allclose(
        to_numpy(corrected.moving_variance),
        expected["unbiased_variance"],
        rtol=1e-5,
    )
    assert not np.allclose(expected["unbiased_variance"], expected["variance"])
    np.testing.assert_allclose(outputs, expected["outputs"], atol=1e-5)
    np.testing.assert_array_equal(
        outputs, to_numpy(plain(x, training=True, mask=mask))
    )


def test_bessel_correction_of_a_group_of_one():
    """A ghost batch of one sample has no unbiased variance: it counts
    with its variance, 0, rather than with 0 / 0."""
    layer = keras_bn.BatchNormalization(
        momentum=0.0, bessel_correction=True, virtual_batch_size=3
    )
    x = _batches((7, 3))[2]
    layer(x, training=True)
    expected = reference.batch_norm(x, virtual_batch_size=3)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance),
        expected["unbiased_variance"],
        rtol=1e-5,
    )


# ---------------------------------------------------------------------------
# Training on frozen statistics.


def test_training_on_moving_statistics():
    """`training_statistics="moving"`: training normalizes as inference
    does, with the input gradient of that normalization, and leaves the
    moving statistics alone."""
    x = _batches()[2]
    layer = keras_bn.BatchNormalization(
        training_statistics="moving",
        moving_mean_initializer=keras.initializers.Constant(1.5),
        moving_variance_initializer=keras.initializers.Constant(4.0),
        gamma_initializer=keras.initializers.Constant(1.5),
        beta_initializer=keras.initializers.Constant(0.25),
    )
    upstream = np.random.default_rng(3).normal(size=x.shape).astype("float32")

    def loss(x):
        outputs = layer(x, training=True)
        return keras.ops.sum(outputs * keras.ops.convert_to_tensor(upstream))

    # Op by op: the layer is built, and called with its state, inside.
    _, (dx,) = value_and_gradients(loss, x, compiled=False)
    scale = 1.5 / np.sqrt(4.0 + layer.epsilon)
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)),
        (x.astype("float64") - 1.5) * scale + 0.25,
        rtol=1e-5,
    )
    np.testing.assert_array_equal(
        to_numpy(layer(x, training=True)), to_numpy(layer(x, training=False))
    )
    np.testing.assert_allclose(dx, upstream * scale, rtol=1e-5)
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), 1.5)
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), 4.0)


def test_fit_on_moving_statistics_trains_gamma_and_beta():
    x = np.concatenate(_batches())
    inputs = keras.Input((3,))
    layer = keras_bn.BatchNormalization(training_statistics="moving")
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, x[:, :1] * 2.0, batch_size=10, verbose=0)
    assert np.all(to_numpy(layer.gamma) != 1.0)
    assert np.all(to_numpy(layer.beta) != 0.0)
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), 0.0)
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), 1.0)


def test_convert_a_model_to_frozen_statistics():
    inputs = keras.Input((3,))
    hidden = keras.layers.BatchNormalization()(inputs)
    outputs = keras_bn.BatchNormalization()(keras.layers.Dense(3)(hidden))
    model = keras.Model(inputs, outputs)
    converted = keras_bn.convert(model, training_statistics="moving")
    layers = [
        layer
        for layer in converted.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(layers) == 2
    assert all(layer.training_statistics == "moving" for layer in layers)
    x = _batches()[0]
    np.testing.assert_allclose(
        to_numpy(converted(x, training=True)),
        to_numpy(model(x, training=False)),
        rtol=1e-6,
    )


def test_convert_and_revert_with_a_debiased_average():
    """`convert` starts a debiased average (a total weight of 0) from the
    weights it copies; `revert` drops the total weight and keeps the
    moving statistics."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    x = _batches()[1]
    model(x, training=True)
    converted = keras_bn.convert(model, moving_average="debiased")
    layer = converted.layers[-1]
    np.testing.assert_array_equal(to_numpy(layer.moving_weight), 0.0)
    np.testing.assert_array_equal(
        to_numpy(layer.moving_mean), to_numpy(model.layers[-1].moving_mean)
    )
    converted(x, training=True)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), reference.batch_norm(x)["mean"], 1e-5
    )
    reverted = keras_bn.revert(converted)
    assert type(reverted.layers[-1]) is keras.layers.BatchNormalization
    np.testing.assert_array_equal(
        to_numpy(reverted.layers[-1].moving_mean), to_numpy(layer.moving_mean)
    )


@pytest.mark.parametrize("moving_average", ("debiased", "cumulative"))
def test_recalibrate_sets_the_total_weight(moving_average):
    inputs = keras.Input((3,))
    layer = _layer(moving_average)
    model = keras.Model(inputs, layer(inputs))
    x = np.concatenate(_batches())
    keras_bn.recalibrate(model, x, batch_size=10)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), x.mean(0), rtol=1e-5
    )
    expected = STEPS if moving_average == "cumulative" else 1.0
    np.testing.assert_array_equal(to_numpy(layer.moving_weight), expected)
