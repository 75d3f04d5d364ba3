import json
import zipfile

import keras
import numpy as np
import pytest

import keras_bn
from tests import reference
from tests.backend import channels_first_conv2d_runs
from tests.backend import to_numpy

BATCH_NORMS = {
    "keras": keras.layers.BatchNormalization,
    "keras_bn": keras_bn.BatchNormalization,
}
BN_KINDS = pytest.mark.parametrize(
    "bn_cls", list(BATCH_NORMS.values()), ids=list(BATCH_NORMS)
)


def _normal(shape, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.normal(size=shape)).astype("float32")


def _weights(model):
    return [to_numpy(w) for w in model.weights]


def _assert_unchanged(model, weights):
    for weight, old in zip(model.weights, weights, strict=True):
        np.testing.assert_array_equal(
            to_numpy(weight), old, err_msg=weight.path
        )


def _conv_net(bn_cls, seed=0):
    """A functional net with every foldable producer and a nested model."""
    keras.utils.set_random_seed(seed)
    inner_inputs = keras.Input((6, 6, 4))
    inner = keras.layers.Conv2D(4, 3, padding="same")(inner_inputs)
    inner = bn_cls()(inner)
    backbone = keras.Model(inner_inputs, inner, name="backbone")

    inputs = keras.Input((6, 6, 3))
    hidden = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    hidden = bn_cls()(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = backbone(hidden)
    hidden = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)(hidden)
    hidden = bn_cls()(hidden)
    branch = keras.layers.Conv2D(8, 1)(hidden)
    # Used twice: cannot fold.
    hidden = keras.layers.Add()([branch, bn_cls()(branch)])
    # Follows an activation: cannot fold.
    hidden = keras.layers.Conv2D(3, 1, activation="relu")(hidden)
    hidden = bn_cls()(hidden)
    hidden = keras.layers.Flatten()(hidden)
    hidden = keras.layers.Dense(5)(hidden)
    outputs = bn_cls()(hidden)
    return keras.Model(inputs, outputs)


def _trained(model, x, epochs=2):
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    output_shape = model.compute_output_shape((None,) + x.shape[1:])
    y = np.zeros((len(x),) + tuple(output_shape[1:]), "float32")
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0)
    return model


def _save_as_plain_keras(model, path):
    """Saves `model`, checks that no keras_bn layer is in the file, and
    loads it back."""
    model.save(str(path))
    with zipfile.ZipFile(path) as archive:
        assert "keras_bn" not in archive.read("config.json").decode()
    return keras.models.load_model(str(path))


def _batch_norms(model):
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers += _batch_norms(layer)
        elif isinstance(
            layer,
            (keras.layers.BatchNormalization, keras_bn.BatchNormalization),
        ):
            layers.append(layer)
    return layers


# ---------------------------------------------------------------------------
# recalibrate


def _reference_statistics(x, batch_size, **kwargs):
    """The count-weighted average of the batch statistics over the
    batches, in float64."""
    totals = [0.0, 0.0, 0.0]
    for start in range(0, len(x), batch_size):
        stats = reference.batch_norm(x[start : start + batch_size], **kwargs)
        totals[0] = totals[0] + stats["mean"] * stats["count"]
        totals[1] = totals[1] + stats["variance"] * stats["count"]
        totals[2] = totals[2] + stats["count"]
    return totals[0] / totals[2], totals[1] / totals[2]


RECALIBRATE_CASES = {
    "keras": (keras.layers.BatchNormalization, {}),
    "plain": (keras_bn.BatchNormalization, {}),
    "frozen_statistics": (
        keras_bn.BatchNormalization,
        {"training_statistics": "moving", "virtual_batch_size": 3},
    ),
    "ghost_ragged": (keras_bn.BatchNormalization, {"virtual_batch_size": 3}),
    "renorm": (keras_bn.BatchNormalization, {"renorm": True}),
    "channels_first": (keras_bn.BatchNormalization, {"axis": 1}),
}


@pytest.mark.parametrize(
    "bn_cls,kwargs",
    list(RECALIBRATE_CASES.values()),
    ids=list(RECALIBRATE_CASES),
)
def test_recalibrate_one_layer_equals_weighted_averages(bn_cls, kwargs):
    x = _normal((23, 3, 4), loc=2.0, scale=3.0)
    layer = bn_cls(**kwargs)
    model = keras.Sequential([keras.Input((3, 4)), layer])
    trainable = [to_numpy(w) for w in model.trainable_weights]
    returned = keras_bn.recalibrate(model, x, batch_size=5)
    assert returned is model
    mean, variance = _reference_statistics(
        x,
        5,
        axis=kwargs.get("axis", -1),
        virtual_batch_size=kwargs.get("virtual_batch_size"),
    )
    np.testing.assert_allclose(to_numpy(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), variance, rtol=1e-5
    )
    if layer.renorm:
        np.testing.assert_allclose(
            to_numpy(layer.moving_stddev),
            np.sqrt(variance + layer.epsilon),
            rtol=1e-5,
        )
        np.testing.assert_array_equal(to_numpy(layer.renorm_mean), 0.0)
    for weight, old in zip(model.trainable_weights, trainable, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), old)


def test_recalibrate_masked_sequence_weights_by_elements():
    """Batches with different numbers of unmasked elements count in
    proportion to them, not to the number of batches."""
    inputs = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Embedding(20, 3, mask_zero=True)(inputs)
    layer = keras_bn.BatchNormalization(virtual_batch_size=2)
    model = keras.Model(inputs, layer(hidden))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, (8, 5))
    tokens[:4, 1:] = 0  # The first batch has far fewer elements.
    keras_bn.recalibrate(model, tokens, batch_size=4)
    embedded = to_numpy(model.layers[1](tokens))
    mask = tokens != 0
    totals = [0.0, 0.0, 0.0]
    for start in (0, 4):
        stats = reference.batch_norm(
            embedded[start : start + 4],
            mask=mask[start : start + 4],
            virtual_batch_size=2,
        )
        totals[0] = totals[0] + stats["mean"] * stats["count"]
        totals[1] = totals[1] + stats["variance"] * stats["count"]
        totals[2] = totals[2] + stats["count"]
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), totals[0] / totals[2], rtol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), totals[1] / totals[2], rtol=1e-5
    )


def _data_source(source, x, batch_size):
    """`x` in batches, as the kind of data `source` names. A source from a
    library that is not installed (the oldest-Keras environment has only
    JAX) skips."""
    y = np.zeros(len(x), "float32")
    starts = range(0, len(x), batch_size)
    if source == "list_of_x":
        return [x[i : i + batch_size] for i in starts]
    if source == "generator_of_pairs":
        return ((x[i : i + batch_size], y[i : i + batch_size]) for i in starts)
    if source == "triples":
        return [
            (
                x[i : i + batch_size],
                y[i : i + batch_size],
                y[i : i + batch_size],
            )
            for i in starts
        ]
    if source == "tf_data":
        tf = pytest.importorskip("tensorflow")
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    torch = pytest.importorskip("torch")
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.from_numpy(x), torch.from_numpy(y)
        ),
        batch_size=batch_size,
    )


@pytest.mark.parametrize(
    "source",
    [
        "list_of_x",
        "generator_of_pairs",
        "triples",
        "tf_data",
        "torch_data_loader",
    ],
)
def test_recalibrate_data_sources(source):
    x = _normal((22, 4), loc=1.0, scale=2.0)
    layer = keras_bn.BatchNormalization(virtual_batch_size=4)
    model = keras.Sequential([keras.Input((4,)), layer])
    keras_bn.recalibrate(model, _data_source(source, x, 6))
    mean, variance = _reference_statistics(x, 6, virtual_batch_size=4)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), variance, rtol=1e-5
    )


def test_recalibrate_steps_and_inference_mode_elsewhere():
    """`steps` limits the batches; dropout stays off during the pass."""
    x = _normal((40, 4), loc=1.0, scale=2.0)
    layer = keras.layers.BatchNormalization()
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dropout(0.5), layer]
    )
    keras_bn.recalibrate(model, x, steps=2, batch_size=10)
    mean, variance = _reference_statistics(x[:20], 10)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), variance, rtol=1e-5
    )


def test_recalibrate_nested_and_frozen():
    x = _normal((16, 6, 6, 3), loc=1.0)
    model = _trained(_conv_net(keras_bn.BatchNormalization), x)
    model.trainable = False
    keras_bn.recalibrate(model, x, batch_size=8)
    assert model.trainable is False
    assert all(not layer.trainable for layer in _batch_norms(model))
    # The first batch norm sees the first convolution's outputs.
    conv, first = model.layers[1], model.layers[2]
    mean, variance = _reference_statistics(to_numpy(conv(x)), 8)
    np.testing.assert_allclose(to_numpy(first.moving_mean), mean, rtol=1e-4)
    np.testing.assert_allclose(
        to_numpy(first.moving_variance), variance, rtol=1e-4
    )


def test_recalibrate_repairs_stale_statistics():
    """After a short training with momentum 0.999 the moving statistics are
    still near their initial values and inference fails; recalibrating
    restores the accuracy that training reached."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 3.0
    labels = rng.integers(0, 4, 600)
    x = (centers[labels] + rng.normal(size=(600, 8)) + 20.0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32),
            keras_bn.BatchNormalization(momentum=0.999),
            keras.layers.ReLU(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x[:500], labels[:500], batch_size=50, epochs=3, verbose=0)
    _, stale = model.evaluate(x[500:], labels[500:], verbose=0)
    keras_bn.recalibrate(model, x[:500], batch_size=50)
    _, recalibrated = model.evaluate(x[500:], labels[500:], verbose=0)
    print(f"stale accuracy {stale:.3f}, recalibrated {recalibrated:.3f}")
    assert stale < 0.6
    assert recalibrated > 0.9


def test_recalibrate_bad_input():
    model = keras.Sequential([keras.Input((3,)), keras_bn.BatchNormalization()])
    with pytest.raises(ValueError, match="yielded no batch"):
        keras_bn.recalibrate(model, [])
    with pytest.raises(ValueError, match="yielded no batch"):
        keras_bn.recalibrate(model, np.zeros((0, 3), "float32"))
    with pytest.raises(TypeError, match="expects a keras.Model"):
        keras_bn.recalibrate(model.layers[0], np.zeros((4, 3)))
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    weights = _weights(plain)
    with pytest.warns(UserWarning, match="no batch-norm layer"):
        assert keras_bn.recalibrate(plain, np.ones((4, 3))) is plain
    _assert_unchanged(plain, weights)


@BN_KINDS
def test_recalibrate_runs_one_compiled_pass(bn_cls):
    """The pass is traced once and serves the next `recalibrate` of the
    model too, with the model's current weights: no Python call of a layer
    per batch on the backends that compile `predict`, the same batches as
    eager PyTorch."""
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(3)
    layer = bn_cls()
    model = keras.Model(inputs, layer(dense(inputs)))
    calls = []
    traced = dense.call

    def counting_call(*args, **kwargs):
        calls.append(1)
        return traced(*args, **kwargs)

    dense.call = counting_call
    x = _normal((30, 3), loc=1.0, scale=2.0)
    keras_bn.recalibrate(model, x, batch_size=10, verbose=0)
    first = len(calls)
    kernel = 3.0 * to_numpy(dense.kernel)
    dense.kernel.assign(kernel)
    keras_bn.recalibrate(model, 2.0 * x, batch_size=10, verbose=0)
    if keras.backend.backend() == "torch":
        assert (first, len(calls)) == (3, 6)
    else:
        assert (first, len(calls)) == (1, 1)
    hidden = 2.0 * x @ kernel + to_numpy(dense.bias)
    mean, variance = _reference_statistics(hidden.astype("float32"), 10)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), variance, rtol=1e-5
    )
    assert model.layers == [model.layers[0], dense, layer]
    assert "call" not in vars(layer)
    assert getattr(layer, "_recording", None) is None


def test_recalibrate_compiles_as_predict_does():
    """The pass follows the model's `jit_compile` (XLA, or torch.compile),
    also when a later `compile` changes it, and gives the same statistics
    either way."""
    x = _normal((20, 3), loc=1.0, scale=2.0)
    mean, variance = _reference_statistics(x, 10, virtual_batch_size=3)
    model = keras.Sequential(
        [keras.Input((3,)), keras_bn.BatchNormalization(virtual_batch_size=3)]
    )
    for jit_compile in (True, False):
        model.compile(jit_compile=jit_compile)
        keras_bn.recalibrate(model, x, batch_size=10, verbose=0)
        assert model._keras_bn_recorder.jit_compile is jit_compile
        np.testing.assert_allclose(
            to_numpy(model.layers[0].moving_mean), mean, rtol=1e-5
        )
        np.testing.assert_allclose(
            to_numpy(model.layers[0].moving_variance), variance, rtol=1e-5
        )


@pytest.mark.parametrize("verbose", [0, 1])
def test_recalibrate_progress_bar(capsys, verbose):
    model = keras.Sequential([keras.Input((3,)), keras_bn.BatchNormalization()])
    keras_bn.recalibrate(model, _normal((12, 3)), batch_size=4, verbose=verbose)
    printed = capsys.readouterr().out
    assert ("3/3" in printed) == bool(verbose), printed


# ---------------------------------------------------------------------------
# convert and revert


def test_convert_and_revert_round_trip(tmp_path):
    x = _normal((16, 6, 6, 3), loc=1.0)
    original = _trained(_conv_net(keras.layers.BatchNormalization), x)
    weights = _weights(original)
    expected = to_numpy(original(x))

    converted = keras_bn.convert(original, virtual_batch_size=4)
    _assert_unchanged(original, weights)
    assert all(
        type(layer) is keras.layers.BatchNormalization
        for layer in _batch_norms(original)
    )
    layers = _batch_norms(converted)
    assert len(layers) == 6
    assert all(type(layer) is keras_bn.BatchNormalization for layer in layers)
    assert all(layer.virtual_batch_size == 4 for layer in layers)
    np.testing.assert_allclose(
        to_numpy(converted(x)), expected, rtol=1e-6, atol=1e-6
    )
    # The converted model trains (with ghost batches of 4).
    before = _weights(converted)
    _trained(converted, x, epochs=1)
    assert not all(
        np.array_equal(to_numpy(w), old)
        for w, old in zip(converted.weights, before, strict=True)
    )

    converted_weights = _weights(converted)
    reverted = keras_bn.revert(converted)
    _assert_unchanged(converted, converted_weights)
    assert all(
        type(layer) is keras.layers.BatchNormalization
        for layer in _batch_norms(reverted)
    )
    np.testing.assert_allclose(
        to_numpy(reverted(x)), to_numpy(converted(x)), rtol=1e-6, atol=1e-6
    )
    _save_as_plain_keras(reverted, tmp_path / "reverted.keras")


def test_convert_drops_a_clipping_keras_never_applies():
    """Keras's layer accepts `renorm_clipping` without renorm and ignores
    it; keras-bn's refuses it, so `convert` leaves it out (the same
    outputs), unless the conversion turns renorm on."""
    x = _normal((8, 3), loc=2.0)
    clipping = {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.BatchNormalization(renorm_clipping=clipping),
        ]
    )
    (layer,) = _batch_norms(keras_bn.convert(model))
    assert layer.renorm_clipping is None and not layer.renorm
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)),
        to_numpy(model(x, training=True)),
        rtol=1e-6,
        atol=1e-6,
    )
    (layer,) = _batch_norms(keras_bn.convert(model, renorm=True))
    assert layer.renorm and layer.renorm_clipping == clipping


def test_convert_sequential_with_nested_backbone():
    x = _normal((8, 6, 6, 3))
    keras.utils.set_random_seed(1)
    backbone = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
        ]
    )
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), backbone, keras.layers.Flatten()]
    )
    _trained(model, x)
    converted = keras_bn.convert(model, momentum=0.5)
    inner = converted.layers[0].layers[-1]
    assert type(inner) is keras_bn.BatchNormalization
    assert inner.momentum == 0.5
    np.testing.assert_allclose(
        to_numpy(converted(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )


# The models' structure is the same on every backend: ResNet50 checks each
# backend's numerics, the other two their structure, on one backend.
ONE_BACKEND = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="converted on TensorFlow; ResNet50 covers this backend",
)


@pytest.mark.parametrize(
    "application",
    [
        "ResNet50",
        pytest.param("MobileNetV2", marks=ONE_BACKEND),
        pytest.param("EfficientNetB0", marks=ONE_BACKEND),
    ],
)
def test_convert_applications(application):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, application)(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    x = _normal((2, 32, 32, 3), scale=50.0)
    converted = keras_bn.convert(model, virtual_batch_size=8)
    assert not any(
        type(layer) is keras.layers.BatchNormalization
        for layer in _batch_norms(converted)
    )
    assert len(_batch_norms(converted)) == len(_batch_norms(model))
    np.testing.assert_allclose(
        to_numpy(converted(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )


def test_tools_on_an_application_inside_a_sequential():
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            backbone,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    x = _normal((2, 32, 32, 3), scale=50.0)
    expected = to_numpy(model(x))
    converted = keras_bn.convert(model, virtual_batch_size=8)
    assert all(
        type(layer) is keras_bn.BatchNormalization
        for layer in _batch_norms(converted)
    )
    np.testing.assert_allclose(
        to_numpy(converted(x)), expected, rtol=1e-6, atol=1e-6
    )
    data = _normal((8, 32, 32, 3), seed=1, scale=50.0)
    keras_bn.recalibrate(converted, data, batch_size=4)
    folded = keras_bn.fold(converted)
    assert _batch_norms(folded) == []
    np.testing.assert_allclose(
        to_numpy(folded(x)), to_numpy(converted(x)), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"axis": [1, 2]}, {"inference_statistics": "batch"}],
    ids=["several_axes", "batch_statistics"],
)
def test_revert_refuses_what_keras_cannot_express(kwargs):
    model = keras.Sequential(
        [keras.Input((3, 4)), keras_bn.BatchNormalization(name="odd", **kwargs)]
    )
    with pytest.raises(ValueError, match="layer 'odd'"):
        keras_bn.revert(model)


def test_revert_single_axis_list():
    model = keras.Sequential(
        [keras.Input((3, 4)), keras_bn.BatchNormalization(axis=[1])]
    )
    x = _normal((5, 3, 4), loc=1.0)
    model.layers[0](x, training=True)
    reverted = keras_bn.revert(model)
    assert reverted.layers[0].axis == 1
    np.testing.assert_allclose(
        to_numpy(reverted(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------------------
# fold


@BN_KINDS
def test_fold_functional(bn_cls, tmp_path):
    x = _normal((16, 6, 6, 3), loc=1.0)
    model = _trained(_conv_net(bn_cls), x)
    weights = _weights(model)
    folded = keras_bn.fold(model)
    _assert_unchanged(model, weights)
    # Folded: the first conv (no bias), the nested conv, the depthwise conv,
    # and the dense layer. Kept: after an activation, and a used branch.
    assert len(_batch_norms(folded)) == 2
    assert folded.layers[1].use_bias
    expected = to_numpy(model(x))
    np.testing.assert_allclose(
        to_numpy(folded(x)), expected, rtol=1e-4, atol=1e-5
    )
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    np.testing.assert_allclose(
        to_numpy(keras.models.load_model(path)(x)),
        expected,
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "producer,shape",
    [
        (lambda: keras.layers.Dense(4), (4, 5)),
        (lambda: keras.layers.Conv1D(4, 2), (4, 6, 3)),
        (
            lambda: keras.layers.Conv2D(4, 2, data_format="channels_first"),
            (4, 3, 6, 7),
        ),
        (lambda: keras.layers.Conv3D(4, 2, use_bias=False), (4, 4, 4, 4, 2)),
        (
            lambda: keras.layers.Conv3D(4, 2, data_format="channels_first"),
            (4, 3, 5, 6, 7),
        ),
        (
            lambda: keras.layers.DepthwiseConv2D(2, depth_multiplier=3),
            (4, 5, 5, 2),
        ),
        (
            lambda: keras.layers.DepthwiseConv1D(2, depth_multiplier=2),
            (4, 6, 3),
        ),
        (lambda: keras.layers.SeparableConv2D(4, 2), (4, 5, 5, 3)),
        (
            lambda: keras.layers.SeparableConv1D(
                4, 2, depth_multiplier=2, use_bias=False
            ),
            (4, 6, 3),
        ),
        (lambda: keras.layers.Conv2DTranspose(4, 2), (4, 3, 3, 3)),
        (
            lambda: keras.layers.Conv1DTranspose(4, 3, use_bias=False),
            (4, 5, 2),
        ),
        (lambda: keras.layers.Conv3DTranspose(4, 2), (4, 2, 3, 3, 2)),
    ],
    ids=[
        "dense",
        "conv1d",
        "conv2d_channels_first",
        "conv3d",
        "conv3d_channels_first",
        "depthwise",
        "depthwise1d",
        "separable",
        "separable1d",
        "transposed",
        "transposed1d",
        "transposed3d",
    ],
)
def test_fold_sequential(producer, shape, tmp_path):
    # Channels-first shapes whose width differs from the number of filters:
    # on TensorFlow, Keras's channels-first Conv2D adds its bias along the
    # last axis when the output width equals the number of filters.
    x = _normal(shape, loc=1.0)
    layer = producer()
    channels_first = getattr(layer, "data_format", None) == "channels_first"
    if channels_first and len(shape) == 4 and not channels_first_conv2d_runs():
        pytest.skip(
            "TensorFlow's CPU Conv2D takes NHWC only without oneDNN, which is "
            "off on this CPU (conv3d_channels_first runs, through XLA)"
        )
    axis = 1 if channels_first else -1
    model = keras.Sequential(
        [
            keras.Input(shape[1:]),
            layer,
            keras_bn.BatchNormalization(axis=axis, momentum=0.5),
        ]
    )
    for _ in range(3):
        model.layers[1](model.layers[0](x), training=True)
    for weight in model.layers[1].trainable_weights:
        weight.assign(np.random.default_rng(2).uniform(0.5, 2, weight.shape))
    folded = keras_bn.fold(model)
    assert _batch_norms(folded) == []
    np.testing.assert_allclose(
        to_numpy(folded(x)), to_numpy(model(x)), rtol=1e-4, atol=1e-5
    )
    loaded = _save_as_plain_keras(folded, tmp_path / "folded.keras")
    np.testing.assert_allclose(
        to_numpy(loaded(x)),
        to_numpy(folded(x)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_tools_on_operations_that_are_not_layers(tmp_path):
    """A functional graph holds operations that are not layers (`h + 3`,
    `keras.ops.mean`, as in MobileNetV3): every tool copies them."""
    x = _normal((16, 4), loc=1.0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3)(inputs)
    hidden = keras.layers.BatchNormalization(momentum=0.5)(hidden + 3.0)
    hidden = keras.layers.Dense(3)(hidden)
    hidden = keras.layers.BatchNormalization(momentum=0.5)(hidden)
    outputs = keras.ops.mean(hidden, axis=-1, keepdims=True) * 2.0
    model = _trained(keras.Model(inputs, outputs), x)
    expected = to_numpy(model(x))

    converted = keras_bn.convert(model, virtual_batch_size=4)
    assert len(_batch_norms(converted)) == 2
    np.testing.assert_allclose(
        to_numpy(converted(x)), expected, rtol=1e-6, atol=1e-6
    )
    _trained(converted, x, epochs=1)
    reverted = keras_bn.revert(converted)
    np.testing.assert_allclose(
        to_numpy(reverted(x)), to_numpy(converted(x)), rtol=1e-6, atol=1e-6
    )
    keras_bn.recalibrate(converted, x, batch_size=8)
    # The first batch norm follows `h + 3`, not a layer: it stays.
    folded = keras_bn.fold(model)
    assert [type(layer) for layer in _batch_norms(folded)] == [
        keras.layers.BatchNormalization
    ]
    np.testing.assert_allclose(to_numpy(folded(x)), expected, rtol=1e-5)
    loaded = _save_as_plain_keras(folded, tmp_path / "folded.keras")
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, rtol=1e-5)


def test_fold_resnet50_removes_every_batch_norm():
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    x = _normal((2, 32, 32, 3), scale=50.0)
    folded = keras_bn.fold(model)
    assert _batch_norms(model)
    assert _batch_norms(folded) == []
    np.testing.assert_allclose(
        to_numpy(folded(x)), to_numpy(model(x)), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "application,size",
    [
        ("MobileNetV3Small", 32),
        pytest.param("Xception", 71, marks=ONE_BACKEND),
    ],
)
def test_tools_on_applications_with_operations_and_separable(
    application, size, tmp_path
):
    """MobileNetV3's graph holds operations that are not layers (its hard
    swish is `x * relu6(x + 3) / 6`); Xception's batch norms follow
    separable convolutions. The converted model keeps the weight paths,
    saves and loads; every batch norm folds. (Without the top,
    whose dropout makes training outputs random.)"""
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, application)(
        weights=None,
        include_top=False,
        pooling="avg",
        input_shape=(size, size, 3),
    )
    x = _normal((2, size, size, 3), scale=50.0)
    expected = to_numpy(model(x))
    converted = keras_bn.convert(model)
    assert len(_batch_norms(converted)) == len(_batch_norms(model))
    assert [w.path for w in converted.weights] == [
        w.path for w in model.weights
    ]
    np.testing.assert_allclose(
        to_numpy(converted(x)), expected, rtol=1e-6, atol=1e-6
    )
    path = tmp_path / "converted.keras"
    converted.save(path)
    np.testing.assert_array_equal(
        to_numpy(keras.models.load_model(path)(x)), to_numpy(converted(x))
    )
    folded = keras_bn.fold(converted)
    assert _batch_norms(model) and _batch_norms(folded) == []
    np.testing.assert_allclose(
        to_numpy(folded(x)), expected, rtol=1e-4, atol=1e-5
    )
    # Batch statistics of two samples, through some fifty batch norms,
    # turn float32 rounding into differences of a few 1e-4.
    np.testing.assert_allclose(
        to_numpy(converted(x, training=True)),
        to_numpy(model(x, training=True)),
        rtol=1e-3,
        atol=2e-3,
    )


# ---------------------------------------------------------------------------
# What cannot be rebuilt.


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.norm = keras.layers.BatchNormalization()

    def call(self, inputs):
        return self.norm(self.dense(inputs))


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization()

    def call(self, inputs):
        return self.norm(inputs)


@pytest.mark.parametrize("tool", ["convert", "revert", "fold"])
def test_tools_refuse_what_they_cannot_rebuild(tool):
    subclassed = _Subclassed()
    subclassed(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="supports Sequential and functional"):
        getattr(keras_bn, tool)(subclassed)

    inputs = keras.Input((4,))
    hidden = _Block(name="block")(inputs)
    model = keras.Model(inputs, keras_bn.BatchNormalization()(hidden))
    with pytest.raises(ValueError, match="layer 'block'"):
        getattr(keras_bn, tool)(model)

    with pytest.raises(TypeError, match="expects a keras.Model"):
        getattr(keras_bn, tool)(keras.layers.Dense(3))


@pytest.mark.parametrize("tool", ["convert", "revert", "fold"])
def test_tools_warn_without_batch_norm(tool):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = _normal((4, 3))
    with pytest.warns(UserWarning, match="no batch-norm layer"):
        result = getattr(keras_bn, tool)(model)
    np.testing.assert_array_equal(to_numpy(result(x)), to_numpy(model(x)))


def test_recalibrate_works_on_subclassed_models():
    model = _Subclassed()
    x = _normal((12, 4), loc=1.0)
    model(x)
    keras_bn.recalibrate(model, x, batch_size=6)
    dense = to_numpy(model.dense(x))
    mean, variance = _reference_statistics(dense, 6)
    np.testing.assert_allclose(
        to_numpy(model.norm.moving_mean), mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(model.norm.moving_variance), variance, rtol=1e-5
    )
    json.dumps(model.norm.get_config())


# ---------------------------------------------------------------------------
# Graph shapes the tools must respect.


def test_fold_leaves_what_the_moving_statistics_cannot_replace():
    """Not folded: a batch norm called with training=True, one after a
    layer shared with another model, one after a LoRA-enabled layer. Dict
    outputs are fine."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    forced = keras_bn.BatchNormalization()(
        keras.layers.Dense(5)(inputs), training=True
    )
    shared = keras.layers.Dense(5)
    side = keras.Sequential([keras.Input((4,)), shared, keras.layers.ReLU()])
    nested = keras.Sequential(
        [keras.Input((4,)), shared, keras_bn.BatchNormalization()]
    )
    lora = keras.layers.Dense(5)
    lora_output = keras.layers.BatchNormalization()(lora(inputs))
    lora.enable_lora(2)
    plain = keras_bn.BatchNormalization()(keras.layers.Dense(5)(inputs))
    model = keras.Model(
        inputs,
        {
            "forced": forced,
            "side": side(inputs),
            "nested": nested(inputs),
            "lora": lora_output,
            "plain": plain,
        },
    )
    for layer in _batch_norms(model):
        layer.moving_mean.assign(np.linspace(-1, 1, 5))
        layer.moving_variance.assign(np.linspace(0.5, 2, 5))
    x = _normal((6, 4), loc=1.0)
    folded = keras_bn.fold(model)
    assert len(_batch_norms(folded)) == len(_batch_norms(model)) - 1
    expected, actual = model(x), folded(x)
    for key in expected:
        np.testing.assert_allclose(
            to_numpy(actual[key]),
            to_numpy(expected[key]),
            rtol=1e-4,
            atol=1e-5,
            err_msg=key,
        )


def test_rebuild_keeps_shared_models_shared():
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(),
        ],
        name="encoder",
    )
    head = keras.Sequential([keras.Input((4,)), encoder, keras.layers.Dense(2)])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [encoder(inputs), head(inputs)])
    converted = keras_bn.convert(model)
    assert len(converted.weights) == len(model.weights)
    assert len({id(w) for w in converted.weights}) == len(model.weights)
    x = _normal((5, 4))
    for mine, expected in zip(converted(x), model(x), strict=True):
        np.testing.assert_allclose(
            to_numpy(mine), to_numpy(expected), rtol=1e-6, atol=1e-6
        )
    keras_bn.recalibrate(converted, x, batch_size=5)
    bn = _batch_norms(converted)[0]
    expected = reference.batch_norm(to_numpy(converted.layers[1].layers[0](x)))
    np.testing.assert_allclose(
        to_numpy(bn.moving_variance), expected["variance"], rtol=1e-5
    )


def test_recalibrate_refusals_leave_the_model_as_it_was():
    unbuilt = keras.Sequential(
        [keras.layers.Dense(4), keras_bn.BatchNormalization()]
    )
    with pytest.raises(ValueError, match="needs a built model"):
        keras_bn.recalibrate(unbuilt, np.ones((4, 3), "float32"))
    assert "call" not in vars(unbuilt.layers[1])

    inputs = keras.Input((4,))
    model = keras.Model(inputs, _Block(name="block")(inputs))
    weights = _weights(model)
    with pytest.raises(ValueError, match="layer 'block'"):
        keras_bn.recalibrate(model, np.ones((4, 4), "float32"))
    _assert_unchanged(model, weights)


def test_recalibrate_named_inputs():
    inputs = {
        "a": keras.Input((2,), name="a"),
        "b": keras.Input((3,), name="b"),
    }
    joined = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    layer = keras_bn.BatchNormalization()
    model = keras.Model(inputs, layer(joined))
    data = {"a": _normal((10, 2), loc=1.0), "b": _normal((10, 3), seed=1)}
    keras_bn.recalibrate(model, data, batch_size=5)
    mean, variance = _reference_statistics(
        np.concatenate([data["a"], data["b"]], axis=1), 5
    )
    np.testing.assert_allclose(to_numpy(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), variance, rtol=1e-5
    )


def test_tools_tell_keras_bn_from_keras_layer():
    """keras_bn's layer is an instance of Keras's: `convert` gives it the
    new arguments and keeps its others, and without any leaves it as it
    is; `revert` turns only it into Keras's."""
    inputs = keras.Input((4,))
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(3)(inputs))
    outputs = keras_bn.BatchNormalization(virtual_batch_size=2, epsilon=0.01)(
        keras.layers.Dense(3)(hidden)
    )
    model = keras.Model(inputs, outputs)
    converted = keras_bn.convert(model, synchronized=True)
    layers = _batch_norms(converted)
    assert [type(layer) for layer in layers] == [
        keras_bn.BatchNormalization
    ] * 2
    assert [layer.synchronized for layer in layers] == [True, True]
    assert [layer.virtual_batch_size for layer in layers] == [None, 2]
    assert layers[1].epsilon == 0.01
    _, kept = _batch_norms(keras_bn.convert(model))
    assert kept.get_config() == model.layers[-1].get_config()
    reverted = keras_bn.revert(model)
    assert [type(layer) for layer in _batch_norms(reverted)] == [
        keras.layers.BatchNormalization
    ] * 2


def test_revert_a_group_of_devices():
    """Keras's layer has no groups: on TensorFlow a group becomes all the
    devices, elsewhere Keras's layer refuses `synchronized=True`."""
    inputs = keras.Input((4,))
    model = keras.Model(
        inputs, keras_bn.BatchNormalization(synchronized=2)(inputs)
    )
    (layer,) = _batch_norms(keras_bn.revert(model))
    assert layer.synchronized is (keras.backend.backend() == "tensorflow")
