"""A layer test harness, modelled on Keras's `run_layer_test`."""

import copy
import pathlib

import keras
import numpy as np

from tests.backend import to_numpy

# Keras's own test module for its layer, in the installed package (Keras
# 3.15.1 ships it; see tests/test_keras_suite.py).
KERAS_SUITE = (
    pathlib.Path(keras.__file__).parent
    / "src"
    / "layers"
    / "normalization"
    / "batch_normalization_test.py"
)


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_num_trainable_weights,
    expected_num_non_trainable_weights,
    tmp_path,
    mask_shape=None,
):
    """Checks the contract every Keras layer keeps.

    Config round-trip without mutation; eager and symbolic calls with the
    expected output shape and weight counts; one `fit` step that moves the
    trainable and the moving weights; a `.keras` round-trip that predicts the
    same; a mixed-precision call with float32 weights and float16 outputs.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=input_shape).astype("float32")
    mask = None if mask_shape is None else rng.random(mask_shape) > 0.3

    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    saved_config = copy.deepcopy(config)
    clone = layer_cls.from_config(config)
    assert config == saved_config, "from_config mutated the config"
    assert clone.get_config() == config
    assert layer.get_config() == saved_config

    outputs = layer(x, training=True, mask=mask)
    assert tuple(outputs.shape) == tuple(input_shape)
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert (
        len(layer.non_trainable_weights) == expected_num_non_trainable_weights
    )
    assert np.all(np.isfinite(to_numpy(outputs)))

    inputs = keras.Input(batch_shape=(None,) + tuple(input_shape[1:]))
    symbolic = layer_cls(**init_kwargs)(inputs)
    assert tuple(symbolic.shape) == tuple(inputs.shape)

    model = keras.Model(inputs, symbolic)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [to_numpy(w) for w in model.weights]
    model.fit(x, 2 * x + 1, batch_size=len(x), epochs=1, verbose=0)
    after = [to_numpy(w) for w in model.weights]
    for weight, old, new in zip(model.weights, before, after, strict=True):
        if weight.trainable or weight.name in (
            "moving_mean",
            "moving_variance",
        ):
            assert not np.allclose(old, new), f"{weight.name} did not train"

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )
    assert type(loaded.layers[-1]) is layer_cls

    mixed = layer_cls(**init_kwargs, dtype="mixed_float16")
    outputs = mixed(x.astype("float16"), training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == "float16"
    for weight in mixed.weights:
        assert keras.backend.standardize_dtype(weight.dtype) == "float32"
    return layer
