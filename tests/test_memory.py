"""A training step of a small convolutional network needs no more memory
with keras-bn's layer than with Keras's, on JAX: XLA's compile-time buffer
assignment, which the machine's load does not change, so that a change of
XLA or of the layer that brings back a buffer of the input's size per batch
normalization fails here (see `_moments.scale_deviations`)."""

import keras
import numpy as np
import pytest

import keras_bn

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the compiled step's buffers are read from XLA on JAX",
)
BATCH = 64
DENSE_BATCH = 1024


def _network(batch_norm):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 8))
    x = inputs
    for filters in (32, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(batch_norm()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def _dense_network(batch_norm):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    x = inputs
    for units in (256, 256):
        x = keras.layers.Dense(units, use_bias=False)(x)
        x = keras.layers.ReLU()(batch_norm()(x))
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def _peak_bytes(model, batch):
    """Bytes the compiled training step allocates beyond its inputs."""
    import jax

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def forward(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return loss(y, logits), non_trainable

    step = jax.jit(jax.value_and_grad(forward, has_aux=True))
    x = np.zeros((batch,) + model.input_shape[1:], "float32")
    y = np.zeros((batch,), "int32")
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    analysis = step.lower(trainable, non_trainable, x, y).compile()
    analysis = analysis.memory_analysis()
    return (
        analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


@pytest.mark.parametrize(
    "kwargs,batch",
    [
        ({}, BATCH),
        ({"virtual_batch_size": 16}, BATCH),
        ({"virtual_batch_size": 16}, BATCH - 8),
    ],
    ids=["plain", "ghost", "ghost_ragged"],
)
def test_training_step_memory_is_keras_s(kwargs, batch):
    keras_bytes = _peak_bytes(_network(keras.layers.BatchNormalization), batch)
    ours = _peak_bytes(
        _network(lambda: keras_bn.BatchNormalization(**kwargs)), batch
    )
    # A tensor of the input's size is a fifth of the step's memory here;
    # the layer's few extra vectors of statistics are a few kilobytes.
    assert ours <= 1.01 * keras_bytes, ours / keras_bytes


@pytest.mark.parametrize(
    "kwargs,batch",
    [
        ({}, DENSE_BATCH),
        ({"virtual_batch_size": 128}, DENSE_BATCH),
        ({"virtual_batch_size": 128}, DENSE_BATCH - 6),
    ],
    ids=["plain", "ghost", "ghost_ragged"],
)
def test_dense_training_step_memory_is_keras_s(kwargs, batch):
    """Dense inputs: ragged ghost batches once took 1.9 times Keras's
    memory (two views copied, their outputs joined; see `RowGroups`)."""
    keras_bytes = _peak_bytes(
        _dense_network(keras.layers.BatchNormalization), batch
    )
    ours = _peak_bytes(
        _dense_network(lambda: keras_bn.BatchNormalization(**kwargs)), batch
    )
    # Ghost batches keep a few more rows of statistics per group.
    assert ours <= 1.03 * keras_bytes, ours / keras_bytes
