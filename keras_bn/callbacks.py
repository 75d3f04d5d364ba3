"""Callbacks for models with `keras_bn.BatchNormalization` layers."""

import keras

from keras_bn import _momentum
from keras_bn._batch_normalization import BatchNormalization
from keras_bn._batch_normalization import _boolean
from keras_bn._model_tools import _all_layers

_UNITS = ("epoch", "step")


class MomentumSchedule(keras.callbacks.Callback):
    """Sets the momentum of every keras-bn batch norm of the model on a
    schedule.

    The momentum of the moving statistics often changes during training:
    PointNet raises it from 0.5 to 0.99, and a low momentum at the end of a
    training makes the moving statistics those of the final weights. At
    the start of each epoch (or of each training step), this callback sets
    `momentum` of every `keras_bn.BatchNormalization` of the model, nested
    models included, to `schedule(index)`. The new value takes effect at
    that step, in a compiled `fit` too (`jit_compile`, `jax.jit`,
    `torch.compile`), without compiling the step again.

    Keras's own `keras.layers.BatchNormalization` compiles its momentum
    into the training step on JAX and TensorFlow, where setting it during
    `fit` does nothing: a model that has one is refused; convert it first
    with `keras_bn.convert(model)`.

    Args:
        schedule: A function of the index of the epoch (from 0, as `fit`'s
            `initial_epoch` counts) or of the training step (from 0, counted
            over every `fit` this callback took part in) that returns the
            momentum, a float in `[0, 1]`.
        unit: `"epoch"` or `"step"`: what `schedule` is a function of.
            Defaults to `"epoch"`.
        renorm: If `True`, also sets `renorm_momentum` of the layers that
            use renorm. Defaults to `False`.

    Example:

    >>> schedule = keras_bn.callbacks.MomentumSchedule(
    ...     lambda epoch: min(0.99, 0.5 + 0.05 * epoch)
    ... )
    >>> model.fit(x, y, epochs=20, callbacks=[schedule])
    """

    def __init__(self, schedule, unit="epoch", renorm=False):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                "`schedule` must be a function of the epoch or the step. "
                f"Received: schedule={schedule!r}"
            )
        if unit not in _UNITS:
            raise ValueError(
                f"`unit` must be one of {_UNITS}. Received: unit={unit!r}"
            )
        self.schedule = schedule
        self.unit = unit
        self.renorm = _boolean("renorm", renorm)
        self.step = 0
        self.layers = []

    def set_model(self, model):
        super().set_model(model)
        # Before `fit` compiles its step: on JAX, the momenta it sets are
        # state of the step from the start (see `_momentum`).
        self._make_state(_all_layers(model))

    def on_train_begin(self, logs=None):
        model = self._synced_model()
        layers = list(_all_layers(model))
        keras_layers = [
            layer.name
            for layer in layers
            if isinstance(layer, keras.layers.BatchNormalization)
            and not isinstance(layer, BatchNormalization)
        ]
        if keras_layers:
            raise ValueError(
                "MomentumSchedule sets the momentum of "
                "keras_bn.BatchNormalization layers. The momentum of "
                "keras.layers.BatchNormalization is a constant of a compiled "
                "training step on JAX and TensorFlow: convert the model "
                "first, with keras_bn.convert(model). Received: a model with "
                f"Keras's layers {keras_layers}"
            )
        self.layers = [
            layer for layer in layers if isinstance(layer, BatchNormalization)
        ]
        self._make_state(self.layers)
        if not self.layers:
            raise ValueError(
                "MomentumSchedule needs a model with "
                "keras_bn.BatchNormalization layers. Received: model "
                f"{model.name!r}, which has none"
            )

    def on_epoch_begin(self, epoch, logs=None):
        if self.unit == "epoch":
            self._set(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.unit == "step":
            self._set(self.step)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.layers:
            logs["momentum"] = self.layers[0].momentum

    def _set(self, index):
        momentum = self.schedule(index)
        layers = [
            layer
            for layer in self.layers
            if layer.momentum != momentum
            or (
                self.renorm
                and layer.renorm
                and layer.renorm_momentum != momentum
            )
        ]
        if not layers:
            return
        self._synced_model()
        for layer in layers:
            layer.momentum = momentum
            if self.renorm and layer.renorm:
                layer.renorm_momentum = momentum

    def _make_state(self, layers):
        names = (
            ("momentum", "renorm_momentum") if self.renorm else ("momentum",)
        )
        for layer in layers:
            if isinstance(layer, BatchNormalization):
                _momentum.make_state(
                    {n: m for n, m in layer._momenta.items() if n in names}
                )

    def _synced_model(self):
        """The model, its variables up to date: on JAX, `fit` keeps the
        state of the model outside them between two syncs, which
        `Callback.model` makes, and a value set without it would be lost;
        the next step then reads the state from the variables."""
        return self.model
