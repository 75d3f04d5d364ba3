"""Settings that a compiled training step reads when it runs: `momentum`,
`renorm_momentum` and `renorm_clipping`.

A Python float in a compiled step is a constant of it: once `fit` has
compiled the step, setting `layer.momentum` would change nothing on JAX and
TensorFlow, and make `torch.compile` compile the step again at every new
value. So a setting that changes after the layer has trained lives in a
`Setting` cell, which the step reads as a tensor, and which a new value
updates in place:

- **TensorFlow and PyTorch**: a `keras.Variable` of its own from `build`
  on, not an attribute of the layer, so not one of its variables: a
  `tf.function` reads it when it runs, and `torch.compile` takes it as an
  input of the graph.
- **JAX**: a compiled step reads only the state it is given, so the cell
  has to be state of the layer (one of its `variables`, which the model's
  state carries). A layer whose settings never change does not need one,
  and has exactly the variables of Keras's layer, its settings constants
  of the step as there. The cell is made when a setting of a layer that
  has trained is set (the model's state then changes, and the next step
  is compiled again with the cell as an input), or up front by
  `keras_bn.callbacks.Schedule` (`make_state`).

  Between two syncs, a JAX `fit` holds the model's state outside its
  variables (and empties them): a value set then would be overwritten by
  the state the loop holds. The setter refuses it with a `ValueError` that
  says what works: setting it through a callback's `self.model`, which
  syncs the state first, or `keras_bn.callbacks.Schedule`.

None of them is a weight of the layer (see
`BatchNormalization.weights`): `weights`, `get_weights`, saved files and
Keras's own tests see the weights of Keras's layer.

A cell holds floats in float64 (float32 on JAX without 64-bit floats):
`[momentum, 1 - momentum]`, or `[rmin, rmax, dmax]` with an infinity for a
missing bound. Cast to the statistics' dtype, each is
rounded once from the float64 value, as Keras's layer rounds the Python
floats it computes with.
"""

import math

import keras
from keras import ops


def pair(momentum):
    """The factors of an update: of the moving statistic, of the batch's."""
    return [momentum, 1.0 - momentum]


def bounds(clipping):
    """`[rmin, rmax, dmax]` of a `renorm_clipping` dict (or None), with an
    infinity for a missing bound (a missing `rmin` is Keras's 0, as `r` is
    positive)."""
    clipping = clipping or {}
    rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
    return [
        -math.inf if rmin is None else rmin,
        math.inf if rmax is None else rmax,
        math.inf if dmax is None else dmax,
    ]


ENCODINGS = {
    "momentum": pair,
    "renorm_momentum": pair,
    "renorm_clipping": bounds,
}


class Setting:
    """The setting `name` of `layer` (a key of `ENCODINGS`), with the value
    `value`, made in the layer's `build`."""

    def __init__(self, layer, name, value):
        self.layer = layer
        self.name = name
        self.value = value
        self.encode = ENCODINGS[name]
        self.variable = None
        # Whether a training step has read the value as a constant (JAX).
        self.read_as_constant = False
        if keras.backend.backend() != "jax":
            self._make_variable()

    def read(self):
        """The encoded value (`(momentum, 1 - momentum)`, `(rmin, rmax,
        dmax)`): tensors read when the step runs or, on JAX without a cell,
        Python floats."""
        if self.variable is None:
            self.read_as_constant = True
            return tuple(self.encode(self.value))
        return tuple(ops.unstack(ops.convert_to_tensor(self.variable)))

    def assign(self, value):
        """Gives `value` to the next training step, or raises a
        `ValueError` where it would not see it (JAX, see the module)."""
        if self.variable is None and not self.read_as_constant:
            # No step has the old value in it: the next one reads this.
            self.value = value
            return
        if _held_outside(self.layer.moving_mean):
            raise ValueError(
                f"`{self.name}` of layer {self.layer.name!r} was set while a "
                "JAX `fit` holds the model's state outside its variables: "
                "the next steps would not see it. Set it from a callback "
                "through `self.model`, which syncs the state first (for "
                f"example `self.model.get_layer({self.layer.name!r})."
                f"{self.name} = value`), in `on_epoch_begin`, or use "
                "`keras_bn.callbacks.Schedule`. Received: "
                f"{self.name}={value!r}"
            )
        if self.variable is None:
            self._make_variable()
        self.variable.assign(self.encode(value))
        self.value = value

    def is_variable(self, variable):
        """Whether `variable` is this cell's."""
        return self.variable is variable

    def _make_variable(self):
        jax = keras.backend.backend() == "jax"
        with keras.name_scope(self.layer.name):
            self.variable = keras.Variable(
                initializer=_initializer(self.encode(self.value)),
                shape=(len(self.encode(self.value)),),
                dtype=_jax_float() if jax else "float64",
                trainable=False,
                autocast=False,
                name=self.name,
            )


def state(settings):
    """The cells among `settings` (a layer's, by name) that exist: on JAX,
    the layer's state beside its weights."""
    return [s.variable for s in settings.values() if s.variable is not None]


def make_state(settings):
    """Makes the cells of `settings` before a training that changes them
    (on JAX; elsewhere they exist from `build` on)."""
    for setting in settings.values():
        if setting.variable is None:
            setting._make_variable()


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


def _initializer(values):
    def initialize(shape, dtype=None):
        return ops.convert_to_tensor(values, dtype)

    return initialize


def _jax_float():
    import jax

    return "float64" if jax.config.read("jax_enable_x64") else "float32"
