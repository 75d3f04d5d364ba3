"""Inputs far from zero: float32 training outputs and gradients stay within
2e-6 of the float64 reference, relative to their own scale, at offsets up
to 1e4 times the inputs' spread.

At such an offset the float32 mean of a group is off by up to half a unit
in its last place (5e-4 at 1e4), and every output `x - mean` would carry
that error (Keras's layer: 2e-3 here); the layer keeps the mean as two
floats (`_moments.Part`)."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_bn
from tests import reference
from tests.backend import value_and_gradients

SHAPE = (36, 6, 16)
OFFSETS = (0.0, 1e2, 1e4)
CASES = {
    "plain": {},
    "ghost": {"virtual_batch_size": 12},
    "ragged": {"virtual_batch_size": 8},
    "masked": {"masked": True},
    "masked_ghost": {"masked": True, "virtual_batch_size": 12},
}
TOLERANCE = 2e-6


def _check(name, actual, expected):
    """Within `TOLERANCE` of the reference, relative to its scale."""
    scale = np.max(np.abs(expected))
    error = np.max(np.abs(np.asarray(actual, "float64") - expected))
    assert error <= TOLERANCE * scale, (name, error / scale)


@pytest.mark.parametrize("offset", OFFSETS, ids=["0", "1e2", "1e4"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_outputs_and_gradients_at_large_offsets(case, offset):
    kwargs = dict(CASES[case])
    masked = kwargs.pop("masked", False)
    rng = np.random.default_rng(0)
    x = (offset + rng.normal(size=SHAPE)).astype("float32")
    upstream = rng.normal(size=SHAPE).astype("float32")
    gamma = rng.uniform(0.5, 2.0, SHAPE[-1]).astype("float32")
    beta = rng.normal(size=SHAPE[-1]).astype("float32")
    mask = rng.random(SHAPE[:-1]) > 0.3 if masked else None
    layer = keras_bn.BatchNormalization(**kwargs)
    layer.build(SHAPE)
    non_trainable = [v.value for v in layer.non_trainable_variables]
    keras_mask = None if mask is None else ops.convert_to_tensor(mask)

    def loss(x, gamma, beta):
        outputs, _ = layer.stateless_call(
            [gamma, beta], non_trainable, x, training=True, mask=keras_mask
        )
        return ops.sum(outputs * ops.convert_to_tensor(upstream))

    def outputs(x):
        return layer.stateless_call(
            [gamma, beta], non_trainable, x, training=True, mask=keras_mask
        )[0]

    _, gradients = value_and_gradients(loss, x, gamma, beta)
    x64 = x.astype("float64")
    reference_mask = None if mask is None else mask[..., None]
    expected = reference.batch_norm(
        x64,
        mask=reference_mask,
        virtual_batch_size=kwargs.get("virtual_batch_size"),
        gamma=gamma,
        beta=beta,
    )["outputs"]
    _check("outputs", keras.ops.convert_to_numpy(outputs(x)), expected)
    expected = reference.batch_norm_gradients(
        x64,
        upstream.astype("float64"),
        mask=reference_mask,
        virtual_batch_size=kwargs.get("virtual_batch_size"),
        gamma=gamma,
    )
    for name, actual in zip(("x", "gamma", "beta"), gradients, strict=True):
        _check(f"gradient with respect to {name}", actual, expected[name])
