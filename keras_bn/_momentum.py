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
  becomes a (non-trainable) variable of the layer the first time its value
  changes after the layer is built: the model's state then carries it, and
  the step is compiled once more, for the new state, and never again. Until
  then the momentum is a constant, as in Keras's layer.

None of them is a weight of the layer (see
`BatchNormalization.weights`): weights, saved files and Keras's own tests
see the layer Keras's layer is.

The cell holds `[momentum, 1 - momentum]` in float64 (float32 on JAX
without 64-bit floats): cast to the statistics' dtype, each is rounded once
from the float64 value, as Keras's layer rounds the Python floats it
multiplies by.
"""

import keras
from keras import ops


def pair(momentum):
    return [momentum, 1.0 - momentum]


class Momentum:
    """The momentum `name` of `layer`, with the value `momentum`; made
    once the layer's moving statistics exist."""

    def __init__(self, layer, name, momentum):
        self.layer = layer
        self.name = name
        self.momentum = momentum
        self.variable = None
        if keras.backend.backend() != "jax":
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
        read when the step runs, or Python floats on JAX until the value
        first changes."""
        if self.variable is None:
            return tuple(pair(self.momentum))
        return tuple(ops.unstack(ops.convert_to_tensor(self.variable)))

    def assign(self, momentum):
        self.momentum = momentum
        if self.variable is None:
            self.variable = self.layer.add_weight(
                shape=(2,),
                name=self.name,
                initializer=_initializer(momentum),
                dtype=_jax_float(),
                trainable=False,
                autocast=False,
            )
        else:
            self.variable.assign(pair(momentum))

    def is_variable(self, variable):
        """Whether `variable` is this cell's (a JAX layer variable)."""
        return self.variable is variable


def _initializer(momentum):
    def initialize(shape, dtype=None):
        return ops.convert_to_tensor(pair(momentum), dtype)

    return initialize


def _jax_float():
    import jax

    return "float64" if jax.config.read("jax_enable_x64") else "float32"
