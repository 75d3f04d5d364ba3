"""Precise BN: `recalibrate` recomputes the moving statistics from data.

The pass runs at about the speed of `predict`, because it is one (plus the
batch norms' training branch, which costs more than inference): a wrapper
model runs the model with its batch-norm layers in their training branch,
and returns what each of them computed (count-weighted sums of the batch
means and variances, and the counts) as its outputs. Keras's `predict`
then compiles the whole pass into one function, feeds it the data, shows
its progress bar and spreads it over the devices of a distribution; the
host only adds up the per-batch sums, in float64, at the end.
"""

import contextlib
import itertools
import threading
import warnings

import keras
import numpy as np
from keras import ops

from keras_bn import _moments
from keras_bn._batch_normalization import BatchNormalization
from keras_bn._batch_normalization import _no_data
from keras_bn._batch_normalization import standardize_mask
from keras_bn._model_tools import _all_layers
from keras_bn._model_tools import _check_model
from keras_bn._model_tools import _check_no_hidden_batch_norm
from keras_bn._model_tools import _is_batch_norm


def recalibrate(model, data, steps=None, batch_size=32, verbose="auto"):
    """Recomputes the moving statistics of every batch-norm layer ("precise
    BN").

    Moving averages lag behind the weights: after a weight average (SWA,
    EMA), a short fine-tuning, or training with a high momentum, they no
    longer describe what the layers see, and inference suffers. This pass
    replaces each batch-norm layer's `moving_mean` and `moving_variance`
    with the average of the statistics that its training branch computes
    over `data`: the batch (or ghost-batch) means and variances, each
    weighted by the number of elements that produced it (Wu and Johnson,
    2021). During the pass batch-norm layers normalize with their batch
    statistics, as in training; every other layer runs in inference mode
    (no dropout). No trainable weight changes. With renorm, `moving_stddev`
    follows the new variance and the renorm statistics are left alone.
    With `moving_average="cumulative"`, training goes on from an average of
    as many batches as the pass saw; with `"debiased"`, from a complete
    estimate, as after a long training.

    The pass is one `model.predict`-like run, compiled once as the model's
    `predict` is, at about its speed on the same data (the batch norms'
    training branch costs more than inference). Under a
    `keras.distribution` (JAX) or a `tf.distribute` strategy (TensorFlow)
    it runs on every device, and the averages cover every device's batches.
    The model is updated in place.

    Args:
        model: A `keras.Model` (any kind, subclassed included).
        data: A NumPy array or a dict of them for named inputs (split
            into batches of `batch_size`), a `tf.data.Dataset`, a PyTorch
            `DataLoader`, or any iterable of batches `x`, `(x, y)` or
            `(x, y, sample_weight)`.
        steps: Optional number of batches to use. Defaults to all of them.
        batch_size: Batch size for NumPy data. Defaults to `32`.
        verbose: `"auto"`, `0`, `1` or `2`, as in `model.predict`: the
            progress bar. Defaults to `"auto"`.

    Raises:
        ValueError: for an unbuilt model, a custom layer holding batch norm
            inside it, or `data` that yields no batch.

    Returns:
        The model.

    Example:

    >>> model.fit(x_train, y_train)  # e.g. with weight averaging
    >>> keras_bn.recalibrate(model, x_train[:5000])

    Reference:
        - [Wu and Johnson, 2021](https://arxiv.org/abs/2105.07576)
    """
    _check_model(model, "recalibrate")
    layers = list(_all_layers(model))
    for layer in layers:
        if not layer.built:
            raise ValueError(
                "keras_bn.recalibrate needs a built model: call it once, or "
                f"build it. Received: layer {layer.name!r} is not built"
            )
        _check_no_hidden_batch_norm(layer, "recalibrate")
    layers = [layer for layer in layers if _is_batch_norm(layer)]
    if not layers:
        warnings.warn(
            "keras_bn.recalibrate: the model has no batch-norm layer; "
            "nothing to do.",
            stacklevel=2,
        )
        return model
    inputs, arguments = _predict_inputs(data, steps, batch_size)
    with _strategy_scope(model):
        recorder = _recorder(model, layers)
        recordings = recorder.recordings
        try:
            for recording in recordings:
                recording.start()
            with warnings.catch_warnings():
                # What `predict` says of every generator it reads to its end.
                warnings.filterwarnings(
                    "ignore", "Your input ran out of data", UserWarning
                )
                sums = recorder.predict(inputs, verbose=verbose, **arguments)
        finally:
            for recording in recordings:
                recording.stop()
    batches = len(sums[0])
    for layer, layer_sums in zip(layers, sums, strict=True):
        _assign(layer, np.sum(layer_sums, axis=0, dtype="float64"), batches)
    return model


class _Recording:
    """What one batch-norm layer's training branch computed during one call
    of the wrapper model: the sums of mean * count, variance * count, and
    count, per feature (stacked as `(1, 3, features)`).

    keras_bn's layer reports to it (its `_recording`) and updates nothing;
    Keras's layer is given a `call` that computes the statistics as
    keras_bn's does, and its moving statistics, which its training branch
    updates, are put back by `stop`, as is a frozen layer's `trainable`.
    The sums are per thread: `tf.distribute`'s replicas run the step in a
    thread each, interleaved."""

    def __init__(self, layer):
        self.layer = layer
        self.features = int(np.prod(layer.moving_mean.shape))
        self._local = threading.local()
        self._frozen = False
        self._weights = None

    def start(self):
        # Setting `trainable` costs a walk over the layer's variables:
        # only a frozen layer's is set.
        self._frozen = not self.layer.trainable
        if self._frozen:
            self.layer.trainable = True
        if self._reports(self.layer):
            self.layer._recording = self
            call = self.layer.call
        else:
            self._weights = self.layer.get_weights()
            call = self._recording_call(self.layer.call)

        def training_call(inputs, training=None, mask=None):
            return call(inputs, training=True, mask=mask)

        self.layer.call = training_call

    def stop(self):
        if "call" in vars(self.layer):
            del self.layer.call
        if self._reports(self.layer):
            self.layer._recording = None
        if self._weights is not None:
            self.layer.set_weights(self._weights)
            self._weights = None
        if self._frozen:
            self.layer.trainable = False
            self._frozen = False

    @staticmethod
    def _reports(layer):
        """Whether `layer`'s training branch reports its batch statistics:
        keras_bn's does, unless it normalizes with the moving ones."""
        return (
            isinstance(layer, BatchNormalization)
            and layer.training_statistics == "batch"
        )

    def reset(self):
        self._local.sums = None

    def add(self, mean, variance, count):
        count = ops.broadcast_to(ops.cast(count, mean.dtype), ops.shape(mean))
        keep = _no_data(mean, variance, count)
        zero = ops.zeros_like(mean)
        sums = ops.stack(
            [
                ops.where(keep, zero, value)
                for value in (mean * count, variance * count, count)
            ]
        )
        sums = ops.reshape(ops.cast(sums, "float32"), (1, 3, self.features))
        previous = getattr(self._local, "sums", None)
        self._local.sums = sums if previous is None else previous + sums

    def sums(self):
        """The sums of this call; zeros for a layer the call did not
        reach."""
        sums = getattr(self._local, "sums", None)
        if sums is None:
            return ops.zeros((1, 3, self.features), "float32")
        return sums

    def _recording_call(self, call):
        """A `call` that also records the batch statistics of the layer's
        input, computed as keras_bn's training branch computes them: for
        Keras's layer, and keras_bn's with `training_statistics="moving"`
        (its moving statistics describe that input too)."""
        layer = self.layer
        if isinstance(layer, BatchNormalization):
            axes = layer._reduction_axes
            virtual_batch_size = layer.virtual_batch_size
        else:
            axes, virtual_batch_size = None, None

        def recording_call(inputs, training=None, mask=None):
            x = ops.cast(inputs, "float32")
            reduced = axes or [
                axis for axis in range(x.ndim) if axis != layer.axis % x.ndim
            ]
            # A batch of one value per feature tells nothing of the
            # variance: left out, as the training branch leaves it out.
            single = _moments.single_value_groups(
                x, reduced, virtual_batch_size
            )
            if single is not True:
                # Keras's layer reads a mask as keras_bn's does (keras_bn
                # also takes masks of the input's rank, which Keras's
                # refuses).
                stats = _moments.moments(
                    x,
                    reduced,
                    standardize_mask(mask, inputs),
                    virtual_batch_size,
                )
                count = stats.count
                if single is not False:
                    count = ops.where(single, ops.zeros_like(count), count)
                self.add(stats.batch_mean, stats.batch_variance, count)
            return call(inputs, training=training, mask=mask)

        return recording_call


class _Recorder(keras.Model):
    """Runs `model` in inference mode, its batch norms in their training
    branch, and returns the sums each recording collected."""

    def __init__(self, model, layers):
        super().__init__(name=f"recalibrate_{model.name}")
        self.recorded = model
        self.recordings = [_Recording(layer) for layer in layers]
        self.built = True

    def call(self, inputs):
        for recording in self.recordings:
            recording.reset()
        self.recorded(inputs, training=False)
        return [recording.sums() for recording in self.recordings]


def _recorder(model, layers):
    """The wrapper model of `model`, made once and kept on it, so that the
    pass it compiles serves every later `recalibrate` of the model, as
    `predict`'s does (until the model's `jit_compile` changes). (It is kept
    out of Keras's tracking: it is no layer of the model and none of its
    state.)"""
    recorder = vars(model).get("_keras_bn_recorder")
    if (
        recorder is None
        or [r.layer for r in recorder.recordings] != layers
        or recorder.jit_compile != model.jit_compile
    ):
        recorder = _Recorder(model, layers)
        # Compiled as the model's `predict` is: with XLA (or torch.compile)
        # where the model's `compile` asked for it or Keras chose it.
        recorder.jit_compile = model.jit_compile
        object.__setattr__(model, "_keras_bn_recorder", recorder)
    return recorder


def _assign(layer, sums, batches):
    """Sets `layer`'s moving statistics to the averages of `sums` (sums of
    mean * count, variance * count, and count over `batches` batches)."""
    mean_sum, variance_sum, count = sums
    keep = count == 0
    safe = np.maximum(count, 1.0)
    mean = np.where(keep, _flat(layer.moving_mean), mean_sum / safe)
    variance = np.where(keep, _flat(layer.moving_variance), variance_sum / safe)
    _set(layer.moving_mean, mean)
    _set(layer.moving_variance, variance)
    if layer.renorm:
        _set(layer.moving_stddev, np.sqrt(variance + layer.epsilon))
    if getattr(layer, "moving_average", "ema") != "ema":
        # A cumulative average goes on from the batches seen here; a
        # debiased one from a complete estimate.
        full = batches if layer.moving_average == "cumulative" else 1.0
        _set(
            layer.moving_weight,
            np.where(keep, _flat(layer.moving_weight), full),
        )


def _flat(variable):
    return np.asarray(variable.numpy(), "float64").reshape(-1)


def _set(variable, value):
    variable.assign(value.reshape(variable.shape).astype(variable.dtype))


def _predict_inputs(data, steps, batch_size):
    """`data` as `predict` takes it, and the arguments that go with it
    (`steps` and `batch_size`).
    NumPy data goes as it is; anything else as a generator of the batches'
    inputs. Data with no batch raises."""
    if isinstance(data, np.ndarray) or (
        isinstance(data, dict)
        and data
        and all(isinstance(value, np.ndarray) for value in data.values())
    ):
        first = next(iter(data.values())) if isinstance(data, dict) else data
        if len(first) and steps != 0:
            return data, {"batch_size": batch_size, "steps": steps}
    elif steps != 0:
        batches = map(_inputs_of, data)
        first = next(batches, None)
        if first is not None:
            # `predict` takes a generator, not any iterator. Where the
            # data's length is known, so is the progress bar's.
            generator = (b for b in itertools.chain([first], batches))
            with contextlib.suppress(TypeError):
                steps = len(data) if steps is None else min(steps, len(data))
            return generator, {"steps": steps}
    raise ValueError(
        "keras_bn.recalibrate: `data` yielded no batch. Received: "
        f"data={type(data).__name__}, steps={steps}"
    )


def _inputs_of(batch):
    """The model inputs of a batch `x`, `(x, y)` or `(x, y, weight)`, as
    NumPy arrays in a 1-tuple: `predict` reads it as `(x,)` whatever `x`
    holds."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        batch = batch[0]
    return (keras.tree.map_structure(np.asarray, batch),)


def _strategy_scope(model):
    """The scope of the `tf.distribute` strategy `model` was made in: the
    wrapper model and its `predict` run in it, on every replica."""
    if keras.backend.backend() == "tensorflow":
        return model.distribute_strategy.scope()
    return contextlib.nullcontext()
