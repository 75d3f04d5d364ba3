"""Rematerialization: one update of the moving statistics per step, and the
outputs and gradients of a step without remat."""

import keras
import numpy as np
import pytest

import keras_bn
from tests import reference
from tests.backend import to_numpy

MOMENTUM = 0.5


class RematModel(keras.Model):
    def __init__(self, bn, rematerialize_bn=False):
        super().__init__()
        self.dense = keras.layers.Dense(4)
        self.bn = bn
        self.head = keras.layers.Dense(1)
        self.rematerialize_bn = rematerialize_bn

    def call(self, inputs, training=None):
        bn = keras.remat(self.bn) if self.rematerialize_bn else self.bn
        return self.head(bn(self.dense(inputs), training=training))


def _model(kind, bn_cls, remat, **kwargs):
    """A Dense, a batch norm and a Dense, in one of the ways to build a
    model; returns it and its batch norm (`None` for no batch norm)."""
    keras.utils.set_random_seed(1)
    bn = keras.layers.Identity() if bn_cls is None else bn_cls(**kwargs)
    if kind == "functional":
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(1)(bn(keras.layers.Dense(4)(inputs)))
        model = keras.Model(inputs, outputs)
    elif kind == "sequential":
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(4),
                bn,
                keras.layers.Dense(1),
            ]
        )
    else:
        model = RematModel(bn, rematerialize_bn=remat and kind == "keras_remat")
        model(np.zeros((2, 4), "float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model, bn


def _build(kind, bn_cls, remat, **kwargs):
    """The model of `_model`, rematerialized: under a `RematScope`, or,
    for `keras_remat`, by calling its batch norm through `keras.remat`."""
    if remat and kind != "keras_remat":
        with keras.RematScope(mode="full"):
            return _model(kind, bn_cls, False, **kwargs)
    return _model(kind, bn_cls, remat, **kwargs)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.5, (8, 4)).astype("float32")
    return x, rng.normal(size=(8, 1)).astype("float32")


def _remat_runs(kind):
    """Why Keras's remat does not train a model without batch norm on this
    backend (Keras 3.15.1 on TensorFlow), or `None`."""
    x, y = _data()
    try:
        model, _ = _build(kind, None, remat=True)
        model.train_on_batch(x, y)
    except Exception as error:  # noqa: BLE001 - any failure of Keras's own
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def _batch_norm_inputs(model, x):
    first = next(
        layer for layer in model.layers if isinstance(layer, keras.layers.Dense)
    )
    return to_numpy(first(x)).astype("float64")


KINDS = ["functional", "sequential", "subclassed", "keras_remat"]


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("kind", KINDS)
def test_remat_updates_once_and_trains_as_without(kind, renorm):
    failure = _remat_runs(kind)
    if failure is not None:
        pytest.skip(
            f"Keras's remat does not train on {keras.backend.backend()} "
            f"here, without batch norm either: {failure}"
        )
    x, y = _data()
    kwargs = {"momentum": MOMENTUM, "renorm": renorm, "renorm_momentum": 0.5}
    plain, _ = _build(kind, keras_bn.BatchNormalization, False, **kwargs)
    plain_loss = plain.train_on_batch(x, y)
    try:
        remat, bn = _build(kind, keras_bn.BatchNormalization, True, **kwargs)
        hidden = _batch_norm_inputs(remat, x)
        remat_loss = remat.train_on_batch(x, y)
    except Exception:
        try:
            keras_model, _ = _build(
                kind, keras.layers.BatchNormalization, True, **kwargs
            )
            keras_model.train_on_batch(x, y)
        except Exception as error:  # noqa: BLE001 - Keras's own failure
            pytest.xfail(
                "Keras's remat does not train Keras's own batch norm on "
                f"{keras.backend.backend()} either: {type(error).__name__}"
            )
        raise
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    expected = reference.batch_norm(hidden)
    np.testing.assert_allclose(
        to_numpy(bn.moving_mean),
        reference.moving_average(0.0, expected["mean"], MOMENTUM),
        rtol=1e-5,
    )
    # The same gradients: the same weights after the step.
    for mine, theirs in zip(remat.weights, plain.weights, strict=True):
        np.testing.assert_allclose(
            to_numpy(mine), to_numpy(theirs), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("kind", KINDS)
def test_keras_layer_updates_more_than_once_under_remat(kind):
    """What the docs say of Keras's own layer under remat on PyTorch
    (docs/guides/layer.md);
    if this fails, a Keras release has fixed it."""
    if keras.backend.backend() != "torch":
        pytest.skip("Keras's remat recomputes eagerly on PyTorch only")
    x, y = _data()
    model, bn = _build(
        kind, keras.layers.BatchNormalization, True, momentum=MOMENTUM
    )
    hidden = _batch_norm_inputs(model, x)
    model.train_on_batch(x, y)
    once = reference.moving_average(
        0.0, reference.batch_norm(hidden)["mean"], MOMENTUM
    )
    ratio = to_numpy(bn.moving_mean) / once
    assert np.all(ratio > 1.2), ratio
