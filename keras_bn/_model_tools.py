"""Model-level tools: convert, revert and fold batch norm.

Each works on Sequential and functional models, nested ones included, with
both `keras.layers.BatchNormalization` and `keras_bn.BatchNormalization`,
and rebuilds the model with `keras.models.clone_model`. (`recalibrate`,
which runs the model, has a module of its own.)
"""

import warnings

import keras
import numpy as np

from keras_bn._batch_normalization import BatchNormalization

_BATCH_NORMS = (keras.layers.BatchNormalization, BatchNormalization)
# The layers a following batch norm folds into, with the index of the
# kernel that makes their output channels among their weights, and how a
# per-channel multiplier takes that kernel's shape (after which the bias
# comes): output channels last; a depthwise kernel's channel `c` and
# multiplier `m` make output channel `c * depth_multiplier + m`; a
# transposed convolution's kernel is `(..., outputs, inputs)`; a separable
# convolution's pointwise kernel makes its outputs.
_FOLDABLE = {
    keras.layers.Dense: (0, "last"),
    keras.layers.Conv1D: (0, "last"),
    keras.layers.Conv2D: (0, "last"),
    keras.layers.Conv3D: (0, "last"),
    keras.layers.DepthwiseConv1D: (0, "depthwise"),
    keras.layers.DepthwiseConv2D: (0, "depthwise"),
    keras.layers.SeparableConv1D: (1, "last"),
    keras.layers.SeparableConv2D: (1, "last"),
    keras.layers.Conv1DTranspose: (0, "transposed"),
    keras.layers.Conv2DTranspose: (0, "transposed"),
    keras.layers.Conv3DTranspose: (0, "transposed"),
}
# Arguments of keras_bn's layer that Keras's layer does not have.
_KERAS_BN_ONLY_KEYS = (
    "virtual_batch_size",
    "inference_statistics",
    "training_statistics",
    "moving_average",
    "bessel_correction",
)


def convert(model, **layer_kwargs):
    """Returns a copy of `model` with keras_bn batch norm.

    Every `keras.layers.BatchNormalization` becomes a
    `keras_bn.BatchNormalization` with the same configuration and weights,
    plus `layer_kwargs` (such as `virtual_batch_size=32`), and every
    `keras_bn.BatchNormalization` takes `layer_kwargs` too:
    `convert(model, synchronized=True)` synchronizes every batch norm of a
    model, as `torch.nn.SyncBatchNorm.convert_sync_batchnorm` does in
    PyTorch. The new model predicts the same in inference and trains. The
    given model is not modified.

    Args:
        model: A Sequential or functional `keras.Model`; nested models are
            converted too.
        **layer_kwargs: Arguments for every new `keras_bn.BatchNormalization`.

    Returns:
        The new model.

    Example:

    >>> backbone = keras.applications.ResNet50(weights=None)
    >>> model = keras_bn.convert(backbone, virtual_batch_size=32)
    """
    _check_model(model, "convert")

    def replace(layer):
        # keras_bn's layers are instances of Keras's too: they change only
        # when there is something to change.
        if type(layer) is keras.layers.BatchNormalization or (
            layer_kwargs and isinstance(layer, BatchNormalization)
        ):
            config = {**layer.get_config(), **layer_kwargs}
            if not config.get("renorm") and "renorm_clipping" not in (
                layer_kwargs
            ):
                # Keras's layer keeps a clipping it never applies, which
                # keras-bn's refuses without renorm: the same computation.
                config["renorm_clipping"] = None
            return BatchNormalization.from_config(config)
        return None

    return _rebuild(model, replace, "convert")


def revert(model):
    """Returns a copy of `model` with Keras's own batch norm.

    Every `keras_bn.BatchNormalization` becomes a
    `keras.layers.BatchNormalization` with the same weights, so that a model
    trained with keras-bn can be shipped without it; inference predictions
    are unchanged. Ghost batches only act in training and are dropped, as is
    `synchronized` on backends where Keras's layer refuses it (on
    TensorFlow, a group of devices becomes all of them). The given model
    is not modified.

    Args:
        model: A Sequential or functional `keras.Model`; nested models are
            reverted too.

    Returns:
        The new model.

    Raises:
        ValueError: for a layer whose inference Keras's layer cannot express
            (several feature axes, `inference_statistics="batch"`).
    """
    _check_model(model, "revert")

    def replace(layer):
        if not isinstance(layer, BatchNormalization):
            return None
        axis = layer.axis
        if isinstance(axis, list) and len(axis) == 1:
            axis = axis[0]
        if not isinstance(axis, int) or layer.inference_statistics != "moving":
            raise ValueError(
                f"keras_bn.revert: layer {layer.name!r} cannot be expressed "
                "by keras.layers.BatchNormalization, which has one feature "
                "axis and normalizes inference with the moving statistics. "
                f"Received: axis={layer.axis}, "
                f"inference_statistics={layer.inference_statistics!r}"
            )
        config = layer.get_config()
        for key in _KERAS_BN_ONLY_KEYS:
            config.pop(key)
        config["axis"] = axis
        # Keras's layer has no groups of devices: a group becomes all of
        # them, where its `synchronized=True` exists at all.
        config["synchronized"] = (
            keras.backend.backend() == "tensorflow"
            and config["synchronized"] is not False
        )
        return keras.layers.BatchNormalization.from_config(config)

    return _rebuild(model, replace, "revert")


def fold(model):
    """Returns an inference copy of `model` with batch norm folded away.

    A batch-norm layer whose only input is a `Dense` layer or a convolution
    (`Conv1D` to `Conv3D`, `DepthwiseConv1D` and `DepthwiseConv2D`,
    `SeparableConv1D` and `SeparableConv2D`, whose pointwise kernel it
    folds into, and `Conv1DTranspose` to `Conv3DTranspose`) with a linear
    activation, whose output nothing else uses, is folded into that
    layer's kernel and bias
    (a bias is added where there was none) and removed (in a Sequential
    model, replaced by a `keras.layers.Identity`). Other batch-norm layers
    stay as they are. The folding uses the moving statistics, so the new
    model predicts the same as the given one in inference; it is meant for
    inference and export, not training. The given model is not modified.

    Args:
        model: A Sequential or functional `keras.Model`; nested models are
            folded too (a pair is folded when both layers sit in the same
            model).

    Returns:
        The new model.

    Example:

    >>> model = keras_bn.fold(keras.applications.ResNet50(weights=None))
    """
    _check_model(model, "fold")
    models = [model] + [
        layer for layer in _all_layers(model) if isinstance(layer, keras.Model)
    ]
    calls = {}
    for submodel in models:
        for layer_id, count in _calls(submodel).items():
            calls[layer_id] = calls.get(layer_id, 0) + count
    producers = {}
    for submodel in models:
        for key, (bn, producer) in _foldable_pairs(submodel).items():
            # A layer shared with another model keeps its own weights.
            if calls.get(id(producer)) == 1:
                producers[key] = (bn, producer)
    producer_ids = {id(producer): bn for bn, producer in producers.values()}

    removed = set()

    def replace(layer):
        if id(layer) in producers:
            identity = keras.layers.Identity(name=layer.name)
            removed.add(id(identity))
            return identity
        if id(layer) in producer_ids:
            config = {**layer.get_config(), "use_bias": True}
            return layer.__class__.from_config(config)
        return None

    def weights_of(layer):
        if id(layer) in producers:
            return []
        if id(layer) in producer_ids:
            return _folded_weights(layer, producer_ids[id(layer)])
        return None

    def call(layer, inputs, *args, **kwargs):
        # In functional models the folded layer leaves the graph; Sequential
        # models keep it as an Identity.
        if id(layer) in removed:
            return inputs
        return layer(inputs, *args, **kwargs)

    return _rebuild(
        model, replace, "fold", weights_of=weights_of, call_function=call
    )


def _check_model(model, name):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"keras_bn.{name} expects a keras.Model. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )


def _is_batch_norm(layer):
    return isinstance(layer, _BATCH_NORMS)


def _all_layers(model, seen=None):
    """Every layer of `model`, nested models' layers included, once each."""
    seen = set() if seen is None else seen
    for layer in model.layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer, seen)


def _rebuild(model, replace, name, weights_of=None, call_function=None):
    """Clones `model`, replacing the layers for which `replace` returns a
    layer, and copies every weight (or `weights_of(layer)` where it returns
    weights)."""
    if not any(_is_batch_norm(layer) for layer in _all_layers(model)):
        warnings.warn(
            f"keras_bn.{name}: the model has no batch-norm layer; returning "
            "an unchanged copy.",
            stacklevel=3,
        )
    pairs = []
    # One memo for the whole model: a layer or nested model used in several
    # places stays shared in the copy.
    clones = {}

    def clone_model(model):
        # Nested models are cloned here rather than with
        # `clone_model(recursive=True)`, which drops `call_function` for
        # functional models nested in a Sequential one.
        sequential = isinstance(model, keras.Sequential)
        try:
            return keras.models.clone_model(
                model,
                clone_function=clone,
                call_function=None if sequential else call_function,
            )
        except ValueError as error:
            if "only supported for Sequential" not in str(error):
                raise
            raise ValueError(
                f"keras_bn.{name} supports Sequential and functional models "
                "(nested ones included), which it can rebuild layer by "
                f"layer. Received: model {model.name!r}, a subclassed model "
                f"of type {type(model).__name__}"
            ) from error

    def clone(layer):
        if id(layer) not in clones:
            clones[id(layer)] = clone_new(layer)
        return clones[id(layer)]

    def clone_new(layer):
        if isinstance(layer, keras.Model):
            return clone_model(layer)
        if not isinstance(layer, keras.layers.Layer):
            # An operation of the functional graph that is not a layer
            # (`x + 3`, `keras.ops.mean(x)`): no weights, no batch norm.
            return layer.__class__.from_config(layer.get_config())
        new = replace(layer)
        if new is None:
            _check_no_hidden_batch_norm(layer, name)
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    rebuilt = clone_model(model)
    for layer, new in pairs:
        weights = weights_of(layer) if weights_of else None
        if weights is None:
            weights = _carried_weights(layer, new)
        new.set_weights(weights)
    return rebuilt


def _carried_weights(layer, new):
    """The weights of `layer` for its copy `new`: all of them, or, between
    batch norms, those of the same name; a weight only `new` has (the
    total weight of a debiased or cumulative average) keeps its initial
    value, so that such an average starts at the next training step."""
    if not (_is_batch_norm(layer) and _is_batch_norm(new)):
        return layer.get_weights()
    old = {weight.name: weight.numpy() for weight in layer.weights}
    return [old.get(weight.name, weight.numpy()) for weight in new.weights]


def _check_no_hidden_batch_norm(layer, name):
    """A custom layer holding batch norm inside would be copied with its
    batch norm untouched: refuse rather than return a partial result."""
    if isinstance(layer, keras.Model) or _is_batch_norm(layer):
        return
    if any(
        weight.path.endswith(("moving_mean", "moving_variance"))
        for weight in layer.weights
    ):
        raise ValueError(
            f"keras_bn.{name}: layer {layer.name!r} of type "
            f"{type(layer).__name__} holds batch-norm weights inside it, "
            "which cannot be rebuilt. Supported: batch-norm layers used "
            "directly in Sequential and functional models."
        )


def _calls(model):
    """How many times `model` calls each of its layers, by `id`."""
    if isinstance(model, keras.Sequential):
        return {id(layer): 1 for layer in model.layers}
    config = model.get_config()
    if "layers" not in config:
        return {}
    # The graph's operations that are not layers (`x + 3`) are left out.
    layers = {layer.name: layer for layer in model.layers}
    return {
        id(layers[entry["name"]]): len(entry.get("inbound_nodes", []))
        for entry in config["layers"]
        if entry["name"] in layers
    }


def _foldable_pairs(model):
    """Maps `id(bn)` to `(bn, producer)` for the batch-norm layers of
    `model` (not of its nested models) that fold into their producer. A
    producer called more than once is left out by `fold`, which counts
    calls over every nested model."""
    if isinstance(model, keras.Sequential):
        layers = model.layers
        candidates = zip(layers[1:], layers[:-1], strict=False)
        return {
            id(bn): (bn, producer)
            for bn, producer in candidates
            if _is_batch_norm(bn) and _can_fold(bn, producer)
        }
    config = model.get_config()
    if "layers" not in config:
        return {}
    consumers = {}
    sources = {}
    for entry in config["layers"]:
        nodes = entry.get("inbound_nodes", [])
        histories = [h for node in nodes for h in _keras_histories(node)]
        for history in histories:
            consumers[history[0]] = consumers.get(history[0], 0) + 1
        # A call with training=True normalizes with batch statistics even
        # in inference: the moving ones cannot stand in for them.
        forced = len(nodes) == 1 and nodes[0].get("kwargs", {}).get("training")
        if len(nodes) == 1 and len(histories) == 1 and not forced:
            sources[entry["name"]] = histories[0][0]
    for output in _output_names(config.get("output_layers", [])):
        consumers[output] = consumers.get(output, 0) + 1
    pairs = {}
    layers = {layer.name: layer for layer in model.layers}
    for layer in model.layers:
        if not _is_batch_norm(layer) or layer.name not in sources:
            continue
        producer_name = sources[layer.name]
        # The producer may be an operation that is not a layer (`x + 3`).
        if consumers.get(producer_name) != 1 or producer_name not in layers:
            continue
        producer = layers[producer_name]
        if _can_fold(layer, producer):
            pairs[id(layer)] = (layer, producer)
    return pairs


def _output_names(structure):
    """The layer names in a functional config's `output_layers`: one
    `[name, node, tensor]` list, or a list or dict of them."""
    if isinstance(structure, dict):
        return [n for value in structure.values() for n in _output_names(value)]
    if len(structure) == 3 and isinstance(structure[0], str):
        return [structure[0]]
    return [name for value in structure for name in _output_names(value)]


def _keras_histories(structure):
    """The `keras_history` entries of the tensors in a node's config."""
    if isinstance(structure, dict):
        if structure.get("class_name") == "__keras_tensor__":
            return [structure["config"]["keras_history"]]
        return [
            h for value in structure.values() for h in _keras_histories(value)
        ]
    if isinstance(structure, (list, tuple)):
        return [h for value in structure for h in _keras_histories(value)]
    return []


def _can_fold(bn, producer):
    if _foldable_class(producer) is None:
        return False
    if getattr(producer, "lora_enabled", False) or getattr(
        producer, "quantization_mode", None
    ):
        return False
    if keras.activations.serialize(producer.activation) != "linear":
        return False
    if getattr(bn, "inference_statistics", "moving") != "moving":
        return False
    axis = bn.axis
    if isinstance(axis, list):
        if len(axis) != 1:
            return False
        axis = axis[0]
    rank = len(producer.output.shape)
    channels_first = getattr(producer, "data_format", None) == "channels_first"
    channel_axis = 1 if channels_first else rank - 1
    return axis % rank == channel_axis


def _folded_weights(producer, bn):
    """The kernel and bias of `producer` with `bn`'s inference transform
    folded in, computed in float64."""
    mean = bn.moving_mean.numpy().astype("float64")
    variance = bn.moving_variance.numpy().astype("float64")
    multiplier = 1.0 / np.sqrt(variance + bn.epsilon)
    if bn.scale:
        multiplier = multiplier * bn.gamma.numpy().astype("float64")
    offset = -mean * multiplier
    if bn.center:
        offset = offset + bn.beta.numpy().astype("float64")
    index, layout = _FOLDABLE[_foldable_class(producer)]
    weights = producer.get_weights()
    kernel = weights[index].astype("float64")
    bias = (
        weights[index + 1].astype("float64")
        if producer.use_bias
        else np.zeros(multiplier.shape)
    )
    shape = {
        "last": multiplier.shape,
        "depthwise": kernel.shape[-2:],
        "transposed": multiplier.shape + (1,),
    }[layout]
    kernel = kernel * multiplier.reshape(shape)
    dtype = weights[index].dtype
    return [
        *weights[:index],
        kernel.astype(dtype),
        (bias * multiplier + offset).astype(dtype),
    ]


def _foldable_class(layer):
    """The class of `_FOLDABLE` that `layer` is an instance of, or None."""
    for cls in type(layer).__mro__:
        if cls in _FOLDABLE:
            return cls
    return None
