import contextlib
import json
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import keras_bn
from tests import reference
from tests.backend import compile_with_dynamic_batch
from tests.backend import float64_enabled
from tests.backend import no_gradients
from tests.backend import to_numpy
from tests.backend import value_and_gradients
from tests.harness import run_layer_test

BACKEND = keras.backend.backend()
RTOL = 1e-5
ATOL = 1e-5


def _normal(shape, seed=0, loc=0.0, scale=1.0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.normal(size=shape)).astype(dtype)


def _random_parameters(layer, seed=1):
    """Non-trivial gamma and beta, so that tests see them."""
    rng = np.random.default_rng(seed)
    for weight in layer.trainable_weights:
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))


def _parameters(layer):
    gamma = to_numpy(layer.gamma) if layer.scale else None
    beta = to_numpy(layer.beta) if layer.center else None
    return gamma, beta


# ---------------------------------------------------------------------------
# The layer contract.

HARNESS_CASES = {
    "defaults": ({}, (8, 3), 2, 2, None),
    "ghost_ragged": ({"virtual_batch_size": 3}, (8, 3), 2, 2, None),
    "channels_first": ({"axis": 1}, (4, 3, 5, 5), 2, 2, None),
    "several_axes": ({"axis": [1, 3]}, (4, 3, 5, 2), 2, 2, None),
    "renorm": ({"renorm": True}, (8, 3), 2, 5, None),
    "masked_sequence": ({"virtual_batch_size": 3}, (8, 5, 3), 2, 2, (8, 5)),
    "batch_inference": ({"inference_statistics": "batch"}, (8, 3), 2, 2, None),
}


@pytest.mark.parametrize(
    "kwargs,shape,trainable,non_trainable,mask_shape",
    list(HARNESS_CASES.values()),
    ids=list(HARNESS_CASES),
)
def test_layer_contract(
    kwargs, shape, trainable, non_trainable, mask_shape, tmp_path
):
    run_layer_test(
        keras_bn.BatchNormalization,
        kwargs,
        shape,
        trainable,
        non_trainable,
        tmp_path,
        mask_shape=mask_shape,
    )


def test_no_scale_no_center():
    layer = keras_bn.BatchNormalization(center=False, scale=False)
    x = _normal((8, 3), loc=2.0, scale=3.0)
    outputs = layer(x, training=True)
    expected = reference.batch_norm(x, epsilon=1e-3)["outputs"]
    np.testing.assert_allclose(
        to_numpy(outputs), expected, rtol=RTOL, atol=ATOL
    )
    assert layer.trainable_weights == []
    assert [w.name for w in layer.weights] == ["moving_mean", "moving_variance"]


# ---------------------------------------------------------------------------
# Drop-in parity with keras.layers.BatchNormalization.

PARITY_CASES = {
    "dense": ({}, (16, 6)),
    "momentum_epsilon": ({"momentum": 0.5, "epsilon": 1e-5}, (16, 6)),
    "no_center": ({"center": False}, (16, 6)),
    "no_scale": ({"scale": False}, (16, 6)),
    "sequence": ({"momentum": 0.9}, (8, 5, 4)),
    "channels_last": ({"momentum": 0.9}, (8, 4, 4, 3)),
    "channels_first": ({"axis": 1, "momentum": 0.9}, (8, 3, 4, 4)),
    "middle_axis": ({"axis": -2, "momentum": 0.9}, (8, 3, 5)),
    "renorm": (
        {"renorm": True, "momentum": 0.8, "renorm_momentum": 0.7},
        (16, 6),
    ),
    "renorm_clipping": (
        {
            "renorm": True,
            "momentum": 0.8,
            "renorm_momentum": 0.7,
            "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1},
        },
        (8, 4, 3),
    ),
}
PARITY = pytest.mark.parametrize(
    "kwargs,shape", list(PARITY_CASES.values()), ids=list(PARITY_CASES)
)


def _twin_layers(kwargs, shape):
    ours = keras_bn.BatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    _random_parameters(theirs)
    ours.set_weights(theirs.get_weights())
    return ours, theirs


def _assert_same_weights(ours, theirs):
    for mine, keras_weight in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(
            to_numpy(mine),
            to_numpy(keras_weight),
            rtol=RTOL,
            atol=ATOL,
            err_msg=mine.name,
        )


def _training_gradients(layer, x, upstream, **call_kwargs):
    """The value of `sum(layer(x, training=True) * upstream)` and its
    gradients with respect to `x` and the trainable weights."""
    non_trainable = [ops.copy(w) for w in layer.non_trainable_variables]

    def loss(x, *trainable):
        y, _ = layer.stateless_call(
            list(trainable), non_trainable, x, training=True, **call_kwargs
        )
        return ops.sum(ops.multiply(y, upstream))

    trainable = [ops.copy(w) for w in layer.trainable_variables]
    return value_and_gradients(loss, x, *trainable)


@PARITY
def test_parity_weights(kwargs, shape):
    ours, theirs = _twin_layers(kwargs, shape)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    assert [w.path.split("/")[-1] for w in ours.weights] == [
        w.path.split("/")[-1] for w in theirs.weights
    ]
    assert [tuple(w.shape) for w in ours.weights] == [
        tuple(w.shape) for w in theirs.weights
    ]
    assert [w.trainable for w in ours.weights] == [
        w.trainable for w in theirs.weights
    ]
    for mine, keras_weight in zip(
        ours.get_weights(), theirs.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(mine, keras_weight)
    # And the other way round.
    ours.set_weights([w + 1.0 for w in ours.get_weights()])
    theirs.set_weights(ours.get_weights())
    for mine, keras_weight in zip(
        ours.get_weights(), theirs.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(mine, keras_weight)


@PARITY
def test_parity_steps(kwargs, shape):
    """Outputs in training and inference, and the moving statistics, over
    several training steps on batches of different statistics."""
    ours, theirs = _twin_layers(kwargs, shape)
    for step in range(4):
        x = _normal(shape, seed=step, loc=step - 1.0, scale=1.0 + step)
        np.testing.assert_allclose(
            to_numpy(ours(x, training=True)),
            to_numpy(theirs(x, training=True)),
            rtol=RTOL,
            atol=ATOL,
        )
        _assert_same_weights(ours, theirs)
        for training in (False, None):
            np.testing.assert_allclose(
                to_numpy(ours(x, training=training)),
                to_numpy(theirs(x, training=training)),
                rtol=RTOL,
                atol=ATOL,
            )


@PARITY
def test_parity_gradients(kwargs, shape):
    ours, theirs = _twin_layers(kwargs, shape)
    x = _normal(shape, loc=0.5, scale=2.0)
    upstream = _normal(shape, seed=7)

    (value, grads), (keras_value, keras_grads) = (
        _training_gradients(ours, x, upstream),
        _training_gradients(theirs, x, upstream),
    )
    np.testing.assert_allclose(value, keras_value, rtol=RTOL, atol=1e-4)
    assert len(grads) == len(keras_grads)
    for mine, keras_grad in zip(grads, keras_grads, strict=True):
        np.testing.assert_allclose(mine, keras_grad, rtol=RTOL, atol=ATOL)


def _small_model(bn_factory, shape, seed=3):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape[1:])
    hidden = keras.layers.Dense(5)(inputs)
    hidden = bn_factory()(hidden)
    hidden = keras.layers.Activation("relu")(hidden)
    hidden = bn_factory(name="second_bn")(hidden)
    outputs = keras.layers.Dense(2)(hidden)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"renorm": True, "momentum": 0.7}, {"momentum": 0.5, "center": False}],
    ids=["plain", "renorm", "no_center"],
)
def test_parity_fit(kwargs):
    """Several `fit` steps from the same weights end with the same weights
    and moving statistics (this also checks the gradients end to end)."""
    shape = (48, 4)
    ours = _small_model(
        lambda **kw: keras_bn.BatchNormalization(**kwargs, **kw), shape
    )
    theirs = _small_model(
        lambda **kw: keras.layers.BatchNormalization(**kwargs, **kw), shape
    )
    ours.set_weights(theirs.get_weights())
    x = _normal(shape, loc=3.0, scale=2.0)
    y = _normal((shape[0], 2), seed=5)
    for model in (ours, theirs):
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for mine, keras_weight in zip(ours.weights, theirs.weights, strict=True):
        assert np.all(np.isfinite(to_numpy(mine))), mine.path
        np.testing.assert_allclose(
            to_numpy(mine),
            to_numpy(keras_weight),
            rtol=1e-5,
            atol=1e-5,
            err_msg=mine.path,
        )
    np.testing.assert_allclose(
        ours.predict(x, verbose=0),
        theirs.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_parity_mask():
    shape = (6, 5, 3)
    ours, theirs = _twin_layers({"momentum": 0.5}, shape)
    x = _normal(shape, loc=1.0, scale=2.0)
    mask = np.random.default_rng(2).random(shape[:2]) > 0.4
    np.testing.assert_allclose(
        to_numpy(ours(x, training=True, mask=mask)),
        to_numpy(theirs(x, training=True, mask=mask)),
        rtol=RTOL,
        atol=ATOL,
    )
    for mine, keras_weight in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(
            to_numpy(mine), to_numpy(keras_weight), rtol=RTOL, atol=ATOL
        )


# Every form of mask Keras's layer takes: one axis less than the input, a
# last axis of size 1 added, broadcast to the input, whatever `axis` is.
KERAS_MASKS = {
    "channels_last": ({}, (6, 5, 3), (6, 5)),
    "rank_2": ({}, (8, 3), (8,)),
    "axis_1_per_channel": ({"axis": 1}, (5, 2, 3), (5, 2)),
    "axis_1_shapes_coincide": ({"axis": 1}, (6, 3, 3, 3), (6, 3, 3)),
    "axis_1_rank_4": ({"axis": 1}, (5, 3, 3, 2), (5, 3, 3)),
    "axis_2_rank_4": ({"axis": 2}, (5, 3, 4, 2), (5, 3, 4)),
    "broadcast": ({}, (4, 2, 3, 4), (1, 2, 1)),
    "broadcast_batch": ({"axis": 1}, (6, 3, 4), (1, 3)),
    "renorm_axis_1": (
        {"axis": 1, "renorm": True, "renorm_momentum": 0.5},
        (6, 3, 4),
        (6, 3),
    ),
}


@pytest.mark.parametrize(
    "kwargs,shape,mask_shape",
    list(KERAS_MASKS.values()),
    ids=list(KERAS_MASKS),
)
def test_parity_keras_masks(kwargs, shape, mask_shape):
    """Outputs, moving statistics over two steps, and gradients."""
    ours, theirs = _twin_layers({"momentum": 0.5, **kwargs}, shape)
    rng = np.random.default_rng(5)
    for step in range(2):
        x = _normal(shape, seed=step, loc=1.0, scale=2.0)
        mask = _mask_with_data(rng, mask_shape, shape, ours)
        np.testing.assert_allclose(
            to_numpy(ours(x, training=True, mask=mask)),
            to_numpy(theirs(x, training=True, mask=mask)),
            rtol=RTOL,
            atol=ATOL,
        )
        _assert_same_weights(ours, theirs)
    upstream = _normal(shape, seed=7)
    _, grads = _training_gradients(ours, x, upstream, mask=mask)
    _, keras_grads = _training_gradients(theirs, x, upstream, mask=mask)
    for mine, keras_grad in zip(grads, keras_grads, strict=True):
        np.testing.assert_allclose(mine, keras_grad, rtol=RTOL, atol=1e-4)


def _mask_with_data(rng, mask_shape, shape, layer):
    """A random Keras mask that leaves every channel some data: a channel
    without any is where the layers differ (see
    `test_a_channel_without_data_keeps_its_statistics`)."""
    while True:
        mask = rng.random(mask_shape) > 0.4
        expanded = np.broadcast_to(mask[..., None], shape)
        if np.all(expanded.sum(axis=tuple(layer._reduction_axes)) > 0):
            return mask


def test_a_channel_without_data_keeps_its_statistics():
    """The one difference on masks: Keras's layer moves the moving
    statistics of a channel without unmasked elements towards 0."""
    ours, theirs = _twin_layers({"axis": 1, "momentum": 0.5}, (4, 2, 3))
    x = _normal((4, 2, 3), loc=1.0)
    mask = np.ones((4, 2), bool)
    mask[:, 1] = False
    before = to_numpy(ours.moving_variance)
    ours(x, training=True, mask=mask)
    theirs(x, training=True, mask=mask)
    np.testing.assert_array_equal(to_numpy(ours.moving_variance)[1], before[1])
    np.testing.assert_allclose(
        to_numpy(theirs.moving_variance)[1], before[1] * 0.5, rtol=RTOL
    )
    np.testing.assert_allclose(
        to_numpy(ours.moving_variance)[0],
        to_numpy(theirs.moving_variance)[0],
        rtol=RTOL,
    )


def test_parity_masking_layer_with_axis_1():
    """The case Keras's own tests found: `Masking` before a layer with
    `axis=1` on `(6, 3, 3, 3)`, where the mask's shape, `(6, 3, 3)`, is
    also that of the input without its feature axis."""
    x = _normal((6, 3, 3, 3), loc=3.0, scale=2.0)
    x[:4, 1, 0, :] = 0.0
    x[2:, 2, 1:, :] = 0.0

    def model(bn_cls):
        inputs = keras.Input((3, 3, 3))
        outputs = bn_cls(axis=1, momentum=0.0)(keras.layers.Masking()(inputs))
        return keras.Model(inputs, outputs)

    ours, theirs = (
        model(keras_bn.BatchNormalization),
        model(keras.layers.BatchNormalization),
    )
    np.testing.assert_allclose(
        to_numpy(ours(x, training=True)),
        to_numpy(theirs(x, training=True)),
        rtol=RTOL,
        atol=ATOL,
    )
    _assert_same_weights(ours, theirs)


def test_mask_of_the_input_rank_is_read_as_it_is():
    """keras-bn's own form: a channels-first mask of time steps, against
    the float64 reference; Keras's layer refuses a mask of this rank."""
    layer = keras_bn.BatchNormalization(axis=1, momentum=0.0)
    x = _normal((6, 3, 4), loc=1.0)
    mask = np.random.default_rng(2).random((6, 1, 4)) > 0.3
    expected = reference.batch_norm(x, axis=1, mask=mask)
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True, mask=mask)),
        expected["outputs"],
        rtol=RTOL,
        atol=ATOL,
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), expected["mean"], rtol=RTOL
    )
    with pytest.raises(ValueError):
        keras.layers.BatchNormalization(axis=1)(x, training=True, mask=mask)


def test_parity_mask_from_embedding():
    """A mask that Keras propagates from `Embedding(mask_zero=True)`."""

    def model(bn):
        keras.utils.set_random_seed(4)
        inputs = keras.Input((6,), dtype="int32")
        hidden = keras.layers.Embedding(10, 3, mask_zero=True)(inputs)
        return keras.Model(inputs, bn(hidden))

    ours = model(keras_bn.BatchNormalization(momentum=0.5))
    theirs = model(keras.layers.BatchNormalization(momentum=0.5))
    tokens = np.random.default_rng(0).integers(0, 10, (8, 6))
    tokens[:, 4:] = 0
    np.testing.assert_allclose(
        to_numpy(ours(tokens, training=True)),
        to_numpy(theirs(tokens, training=True)),
        rtol=RTOL,
        atol=ATOL,
    )
    np.testing.assert_allclose(
        to_numpy(ours.layers[-1].moving_variance),
        to_numpy(theirs.layers[-1].moving_variance),
        rtol=RTOL,
    )


@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
def test_weights_file_interchange(direction, tmp_path):
    def model(bn_cls):
        return _small_model(lambda **kw: bn_cls(renorm=True, **kw), (8, 4))

    source_cls, target_cls = (
        keras.layers.BatchNormalization,
        keras_bn.BatchNormalization,
    )
    if direction == "ours_to_keras":
        source_cls, target_cls = target_cls, source_cls
    source = model(source_cls)
    x = _normal((8, 4), loc=1.0)
    source.compile(optimizer="sgd", loss="mse")
    source.fit(x, x[:, :2], epochs=2, verbose=0)
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    target = model(target_cls)
    target.load_weights(path)
    for mine, other in zip(target.weights, source.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(mine), to_numpy(other))
    np.testing.assert_allclose(
        to_numpy(target(x)), to_numpy(source(x)), rtol=1e-6, atol=1e-6
    )


def test_frozen_layer_runs_inference_and_keeps_statistics():
    layer = keras_bn.BatchNormalization(virtual_batch_size=2, renorm=True)
    x = _normal((6, 3), loc=2.0, scale=3.0)
    layer(x, training=True)
    layer.trainable = False
    before = [to_numpy(w) for w in layer.weights]
    frozen = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(
        frozen, to_numpy(layer(x, training=False)), rtol=1e-6
    )
    for weight, old in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), old)

    # In a model, fit must not move anything either.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, x, verbose=0)
    for weight, old in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), old)


def test_training_none_is_inference():
    layer = keras_bn.BatchNormalization()
    x = _normal((6, 3), loc=2.0, scale=3.0)
    layer.build(x.shape)
    layer.moving_mean.assign([1.0, 2.0, 3.0])
    layer.moving_variance.assign([4.0, 5.0, 6.0])
    expected = reference.inference(x, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=RTOL)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), [1.0, 2.0, 3.0], rtol=0
    )


# ---------------------------------------------------------------------------
# Ghost batches and axes against the float64 reference.

GHOST_CASES = {
    "even": ({"virtual_batch_size": 4}, (12, 3), None),
    "ragged": ({"virtual_batch_size": 4}, (10, 3), None),
    "ragged_single_last": ({"virtual_batch_size": 3}, (7, 2, 3), None),
    "one_ghost_batch": ({"virtual_batch_size": 16}, (10, 3), None),
    "size_one": ({"virtual_batch_size": 1}, (5, 4, 3), None),
    "masked": ({"virtual_batch_size": 3}, (8, 4, 3), (8, 4)),
    "channels_first": (
        {"axis": 1, "virtual_batch_size": 3},
        (7, 3, 4, 2),
        None,
    ),
    "channels_first_masked": (
        {"axis": 1, "virtual_batch_size": 3},
        (7, 3, 4, 2),
        (7, 1, 4, 2),
    ),
    "several_axes": (
        {"axis": [1, -1], "virtual_batch_size": 2},
        (5, 3, 4, 2),
        None,
    ),
    "several_axes_masked": ({"axis": (2, 1)}, (5, 3, 2, 4), (5, 1, 1, 4)),
    "rank_5": ({"virtual_batch_size": 2}, (5, 2, 3, 2, 3), None),
    "renorm": (
        {"virtual_batch_size": 4, "renorm": True, "renorm_momentum": 0.5},
        (10, 3),
        None,
    ),
    "renorm_clipping_masked": (
        {
            "virtual_batch_size": 3,
            "renorm": True,
            "renorm_clipping": {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3},
        },
        (8, 4, 3),
        (8, 4),
    ),
}
GHOST = pytest.mark.parametrize(
    "kwargs,shape,mask_shape",
    list(GHOST_CASES.values()),
    ids=list(GHOST_CASES),
)


def _ghost_reference(kwargs, x, mask, gamma, beta, renorm):
    """The reference's training step for a layer built with `kwargs`."""
    return reference.batch_norm(
        x,
        axis=kwargs.get("axis", -1),
        mask=mask,
        virtual_batch_size=kwargs.get("virtual_batch_size"),
        gamma=gamma,
        beta=beta,
        renorm=renorm,
    )


def _renorm_state(layer):
    """The reference's `renorm` argument for the layer's current state."""
    if not layer.renorm:
        return None
    return {
        "mean": to_numpy(layer.renorm_mean),
        "stddev": to_numpy(layer.renorm_stddev),
        **(layer.renorm_clipping or {}),
    }


def _mask(mask_shape, seed=3):
    if mask_shape is None:
        return None
    return np.random.default_rng(seed).random(mask_shape) > 0.3


@GHOST
def test_ghost_batches_match_reference(kwargs, shape, mask_shape):
    momentum = 0.6
    layer = keras_bn.BatchNormalization(momentum=momentum, **kwargs)
    layer.build(shape)
    _random_parameters(layer)
    gamma, beta = _parameters(layer)
    axis = kwargs.get("axis", -1)
    moving_mean = to_numpy(layer.moving_mean)
    moving_variance = to_numpy(layer.moving_variance)
    moving_stddev = np.sqrt(moving_variance)
    for step in range(3):
        x = _normal(shape, seed=step, loc=2.0 * step - 1.0, scale=1.0 + step)
        mask = _mask(mask_shape, seed=step)
        renorm_state = _renorm_state(layer)
        expected = _ghost_reference(kwargs, x, mask, gamma, beta, renorm_state)
        outputs = layer(x, training=True, mask=mask)
        np.testing.assert_allclose(
            to_numpy(outputs), expected["outputs"], rtol=RTOL, atol=ATOL
        )
        moving_mean = reference.moving_average(
            moving_mean, expected["mean"], momentum
        )
        np.testing.assert_allclose(
            to_numpy(layer.moving_mean), moving_mean, rtol=RTOL, atol=ATOL
        )
        if layer.renorm:
            stddev = np.sqrt(expected["variance"] + layer.epsilon)
            moving_stddev = reference.moving_average(
                moving_stddev, stddev, momentum
            )
            moving_variance = moving_stddev**2 - layer.epsilon
        else:
            moving_variance = reference.moving_average(
                moving_variance, expected["variance"], momentum
            )
        np.testing.assert_allclose(
            to_numpy(layer.moving_variance),
            moving_variance,
            rtol=RTOL,
            atol=ATOL,
        )
    # Inference ignores ghost batches and takes any batch size.
    x = _normal((3,) + shape[1:], seed=9)
    expected = reference.inference(
        x, moving_mean, moving_variance, axis=axis, gamma=gamma, beta=beta
    )
    np.testing.assert_allclose(
        to_numpy(layer(x)), expected, rtol=RTOL, atol=ATOL
    )


@GHOST
def test_ghost_gradients_match_reference(kwargs, shape, mask_shape):
    """Gradients with respect to the input, gamma and beta flow through the
    ghost statistics: checked against finite differences of the float64
    reference."""
    layer = keras_bn.BatchNormalization(**kwargs)
    layer.build(shape)
    _random_parameters(layer)
    gamma, beta = _parameters(layer)
    axis = kwargs.get("axis", -1)
    x = _normal(shape, loc=1.0, scale=2.0)
    mask = _mask(mask_shape)
    upstream = _normal(shape, seed=11)
    renorm_state = None
    if layer.renorm:
        layer.renorm_mean.assign(np.full(layer.renorm_mean.shape, 0.7))
        layer.renorm_stddev.assign(np.full(layer.renorm_stddev.shape, 1.3))
        renorm_state = _renorm_state(layer)
        renorm_state["corrections"] = reference.batch_norm(
            x,
            axis=axis,
            mask=mask,
            virtual_batch_size=kwargs.get("virtual_batch_size"),
            renorm=renorm_state,
        )["corrections"]
    non_trainable = [ops.copy(w) for w in layer.non_trainable_variables]

    def loss(x, gamma, beta):
        y, _ = layer.stateless_call(
            [gamma, beta], non_trainable, x, training=True, mask=mask
        )
        return ops.sum(ops.multiply(y, upstream))

    # Op by op on JAX: the other tests take their gradients compiled.
    _, (dx, dgamma, dbeta) = value_and_gradients(
        loss, x, gamma, beta, compiled=False
    )

    def reference_loss(x=x, gamma=gamma, beta=beta):
        outputs = _ghost_reference(kwargs, x, mask, gamma, beta, renorm_state)[
            "outputs"
        ]
        return np.sum(outputs * upstream)

    expected_dx = reference.numerical_gradient(lambda v: reference_loss(x=v), x)
    expected_dgamma = reference.numerical_gradient(
        lambda v: reference_loss(gamma=v), gamma
    )
    expected_dbeta = reference.numerical_gradient(
        lambda v: reference_loss(beta=v), beta
    )
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dgamma, expected_dgamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta, expected_dbeta, rtol=1e-4, atol=1e-4)


def test_ghost_statistics_differ_from_plain():
    """The ghost path really normalizes per ghost batch: ghost batches with
    different statistics give each a zero mean, which plain BN does not."""
    x = np.concatenate(
        [_normal((4, 3), loc=-5.0), _normal((4, 3), seed=1, loc=5.0)]
    )
    ghost = to_numpy(
        keras_bn.BatchNormalization(virtual_batch_size=4)(x, training=True)
    )
    plain = to_numpy(keras_bn.BatchNormalization()(x, training=True))
    np.testing.assert_allclose(ghost[:4].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ghost[4:].mean(axis=0), 0.0, atol=1e-5)
    assert np.all(np.abs(plain[:4].mean(axis=0)) > 0.9)


def test_ghost_matches_tf_keras_virtual_batch_size():
    """tf.keras's ghost batch j holds samples j, j + G, j + 2G, ...; ours
    are consecutive. With the batch permuted they compute the same."""
    if BACKEND != "tensorflow":
        pytest.skip("tf_keras runs on TensorFlow")
    import tf_keras

    batch, virtual, features = 12, 4, 3
    groups = batch // virtual
    permutation = np.array(
        [i * groups + j for j in range(groups) for i in range(virtual)]
    )
    theirs = tf_keras.layers.BatchNormalization(
        virtual_batch_size=virtual, momentum=0.7, renorm=True
    )
    ours = keras_bn.BatchNormalization(virtual_batch_size=virtual, momentum=0.7)
    ours_renorm = keras_bn.BatchNormalization(
        virtual_batch_size=virtual, momentum=0.7, renorm=True
    )
    plain_theirs = tf_keras.layers.BatchNormalization(
        virtual_batch_size=virtual, momentum=0.7
    )
    for step in range(3):
        x = _normal((batch, features), seed=step, loc=step, scale=1 + step)
        y_theirs = to_numpy(plain_theirs(x, training=True))
        y_ours = to_numpy(ours(x[permutation], training=True))
        np.testing.assert_allclose(
            y_ours, y_theirs[permutation], rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(
            to_numpy(ours.moving_mean),
            plain_theirs.moving_mean.numpy().reshape(-1),
            rtol=RTOL,
            atol=ATOL,
        )
        np.testing.assert_allclose(
            to_numpy(ours.moving_variance),
            plain_theirs.moving_variance.numpy().reshape(-1),
            rtol=RTOL,
            atol=ATOL,
        )
        # tf.keras applies one renorm correction to all ghost batches;
        # ours corrects each ghost batch, so only the statistics compare.
        theirs(x, training=True)
        ours_renorm(x[permutation], training=True)
        for name in ("moving_mean", "moving_variance", "renorm_mean"):
            np.testing.assert_allclose(
                to_numpy(getattr(ours_renorm, name)),
                getattr(theirs, name).numpy().reshape(-1),
                rtol=RTOL,
                atol=ATOL,
                err_msg=name,
            )


@pytest.mark.parametrize(
    "virtual_batch_size", [4, None], ids=["ghost_batches", "whole_batch"]
)
def test_dynamic_batch_compiled(virtual_batch_size):
    """A compiled step with an unknown batch size takes any batch, ragged
    ghost batches included."""
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=virtual_batch_size, momentum=0.0
    )
    layer.build((None, 3))
    x = _normal((10, 3), loc=1.0, scale=2.0)

    def step(x):
        outputs, updated = layer.stateless_call(
            layer.trainable_variables,
            layer.non_trainable_variables,
            x,
            training=True,
        )
        return outputs, updated[1]

    compiled = compile_with_dynamic_batch(step, x)
    for batch in (10, 4, 3, 9):
        outputs, moving_variance = compiled(x[:batch])
        expected = reference.batch_norm(
            x[:batch], virtual_batch_size=virtual_batch_size
        )
        np.testing.assert_allclose(
            to_numpy(outputs), expected["outputs"], rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(
            to_numpy(moving_variance), expected["variance"], rtol=RTOL
        )


# Keras's own Layer.__call__ calls an lru_cache-wrapped function, which
# torch.compile (fit(jit_compile=True) on torch) warns about.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools")
@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "jit"])
def test_fit_with_ragged_last_batch(jit_compile):
    """`fit` with a last batch smaller than the others, and the ghost batch
    size dividing neither, trains to the same moving statistics as the
    reference."""
    x = _normal((22, 3), loc=4.0, scale=2.0)
    layer = keras_bn.BatchNormalization(virtual_batch_size=3, momentum=0.5)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    model.fit(x, x, batch_size=8, epochs=1, shuffle=False, verbose=0)
    mean, variance = np.zeros(3), np.ones(3)
    for start in range(0, 22, 8):
        expected = reference.batch_norm(
            x[start : start + 8], virtual_batch_size=3
        )
        mean = reference.moving_average(mean, expected["mean"], 0.5)
        variance = reference.moving_average(variance, expected["variance"], 0.5)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), mean, rtol=RTOL)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), variance, rtol=RTOL
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shape", [(9, 3), (9, 1, 1, 3)], ids=str)
def test_a_last_ghost_batch_of_one_value_joins_the_one_before(compiled, shape):
    """A ghost batch of one value per feature has variance 0: the last
    ghost batch of 9 samples in batches of 4, one sample, joins the one
    before it (samples 4 to 8), with a batch size known only at run time
    too."""
    x = _normal(shape, loc=3.0, scale=2.0)
    layer = keras_bn.BatchNormalization(virtual_batch_size=4, momentum=0.0)
    layer.build((None,) + shape[1:])

    def step(x):
        outputs, updated = layer.stateless_call(
            layer.trainable_variables,
            layer.non_trainable_variables,
            x,
            training=True,
        )
        return outputs, updated[1]

    if compiled:
        step = compile_with_dynamic_batch(step, x)
    outputs, moving_variance = step(x)
    parts = [reference.batch_norm(x[:4]), reference.batch_norm(x[4:])]
    expected = np.concatenate([part["outputs"] for part in parts])
    np.testing.assert_allclose(
        to_numpy(outputs), expected, rtol=RTOL, atol=ATOL
    )
    variance = (4 * parts[0]["variance"] + 5 * parts[1]["variance"]) / 9
    np.testing.assert_allclose(
        to_numpy(moving_variance).reshape(-1), variance, rtol=RTOL
    )
    assert not np.allclose(
        to_numpy(outputs)[8], np.zeros(shape[1:]), atol=1e-3
    ), "the last sample was normalized on its own"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("virtual_batch_size", [None, 4], ids=str)
def test_a_batch_of_one_value_keeps_the_moving_statistics(
    compiled, virtual_batch_size
):
    """A training batch of one sample with one value per feature tells
    nothing of the variance: it is normalized with the moving statistics,
    which it leaves as they are; a batch of two is trained on."""
    x = _normal((2, 3), loc=3.0, scale=2.0)
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=virtual_batch_size, momentum=0.5
    )
    layer.build((None, 3))
    for weight, seed in zip(layer.weights, range(4), strict=True):
        weight.assign(_normal((3,), seed=seed, loc=1.0, scale=0.2))

    def step(x):
        outputs, updated = layer.stateless_call(
            layer.trainable_variables,
            layer.non_trainable_variables,
            x,
            training=True,
        )
        return outputs, updated

    if compiled:
        step = compile_with_dynamic_batch(step, x)
    gamma, beta, mean, variance = (to_numpy(w) for w in layer.weights)
    outputs, updated = step(x[:1])
    np.testing.assert_allclose(
        to_numpy(outputs),
        reference.inference(x[:1], mean, variance, gamma=gamma, beta=beta),
        rtol=RTOL,
        atol=ATOL,
    )
    for value, old in zip(updated[:2], (mean, variance), strict=True):
        np.testing.assert_array_equal(to_numpy(value), old)
    outputs, updated = step(x)
    expected = reference.batch_norm(x, gamma=gamma, beta=beta)
    np.testing.assert_allclose(
        to_numpy(outputs), expected["outputs"], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        to_numpy(updated[0]),
        reference.moving_average(mean, expected["mean"], 0.5),
        rtol=RTOL,
    )


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools")
@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "jit"])
def test_fit_with_a_last_batch_of_one_sample(jit_compile):
    """`fit` on 9 samples in batches of 4: the last batch, one sample,
    leaves the moving statistics to the first two."""
    x = _normal((9, 3), loc=4.0, scale=2.0)
    layer = keras_bn.BatchNormalization(momentum=0.5)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    model.fit(x, x, batch_size=4, epochs=1, shuffle=False, verbose=0)
    mean, variance = np.zeros(3), np.ones(3)
    for start in (0, 4):
        expected = reference.batch_norm(x[start : start + 4])
        mean = reference.moving_average(mean, expected["mean"], 0.5)
        variance = reference.moving_average(variance, expected["variance"], 0.5)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), mean, rtol=RTOL)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), variance, rtol=RTOL
    )


def test_ghost_batches_of_one_value_are_refused():
    """`virtual_batch_size=1` where a sample has one value per feature;
    on images, a ghost batch of one sample has many."""
    with pytest.raises(ValueError, match="virtual_batch_size=1, input_shape"):
        keras_bn.BatchNormalization(virtual_batch_size=1).build((None, 3))
    layer = keras_bn.BatchNormalization(virtual_batch_size=1)
    x = _normal((2, 4, 4, 3), loc=1.0)
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)),
        np.concatenate(
            [
                reference.batch_norm(x[:1])["outputs"],
                reference.batch_norm(x[1:])["outputs"],
            ]
        ),
        rtol=RTOL,
        atol=ATOL,
    )


# ---------------------------------------------------------------------------
# Masks.


def test_masked_positions_are_ignored():
    """Changing the values at masked positions changes neither the
    statistics nor the outputs elsewhere."""
    shape = (6, 3, 4)
    x = _normal(shape, loc=1.0)
    mask = np.ones((6, 1, 4), bool)
    mask[..., 3] = False
    noisy = x.copy()
    noisy[:, :, 3] = 1e6
    layers = [
        keras_bn.BatchNormalization(axis=1, virtual_batch_size=4)
        for _ in range(2)
    ]
    clean = to_numpy(layers[0](x, training=True, mask=mask))
    dirty = to_numpy(layers[1](noisy, training=True, mask=mask))
    np.testing.assert_allclose(clean[..., :3], dirty[..., :3], rtol=1e-6)
    np.testing.assert_allclose(
        to_numpy(layers[0].moving_variance),
        to_numpy(layers[1].moving_variance),
        rtol=1e-6,
    )


def test_a_mask_of_numbers_is_read_as_booleans():
    """A mask of numbers keeps the positions where it is not zero, each
    with the same weight, as in Keras's layer since Keras 3.15 (which
    weighted them by the value before): fractions are not weights."""
    x = _normal((6, 3), loc=1.0, scale=2.0)
    numbers = np.array([1.0, 0.5, 0.25, 1.0, 0.0, 2.0], "float32")
    kept = numbers != 0
    expected = reference.batch_norm(x, mask=kept[:, None])["outputs"]
    layer = keras_bn.BatchNormalization()
    outputs = to_numpy(layer(x, training=True, mask=numbers))
    np.testing.assert_allclose(outputs, expected, rtol=RTOL, atol=ATOL)
    weighted_mean = (numbers @ x) / numbers.sum()
    assert not np.allclose(
        to_numpy(layer.moving_mean), 0.01 * weighted_mean, rtol=1e-3
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), 0.01 * x[kept].mean(0), rtol=1e-5
    )


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_empty_ghost_batch_and_empty_batch(renorm):
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=2, momentum=0.5, renorm=renorm
    )
    x = _normal((6, 3, 2), loc=3.0)
    mask = np.ones((6, 3), bool)
    mask[2:4] = False  # The second ghost batch has no data.
    outputs = to_numpy(layer(x, training=True, mask=mask))
    assert np.all(np.isfinite(outputs))
    expected = reference.batch_norm(x, mask=mask, virtual_batch_size=2)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean),
        reference.moving_average(0.0, expected["mean"], 0.5),
        rtol=RTOL,
    )

    # A fresh layer too: renorm derives moving_variance from moving_stddev,
    # which must not move it either.
    fresh_layer = keras_bn.BatchNormalization(renorm=renorm)
    fresh_layer.build(x.shape)
    for fresh in (layer, fresh_layer):
        before = [to_numpy(w) for w in fresh.weights]
        empty = np.zeros((6, 3), bool)
        outputs = to_numpy(fresh(x, training=True, mask=empty))
        assert np.all(np.isfinite(outputs))
        for weight, old in zip(fresh.weights, before, strict=True):
            np.testing.assert_array_equal(
                to_numpy(weight), old, err_msg=weight.name
            )


@pytest.mark.parametrize(
    "mask_shape", [(6,), (6, 3, 3), (6, 4), (5, 3), (6, 3, 2, 1)], ids=str
)
def test_mask_of_wrong_shape(mask_shape):
    layer = keras_bn.BatchNormalization()
    x = _normal((6, 3, 2))
    with pytest.raises(ValueError, match="mask.shape=") as error:
        layer(x, training=True, mask=np.ones(mask_shape, bool))
    assert str(mask_shape) in str(error.value)


# ---------------------------------------------------------------------------
# Inference statistics.


def test_inference_with_batch_statistics():
    layer = keras_bn.BatchNormalization(inference_statistics="batch")
    x = _normal((9, 3), loc=5.0, scale=3.0)
    layer.build(x.shape)
    _random_parameters(layer)
    gamma, beta = _parameters(layer)
    before = [to_numpy(w) for w in layer.non_trainable_weights]
    expected = reference.batch_norm(x, gamma=gamma, beta=beta)["outputs"]
    for training in (False, None):
        np.testing.assert_allclose(
            to_numpy(layer(x, training=training)),
            expected,
            rtol=RTOL,
            atol=ATOL,
        )
    mask = np.arange(9) < 5
    expected = reference.batch_norm(x, mask=mask, gamma=gamma, beta=beta)
    np.testing.assert_allclose(
        to_numpy(layer(x, mask=mask)), expected["outputs"], rtol=RTOL, atol=ATOL
    )
    inputs = keras.Input((3,))
    keras.Model(inputs, layer(inputs)).predict(x, batch_size=4, verbose=0)
    for weight, old in zip(layer.non_trainable_weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), old)


# ---------------------------------------------------------------------------
# Numerics.


def test_variance_of_inputs_with_large_offset():
    """1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 loses the variance to
    cancellation; the two-pass variance keeps it to 1e-3."""
    x = _normal((256, 4), loc=1e4)
    expected = np.var(x.astype(np.float64), axis=0)
    for kwargs in ({}, {"virtual_batch_size": 64}):
        layer = keras_bn.BatchNormalization(momentum=0.0, **kwargs)
        outputs = to_numpy(layer(x, training=True))
        ghost_variance = reference.batch_norm(x, **kwargs)["variance"]
        np.testing.assert_allclose(
            to_numpy(layer.moving_variance), ghost_variance, rtol=1e-3
        )
        if not kwargs:
            np.testing.assert_allclose(
                to_numpy(layer.moving_variance), expected, rtol=1e-3
            )
            np.testing.assert_allclose(outputs.std(axis=0), 1.0, rtol=1e-3)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    half = policy.removeprefix("mixed_")
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=4, renorm=True, dtype=policy
    )
    x = _normal((10, 3), loc=1.0, scale=3.0)
    outputs = layer(x.astype(half), training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == half
    for weight in layer.weights:
        assert keras.backend.standardize_dtype(weight.dtype) == "float32"
    expected = reference.batch_norm(
        x.astype(half).astype("float32"),
        virtual_batch_size=4,
        renorm={"mean": 0.0, "stddev": 1.0},
    )
    tolerance = 1e-2 if half == "bfloat16" else 2e-3
    np.testing.assert_allclose(
        to_numpy(ops.cast(outputs, "float32")),
        expected["outputs"],
        rtol=tolerance,
        atol=tolerance,
    )
    inference = layer(x.astype(half))
    assert keras.backend.standardize_dtype(inference.dtype) == half


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_full_16_bit_policies_keep_float32_statistics(policy):
    """Under a 16-bit policy the statistics are float32 variables: an
    update `0.001 * (batch - moving)` is below bfloat16's resolution, and
    1000 steps at momentum 0.999 stall 48 % short of the average in
    bfloat16 variables (Keras's layer)."""
    steps, batch = 1000, 8
    rng = np.random.default_rng(0)
    means = np.array([3.0, -1.0, 10.0, 0.1])
    x = (means + 2.0 * rng.normal(size=(steps * batch, 4))).astype(policy)
    layer = keras_bn.BatchNormalization(momentum=0.999, dtype=policy)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, x, batch_size=batch, shuffle=False, verbose=0)
    for weight in layer.non_trainable_weights:
        assert keras.backend.standardize_dtype(weight.dtype) == "float32"
    assert keras.backend.standardize_dtype(layer.gamma.dtype) == policy
    assert keras.backend.standardize_dtype(model(x[:2]).dtype) == policy
    expected_mean, expected_variance = np.zeros(4), np.ones(4)
    for batch_x in x.astype("float64").reshape(steps, batch, 4):
        expected_mean = 0.999 * expected_mean + 0.001 * batch_x.mean(0)
        expected_variance = 0.999 * expected_variance + 0.001 * batch_x.var(0)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), expected_mean, rtol=1e-4
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), expected_variance, rtol=1e-4
    )


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_float16"])
def test_weights_of_keras_layer_under_16_bit_policy_load(tmp_path, policy):
    """Keras's layer stores its statistics in the policy's variable dtype:
    its files load into keras-bn's float32 statistics, value for value."""
    x = _normal((16, 3), loc=2.0, scale=3.0).astype(policy.split("_")[-1])

    def model(batch_norm):
        return keras.Sequential(
            [keras.Input((3,)), batch_norm(momentum=0.5, dtype=policy)]
        )

    original = model(keras.layers.BatchNormalization)
    original(x, training=True)
    original.save_weights(tmp_path / "keras.weights.h5")
    loaded = model(keras_bn.BatchNormalization)
    loaded.load_weights(tmp_path / "keras.weights.h5")
    for mine, theirs in zip(loaded.weights, original.weights, strict=True):
        np.testing.assert_array_equal(
            to_numpy(mine), to_numpy(ops.cast(theirs, mine.dtype))
        )
    np.testing.assert_allclose(
        to_numpy(ops.cast(loaded(x), "float32")),
        to_numpy(ops.cast(original(x), "float32")),
        rtol=1e-2,
        atol=1e-2,
    )


def test_float16_inputs_near_the_limit_stay_finite():
    layer = keras_bn.BatchNormalization(dtype="mixed_float16")
    x = np.random.default_rng(0).uniform(-6e4, 6e4, (64, 3)).astype("float16")
    outputs = to_numpy(ops.cast(layer(x, training=True), "float32"))
    assert np.all(np.isfinite(outputs))
    assert np.all(np.isfinite(to_numpy(layer.moving_variance)))
    np.testing.assert_allclose(
        outputs,
        reference.batch_norm(x.astype("float64"))["outputs"],
        rtol=1e-2,
        atol=1e-2,
    )


@pytest.fixture(name="float64")
def float64_fixture():
    with float64_enabled():
        yield


def test_float64_stays_float64(float64):
    """Keras's own layer computes float64 statistics in float32 on JAX: at
    an offset of 1e8 the variance comes out as 0."""
    layer = keras_bn.BatchNormalization(dtype="float64", virtual_batch_size=3)
    x = _normal((7, 3), loc=1e8, dtype="float64")
    outputs = layer(x, training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == "float64"
    np.testing.assert_allclose(
        to_numpy(outputs),
        reference.batch_norm(x, virtual_batch_size=3)["outputs"],
        rtol=1e-9,
        atol=1e-9,
    )


def test_float64_epsilon_is_not_rounded_to_float32(float64):
    """Found by the randomized tests: on TensorFlow, `ops.cast(0.1,
    "float64")` goes through float32 (0.10000000149...), which put float64
    inference 1e-8 off."""
    layer = keras_bn.BatchNormalization(
        dtype="float64", epsilon=0.1, center=False, scale=False
    )
    x = _normal((4, 3), dtype="float64")
    np.testing.assert_allclose(
        to_numpy(layer(x)), x / np.sqrt(1.0 + 0.1), rtol=1e-14
    )


def test_float64_renorm_corrections_stay_float64(float64):
    """Found by the randomized tests: on the torch backend `ops.maximum`,
    `ops.minimum` and `ops.clip` return float32 for float64 inputs, which
    rounded renorm's `r` and `d` (and the `sqrt(epsilon)` floor)."""
    clipping = {"rmin": 0.5, "rmax": 1.5, "dmax": 0.7}
    layer = keras_bn.BatchNormalization(
        dtype="float64",
        epsilon=0.01,
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=0.0,
    )
    steps = [
        _normal((6, 3), seed=step, loc=3.0 * step, scale=0.1 + step)
        for step in range(3)
    ]
    renorm = {"mean": 0.0, "stddev": 1.0, **clipping}
    for x in steps:
        expected = reference.batch_norm(x, epsilon=0.01, renorm=renorm)
        outputs = layer(x, training=True)
        np.testing.assert_allclose(
            to_numpy(outputs), expected["outputs"], rtol=1e-12, atol=1e-12
        )
        renorm["mean"] = expected["mean"]
        renorm["stddev"] = np.sqrt(expected["variance"] + 0.01)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=str)
@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_non_finite_channel_keeps_its_moving_statistics(bad, renorm):
    layer = keras_bn.BatchNormalization(
        momentum=0.5, renorm=renorm, virtual_batch_size=4
    )
    x = _normal((8, 3), loc=2.0)
    layer(x, training=True)
    before = {w.name: to_numpy(w) for w in layer.non_trainable_weights}
    corrupted = x.copy()
    corrupted[5, 1] = bad
    outputs = to_numpy(layer(corrupted, training=True))
    assert np.all(np.isfinite(outputs[:, [0, 2]]))
    for weight in layer.non_trainable_weights:
        value = to_numpy(weight)
        np.testing.assert_array_equal(value[1], before[weight.name][1])
        assert np.all(value[[0, 2]] != before[weight.name][[0, 2]])


NO_GRADIENT_CASES = {
    "plain": ({}, (8, 3), None),
    "ghost_ragged": ({"virtual_batch_size": 3}, (8, 4, 3), None),
    "several_axes": ({"axis": [1, 3]}, (4, 3, 5, 2), None),
    "masked": ({"virtual_batch_size": 4}, (8, 5, 3), (8, 5)),
    "renorm": ({"renorm": True}, (8, 3), None),
}


@pytest.mark.parametrize(
    "kwargs,shape,mask_shape",
    list(NO_GRADIENT_CASES.values()),
    ids=list(NO_GRADIENT_CASES),
)
def test_without_gradients_inputs_stay_and_outputs_agree(
    kwargs, shape, mask_shape
):
    """Where no gradient is recorded (`predict`, `recalibrate`), the layer
    computes its outputs in buffers of its own (in place on PyTorch): the
    input tensor is left as it was, and training and inference outputs and
    moving statistics are those of a call that records gradients."""
    x = _normal(shape, loc=3.0)
    mask = None
    if mask_shape is not None:
        mask = np.random.default_rng(2).uniform(size=mask_shape) > 0.3
    layers = [keras_bn.BatchNormalization(**kwargs) for _ in range(2)]
    for layer in layers:
        layer.build(shape)
        _random_parameters(layer)
    inputs = ops.convert_to_tensor(x)
    outputs = {}
    for name, layer in zip(("without", "with"), layers, strict=True):
        with no_gradients() if name == "without" else contextlib.nullcontext():
            training = layer(inputs, training=True, mask=mask)
            inference = layer(inputs, training=False)
        outputs[name] = (to_numpy(training), to_numpy(inference))
        np.testing.assert_array_equal(to_numpy(inputs), x)
    for without, recorded in zip(
        outputs["without"], outputs["with"], strict=True
    ):
        np.testing.assert_allclose(without, recorded, rtol=1e-6, atol=1e-6)
    for weight, other in zip(
        layers[0].non_trainable_weights,
        layers[1].non_trainable_weights,
        strict=True,
    ):
        np.testing.assert_allclose(to_numpy(weight), to_numpy(other))
    layer = layers[0]
    if not layer.renorm:
        expected = reference.batch_norm(
            x,
            axis=kwargs.get("axis", -1),
            mask=mask,
            virtual_batch_size=kwargs.get("virtual_batch_size"),
            gamma=to_numpy(layer.gamma),
            beta=to_numpy(layer.beta),
        )
        np.testing.assert_allclose(
            outputs["without"][0], expected["outputs"], rtol=RTOL, atol=ATOL
        )
    np.testing.assert_allclose(
        outputs["without"][1],
        reference.inference(
            x,
            to_numpy(layer.moving_mean),
            to_numpy(layer.moving_variance),
            axis=kwargs.get("axis", -1),
            gamma=to_numpy(layer.gamma),
            beta=to_numpy(layer.beta),
        ),
        rtol=RTOL,
        atol=ATOL,
    )


# ---------------------------------------------------------------------------
# Synchronized statistics on one device.


def test_synchronized_on_one_device_changes_nothing():
    x = _normal((10, 3), loc=1.0, scale=2.0)
    for kwargs, synchronized in (
        ({}, True),
        ({"virtual_batch_size": 4}, True),
        ({}, 4),
    ):
        synced = keras_bn.BatchNormalization(
            synchronized=synchronized, **kwargs
        )
        plain = keras_bn.BatchNormalization(**kwargs)
        np.testing.assert_allclose(
            to_numpy(synced(x, training=True)),
            to_numpy(plain(x, training=True)),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            to_numpy(synced.moving_variance),
            to_numpy(plain.moving_variance),
            rtol=1e-6,
        )


# ---------------------------------------------------------------------------
# Bad arguments.

BAD_ARGUMENTS = {
    "virtual_batch_size_zero": (
        {"virtual_batch_size": 0},
        "virtual_batch_size=0",
    ),
    "virtual_batch_size_negative": (
        {"virtual_batch_size": -4},
        "virtual_batch_size=-4",
    ),
    "virtual_batch_size_float": (
        {"virtual_batch_size": 2.5},
        "virtual_batch_size=2.5",
    ),
    "virtual_batch_size_string": (
        {"virtual_batch_size": "8"},
        "virtual_batch_size='8'",
    ),
    "virtual_batch_size_bool": (
        {"virtual_batch_size": True},
        "virtual_batch_size=True",
    ),
    "synchronized_one": ({"synchronized": 1}, "synchronized=1"),
    "synchronized_zero": ({"synchronized": 0}, "synchronized=0"),
    "synchronized_negative": ({"synchronized": -2}, "synchronized=-2"),
    "synchronized_float": ({"synchronized": 2.0}, "synchronized=2.0"),
    "synchronized_string": ({"synchronized": "all"}, "synchronized='all'"),
    "momentum_above_one": ({"momentum": 1.5}, "momentum=1.5"),
    "momentum_negative": ({"momentum": -0.1}, "momentum=-0.1"),
    "renorm_momentum": ({"renorm_momentum": 2.0}, "renorm_momentum=2.0"),
    "epsilon_zero": ({"epsilon": 0.0}, "epsilon=0.0"),
    "epsilon_negative": ({"epsilon": -1e-3}, "epsilon=-0.001"),
    "inference_statistics": (
        {"inference_statistics": "moving_average"},
        "inference_statistics='moving_average'",
    ),
    "axis_float": ({"axis": 1.0}, "axis=1.0"),
    "axis_empty": ({"axis": []}, r"axis=\[\]"),
    "axis_repeated": ({"axis": [1, 1]}, r"axis=\[1, 1\]"),
    "batch_axis_with_ghost": (
        {"axis": [0, 2], "virtual_batch_size": 4},
        "batch axis 0",
    ),
    # The renorm_clipping messages also hold the phrases Keras's own tests
    # match (tests/test_keras_suite.py).
    "renorm_clipping_key": (
        {"renorm": True, "renorm_clipping": {"rmax": 2.0, "r_max": 3.0}},
        "Received invalid keys.*r_max.*Received: renorm_clipping=",
    ),
    "renorm_clipping_rmax_below_rmin": (
        {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 1.0}},
        "rmax should be greater than rmin.*'rmax': 0.5, 'rmin': 1.0",
    ),
    "renorm_clipping_dmax_negative": (
        {"renorm": True, "renorm_clipping": {"dmax": -1.0}},
        "dmax should be non-negative.*'dmax': -1.0",
    ),
    "renorm_clipping_rmax_below_one": (
        {"renorm": True, "renorm_clipping": {"rmax": 0.5}},
        "rmax should be at least 1.*'rmax': 0.5",
    ),
    "renorm_clipping_rmin_above_one": (
        {"renorm": True, "renorm_clipping": {"rmin": 1.5, "rmax": 2.0}},
        "rmin should be at most 1.*'rmin': 1.5",
    ),
    "renorm_clipping_infinite": (
        {"renorm": True, "renorm_clipping": {"dmax": float("inf")}},
        "dmax should be a finite number.*'dmax': inf",
    ),
    "renorm_clipping_nan": (
        {"renorm": True, "renorm_clipping": {"rmax": float("nan")}},
        "rmax should be a finite number.*'rmax': nan",
    ),
    "renorm_clipping_string": (
        {"renorm": True, "renorm_clipping": {"rmax": "3"}},
        "rmax should be a finite number.*'rmax': '3'",
    ),
    "renorm_clipping_without_renorm": (
        {"renorm_clipping": {"rmax": 2.0}},
        r"renorm=True.*renorm_clipping=\{'rmax': 2.0\} with renorm=False",
    ),
    **{
        f"{name}_{kind}": ({name: value}, f"{name}={value!r}")
        for name in ("center", "scale", "renorm", "bessel_correction")
        for kind, value in (("string", "yes"), ("int", 1), ("none", None))
    },
}


@pytest.mark.parametrize(
    "kwargs,message", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS)
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_bn.BatchNormalization(**kwargs)


def test_numpy_booleans_are_booleans():
    layer = keras_bn.BatchNormalization(
        center=np.bool_(False), renorm=np.bool_(True)
    )
    assert layer.center is False and layer.renorm is True
    assert layer.get_config()["center"] is False


BAD_BUILDS = {
    "axis_out_of_range": ({"axis": 3}, (None, 4, 3), "axis=3"),
    "axis_negative_out_of_range": ({"axis": -4}, (None, 4, 3), "axis=-4"),
    "axis_same_twice": ({"axis": [2, -1]}, (None, 4, 3), r"axis=\[2, -1\]"),
    "batch_axis_with_ghost": (
        {"axis": [-3, -1], "virtual_batch_size": 4},
        (8, 4, 3),
        "batch axis 0",
    ),
    "unknown_feature_dimension": ({"axis": 1}, (None, None, 3), "known size"),
    "rank_one": ({}, (8,), "rank 2 or more"),
}


@pytest.mark.parametrize(
    "kwargs,shape,message", list(BAD_BUILDS.values()), ids=list(BAD_BUILDS)
)
def test_invalid_inputs(kwargs, shape, message):
    layer = keras_bn.BatchNormalization(**kwargs)
    with pytest.raises(ValueError, match=message):
        layer.build(shape)


def test_bad_call_leaves_state_intact():
    layer = keras_bn.BatchNormalization(momentum=0.5)
    x = _normal((6, 3, 2), loc=1.0)
    layer(x, training=True)
    before = [to_numpy(w) for w in layer.weights]
    with pytest.raises(ValueError):
        layer(x, training=True, mask=np.ones((6, 2, 3), bool))
    for weight, old in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), old)


def test_batch_axis_without_ghost_is_allowed():
    layer = keras_bn.BatchNormalization(axis=[0, -1])
    x = _normal((4, 5, 3))
    expected = reference.batch_norm(x, axis=[0, -1])["outputs"]
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)), expected, rtol=RTOL, atol=ATOL
    )
    assert tuple(layer.gamma.shape) == (4, 3)


# ---------------------------------------------------------------------------
# Serialization.

FULL_CONFIG = {
    "axis": [1, 3],
    "momentum": 0.9,
    "epsilon": 1e-4,
    "center": False,
    "scale": True,
    "beta_initializer": "ones",
    "gamma_initializer": keras.initializers.Constant(2.0),
    "moving_mean_initializer": "ones",
    "moving_variance_initializer": keras.initializers.Constant(4.0),
    "beta_regularizer": "l2",
    "gamma_regularizer": keras.regularizers.L1(0.01),
    "beta_constraint": "non_neg",
    "gamma_constraint": keras.constraints.MaxNorm(2.0),
    "synchronized": True,
    "renorm": True,
    "renorm_clipping": {"rmax": 3.0, "rmin": 0.5, "dmax": 1.0},
    "renorm_momentum": 0.8,
    "virtual_batch_size": 16,
    "inference_statistics": "batch",
}


def test_config_round_trip_keeps_every_argument():
    layer = keras_bn.BatchNormalization(**FULL_CONFIG, name="bn")
    config = layer.get_config()
    for key in (
        "axis",
        "momentum",
        "epsilon",
        "center",
        "scale",
        "synchronized",
        "renorm",
        "renorm_clipping",
        "renorm_momentum",
        "virtual_batch_size",
        "inference_statistics",
    ):
        assert config[key] == FULL_CONFIG[key], key
    json.dumps(config)
    snapshot = json.loads(json.dumps(config))
    clone = keras_bn.BatchNormalization.from_config(config)
    assert json.loads(json.dumps(config)) == snapshot
    assert clone.get_config() == config
    config["renorm_clipping"]["rmax"] = 100.0
    assert layer.renorm_clipping["rmax"] == 3.0
    assert clone.virtual_batch_size == 16


def test_load_model_without_custom_objects(tmp_path):
    inputs = keras.Input((5, 3))
    outputs = keras_bn.BatchNormalization(
        virtual_batch_size=3, renorm=True, axis=[1, 2]
    )(inputs)
    model = keras.Model(inputs, outputs)
    x = _normal((7, 5, 3), loc=1.0)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, x, verbose=0)
    path = tmp_path / "model.keras"
    model.save(str(path))
    with zipfile.ZipFile(path) as archive:
        saved = json.loads(archive.read("config.json"))
    layer_config = saved["config"]["layers"][1]
    assert layer_config["registered_name"] == "keras_bn>BatchNormalization"
    assert layer_config["config"]["virtual_batch_size"] == 3
    loaded = keras.models.load_model(str(path))
    assert isinstance(loaded.layers[1], keras_bn.BatchNormalization)
    assert loaded.layers[1].virtual_batch_size == 3
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )


def test_stateless_call_returns_updated_moving_statistics():
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=3, renorm=True, momentum=0.5
    )
    x = _normal((8, 3), loc=2.0, scale=3.0)
    layer.build(x.shape)
    trainable = [ops.copy(w) for w in layer.trainable_variables]
    non_trainable = [ops.copy(w) for w in layer.non_trainable_variables]
    outputs, updated = layer.stateless_call(
        trainable, non_trainable, x, training=True
    )
    # The layer itself did not change ...
    for weight, old in zip(
        layer.non_trainable_variables, non_trainable, strict=True
    ):
        np.testing.assert_array_equal(to_numpy(weight), to_numpy(old))
    # ... and the stateless results equal a stateful step.
    stateful = layer(x, training=True)
    np.testing.assert_allclose(to_numpy(outputs), to_numpy(stateful), rtol=1e-6)
    # The five weights of renorm, on every backend (momenta that never
    # changed are no state).
    assert len(updated) == len(layer.non_trainable_variables) == 5
    assert len(layer.non_trainable_weights) == 5
    for new, weight in zip(updated, layer.non_trainable_variables, strict=True):
        np.testing.assert_allclose(
            to_numpy(new), to_numpy(weight), rtol=1e-6, err_msg=weight.name
        )


# ---------------------------------------------------------------------------
# An instance of Keras's layer, with none of its behaviour.


def test_is_an_instance_of_keras_layer():
    assert isinstance(
        keras_bn.BatchNormalization(), keras.layers.BatchNormalization
    )


def test_fine_tuning_recipe_finds_it():
    """keras.io's fine-tuning recipe: unfreeze everything but the batch
    norms, found by class."""
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3)(inputs)
    outputs = keras_bn.BatchNormalization(virtual_batch_size=2)(hidden)
    model = keras.Model(inputs, outputs)
    for layer in model.layers:
        layer.trainable = False
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
    bn = model.layers[-1]
    assert not bn.trainable and model.layers[1].trainable
    before = [to_numpy(w) for w in bn.weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = _normal((8, 4), loc=1.0)
    model.fit(x, np.ones((8, 3)), batch_size=8, verbose=0)
    for weight, old in zip(bn.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), old)


def test_overrides_every_public_method_of_keras_layer():
    ours = vars(keras_bn.BatchNormalization)
    public = [
        name
        for name, value in vars(keras.layers.BatchNormalization).items()
        if not name.startswith("_") and callable(value)
    ]
    assert "call" in public
    assert [name for name in public if name not in ours] == []


def test_calls_no_private_method_of_keras_layer(monkeypatch):
    private = [
        name
        for name, value in vars(keras.layers.BatchNormalization).items()
        if name.startswith("_")
        and not name.startswith("__")
        and callable(value)
        and name not in vars(keras_bn.BatchNormalization)
    ]
    assert "_moments" in private

    def refuse(*args, **kwargs):
        raise AssertionError("a method of Keras's layer was called")

    for name in private:
        monkeypatch.setattr(keras.layers.BatchNormalization, name, refuse)
    for kwargs in ({}, {"renorm": True, "virtual_batch_size": 3}):
        layer = keras_bn.BatchNormalization(**kwargs)
        x = _normal((7, 2, 3), loc=1.0)
        layer(x, training=True, mask=np.arange(14).reshape(7, 2) % 3 > 0)
        layer(x)
        inputs = keras.Input((2, 3))
        model = keras.Model(
            inputs, keras_bn.BatchNormalization(**kwargs)(inputs)
        )
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, x, verbose=0)


def test_keras_layer_validation_does_not_apply():
    """Keras's layer refuses `synchronized=True` off TensorFlow; keras_bn's
    means the same on every backend, and one process trains with it."""
    layer = keras_bn.BatchNormalization(synchronized=True, momentum=0.0)
    x = _normal((6, 3), loc=2.0)
    layer(x, training=True)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean),
        reference.batch_norm(x)["mean"],
        rtol=RTOL,
    )


def test_serializes_under_its_own_name():
    layer = keras_bn.BatchNormalization(virtual_batch_size=4)
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == "keras_bn>BatchNormalization"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is keras_bn.BatchNormalization
    assert restored.virtual_batch_size == 4


@pytest.mark.parametrize("synchronized", [True, False, 2, 8], ids=str)
def test_synchronized_round_trips(synchronized):
    layer = keras_bn.BatchNormalization(synchronized=synchronized)
    config = json.loads(json.dumps(layer.get_config()))
    assert config["synchronized"] is synchronized or (
        config["synchronized"] == synchronized
        and type(config["synchronized"]) is type(synchronized)
    )
    restored = keras_bn.BatchNormalization.from_config(config)
    assert restored.synchronized == synchronized
    assert type(restored.synchronized) is type(synchronized)
