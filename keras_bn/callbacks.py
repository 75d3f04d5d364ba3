"""Callbacks for models with `keras_bn.BatchNormalization` layers."""

import keras

from keras_bn import _settings
from keras_bn._batch_normalization import BatchNormalization
from keras_bn._batch_normalization import _boolean
from keras_bn._model_tools import _all_layers

_UNITS = ("epoch", "step")
# What a schedule may set, and the layers that have it.
_SETTINGS = ("momentum", "renorm_momentum", "renorm_clipping")
_RENORM_ONLY = ("renorm_momentum", "renorm_clipping")


class Schedule(keras.callbacks.Callback):
    """Sets the momenta or renorm's clipping of every keras-bn batch norm of
    the model on a schedule.

    What batch norm should do often changes during training: PointNet
    raises the momentum from 0.5 to 0.99, a low momentum at the end of a
    training makes the moving statistics those of the final weights, and
    batch renormalization starts as plain batch norm (`rmax = 1`,
    `dmax = 0`) and relaxes its clipping later. At the start of each epoch
    (or of each training step), this callback sets the settings that
    `schedule(index)` returns on every `keras_bn.BatchNormalization` of the
    model, nested models included (`renorm_momentum` and `renorm_clipping`
    on those with `renorm=True`). Each new value takes effect at that step,
    in a compiled `fit` too (`jit_compile`, `jax.jit`, `torch.compile`),
    without compiling the step again.

    Keras's own `keras.layers.BatchNormalization` compiles these settings
    into the training step on JAX and TensorFlow, where setting them during
    `fit` does nothing: a model that has one is refused; convert it first
    with `keras_bn.convert(model)`.

    Args:
        schedule: A function of the index of the epoch (from 0, as `fit`'s
            `initial_epoch` counts) or of the training step (from 0, counted
            over every `fit` this callback took part in) that returns a dict
            of settings: any of `"momentum"` and `"renorm_momentum"` (floats
            in `[0, 1]`) and `"renorm_clipping"` (a dict as the layer's
            argument, or `None`). `renorm_clipping_ramp` makes the renorm
            paper's schedule.
        unit: `"epoch"` or `"step"`: what `schedule` is a function of.
            Defaults to `"epoch"`.

    Example:

    >>> schedule = keras_bn.callbacks.Schedule(
    ...     keras_bn.callbacks.renorm_clipping_ramp(), unit="step"
    ... )
    >>> model.fit(x, y, epochs=20, callbacks=[schedule])

    Reference:
    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275)
    """

    def __init__(self, schedule, unit="epoch"):
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
        self.step = 0
        self.layers = []
        # The settings set so far, which the cells are made for on JAX.
        self.names = set()

    def set_model(self, model):
        super().set_model(model)
        # Before `fit` compiles its step: on JAX, the settings this sets are
        # state of the step from the start (see `_settings`).
        first = self.step if self.unit == "step" else 0
        self.names |= set(self.settings(first))
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
                f"{type(self).__name__} sets the settings of "
                "keras_bn.BatchNormalization layers. Those of "
                "keras.layers.BatchNormalization are constants of a compiled "
                "training step on JAX and TensorFlow: convert the model "
                "first, with keras_bn.convert(model). Received: a model with "
                f"Keras's layers {keras_layers}"
            )
        self.layers = [
            layer for layer in layers if isinstance(layer, BatchNormalization)
        ]
        if not self.layers:
            raise ValueError(
                f"{type(self).__name__} needs a model with "
                "keras_bn.BatchNormalization layers. Received: model "
                f"{model.name!r}, which has none"
            )
        self._make_state(self.layers)

    def on_epoch_begin(self, epoch, logs=None):
        if self.unit == "epoch":
            self._set(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.unit == "step":
            self._set(self.step)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self.layers:
            return
        layer = self.layers[0]
        renorm = next((la for la in self.layers if la.renorm), None)
        for name in sorted(self.names):
            if name == "momentum":
                logs[name] = layer.momentum
            elif name == "renorm_momentum" and renorm is not None:
                logs[name] = renorm.renorm_momentum
            elif name == "renorm_clipping" and renorm is not None:
                for key, value in (renorm.renorm_clipping or {}).items():
                    logs[f"renorm_{key}"] = value

    def settings(self, index):
        """The settings at `index` (an epoch or a step), validated."""
        settings = self.schedule(index)
        if not isinstance(settings, dict) or set(settings) - set(_SETTINGS):
            raise ValueError(
                "`schedule` must return a dict with keys among "
                f"{_SETTINGS}. Received: schedule({index})={settings!r}"
            )
        return settings

    def _set(self, index):
        settings = self.settings(index)
        new = set(settings) - self.names
        changes = [
            (layer, name, value)
            for layer in self.layers
            for name, value in settings.items()
            if (layer.renorm or name not in _RENORM_ONLY)
            and _differs(getattr(layer, name), value)
        ]
        if not changes and not new:
            return
        self._synced_model()
        if new:
            self.names |= new
            self._make_state(self.layers)
        for layer, name, value in changes:
            setattr(layer, name, value)

    def _make_state(self, layers):
        for layer in layers:
            if isinstance(layer, BatchNormalization):
                _settings.make_state(
                    {
                        name: setting
                        for name, setting in layer._settings.items()
                        if name in self.names
                    }
                )

    def _synced_model(self):
        """The model, its variables up to date: on JAX, `fit` keeps the
        state of the model outside them between two syncs, which
        `Callback.model` makes, and a value set without it would be lost;
        the next step then reads the state from the variables."""
        return self.model


class MomentumSchedule(Schedule):
    """Sets the momentum of every keras-bn batch norm of the model on a
    schedule.

    A `keras_bn.callbacks.Schedule` of the momentum alone: at the start of
    each epoch (or of each training step), it sets `momentum` of every
    `keras_bn.BatchNormalization` of the model, nested models included, to
    `schedule(index)`. The new value takes effect at that step, in a
    compiled `fit` too, without compiling the step again. It logs
    `momentum` at the end of each epoch.

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
        if not callable(schedule):
            raise ValueError(
                "`schedule` must be a function of the epoch or the step. "
                f"Received: schedule={schedule!r}"
            )
        self.renorm = _boolean("renorm", renorm)
        self.momentum_schedule = schedule
        super().__init__(self._momenta, unit)
        self.names = {"momentum", "renorm_momentum"} if renorm else {"momentum"}

    def _momenta(self, index):
        momentum = self.momentum_schedule(index)
        if self.renorm:
            return {"momentum": momentum, "renorm_momentum": momentum}
        return {"momentum": momentum}

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.layers:
            logs["momentum"] = self.layers[0].momentum


def renorm_clipping_ramp(
    rmax=3.0, dmax=5.0, start=5000, rmax_step=40000, dmax_step=25000
):
    """The renorm paper's schedule of `renorm_clipping`, for
    `keras_bn.callbacks.Schedule(..., unit="step")`.

    Batch renormalization first trains as plain batch norm (`rmax = 1`,
    `rmin = 1 / rmax = 1`, `dmax = 0`: the corrections `r = 1`, `d = 0`)
    for `start` steps, then relaxes the bounds linearly, to reach `rmax` at
    step `rmax_step` and `dmax` at step `dmax_step`, and keeps them there.
    The defaults are the paper's (Inception on ImageNet); scale the steps
    to the length of the training.

    Args:
        rmax: The final bound of `r`, at least 1 (`rmin` is `1 / rmax`).
        dmax: The final bound of `|d|`, at least 0.
        start: The steps of plain batch norm.
        rmax_step: The step at which the bound of `r` reaches `rmax`,
            after `start`.
        dmax_step: The step at which the bound of `|d|` reaches `dmax`,
            after `start`.

    Returns:
        A function of the step that returns `{"renorm_clipping": {...}}`.

    Reference:
    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275)
    """
    rmax, dmax = float(rmax), float(dmax)
    if not rmax >= 1.0 or not dmax >= 0.0:
        raise ValueError(
            "`rmax` must be at least 1 and `dmax` at least 0. Received: "
            f"rmax={rmax}, dmax={dmax}"
        )
    for name, step in (("rmax_step", rmax_step), ("dmax_step", dmax_step)):
        if not step > start >= 0:
            raise ValueError(
                f"`{name}` must be after `start`, and `start` at least 0. "
                f"Received: start={start}, {name}={step}"
            )

    def ramp(step, end, final, initial):
        progress = min(max((step - start) / (end - start), 0.0), 1.0)
        return initial + (final - initial) * progress

    def schedule(step):
        r = ramp(step, rmax_step, rmax, 1.0)
        return {
            "renorm_clipping": {
                "rmax": r,
                "rmin": 1.0 / r,
                "dmax": ramp(step, dmax_step, dmax, 0.0),
            }
        }

    return schedule


def _differs(old, new):
    if isinstance(new, dict) or old is None or new is None:
        return (None if old is None else dict(old)) != new
    return old != new
