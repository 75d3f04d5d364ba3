"""`from_torch`: a PyTorch batch norm as a `keras_bn.BatchNormalization`.

PyTorch's conventions differ from Keras's in four places, which a port gets
wrong one at a time: its `momentum` is the weight of the batch (`1 -
momentum` in Keras), `momentum=None` is a cumulative average, its `eps`
defaults to 1e-5, and its running variance is updated with the
Bessel-corrected batch variance. `from_torch` maps each.
"""

import numpy as np

from keras_bn._batch_normalization import BatchNormalization

# The class names, with the rank of the input the layer is built for by
# default: PyTorch's `(N, C)` for BatchNorm1d (its `(N, C, L)` needs
# `input_shape`), `(N, C, H, W)` for the others.
_RANKS = {"BatchNorm1d": 2, "BatchNorm2d": 4, "BatchNorm3d": 5}
_RANKS["SyncBatchNorm"] = 4
_DEFAULTS = {
    "eps": 1e-5,
    "momentum": 0.1,
    "affine": True,
    "track_running_stats": True,
}


def from_torch(module, input_shape=None, state_dict=None, **arguments):
    """Returns a `keras_bn.BatchNormalization` that computes what a PyTorch
    batch norm computes, with its weights and running statistics.

    The layer normalizes axis 1 (PyTorch's channels); its `momentum` is
    `1 - momentum` of PyTorch, `momentum=None` becomes
    `moving_average="cumulative"` (with the number of batches tracked as
    its total weight), `eps` is its `epsilon`, `affine=False` drops `gamma`
    and `beta`, `track_running_stats=False` normalizes inference batches
    with their own statistics, `SyncBatchNorm` is `synchronized=True`, and
    the moving variance is updated with the Bessel-corrected batch
    variance (`bessel_correction=True`), as PyTorch's running variance is.
    In training, in inference, and in the moving statistics, the layer and
    the module agree to float32 rounding.

    Args:
        module: A `torch.nn.BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d` or
            `SyncBatchNorm` module; or the name of one of these classes,
            with `state_dict` and the constructor `arguments`, which needs
            no PyTorch.
        input_shape: The input's shape without the batch axis, channels
            first as PyTorch takes it (`None` for a size known only at run
            time). Defaults to `(num_features,)` for `BatchNorm1d` (pass
            `(num_features, None)` for sequences) and to
            `(num_features, None, None)` and
            `(num_features, None, None, None)` for 2d and 3d
            (`SyncBatchNorm` as 2d).
        state_dict: With a class name, the module's state dict: tensors or
            NumPy arrays under PyTorch's names (`weight`, `bias`,
            `running_mean`, `running_var`, `num_batches_tracked`).
        **arguments: With a class name, the module's constructor arguments:
            `num_features` and, optionally, `eps`, `momentum`, `affine`,
            `track_running_stats`.

    Returns:
        A built `keras_bn.BatchNormalization`.

    Example:

    >>> torch_bn = torch.nn.BatchNorm2d(64)
    >>> layer = keras_bn.from_torch(torch_bn)  # for (batch, 64, H, W)
    """
    kind, arguments, state = _describe(module, state_dict, arguments)
    channels = int(arguments["num_features"])
    if input_shape is None:
        input_shape = (channels,) + (None,) * (_RANKS[kind] - 2)
    input_shape = tuple(input_shape)
    if not input_shape or input_shape[0] != channels:
        raise ValueError(
            "`input_shape` must be channels first, with the module's "
            f"{channels} features first. Received: input_shape={input_shape}"
        )
    momentum = arguments["momentum"]
    affine = bool(arguments["affine"])
    tracked = bool(arguments["track_running_stats"])
    layer = BatchNormalization(
        axis=1,
        momentum=0.9 if momentum is None else 1.0 - float(momentum),
        epsilon=float(arguments["eps"]),
        center=affine,
        scale=affine,
        synchronized=kind == "SyncBatchNorm",
        inference_statistics="moving" if tracked else "batch",
        moving_average="cumulative" if momentum is None else "ema",
        bessel_correction=True,
    )
    needed = ["weight", "bias"] if affine else []
    if tracked:
        needed += ["running_mean", "running_var"]
        needed += ["num_batches_tracked"] if momentum is None else []
    missing = [key for key in needed if key not in state]
    if missing:
        raise ValueError(
            f"`state_dict` lacks {missing}. Received: state_dict with keys "
            f"{sorted(state)}"
        )
    layer.build((None, *input_shape))
    values = {}
    if affine:
        values.update(gamma=state["weight"], beta=state["bias"])
    if tracked:
        values.update(
            moving_mean=state["running_mean"],
            moving_variance=state["running_var"],
        )
        if momentum is None:
            batches = float(np.asarray(state["num_batches_tracked"]))
            values["moving_weight"] = np.full(channels, batches)
    for name, value in values.items():
        weight = getattr(layer, name)
        weight.assign(np.asarray(value, "float32").reshape(weight.shape))
    return layer


def _describe(module, state_dict, arguments):
    """The class name, the constructor arguments and the state (NumPy
    arrays) of `module`, or of the class name, `state_dict` and
    `arguments` given."""
    if isinstance(module, str):
        if module not in _RANKS:
            raise ValueError(
                f"`module` must be a PyTorch batch norm or one of "
                f"{tuple(_RANKS)}. Received: module={module!r}"
            )
        unknown = set(arguments) - {"num_features", *_DEFAULTS}
        if "num_features" not in arguments or unknown:
            raise ValueError(
                "With a class name, pass `num_features` and optionally "
                f"{tuple(_DEFAULTS)}. Received: arguments={arguments}"
            )
        state = {
            key: _to_numpy(value) for key, value in (state_dict or {}).items()
        }
        return module, {**_DEFAULTS, **arguments}, state
    kind = type(module).__name__
    if kind not in _RANKS or state_dict is not None or arguments:
        raise ValueError(
            "`module` must be a torch.nn.BatchNorm1d, BatchNorm2d, "
            "BatchNorm3d or SyncBatchNorm module (its state and arguments "
            "come with it), or a class name with `state_dict` and the "
            f"constructor arguments. Received: module of type {kind}"
        )
    arguments = {
        "num_features": module.num_features,
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
    }
    state = {
        key: _to_numpy(value) for key, value in module.state_dict().items()
    }
    return kind, arguments, state


def _to_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
