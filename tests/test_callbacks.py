"""A momentum that changes during training takes effect at the next step,
in compiled `fit` too, without compiling the step again; the moving
statistics follow `MomentumSchedule` exactly."""

import keras
import numpy as np
import pytest

import keras_bn
from tests import reference
from tests.backend import to_numpy

BACKEND = keras.backend.backend()
BATCH = 8
MOMENTA = [0.5, 0.9, 0.0, 0.3, 0.7, 0.2]
COMPILE = [False, True]
COMPILE_IDS = ["eager", "jit"]


class CountingBatchNormalization(keras_bn.BatchNormalization):
    """Counts the Python runs of its training calls: one per step when
    eager, one per compilation when compiled."""

    runs = 0

    def call(self, inputs, training=None, mask=None):
        if training:
            CountingBatchNormalization.runs += 1
        return super().call(inputs, training=training, mask=mask)


def _data(steps=6):
    rng = np.random.default_rng(0)
    scale = np.repeat(np.arange(1.0, steps + 1), BATCH)[:, None]
    x = (rng.normal(size=(steps * BATCH, 3)) * scale + scale).astype("float32")
    return x, rng.normal(size=(steps * BATCH, 1)).astype("float32")


def _model(layer, jit_compile):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    return model


def _batch_means(x):
    return [reference.batch_norm(b)["mean"] for b in np.split(x, len(x) // 8)]


def test_epoch_schedule_and_its_log():
    x, y = _data(2)
    layer = keras_bn.BatchNormalization()
    model = _model(layer, jit_compile=False)
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[
            keras_bn.callbacks.MomentumSchedule(lambda epoch: 0.2 * epoch)
        ],
    )
    means = _batch_means(x) * 3
    momenta = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4]
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean),
        reference.averaged(means, momenta, "ema", 0.0),
        rtol=1e-5,
    )
    assert history.history["momentum"] == [0.0, 0.2, 0.4]


def _compilations(jit_compile, callbacks):
    """Fits a model with an exponential and a debiased average side by side
    (one compilation for both); returns how often that compiled its step
    (the Python runs of a layer's training call under JAX and TensorFlow,
    once per step when eager; the graphs torch.compile makes on PyTorch),
    the layers by average, and the inputs."""
    x, y = _data()
    compiled_torch = jit_compile and keras.backend.backend() == "torch"
    if compiled_torch:
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
    # The counter is state torch.compile would guard on.
    layer_class = (
        keras_bn.BatchNormalization
        if compiled_torch
        else CountingBatchNormalization
    )
    CountingBatchNormalization.runs = 0
    layers = {
        average: layer_class(moving_average=average)
        for average in ("ema", "debiased")
    }
    inputs = keras.Input((3,))
    hidden = keras.layers.Concatenate()(
        [layer(inputs) for layer in layers.values()]
    )
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    model.fit(
        x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=callbacks
    )
    if compiled_torch:
        count = counters["stats"]["unique_graphs"] - before
    else:
        count = CountingBatchNormalization.runs // len(layers)
    return count, layers, x


@pytest.mark.parametrize("jit_compile", COMPILE, ids=COMPILE_IDS)
def test_a_schedule_is_followed_exactly_and_compiles_nothing_more(
    jit_compile,
):
    """A momentum that changes at every step is followed exactly, by an
    exponential and a debiased average alike, and compiles the step as
    often as a constant one (after a first fit, which compiles what every
    model shares on PyTorch)."""
    _compilations(jit_compile, [])
    constant, _, _ = _compilations(jit_compile, [])
    schedule = keras_bn.callbacks.MomentumSchedule(MOMENTA.__getitem__, "step")
    scheduled, layers, x = _compilations(jit_compile, [schedule])
    assert scheduled == constant
    if jit_compile:
        assert constant < len(MOMENTA)
    for moving_average, layer in layers.items():
        np.testing.assert_allclose(
            to_numpy(layer.moving_mean),
            reference.averaged(_batch_means(x), MOMENTA, moving_average, 0.0),
            rtol=1e-5,
            atol=1e-7,
            err_msg=moving_average,
        )
        assert layer.momentum == MOMENTA[-1]


@pytest.mark.parametrize("jit_compile", COMPILE, ids=COMPILE_IDS)
def test_setting_momentum_takes_effect_in_compiled_fit(jit_compile):
    """A plain callback that sets `momentum` through `self.model` at the
    third step, and a new momentum between two `fit` calls."""
    x, y = _data()

    class Freeze(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                self.model.layers[1].momentum = 0.0

    layer = keras_bn.BatchNormalization(momentum=0.5)
    model = _model(layer, jit_compile)
    first, second = x[: 4 * BATCH], x[4 * BATCH :]
    model.fit(
        first,
        y[: 4 * BATCH],
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[Freeze()],
    )
    means = _batch_means(first)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), means[-1], 1e-5)
    layer.momentum = 0.25
    model.fit(
        second, y[4 * BATCH :], batch_size=BATCH, shuffle=False, verbose=0
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean),
        reference.averaged(
            [means[-1], *_batch_means(second)], [0.0, 0.25, 0.25], "ema", 0
        ),
        rtol=1e-5,
    )


@pytest.mark.parametrize("jit_compile", COMPILE, ids=COMPILE_IDS)
def test_momentum_set_through_a_captured_reference(jit_compile):
    """A callback that holds the layer itself (not `self.model`) sets
    `momentum` to 0 at the third of four steps: on TensorFlow and PyTorch
    the last step's mean becomes the moving mean. On JAX, `fit` holds the
    state outside the variables then: the setter refuses with a
    `ValueError` that says what works, and the layer keeps its momentum
    and the statistics of the steps before. At the start of an epoch the
    state is in the variables: the new value takes effect on every
    backend."""
    x, y = _data(4)
    layer = keras_bn.BatchNormalization(momentum=0.5)
    model = _model(layer, jit_compile)

    def freeze(batch, logs):
        if batch == 2:
            layer.momentum = 0.0

    callback = keras.callbacks.LambdaCallback(on_train_batch_begin=freeze)
    means = _batch_means(x)
    fit = dict(batch_size=BATCH, shuffle=False, verbose=0)
    if BACKEND == "jax":
        with pytest.raises(ValueError, match=r"self\.model.*momentum=0\.0"):
            model.fit(x, y, callbacks=[callback], **fit)
        assert layer.momentum == 0.5
        expected = reference.averaged(means[:2], [0.5, 0.5], "ema", 0.0)
    else:
        model.fit(x, y, callbacks=[callback], **fit)
        assert layer.momentum == 0.0
        expected = means[-1]
    np.testing.assert_allclose(to_numpy(layer.moving_mean), expected, 1e-5)

    layer.momentum = 0.5

    def set_at_epoch(epoch, logs):
        layer.momentum = [0.5, 0.0][epoch]

    callback = keras.callbacks.LambdaCallback(on_epoch_begin=set_at_epoch)
    model.fit(x, y, epochs=2, callbacks=[callback], **fit)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), means[-1], 1e-5)


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_variables_are_those_of_keras_layer(renorm):
    """A layer whose momentum does not change has the variables of Keras's
    layer (names, shapes, order), on JAX too. A momentum set after
    training (or a `MomentumSchedule`) adds it as state on JAX, never as a
    weight."""
    x, y = _data(2)
    # Compiled where compiling is quick (torch.compile takes 20 s here).
    jit_compile = BACKEND != "torch"
    layer = keras_bn.BatchNormalization(renorm=renorm)
    model = _model(layer, jit_compile)
    keras_layer = keras.layers.BatchNormalization(renorm=renorm)
    keras_model = _model(keras_layer, jit_compile)

    def described(variables):
        return [(v.name, tuple(v.shape), v.trainable) for v in variables]

    for trained in (model, keras_model):
        trained.fit(x, y, batch_size=BATCH, verbose=0)
    assert described(layer.variables) == described(keras_layer.variables)
    assert described(model.non_trainable_variables) == described(
        keras_model.non_trainable_variables
    )
    layer.momentum = 0.0
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), _batch_means(x)[-1], 1e-5
    )
    assert described(layer.weights) == described(keras_layer.weights)
    extra = len(layer.variables) - len(keras_layer.variables)
    assert extra == (1 if BACKEND == "jax" else 0)


def test_renorm_momentum_schedule():
    x, y = _data(3)
    layer = keras_bn.BatchNormalization(renorm=True, momentum=0.9)
    # Compiled where compiling is quick (torch.compile takes 20 s here).
    model = _model(layer, jit_compile=BACKEND != "torch")
    model.fit(
        x,
        y,
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[
            keras_bn.callbacks.MomentumSchedule(
                [0.5, 0.1, 0.0].__getitem__, unit="step", renorm=True
            )
        ],
    )
    means = _batch_means(x)
    for variable in (layer.moving_mean, layer.renorm_mean):
        np.testing.assert_allclose(
            to_numpy(variable),
            reference.averaged(means, [0.5, 0.1, 0.0], "ema", 0.0),
            rtol=1e-5,
        )


def test_momentum_is_state_not_a_weight(tmp_path):
    """Changed momenta are in the config, not in the weights: the layer
    keeps Keras's weights, and a saved model loads with the new value."""
    layer = keras_bn.BatchNormalization(renorm=True)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layer(inputs))
    layer.momentum = 0.5
    layer.renorm_momentum = 0.25
    keras_layer = keras.layers.BatchNormalization(renorm=True)
    keras_layer.build((None, 3))
    assert [w.name for w in layer.weights] == [
        w.name for w in keras_layer.weights
    ]
    assert len(model.get_weights()) == len(keras_layer.get_weights())
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras").layers[-1]
    assert (loaded.momentum, loaded.renorm_momentum) == (0.5, 0.25)
    x = _data(1)[0]
    loaded(x, training=True)
    np.testing.assert_allclose(
        to_numpy(loaded.moving_mean), 0.5 * x.mean(0), rtol=1e-5
    )


def test_invalid_momentum_leaves_the_layer_alone():
    layer = keras_bn.BatchNormalization(momentum=0.5)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="momentum=1.5"):
        layer.momentum = 1.5
    assert layer.momentum == 0.5
    layer(_data(1)[0], training=True)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), 0.5 * _data(1)[0].mean(0), rtol=1e-5
    )


def test_schedule_refuses_keras_layers():
    x, y = _data(1)
    model = _model(keras.layers.BatchNormalization(), jit_compile=False)
    schedule = keras_bn.callbacks.MomentumSchedule(lambda epoch: 0.5)
    with pytest.raises(ValueError, match="keras_bn.convert"):
        model.fit(x, y, verbose=0, callbacks=[schedule])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"schedule": 0.9}, "schedule=0.9"),
        ({"schedule": abs, "unit": "batch"}, "unit='batch'"),
        ({"schedule": abs, "renorm": "yes"}, "renorm='yes'"),
    ],
)
def test_invalid_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_bn.callbacks.MomentumSchedule(**kwargs)
