"""Exports models with keras_bn layers in every format Keras offers on the
backend `KERAS_BACKEND`, runs each artifact in its own runtime and writes
what it found to the JSON file named by the first argument.

Each record names the backend, the format and the case, with `status`
("ok", "skip" or "error"), the largest difference from `model.predict` and,
for the graph checks, the number of ops of each type in the artifact.
"""

import collections
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback

import keras
import numpy as np

import keras_bn

BACKEND = keras.backend.backend()
FORMATS = {
    "tensorflow": ("onnx", "litert", "openvino"),
    "jax": ("onnx", "openvino"),
    "torch": ("onnx", "openvino", "torch"),
}[BACKEND]
SUFFIX = {"onnx": ".onnx", "litert": ".tflite", "openvino": ".xml"}
SUFFIX["torch"] = ".pt2"
# The keras_bn configurations the export test covers, one branch each of
# one model; "masked" follows a `Masking` layer.
CONFIGURATIONS = {
    "plain": {},
    "ghost": {"virtual_batch_size": 4},
    "masked": {},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 2.0}},
    "frozen_statistics": {"training_statistics": "moving"},
}
SEQUENCE_SHAPE = (6, 3)
IMAGE_SHAPE = (8, 8, 3)
BATCH = 8


def configurations_model():
    """One branch per configuration over a sequence input; the output
    holds each branch's two columns, in `CONFIGURATIONS`' order."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SEQUENCE_SHAPE)
    branches = []
    for name, kwargs in CONFIGURATIONS.items():
        if name == "masked":
            hidden = keras.layers.Masking(0.0)(inputs)
        else:
            hidden = keras.layers.Dense(4)(inputs)
        hidden = keras_bn.BatchNormalization(**kwargs)(hidden)
        hidden = keras.layers.ReLU()(hidden)
        hidden = keras.layers.GlobalAveragePooling1D()(hidden)
        branches.append(keras.layers.Dense(2)(hidden))
    model = keras.Model(inputs, keras.layers.Concatenate()(branches))
    x = np.random.default_rng(0).normal(1.0, 2.0, (32, *SEQUENCE_SHAPE))
    x[::3, 4:] = 0.0  # masked steps in every third sequence
    x = x.astype("float32")
    model.compile(optimizer="sgd", loss="mse")
    y = np.ones((len(x), 2 * len(CONFIGURATIONS)), "float32")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    return model, x[:BATCH]


def conv_model(layer=keras_bn.BatchNormalization, batch_norm=True):
    """Conv2D -> batch norm -> ReLU -> pooling -> Dense -> batch norm,
    trained for an epoch; without `batch_norm`, the same network with none
    (untrained: only its graph counts)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(IMAGE_SHAPE)
    # Nonzero biases: exporters drop an add of zeros.
    biases = "random_normal"
    hidden = keras.layers.Conv2D(4, 3, bias_initializer=biases)(inputs)
    if batch_norm:
        hidden = layer()(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(2, bias_initializer=biases)(hidden)
    if batch_norm:
        outputs = layer()(outputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).normal(2.0, 3.0, (16, *IMAGE_SHAPE))
    x = x.astype("float32")
    if batch_norm:
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, np.ones((16, 2)), batch_size=BATCH, epochs=1, verbose=0)
    return model, x[:BATCH]


def fusion_model(kind, layer):
    """`kind` ("conv" or "dense") -> batch norm `layer` -> ReLU, trained
    for a step."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(IMAGE_SHAPE)
    if kind == "conv":
        hidden = keras.layers.Conv2D(4, 3)(inputs)
    else:
        hidden = keras.layers.Dense(4)(keras.layers.Flatten()(inputs))
    outputs = keras.layers.ReLU()(layer()(hidden))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(2).normal(size=(16, *IMAGE_SHAPE))
    model.compile(optimizer="sgd", loss="mse")
    y = np.ones((16, *model.output_shape[1:]), "float32")
    model.fit(x.astype("float32"), y, batch_size=BATCH, epochs=1, verbose=0)
    return model


def run_onnx(path, x):
    import onnx
    import onnxruntime

    session = onnxruntime.InferenceSession(
        path, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    outputs = session.run(None, {name: x})[0]
    graph = onnx.load(path).graph
    return outputs, collections.Counter(node.op_type for node in graph.node)


def run_litert(path, x):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    output = interpreter.get_output_details()[0]["index"]
    outputs = interpreter.get_tensor(output)
    ops = interpreter._get_ops_details()
    return outputs, collections.Counter(op["op_name"] for op in ops)


def run_openvino(path, x):
    import openvino

    core = openvino.Core()
    model = core.read_model(path)
    compiled = core.compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    outputs = compiled([x])[compiled.output(0)]
    ops = collections.Counter(op.get_type_name() for op in model.get_ops())
    return outputs, ops


def run_torch(path, x):
    import torch

    program = torch.export.load(path)
    outputs = program.module()(torch.from_numpy(x)).detach().numpy()
    ops = collections.Counter(
        str(node.target).split(".")[1]
        for node in program.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("aten")
    )
    return outputs, ops


RUNNERS = {
    "onnx": run_onnx,
    "litert": run_litert,
    "openvino": run_openvino,
    "torch": run_torch,
}


def export_and_run(model, x, format, directory, name):
    """Exports `model`, runs the artifact on `x`; returns its outputs and
    op counts."""
    path = os.path.join(directory, name + SUFFIX[format])
    if format == "openvino" and BACKEND == "jax":
        # Keras's own path hands OpenVINO a jax2tf function whose
        # `XlaCallModule` op it cannot convert; OpenVINO reads the ONNX
        # export instead.
        path = os.path.join(directory, name + "-openvino.onnx")
        model.export(path, format="onnx", verbose=False)
        return run_openvino(path, x)
    kwargs = {}
    if format == "torch":
        kwargs["input_signature"] = [
            keras.InputSpec(shape=x.shape, dtype="float32")
        ]
    model.export(path, format=format, verbose=False, **kwargs)
    return RUNNERS[format](path, x)


def record(records, format, case, function, *args):
    entry = {"backend": BACKEND, "format": format, "case": case}
    start = time.perf_counter()
    try:
        entry.update(function(*args))
        entry.setdefault("status", "ok")
    except Exception:
        entry.update(status="error", reason=traceback.format_exc()[-3000:])
    entry["seconds"] = round(time.perf_counter() - start, 2)
    records.append(entry)
    print(json.dumps(entry)[:300], flush=True)


def compared(model, x, format, directory, name):
    """The artifact's largest difference from `predict` and its ops."""
    predicted = model.predict(x, verbose=0)
    # ONNX export wants a model that has been called: on JAX, `predict`
    # does not count, and `fold` returns a new model.
    model(x)
    outputs, ops = export_and_run(model, x, format, directory, name)
    return {"difference": float(np.abs(outputs - predicted).max()), "ops": ops}


def configurations(model, x, format, directory):
    """The largest difference from `predict` of each configuration's
    columns."""
    predicted = model.predict(x, verbose=0)
    outputs, ops = export_and_run(model, x, format, directory, "c")
    columns = np.abs(outputs - predicted).max(axis=0)
    return {
        "difference": {
            name: float(columns[2 * i : 2 * i + 2].max())
            for i, name in enumerate(CONFIGURATIONS)
        },
        "ops": ops,
    }


def quantized(model, x):
    """The largest difference int8 quantization makes to `model`'s
    outputs, and their largest magnitude."""
    reference = model.predict(x, verbose=0)
    model.quantize("int8")
    outputs = model.predict(x, verbose=0)
    return {
        "difference": float(np.abs(outputs - reference).max()),
        "scale": float(np.abs(reference).max()),
    }


def main(output):
    start = time.perf_counter()
    records = []
    directory = tempfile.mkdtemp()
    model, x = configurations_model()
    for format in FORMATS:
        record(
            records,
            format,
            "configurations",
            configurations,
            model,
            x,
            format,
            directory,
        )

    # Folding: op counts of the conv network with keras_bn's layer, folded,
    # and with no batch norm at all.
    model, x = conv_model()
    models = {
        "keras_bn": model,
        "none": conv_model(batch_norm=False)[0],
        "folded": keras_bn.fold(model),
    }
    for format in FORMATS:
        for name, network in models.items():
            args = (network, x, format, directory, name)
            record(records, format, "graph-" + name, compared, *args)

    # LiteRT's fusion of batch norm into the conv or dense layer before it
    # (and of the ReLU after it), Keras's layer against keras_bn's.
    if "litert" in FORMATS:
        for kind in ("conv", "dense"):
            for name, layer in (
                ("keras", keras.layers.BatchNormalization),
                ("keras_bn", keras_bn.BatchNormalization),
            ):
                network = fusion_model(kind, layer)
                args = (network, x, "litert", directory, kind + name)
                record(
                    records, "litert", f"fuse-{kind}-{name}", compared, *args
                )

    record(records, "int8", "quantize-folded", quantized, models["folded"], x)
    print(f"worker: {time.perf_counter() - start:.1f} s", flush=True)
    pathlib.Path(output).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
