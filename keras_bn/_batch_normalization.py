"""The `keras_bn.BatchNormalization` layer."""

import math
import numbers
import types

import keras
import numpy as np
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_bn import _distribute
from keras_bn import _moments
from keras_bn import _remat
from keras_bn import _settings

_INFERENCE_STATISTICS = ("moving", "batch")
_TRAINING_STATISTICS = ("batch", "moving")
_MOVING_AVERAGES = ("ema", "debiased", "cumulative")
_RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with ghost batches, on every Keras backend.

    A drop-in replacement for `keras.layers.BatchNormalization`: with the same
    arguments it computes the same outputs, gradients and moving statistics,
    and has the same weights, in the same order, under the same names, so
    weights saved from one load into the other. It is an instance of
    `keras.layers.BatchNormalization` too, so that code finding batch norms
    by class (fine-tuning recipes that keep them frozen, folding and
    quantization tools) finds it. On top of it:

    - **Ghost batches** (`virtual_batch_size`): the training batch is split
      into consecutive ghost batches of `virtual_batch_size` samples, each
      normalized with its own statistics (Hoffer et al., 2017). A batch that
      is not a multiple ends with a smaller ghost batch, also when the batch
      dimension is only known at run time; where a sample has one value
      per feature, a last ghost batch of one sample (variance 0) joins the
      one before it. On several devices, each
      device's part of the batch is split so. The moving statistics are
      updated once per step with the ghost batches' means and variances,
      each weighted by its number of (unmasked) elements. Inference ignores
      `virtual_batch_size`.
    - **Several feature axes** (`axis` as a list), any rank from 2, channels
      first or last; the parameters get the shape of those axes.
    - **Masks on any layout**: besides Keras's masks, a mask of the
      input's rank, broadcast to it (see `mask` below).
    - **Prediction-time batch statistics** (`inference_statistics="batch"`,
      Nado et al., 2020): inference normalizes each batch with its own
      statistics, for inputs whose distribution has shifted.
    - **Stable numerics** on every backend: statistics in float32 (float64
      inputs stay float64) with a two-pass variance, never
      `E[x^2] - E[x]^2`; a batch whose statistics are not finite for a
      channel leaves that channel's moving statistics untouched.
    - **The same meaning on every backend when training on several
      devices** (`synchronized`), with moving statistics that average every
      device's statistics.
    - **Moving statistics to trust**: debiased or cumulative averages
      (`moving_average`), a momentum that can change during compiled
      training, frozen statistics with trainable `gamma` and `beta`
      (`training_statistics="moving"`), and PyTorch's Bessel-corrected
      update (`bessel_correction`, see `keras_bn.from_torch`).

    During training (`training=True` and `trainable=True`) the layer returns
    `gamma * (x - mean) / sqrt(variance + epsilon) + beta` with the mean and
    variance of the batch (or ghost batch), and updates
    `moving_mean = moving_mean * momentum + mean * (1 - momentum)` and
    likewise `moving_variance` (with the default `moving_average`). In
    inference (`training=False` or `None`, or a frozen layer with
    `trainable=False`) it uses the moving statistics and changes nothing.

    Args:
        axis: Integer or list/tuple of integers, the feature axes that are
            not normalized over (each gets its own statistics). Negative
            values count from the end. Defaults to `-1`.
        momentum: Float in `[0, 1]`, the momentum of the moving averages.
            It can be set on a built layer during training: the new value
            takes effect at the next training step, in a compiled step too,
            without compiling it again (see
            `keras_bn.callbacks.MomentumSchedule`). Defaults to `0.99`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        center: If `True`, add the learned offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by the learned scale `gamma`. Defaults to
            `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        moving_mean_initializer: Initializer for the moving mean. Defaults
            to `"zeros"`.
        moving_variance_initializer: Initializer for the moving variance.
            Defaults to `"ones"`.
        beta_regularizer: Optional regularizer for `beta`. Defaults to
            `None`.
        gamma_regularizer: Optional regularizer for `gamma`. Defaults to
            `None`.
        beta_constraint: Optional constraint for `beta`. Defaults to `None`.
        gamma_constraint: Optional constraint for `gamma`. Defaults to
            `None`.
        synchronized: How statistics are computed when a training step runs
            on several devices (a `tf.distribute` strategy on TensorFlow,
            `keras.distribution` on JAX). `True`: over the global batch of
            every device, as on a single device. `False`: each device
            normalizes with the statistics of its own part of the batch,
            as a single device would with `virtual_batch_size` set to the
            per-device batch size. An integer `k` of at least 2: over
            groups of `k` consecutive devices (within a machine, say,
            rather than across all of them, as PyTorch's
            `SyncBatchNorm(process_group=...)`); `k` must divide the number
            of devices. Ghost batches never cross a device
            boundary, whatever this is. In every case the moving statistics
            are the average over all devices, kept identical on each. On
            PyTorch the devices are the processes of a `torch.distributed`
            job (`DistributedDataParallel`); in a single process it has no
            effect. Defaults to `False`.
        renorm: If `True`, use Batch Renormalization (Ioffe, 2017): during
            training the normalized values are corrected by `r` and `d` (per
            ghost batch) towards the renorm moving statistics. Adds the
            `moving_stddev`, `renorm_mean` and `renorm_stddev` weights.
            Defaults to `False`.
        renorm_clipping: Optional dict with keys among `"rmax"`, `"rmin"`,
            `"dmax"`, clipping `r` to `[rmin, rmax]` and `d` to
            `[-dmax, dmax]`, with `rmax >= 1 >= rmin` and `dmax >= 0`.
            Missing keys do not clip. Only with `renorm=True`. Can be set
            during training (`keras_bn.callbacks.Schedule`). Defaults to
            `None`.
        renorm_momentum: Float in `[0, 1]`, the momentum of the renorm moving
            statistics. Defaults to `0.99`.
        virtual_batch_size: Optional positive integer, the number of samples
            per ghost batch in training (at least 2 where a sample has one
            value per feature). `None` normalizes over the whole batch.
            Defaults to `None`.
        inference_statistics: `"moving"` to normalize in inference with the
            moving statistics, or `"batch"` to normalize each inference batch
            with its own statistics (the moving statistics are then left
            alone). Defaults to `"moving"`.
        training_statistics: `"batch"` to train with the statistics of the
            batch (or ghost batch), or `"moving"` to train with the moving
            statistics and never update them, while `gamma`, `beta` and the
            rest of the model train (frozen statistics, for fine-tuning).
            Defaults to `"batch"`.
        moving_average: How the moving statistics average the batches'
            statistics. `"ema"`: the exponential moving average above.
            `"debiased"`: the same weights, `(1 - momentum) *
            momentum^(t - i)` for batch `i` of `t`, normalized to sum to 1,
            so that the estimate is exact from the first step, whatever
            the initializers. `"cumulative"`: every batch weighted alike
            (PyTorch's `momentum=None`; `momentum` is unused). Both add the
            weight `moving_weight`, the total weight of the batches
            averaged, after Keras's weights. Defaults to `"ema"`.
        bessel_correction: If `True`, the moving variance is updated with
            each group's Bessel-corrected variance, `n / (n - 1)` times its
            variance, as PyTorch updates its running variance;
            normalization keeps the biased variance. Defaults to `False`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: Input tensor of rank 2 or more.
        training: Python boolean. `True` normalizes with the statistics of
            the batch and updates the moving statistics (or, with
            `training_statistics="moving"`, normalizes as inference does);
            `False` or `None` runs in inference mode.
        mask: Optional boolean tensor that broadcasts to the input, read
            as by Keras's layer when it has one axis less than the input
            (a last axis of size 1 is added: the masks of `Masking` and
            `Embedding(mask_zero=True)`, whatever `axis` is), and as it is
            when it has the input's rank (for a channels-first input
            `(batch, channels, steps)`, a mask of steps is
            `(batch, 1, steps)`). `False` positions are left out of the
            statistics (a mask of numbers keeps its nonzero positions, each
            with the same weight); a mask that varies along the feature
            axes gives each feature a count of its own.

    Example:

    >>> layer = keras_bn.BatchNormalization(virtual_batch_size=32)
    >>> x = np.random.normal(size=(100, 8)).astype("float32")
    >>> y = layer(x, training=True)  # ghost batches of 32, 32, 32 and 4

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167)
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741)
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275)
        - [Nado et al., 2020](https://arxiv.org/abs/2006.10963)
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        virtual_batch_size=None,
        inference_statistics="moving",
        training_statistics="batch",
        moving_average="ema",
        bessel_correction=False,
        **kwargs,
    ):
        # A subclass of Keras's layer, so that code which finds batch
        # norms by class finds this one, but none of its behaviour: its
        # `__init__` reads and validates the arguments its own way (it
        # refuses `synchronized=True` off TensorFlow), every public method
        # of it is overridden here, and no private one is called.
        keras.layers.Layer.__init__(self, **kwargs)
        self.axis = _standardize_axis(axis)
        self._settings = {}
        self.momentum = momentum
        self.epsilon = float(epsilon)
        if not self.epsilon > 0:
            raise ValueError(
                f"`epsilon` must be positive. Received: epsilon={epsilon}"
            )
        self.center = _boolean("center", center)
        self.scale = _boolean("scale", scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.synchronized = _standardize_synchronized(synchronized)
        self.renorm = _boolean("renorm", renorm)
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size = _standardize_virtual_batch_size(
            virtual_batch_size
        )
        if self.virtual_batch_size is not None:
            _check_batch_axis_not_in(self.axis, self.virtual_batch_size)
        self.inference_statistics = _one_of(
            "inference_statistics", inference_statistics, _INFERENCE_STATISTICS
        )
        self.training_statistics = _one_of(
            "training_statistics", training_statistics, _TRAINING_STATISTICS
        )
        self.moving_average = _one_of(
            "moving_average", moving_average, _MOVING_AVERAGES
        )
        self.bessel_correction = _boolean(
            "bessel_correction", bessel_correction
        )
        self.supports_masking = True
        # Set by `keras_bn.recalibrate` while it runs: where the training
        # branch reports its batch statistics instead of updating the
        # moving ones.
        self._recording = None

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    def build(self, input_shape):
        ndim = len(input_shape)
        self._feature_axes = _feature_axes(self.axis, ndim)
        if self.virtual_batch_size is not None:
            _check_batch_axis_not_in(
                self._feature_axes, self.virtual_batch_size
            )
        for axis in self._feature_axes:
            if input_shape[axis] is None:
                raise ValueError(
                    "The feature axes of the input must have a known size. "
                    f"Received: axis={self.axis}, "
                    f"input_shape={tuple(input_shape)}"
                )
        self._reduction_axes = [
            axis for axis in range(ndim) if axis not in self._feature_axes
        ]
        if self.virtual_batch_size == 1 and all(
            input_shape[axis] == 1 for axis in self._reduction_axes[1:]
        ):
            raise ValueError(
                "`virtual_batch_size` must be at least 2 where a sample has "
                "one value per feature: a ghost batch of one value has "
                "variance 0. Received: virtual_batch_size=1, "
                f"input_shape={tuple(input_shape)}"
            )
        self._broadcast_shape = [
            input_shape[axis] if axis in self._feature_axes else 1
            for axis in range(ndim)
        ]
        shape = tuple(input_shape[axis] for axis in self._feature_axes)

        # The statistics in float32 whatever the policy (float64 under a
        # float64 one): an update `(1 - momentum) * (batch - moving)` falls
        # below a 16-bit float's resolution, and the average stalls.
        statistics = _statistics_dtype(self.variable_dtype)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            dtype=statistics,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            dtype=statistics,
            autocast=False,
        )
        if self.renorm:
            # Renorm tracks the standard deviation, as in the paper and in
            # Keras: these weights, names and order match Keras's layer.
            stddev_initializer = _sqrt_initializer(
                self.moving_variance_initializer
            )
            self.moving_stddev = self.add_weight(
                shape=shape,
                name="moving_stddev",
                initializer=stddev_initializer,
                trainable=False,
                dtype=statistics,
                autocast=False,
            )
            self.renorm_mean = self.add_weight(
                shape=shape,
                name="renorm_mean",
                initializer=self.moving_mean_initializer,
                trainable=False,
                dtype=statistics,
                autocast=False,
            )
            self.renorm_stddev = self.add_weight(
                shape=shape,
                name="renorm_stddev",
                initializer=stddev_initializer,
                trainable=False,
                dtype=statistics,
                autocast=False,
            )
        if self.moving_average != "ema":
            # After Keras's weights: a layer with the default average has
            # exactly those.
            self.moving_weight = self.add_weight(
                shape=shape,
                name="moving_weight",
                initializer="zeros",
                trainable=False,
                dtype=statistics,
                autocast=False,
            )
        # Read by the training step when it runs: a new value takes effect
        # in a compiled step without compiling it again (see `_settings`).
        names = ("momentum",)
        if self.renorm:
            names += ("renorm_momentum", "renorm_clipping")
        self._settings = {
            name: _settings.Setting(self, name, getattr(self, name))
            for name in names
        }
        self.input_spec = keras.layers.InputSpec(
            ndim=ndim,
            axes={axis: input_shape[axis] for axis in self._feature_axes},
        )

    @property
    def momentum(self):
        """The momentum of the moving statistics; a new value takes effect
        at the next training step, compiled or not."""
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        self._momentum = self._set_momentum("momentum", value)

    @property
    def renorm_momentum(self):
        """The momentum of the renorm statistics; a new value takes effect
        at the next training step, compiled or not."""
        return self._renorm_momentum

    @renorm_momentum.setter
    def renorm_momentum(self, value):
        self._renorm_momentum = self._set_momentum("renorm_momentum", value)

    @property
    def renorm_clipping(self):
        """The bounds of renorm's corrections (see `__init__`); a new value
        takes effect at the next training step, compiled or not."""
        return self._renorm_clipping

    @renorm_clipping.setter
    def renorm_clipping(self, value):
        clipping = _standardize_renorm_clipping(value)
        if clipping is not None and not self.renorm:
            raise ValueError(
                "`renorm_clipping` clips batch renormalization's corrections "
                "and means nothing without `renorm=True`. Received: "
                f"renorm_clipping={value!r} with renorm=False"
            )
        clipping = self._set_setting("renorm_clipping", clipping)
        # Read-only: a bound changed in place would not reach the step.
        self._renorm_clipping = (
            None if clipping is None else types.MappingProxyType(clipping)
        )

    def _set_momentum(self, name, value):
        """Validates a momentum, and gives it to the training step of a
        built layer."""
        return self._set_setting(name, _unit_interval(name, value))

    def _set_setting(self, name, value):
        """Gives a valid setting to the training step of a built layer."""
        if name in self._settings:
            self._settings[name].assign(value)
        return value

    if keras.backend.backend() == "jax":
        # On JAX, a setting that changes during training is state, which
        # the compiled step is given (see `_settings`). Elsewhere it is not
        # a variable of the layer (and this property would stop
        # torch.compile's tracing).

        @property
        def variables(self):
            variables = keras.layers.Layer.variables.fget(self)
            return variables + _settings.state(self._settings)

    @property
    def weights(self):
        # The layer has no sublayer and no seed: its variables are its
        # weights and, on JAX, the settings that change (state, not
        # weights: the config holds their values). `super().weights` would
        # stop torch.compile's tracing.
        return [
            variable
            for variable in self.variables
            if not any(s.is_variable(variable) for s in self._settings.values())
        ]

    def save_own_variables(self, store):
        for index, weight in enumerate(self.weights):
            store[f"{index}"] = weight

    def load_own_variables(self, store):
        weights = self.weights
        if len(store.keys()) != len(weights):
            raise ValueError(
                f"Layer {self.name!r} has {len(weights)} weights "
                f"({', '.join(weight.name for weight in weights)}), but the "
                f"file holds {len(store.keys())} for it. Received: "
                f"{len(store.keys())} saved weights"
            )
        for index, weight in enumerate(weights):
            weight.assign(store[f"{index}"])

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs, training=None, mask=None):
        mask = standardize_mask(mask, inputs)
        # 16-bit floats overflow and lose precision in the statistics: they
        # are computed in float32 and the output cast back. float64 stays
        # float64 (Keras's own promotion would turn it into float32).
        if keras.backend.standardize_dtype(inputs.dtype) == "float64":
            compute_dtype = "float64"
        else:
            compute_dtype = "float32"
        inputs = ops.cast(inputs, compute_dtype)

        training = bool(training and self.trainable)
        if training and self.training_statistics == "batch":
            outputs = self._train(inputs, mask)
        elif not training and self.inference_statistics == "batch":
            stats = _moments.moments(inputs, self._reduction_axes, mask)
            outputs = stats.ungroup([self._normalize(p) for p in stats.parts])
        else:
            outputs = self._normalize_moving(inputs)
        return ops.cast(outputs, self.compute_dtype)

    def _normalize_moving(self, inputs):
        """Normalizes with the moving statistics."""
        dtype = inputs.dtype
        if keras.backend.backend() == "torch" and len(self._feature_axes) == 1:
            # The torch backend's batch_normalization computes the same
            # `(x - mean) * (rsqrt(variance + epsilon) * gamma) + beta`, in
            # place after the subtraction: one output buffer instead of
            # three. (The other backends compute `x * multiplier + offset`,
            # which cancels on large offsets.)
            return ops.batch_normalization(
                inputs,
                ops.cast(self.moving_mean, dtype),
                ops.cast(self.moving_variance, dtype),
                axis=self._feature_axes[0],
                offset=ops.cast(self.beta, dtype) if self.center else None,
                scale=ops.cast(self.gamma, dtype) if self.scale else None,
                epsilon=self.epsilon,
            )
        mean = self._broadcast(self.moving_mean, dtype)
        variance = self._broadcast(self.moving_variance, dtype)
        return self._normalize_with(inputs - mean, variance)

    def _train(self, inputs, mask):
        devices = _distribute.moments_arguments(
            self.synchronized, self.virtual_batch_size
        )
        # A group of one value per feature has variance 0 and would
        # normalize to `beta`: such a batch is normalized with the moving
        # statistics, which it leaves as they are. Not across replicas,
        # which must all reach the same all-reduces.
        replicas = "group_sum" in devices or "total_sum" in devices
        single = not replicas and _moments.single_value_groups(
            inputs,
            self._reduction_axes,
            self.virtual_batch_size,
            devices.get("num_shards", 1),
        )
        if single is True:
            return self._normalize_moving(inputs)
        stats = _moments.moments(
            inputs,
            self._reduction_axes,
            mask,
            virtual_batch_size=self.virtual_batch_size,
            unbiased=self.bessel_correction,
            **devices,
        )
        count = stats.count
        if single is not False:
            # Known when the step runs: no count, no update.
            count = ops.where(single, ops.zeros_like(count), count)
        # A recomputation of this call for the backward pass (remat)
        # normalizes as the call did, and updates nothing again. The
        # updates need no gradient: nothing of them is kept for the
        # backward pass, which then keeps the same tensors either way.
        update = not _remat.recomputing()
        batch_statistics = [
            ops.stop_gradient(value)
            for value in (stats.batch_mean, stats.batch_variance)
        ] + [count]
        if self._recording is not None:
            self._recording.add(*batch_statistics)
            update = False
        if self.renorm:
            # Read before the renorm statistics update.
            renorm = _remat.read_once(
                self, (self.renorm_mean, self.renorm_stddev)
            )
            corrections = [
                self._renorm_correction(part, *renorm) for part in stats.parts
            ]
            if update:
                self._update_renorm_statistics(*batch_statistics)
        else:
            corrections = [None] * len(stats.parts)
            if update:
                self._update_moving_statistics(*batch_statistics)
        outputs = stats.ungroup(
            [
                self._normalize(part, correction)
                for part, correction in zip(
                    stats.parts, corrections, strict=True
                )
            ]
        )
        if single is not False:
            outputs = ops.where(single, self._normalize_moving(inputs), outputs)
        return outputs

    def _renorm_correction(self, part, renorm_mean, renorm_stddev):
        """Batch renormalization's `(r, d)` for a part's statistics, from
        the renorm statistics."""
        dtype = part.mean.dtype
        renorm_mean = self._broadcast(renorm_mean, dtype, part)
        # The floor avoids dividing by zero early in training, as in Keras.
        renorm_stddev = _clip(
            self._broadcast(renorm_stddev, dtype, part),
            math.sqrt(self.epsilon),
        )
        stddev = ops.sqrt(part.variance + self.epsilon)
        r = stddev / renorm_stddev
        d = (part.mean - renorm_mean + part.residual) / renorm_stddev
        rmin, rmax, dmax = self._settings["renorm_clipping"].read()
        r = _clip(r, rmin, rmax)
        d = _clip(d, -dmax, dmax)
        # The corrections are constants for the gradient (the paper's
        # stop_gradient).
        return ops.stop_gradient(r), ops.stop_gradient(d)

    def _normalize(self, part, correction=None):
        """Normalizes with the batch statistics of a `_moments.Part`."""
        return self._normalize_with(
            part.centered, part.variance, correction, part
        )

    def _normalize_with(self, centered, variance, correction=None, part=None):
        """`centered * multiplier + offset`: `centered` is the input minus
        the mean, the multiplier and offset come from the variance, `gamma`,
        `beta` and the renorm `correction` `(r, d)`. With the `part` of
        batch statistics, the tensors are in its layout and its mean gets
        its gradient through the offset (`_moments.shift_gradient`)."""
        dtype = centered.dtype
        multiplier = ops.rsqrt(
            variance + ops.convert_to_tensor(self.epsilon, dtype)
        )
        offset = None
        if correction is not None:
            r, d = correction
            multiplier = multiplier * r
            offset = d
        if self.scale:
            gamma = self._broadcast(self.gamma, dtype, part)
            multiplier = multiplier * gamma
            offset = None if offset is None else offset * gamma
        if self.center:
            beta = self._broadcast(self.beta, dtype, part)
            offset = beta if offset is None else offset + beta
        if part is not None:
            offset = _moments.offset_of(part, multiplier, offset)
            if keras.backend.backend() == "jax":
                return _moments.scale_deviations(part, multiplier, offset)
        # (x - mean) * multiplier rather than x * multiplier - mean *
        # multiplier: the latter cancels catastrophically on large offsets.
        return _multiply_add(centered, multiplier, offset)

    def _update_moving_statistics(self, mean, variance, count):
        keep = _no_data(mean, variance, count)
        weights = self._average_weights(keep)
        self._assign_average(self.moving_mean, mean, weights, keep)
        self._assign_average(self.moving_variance, variance, weights, keep)

    def _update_renorm_statistics(self, mean, variance, count):
        keep = _no_data(mean, variance, count)
        stddev = ops.sqrt(variance + self.epsilon)
        renorm = self._settings["renorm_momentum"].read()
        self._assign_average(self.renorm_mean, mean, renorm, keep)
        self._assign_average(self.renorm_stddev, stddev, renorm, keep)
        weights = self._average_weights(keep)
        self._assign_average(self.moving_mean, mean, weights, keep)
        moving_stddev = self._assign_average(
            self.moving_stddev, stddev, weights, keep
        )
        # The relu guards against rounding below zero, as in Keras.
        self._assign_where(
            self.moving_variance,
            ops.relu(moving_stddev * moving_stddev - self.epsilon),
            keep,
        )

    def _average_weights(self, keep):
        """The weights of the moving statistics and of the batch's in the
        update of the moving statistics (see `moving_average`); updates the
        total weight of a debiased or cumulative average."""
        momentum, rate = self._settings["momentum"].read()
        if self.moving_average == "ema":
            return momentum, rate
        total = ops.convert_to_tensor(self.moving_weight)
        if self.moving_average == "debiased":
            old, batch = momentum * total, rate
        else:
            old, batch = total, ops.ones_like(total)
        new_total = old + batch
        # Nothing to average yet (a debiased average with momentum 1):
        # the moving statistics stay.
        some = new_total > 0
        safe = ops.where(some, new_total, ops.ones_like(new_total))
        weights = ops.where(some, old / safe, ops.ones_like(safe)), batch / safe
        # Assigned once the weights are computed: on PyTorch, `total` is
        # the variable's own tensor, which the assignment changes in place.
        self._assign_where(self.moving_weight, new_total, keep)
        return weights

    def _assign_average(self, variable, value, weights, keep):
        """`variable = variable * old + value * new` for the `weights`
        `(old, new)` (which broadcast to it), except where `keep`; returns
        the new value."""
        value = ops.reshape(value, variable.shape)
        old = ops.cast(variable, value.dtype)
        old_weight, new_weight = (
            ops.cast(weight, value.dtype) for weight in weights
        )
        return self._assign_where(
            variable, old * old_weight + value * new_weight, keep
        )

    def _assign_where(self, variable, value, keep):
        """Assigns `value` to `variable` except where `keep`; returns the
        new value."""
        old = ops.cast(variable, value.dtype)
        value = ops.where(ops.reshape(keep, variable.shape), old, value)
        variable.assign(ops.cast(value, variable.dtype))
        return value

    def _broadcast(self, weight, dtype, part=None):
        """A weight cast to `dtype` and shaped to broadcast with the input,
        or with the tensors of `part`."""
        shape = self._broadcast_shape if part is None else part.feature_shape
        return ops.reshape(ops.cast(weight, dtype), shape)

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": (
                None
                if self.renorm_clipping is None
                else dict(self.renorm_clipping)
            ),
            "renorm_momentum": self.renorm_momentum,
            "virtual_batch_size": self.virtual_batch_size,
            "inference_statistics": self.inference_statistics,
            "training_statistics": self.training_statistics,
            "moving_average": self.moving_average,
            "bessel_correction": self.bessel_correction,
        }
        return {**super().get_config(), **config}


def standardize_mask(mask, inputs):
    """The mask of a call as a boolean tensor of the input's rank: Keras's
    form, one axis less, gets a last axis of size 1, as in Keras's layer.
    A mask that does not broadcast to the input is refused."""
    if mask is None:
        return None
    ndim = len(inputs.shape)
    received = tuple(mask.shape)
    if len(received) == ndim - 1:
        mask = ops.expand_dims(mask, -1)
    if len(mask.shape) != ndim or any(
        size not in (None, 1, input_size) and input_size is not None
        for size, input_size in zip(mask.shape, inputs.shape, strict=True)
    ):
        raise ValueError(
            "`mask` must broadcast to the input, with one axis less than the "
            "input (Keras's form, read with a last axis of size 1) or the "
            "input's rank (for channels first `(batch, channels, steps)`, "
            "a mask of steps is `(batch, 1, steps)`). Received: "
            f"mask.shape={received}, inputs.shape={tuple(inputs.shape)}"
        )
    return ops.cast(mask, "bool")


def _statistics_dtype(variable_dtype):
    """float32 for the moving statistics, float64 for a float64 layer."""
    if keras.backend.standardize_dtype(variable_dtype) == "float64":
        return "float64"
    return "float32"


def _no_data(mean, variance, count):
    """Where the moving statistics must be kept: channels with no unmasked
    element, or with non-finite statistics (NaN or inf in the batch)."""
    finite = ops.logical_and(ops.isfinite(mean), ops.isfinite(variance))
    return ops.logical_not(ops.logical_and(finite, count > 0))


def _multiply_add(centered, multiplier, offset=None):
    """`centered * multiplier + offset`, for a `centered` that is a fresh
    tensor of the layer's own, used nowhere else.

    Eager PyTorch on a CPU spends more on allocating a tensor of the
    input's size than on computing it: where no gradient is recorded
    (`predict`, `recalibrate`, frozen statistics under `torch.no_grad`),
    the result is computed in place in `centered`, as PyTorch's own
    inference batch norm does.
    """
    if keras.backend.backend() == "torch" and not any(
        getattr(value, "requires_grad", False)
        for value in (centered, multiplier, offset)
    ):
        outputs = centered.mul_(multiplier)
        return outputs if offset is None else outputs.add_(offset)
    outputs = centered * multiplier
    return outputs if offset is None else outputs + offset


def _clip(x, low=None, high=None):
    """Clips `x` to `[low, high]` (tensors, or Python floats with `None` or
    an infinity for no bound) in its own dtype: on the torch backend,
    `ops.clip`, `ops.maximum` and `ops.minimum` round float64 tensors or
    bounds to float32."""
    if _is_bound(low):
        low = ops.cast(low, x.dtype)
        x = ops.where(x < low, low, x)
    if _is_bound(high):
        high = ops.cast(high, x.dtype)
        x = ops.where(x > high, high, x)
    return x


def _is_bound(bound):
    """Whether `bound` may clip: a tensor, or a finite Python float."""
    if bound is None:
        return False
    return not isinstance(bound, (int, float)) or math.isfinite(bound)


def _one_of(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )
    return value


def _sqrt_initializer(initializer):
    def initialize(shape, dtype=None):
        return ops.sqrt(initializer(shape, dtype=dtype))

    return initialize


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _standardize_axis(axis):
    if _is_int(axis):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(map(_is_int, axis)):
        axis = [int(a) for a in axis]
        if len(set(axis)) != len(axis):
            raise ValueError(
                f"`axis` must not repeat an axis. Received: axis={axis}"
            )
        return axis
    raise ValueError(
        "`axis` must be an integer or a non-empty list/tuple of integers. "
        f"Received: axis={axis!r}"
    )


def _feature_axes(axis, ndim):
    """The feature axes as sorted non-negative positions in an input of rank
    `ndim`."""
    axes = [axis] if isinstance(axis, int) else axis
    if ndim < 2:
        raise ValueError(
            "The input must have rank 2 or more (a batch axis and a feature "
            f"axis). Received: input rank {ndim}"
        )
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`axis` is out of range for an input of rank {ndim}. "
                f"Received: axis={axis}"
            )
    positions = sorted(a % ndim for a in axes)
    if len(set(positions)) != len(positions):
        raise ValueError(
            f"`axis` names the same axis twice for an input of rank {ndim}. "
            f"Received: axis={axis}"
        )
    return positions


def _check_batch_axis_not_in(axes, virtual_batch_size):
    if 0 in ([axes] if isinstance(axes, int) else axes):
        raise ValueError(
            "`axis` cannot include the batch axis 0 when "
            "`virtual_batch_size` is set: ghost batches split that axis. "
            f"Received: axis={axes}, virtual_batch_size={virtual_batch_size}"
        )


def _unit_interval(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"`{name}` must be a float in [0, 1]. Received: {name}={value!r}"
        )
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1]. Received: {name}={value}"
        )
    return float(value)


def _standardize_synchronized(value):
    if isinstance(value, bool):
        return value
    if not _is_int(value) or value < 2:
        raise ValueError(
            "`synchronized` must be True, False, or an integer of at least "
            "2, the number of consecutive devices that share statistics "
            f"(1 is False). Received: synchronized={value!r}"
        )
    return int(value)


def _standardize_virtual_batch_size(value):
    if value is None:
        return None
    if not _is_int(value) or value <= 0:
        raise ValueError(
            "`virtual_batch_size` must be a positive integer or None. "
            f"Received: virtual_batch_size={value!r}"
        )
    return int(value)


def _standardize_renorm_clipping(clipping):
    if clipping is None:
        return None
    if not isinstance(clipping, dict):
        raise ValueError(
            "`renorm_clipping` must be a dict with keys among "
            f"{_RENORM_CLIPPING_KEYS}. Received: renorm_clipping={clipping!r}"
        )
    unknown = set(clipping) - set(_RENORM_CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            "Received invalid keys for `renorm_clipping` argument: "
            f"{sorted(unknown)}; the supported keys are "
            f"{_RENORM_CLIPPING_KEYS}. Received: renorm_clipping={clipping}"
        )
    for key, value in clipping.items():
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise ValueError(
                f"{key} should be a finite number or None in the "
                f"`renorm_clipping` argument. Received: renorm_clipping="
                f"{clipping!r}"
            )
    clipping = {
        key: None if value is None else float(value)
        for key, value in clipping.items()
    }
    rmin, rmax, dmax = (clipping.get(key) for key in ("rmin", "rmax", "dmax"))
    # r = batch stddev / moving stddev and d = (batch mean - moving mean) /
    # moving stddev are 1 and 0 when the statistics agree: a range that
    # excludes them would not clip the corrections but replace them.
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` "
            f"argument. Received: renorm_clipping={clipping}"
        )
    if rmax is not None and rmax < 1:
        raise ValueError(
            "rmax should be at least 1 in the `renorm_clipping` argument. "
            f"Received: renorm_clipping={clipping}"
        )
    if rmin is not None and rmin > 1:
        raise ValueError(
            "rmin should be at most 1 in the `renorm_clipping` argument. "
            f"Received: renorm_clipping={clipping}"
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            "dmax should be non-negative in the `renorm_clipping` "
            f"argument. Received: renorm_clipping={clipping}"
        )
    return clipping


def _boolean(name, value):
    """`value` if it is a bool (Python's or NumPy's): `bool("no")` is True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return bool(value)
