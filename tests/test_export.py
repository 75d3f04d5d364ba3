"""Exported SavedModels of models with keras-bn layers: `model.export`
from TensorFlow and JAX (through jax2tf), loaded back with
`tf.saved_model.load`, predict as the model does, and gradients with
respect to the inputs flow through them."""

import keras
import numpy as np
import pytest

import keras_bn

pytestmark = pytest.mark.skipif(
    keras.backend.backend() not in ("tensorflow", "jax"),
    reason="Keras exports a SavedModel from TensorFlow and JAX",
)

CONFIGURATIONS = {
    "plain": {},
    "ghost": {"virtual_batch_size": 4},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 2.0}},
    "frozen_statistics": {"training_statistics": "moving"},
}


def _trained_model(kwargs, x):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x.shape[1:])
    outputs = keras.layers.Conv2D(4, 3)(inputs)
    outputs = keras_bn.BatchNormalization(**kwargs)(outputs)
    outputs = keras.layers.ReLU()(outputs)
    outputs = keras.layers.GlobalAveragePooling2D()(outputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(outputs))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.ones((len(x), 2)), batch_size=10, epochs=2, verbose=0)
    return model


def _input_gradient(model, x):
    """The gradient of `sum(model(x) ** 2)` with respect to `x`, inference
    mode, in the backend's own autodiff."""
    if keras.backend.backend() == "jax":
        import jax

        def loss(x):
            return (model(x, training=False) ** 2).sum()

        return np.asarray(jax.grad(loss)(x))
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(model(x, training=False) ** 2)
    return tape.gradient(loss, x).numpy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_exported_saved_model_predicts_and_differentiates(name, tmp_path):
    """The SavedModel's serving function gives `predict`'s outputs (1e-5),
    and its input gradients are those of the model. (TensorFlow logs that
    the functions jax2tf makes have "unsaved custom gradients": the
    serving function's gradient is computed all the same.)"""
    import tensorflow as tf

    x = np.random.default_rng(0).normal(2.0, 3.0, (20, 8, 8, 3))
    x = x.astype("float32")
    model = _trained_model(CONFIGURATIONS[name], x)
    path = str(tmp_path / "saved_model")
    model.export(path, format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(path)
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = loaded.serve(inputs)
        loss = tf.reduce_sum(outputs**2)
    gradient = tape.gradient(loss, inputs).numpy()
    np.testing.assert_allclose(
        outputs.numpy(), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    expected = _input_gradient(model, x)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)


def test_exported_saved_model_has_the_variables_of_keras_layer(tmp_path):
    """The same network with Keras's layer and with keras-bn's exports the
    same variables (a default layer has exactly Keras's, on JAX too)."""
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(20, 8, 8, 3)).astype("float32")
    shapes = {}
    for name, layer in (
        ("keras", keras.layers.BatchNormalization),
        ("keras_bn", keras_bn.BatchNormalization),
    ):
        inputs = keras.Input(x.shape[1:])
        outputs = layer()(keras.layers.Conv2D(4, 3)(inputs))
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, np.ones((20, 6, 6, 4)), batch_size=10, verbose=0)
        path = str(tmp_path / name)
        model.export(path, format="tf_saved_model", verbose=False)
        loaded = tf.saved_model.load(path)
        shapes[name] = sorted(tuple(v.shape) for v in loaded.variables)
    assert shapes["keras_bn"] == shapes["keras"]
    assert len(shapes["keras"]) == 6
