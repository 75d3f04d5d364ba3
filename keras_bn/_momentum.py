"""Momenta that a compiled training step reads when it runs.

A Python float in a compiled step is a constant of it: once `fit` has
compiled the step, setting `layer.momentum` would change nothing on JAX and
TensorFlow, and make `torch.compile` compile the step again at every new
value. So each momentum lives in a `Momentum` cell, which the step reads as
a tensor, and which a new value updates in place:

- **TensorFlow and PyTorch**: a `keras.Variable` of its own, not an
  attribute of the layer, so not one of its variables: a `tf.function`
  reads it when it runs, and `torch.compile` takes it as an input of the
  graph.
- **JAX**: a compiled step reads only the state it is given, so the cell
  is a non-trainable variable of the layer, which the model's state
  carries. On JAX, `fit` keeps that state outside the variables between
  two syncs: a callback changes it through `self.model`, which syncs them,
  as for any state.

None of them is a weight of the layer (see
`BatchNormalization.weights`): `weights`, `get_weights`, saved files and
Keras's own tests see the weights of Keras's layer.

The cell holds `[momentum, 1 - momentum]` in float64 (float32 on JAX
without 64-bit floats): cast to the statistics' dtype, each is rounded once
from the float64 value, as Keras's layer rounds the Python floats it
multiplies by.
"""

import keras
from keras import ops


def pair(momentum):
    """The factors of an update: of the moving statistic, of the batch's."""
    return [momentum, 1.0 - momentum]


class Momentum:
    """The momentum `name` of `layer`, with the value `momentum`, made in
    the layer's `build`."""

    def __init__(self, layer, name, momentum):
        if keras.backend.backend() == "jax":
            # A variable of the layer: the state a compiled step is given.
            self.variable = layer.add_weight(
                shape=(2,),
                name=name,
                initializer=_initializer(momentum),
                dtype=_jax_float(),
                trainable=False,
                autocast=False,
            )
        else:
            # Not an attribute of the layer: not one of its variables.
            self.variable = keras.Variable(
                initializer=_initializer(momentum),
                shape=(2,),
                dtype="float64",
                trainable=False,
                autocast=False,
                name=name,
            )

    def read(self):
        """The factors `(momentum, 1 - momentum)` of an update, as tensors
        read when the step runs."""
        return tuple(ops.unstack(ops.convert_to_tensor(self.variable)))

    def assign(self, momentum):
        self.variable.assign(pair(momentum))

    def is_variable(self, variable):
        """Whether `variable` is this cell's (a variable of the layer on
        JAX)."""
        return self.variable is variable


def _initializer(momentum):
    def initialize(shape, dtype=None):
        return ops.convert_to_tensor(pair(momentum), dtype)

    return initialize


def _jax_float():
    import jax

    return "float64" if jax.config.read("jax_enable_x64") else "float32"
