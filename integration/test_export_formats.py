"""Models with keras_bn layers exported in every format Keras offers on each
backend (ONNX, LiteRT, OpenVINO, `torch.export`) run in their own runtimes
and predict as the model does; batch norm fuses into the layer before it in
LiteRT as Keras's layer does, and after `keras_bn.fold` no format's graph
holds anything left of a batch norm. `integration/export_worker.py` does
the work, in one process per backend."""

import collections
import concurrent.futures
import importlib.util
import json
import pathlib

import backend_process
import pytest

WORKER = pathlib.Path(__file__).with_name("export_worker.py")
FORMATS = {
    "tensorflow": ("onnx", "litert", "openvino"),
    "jax": ("onnx", "openvino"),
    "torch": ("onnx", "openvino", "torch"),
}
PACKAGES = {
    "onnx": ("onnx", "onnxruntime"),
    "litert": ("ai_edge_litert",),
    "openvino": ("openvino",),
    "torch": (),
}
# Exporters the ONNX export needs besides the runtime, per backend.
ONNX_EXPORTERS = {
    "tensorflow": ("tf2onnx",),
    "jax": ("jax2onnx",),
    "torch": ("onnxscript",),
}
CONFIGURATIONS = ("plain", "ghost", "masked", "renorm", "frozen_statistics")
CASES = [(b, f) for b in FORMATS for f in FORMATS[b]]


def _missing(backend, format):
    names = PACKAGES[format]
    if format == "onnx" or (format == "openvino" and backend == "jax"):
        names += ONNX_EXPORTERS[backend]
    return [n for n in names if importlib.util.find_spec(n) is None]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """What each backend's worker found, by (backend, format, case)."""
    directory = tmp_path_factory.mktemp("export")

    def run(backend):
        output = directory / f"{backend}.json"
        result = backend_process.run(backend, WORKER, output, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(output.read_text())

    found = {}
    with concurrent.futures.ThreadPoolExecutor(len(FORMATS)) as pool:
        results = list(pool.map(run, FORMATS))
    for entries in results:
        for entry in entries:
            found[entry["backend"], entry["format"], entry["case"]] = entry
    return found


def _entry(records, backend, format, case):
    missing = _missing(backend, format) if format in PACKAGES else []
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the export extra)")
    entry = records[backend, format, case]
    assert entry["status"] == "ok", entry.get("reason")
    return entry


@pytest.mark.parametrize("backend,format", CASES)
def test_artifact_predicts_as_the_model(records, backend, format):
    """Every configuration's outputs from the artifact, run in its own
    runtime, equal `model.predict`'s within 1e-5."""
    entry = _entry(records, backend, format, "configurations")
    assert set(entry["difference"]) == set(CONFIGURATIONS)
    for name, difference in entry["difference"].items():
        assert difference <= 1e-5, (name, difference)


@pytest.mark.parametrize("backend,format", CASES)
def test_folded_graph_has_no_batch_norm_left(records, backend, format):
    """After `keras_bn.fold`, the artifact holds exactly the ops of the
    same network built with no batch norm, and predicts as the folded
    model does."""
    for case in ("keras_bn", "none", "folded"):
        entry = _entry(records, backend, format, "graph-" + case)
        assert entry["difference"] <= 1e-5, (case, entry["difference"])
    folded = records[backend, format, "graph-folded"]["ops"]
    assert folded == records[backend, format, "graph-none"]["ops"]
    assert not [op for op in folded if "norm" in op.lower()]
    # The unfolded graph is larger: the check sees a batch norm when there
    # is one.
    unfolded = records[backend, format, "graph-keras_bn"]["ops"]
    assert sum(unfolded.values()) > sum(folded.values())


def _litert_ops(records, case):
    entry = _entry(records, "tensorflow", "litert", case)
    assert entry["difference"] <= 1e-5, entry["difference"]
    return collections.Counter(entry["ops"])


def test_litert_fuses_conv_batch_norm_relu_as_keras_does(records):
    """Conv2D -> keras_bn -> ReLU becomes the one fused `CONV_2D` that
    Keras's layer gives."""
    ops = _litert_ops(records, "fuse-conv-keras_bn")
    assert ops == _litert_ops(records, "fuse-conv-keras")
    assert ops["CONV_2D"] == 1 and not ops.keys() - {"CONV_2D", "DELEGATE"}


@pytest.mark.xfail(
    strict=True,
    reason="after a Dense layer, keras_bn's inference leaves SUB, MUL and "
    "ADD that LiteRT does not fold into FULLY_CONNECTED, as it does "
    "Keras's layer",
)
def test_litert_fuses_dense_batch_norm_as_keras_does(records):
    ops = _litert_ops(records, "fuse-dense-keras_bn")
    assert ops == _litert_ops(records, "fuse-dense-keras")


@pytest.mark.parametrize("backend", list(FORMATS))
def test_quantized_folded_model_is_close(records, backend):
    """`model.quantize("int8")` of a folded model runs, and its outputs
    stay within 5% of the largest float output."""
    entry = _entry(records, backend, "int8", "quantize-folded")
    assert 0 < entry["difference"] <= 5e-2 * entry["scale"]
