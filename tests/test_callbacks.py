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


CLIPPINGS = [
    {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0},
    {"rmax": 1.3, "rmin": 0.9, "dmax": 0.2},
    None,
    {"rmax": 1.1},
    {"dmax": 0.05},
]


def _renorm_fit_reference(x, y, clippings, lr, momentum):
    """gamma and beta after each step of SGD on the mean squared error of
    renorm batch norm (no other layer), in float64, with the clipping of
    each step; the renorm statistics start at 0 and 1."""
    gamma, beta = np.ones(x.shape[1]), np.zeros(x.shape[1])
    mean, stddev = np.zeros(x.shape[1]), np.ones(x.shape[1])
    after = []
    batches = np.split(np.arange(len(x)), len(clippings))
    for rows, clipping in zip(batches, clippings, strict=True):
        step = reference.batch_norm(
            x[rows], renorm={"mean": mean, "stddev": stddev, **(clipping or {})}
        )
        upstream = (
            2.0 * (gamma * step["outputs"] + beta - y[rows]) / y[rows].size
        )
        gamma = gamma - lr * (upstream * step["outputs"]).sum(0)
        beta = beta - lr * upstream.sum(0)
        mean = momentum * mean + (1 - momentum) * step["mean"]
        stddev = momentum * stddev + (1 - momentum) * np.sqrt(
            step["variance"] + 1e-3
        )
        after.append((gamma, beta))
    return after


class _RecordGammaBeta(keras.callbacks.Callback):
    """`gamma` and `beta` of the model's last layer after each step, read
    through `self.model` (on JAX, that syncs the state into the
    variables)."""

    def __init__(self):
        super().__init__()
        self.after = []

    def on_train_batch_end(self, batch, logs=None):
        layer = self.model.layers[-1]
        self.after.append(
            [to_numpy(w).astype("float64") for w in (layer.gamma, layer.beta)]
        )


def test_renorm_clipping_schedule_is_followed_exactly():
    """A `Schedule` of `renorm_clipping` (from plain batch norm, `rmax = 1`
    and `dmax = 0`, to looser bounds and none) is applied at each step of
    a compiled `fit`: `gamma` and `beta` after each step equal float64
    NumPy's, and the step is compiled as often as without it."""
    rng = np.random.default_rng(1)
    steps = len(CLIPPINGS)
    # Batches whose statistics move, so that the corrections need clipping.
    shift = np.repeat(np.linspace(-1.0, 2.0, steps), BATCH)[:, None]
    x = rng.normal(size=(steps * BATCH, 3)) * (1.0 + shift**2) + 3.0 * shift
    y = rng.normal(size=(steps * BATCH, 3))
    x, y = x.astype("float32"), y.astype("float32")
    jit_compile = BACKEND != "torch"
    runs = {}
    for scheduled in (False, True):
        CountingBatchNormalization.runs = 0
        layer = CountingBatchNormalization(
            renorm=True, renorm_momentum=0.5, momentum=0.5
        )
        inputs = keras.Input((3,))
        model = keras.Model(inputs, layer(inputs))
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss="mse",
            jit_compile=jit_compile,
        )
        record = _RecordGammaBeta()
        clippings = CLIPPINGS if scheduled else [None] * steps
        callbacks = [record]
        if scheduled:
            schedule = keras_bn.callbacks.Schedule(
                lambda step: {"renorm_clipping": CLIPPINGS[step]}, unit="step"
            )
            callbacks.insert(0, schedule)
        history = model.fit(
            x,
            y,
            batch_size=BATCH,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        runs[scheduled] = CountingBatchNormalization.runs
        expected = _renorm_fit_reference(
            x.astype("float64"), y.astype("float64"), clippings, 0.1, 0.5
        )
        for step, ((gamma, beta), (want_gamma, want_beta)) in enumerate(
            zip(record.after, expected, strict=True)
        ):
            np.testing.assert_allclose(
                gamma, want_gamma, 2e-6, 2e-6, err_msg=step
            )
            np.testing.assert_allclose(
                beta, want_beta, 2e-6, 2e-6, err_msg=step
            )
    if jit_compile:
        assert runs[True] == runs[False] < steps
    assert layer.renorm_clipping == {"dmax": 0.05}
    # The schedule logs the bounds it set last.
    logged = {k: v for k, v in history.history.items() if k != "loss"}
    assert logged == {"renorm_dmax": [0.05]}


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


def test_setting_renorm_clipping_validates_and_serializes():
    layer = keras_bn.BatchNormalization(renorm=True)
    layer.build((None, 3))
    layer.renorm_clipping = {"rmax": 2.0, "dmax": 1}
    assert layer.get_config()["renorm_clipping"] == {"rmax": 2.0, "dmax": 1.0}
    with pytest.raises(ValueError, match=r"renorm_clipping=\{'rmax': 0\.5\}"):
        layer.renorm_clipping = {"rmax": 0.5}
    assert layer.renorm_clipping == {"rmax": 2.0, "dmax": 1.0}
    # A bound changed in place would not reach the compiled step.
    with pytest.raises(TypeError):
        layer.renorm_clipping["rmax"] = 3.0
    plain = keras_bn.BatchNormalization()
    with pytest.raises(ValueError, match="renorm=False"):
        plain.renorm_clipping = {"rmax": 2.0}
    assert plain.renorm_clipping is None


@pytest.mark.parametrize(
    "returned,match",
    [(0.9, "schedule\\(0\\)=0.9"), ({"rmax": 2.0}, "'rmax': 2.0")],
    ids=["not_a_dict", "unknown_setting"],
)
def test_schedule_refuses_what_it_cannot_set(returned, match):
    x, y = _data(1)
    model = _model(keras_bn.BatchNormalization(), jit_compile=False)
    schedule = keras_bn.callbacks.Schedule(lambda epoch: returned)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, verbose=0, callbacks=[schedule])


def test_renorm_clipping_ramp():
    """The renorm paper's schedule: plain batch norm for 5000 steps, then
    `rmax` to 3 at step 40000 and `dmax` to 5 at step 25000."""
    ramp = keras_bn.callbacks.renorm_clipping_ramp()
    expected = {
        0: (1.0, 0.0),
        5000: (1.0, 0.0),
        22500: (2.0, 4.375),
        25000: (2.0 + 1.0 / 7.0, 5.0),
        40000: (3.0, 5.0),
        10**6: (3.0, 5.0),
    }
    for step, (rmax, dmax) in expected.items():
        clipping = ramp(step)["renorm_clipping"]
        np.testing.assert_allclose(
            [clipping["rmax"], clipping["rmin"], clipping["dmax"]],
            [rmax, 1.0 / rmax, dmax],
            rtol=1e-12,
            err_msg=step,
        )
    with pytest.raises(ValueError, match="rmax=0.5"):
        keras_bn.callbacks.renorm_clipping_ramp(rmax=0.5)
    with pytest.raises(ValueError, match="dmax_step=10"):
        keras_bn.callbacks.renorm_clipping_ramp(start=100, dmax_step=10)
