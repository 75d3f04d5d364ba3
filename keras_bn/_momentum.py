"""Momenta that a compiled training step reads when it runs.

A Python float in a compiled step is a constant of it: once `fit` has
compiled the step, setting `layer.momentum` would change nothing on JAX and
TensorFlow, and make `torch.compile` compile the step again at every new
value. So a momentum that changes after the layer has trained lives in a
`Momentum` cell, which the step reads as a tensor, and which a new value
updates in place:

- **TensorFlow and PyTorch**: a `keras.Variable` of its own from `build`
  on, not an attribute of the layer, so not one of its variables: a
  `tf.function` reads it when it runs, and `torch.compile` takes it as an
  input of the graph.
- **JAX**: a compiled step reads only the state it is given, so the cell
  has to be state of the layer (one of its `variables`, which the model's
  state carries). A layer whose momentum never changes does not need one,
  and has exactly the variables of Keras's layer, its momentum a constant
  of the step as there. The cell is made when the momentum of a layer
  that has trained is set (the model's state then changes, and the next
  step is compiled again with the cell as an input), or up front by
  `MomentumSchedule` (`make_state`).

  Between two syncs, a JAX `fit` holds the model's state outside its
  variables (and empties them): a value set then would be overwritten by
  the state the loop holds. The setter refuses it with a `ValueError` that
  says what works: setting it through a callback's `self.model`, which
  syncs the state first, or `MomentumSchedule`.

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
        self.layer = layer
        self.name = name
        self.value = momentum
        self.variable = None
        # Whether a training step has read the value as a constant (JAX).
        self.read_as_constant = False
        if keras.backend.backend() != "jax":
            self._make_variable()

    def read(self):
        """The factors `(momentum, 1 - momentum)` of an update: tensors read
        when the step runs or, on JAX without a cell, Python floats."""
        if self.variable is None:
            self.read_as_constant = True
            return tuple(pair(self.value))
        return tuple(ops.unstack(ops.convert_to_tensor(self.variable)))

    def assign(self, momentum):
        """Gives `momentum` to the next training step, or raises a
        `ValueError` where it would not see it (JAX, see the module)."""
        if self.variable is None and not self.read_as_constant:
            # No step has the old value in it: the next one reads this.
            self.value = momentum
            return
        if _held_outside(self.layer.moving_mean):
            raise ValueError(
                f"`{self.name}` of layer {self.layer.name!r} was set while a "
                "JAX `fit` holds the model's state outside its variables: "
                "the next steps would not see it. Set it from a callback "
                "through `self.model`, which syncs the state first (for "
                f"example `self.model.get_layer({self.layer.name!r})."
                f"{self.name} = value`), in `on_epoch_begin`, or use "
                "`keras_bn.callbacks.MomentumSchedule`. Received: "
                f"{self.name}={momentum}"
            )
        if self.variable is None:
            self._make_variable()
        self.variable.assign(pair(momentum))
        self.value = momentum

    def is_variable(self, variable):
        """Whether `variable` is this cell's."""
        return self.variable is variable

    def _make_variable(self):
        jax = keras.backend.backend() == "jax"
        with keras.name_scope(self.layer.name):
            self.variable = keras.Variable(
                initializer=_initializer(self.value),
                shape=(2,),
                dtype=_jax_float() if jax else "float64",
                trainable=False,
                autocast=False,
                name=self.name,
            )


def state(momenta):
    """The cells among `momenta` (a layer's, by name) that exist: on JAX,
    the layer's state beside its weights."""
    return [m.variable for m in momenta.values() if m.variable is not None]


def make_state(momenta):
    """Makes the cells of `momenta` before a training that changes them
    (on JAX; elsewhere they exist from `build` on)."""
    for momentum in momenta.values():
        if momentum.variable is None:
            momentum._make_variable()


def _held_outside(variable):
    """Whether a JAX `fit` holds the value of `variable` outside it, between
    two syncs of the model's state. It has emptied the variable then: its
    `value` can no longer be read (the initializer it would fall back to is
    gone once the variable was first set) or, where the initializer is
    still there, is a new placeholder at each read, where a variable that
    holds its value gives the same array each time."""
    if keras.backend.backend() != "jax":
        return False
    try:
        return variable.value is not variable.value
    except TypeError:
        return True


def _initializer(momentum):
    def initialize(shape, dtype=None):
        return ops.convert_to_tensor(pair(momentum), dtype)

    return initialize


def _jax_float():
    import jax

    return "float64" if jax.config.read("jax_enable_x64") else "float32"
