"""The speed benchmark keeps working: `benchmarks/speed.py --tiny` runs on
every backend (on JAX in two processes whose figures it combines) and
writes a complete report (every case, engine and variant, with finite
timings, ratios and memory figures where the backend can tell them); so do
`models.py`, `recalibrate.py`, `reductions.py` and `multiprocess.py`."""

import functools
import json
import math

import backend_process
import pytest

BACKENDS = ("tensorflow", "jax", "torch")
ENGINES = {"tensorflow": ["xla"], "jax": ["jit"], "torch": ["eager", "compile"]}
VARIANTS = {
    "keras",
    "keras_bn",
    "ghost_32",
    "ghost_32_ragged",
    "masked",
    "renorm",
    "keras_renorm",
    "floor",
}


# Every case, engine, form and variant on every backend, but torch.compile,
# which compiles each step for seconds here: one case, one variant beside
# its references. The figures of two processes are combined on one backend
# (the combining is the same Python on every backend).
SPEED_RUNS = [
    pytest.param("tensorflow", ["--processes", "1"], id="tensorflow"),
    pytest.param("jax", ["--processes", "2"], id="jax"),
    pytest.param(
        "torch", ["--processes", "1", "--engines", "eager"], id="torch"
    ),
    pytest.param(
        "torch",
        ["--processes", "1", "--engines", "compile", "--cases", "dense"]
        + ["--variants", "ghost_32_ragged"],
        id="torch_compile",
    ),
]
CASES = ("image", "dense", "image, mixed_float16")


def _option(arguments, name, default):
    if name not in arguments:
        return default
    start = arguments.index(name) + 1
    values = []
    for value in arguments[start:]:
        if value.startswith("--"):
            break
        values.append(value)
    return values


@pytest.mark.parametrize("backend,arguments", SPEED_RUNS)
def test_speed_benchmark_runs(tmp_path, backend, arguments):
    result = backend_process.run(
        backend,
        "benchmarks/speed.py",
        "--tiny",
        *arguments,
        "--output-dir",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / f"speed_{backend}.json").read_text())
    assert report["environment"]["backend"] == backend
    processes = int(_option(arguments, "--processes", None)[0])
    assert report["environment"]["processes"] == processes
    cases = [(r["case"], r["engine"], r["form"]) for r in report["results"]]
    forms = ("upstream", "mean_square", "affine_only")
    expected = [
        (case, engine, form)
        for case in _option(arguments, "--cases", CASES)
        for engine in _option(arguments, "--engines", ENGINES[backend])
        for form in (forms if "mixed" not in case else forms[:1])
    ]
    assert cases == expected
    chosen = set(_option(arguments, "--variants", VARIANTS))
    for result_case in report["results"]:
        rows = result_case["variants"]
        names = (
            VARIANTS
            if "mixed" not in result_case["case"]
            else {
                "keras",
                "keras_bn",
                "ghost_32",
                "floor",
            }
        )
        assert set(rows) == names & (chosen | {"keras", "floor"})
        for name, row in rows.items():
            assert "error" not in row, (name, row)
            keys = ["train_seconds", "train_vs_keras"]
            keys.append("train_bandwidth_fraction")
            if result_case["form"] == "upstream":
                keys += ["inference_seconds", "inference_vs_floor"]
            for key in keys:
                assert math.isfinite(row[key]) and row[key] > 0, (name, key)
            if memory_measured(backend):
                assert row["train_peak_bytes"] >= 0
            else:
                assert "train_peak_bytes" not in row
        assert rows["keras"]["train_vs_keras"] == 1.0
    table = (tmp_path / f"speed_{backend}.md").read_text()
    assert table.count("| keras |") == len(expected)


@pytest.mark.parametrize("backend", ("tensorflow", "jax"))
def test_reductions_benchmark_runs(backend):
    result = backend_process.run(
        backend, "benchmarks/reductions.py", "--repeats", "2"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line[:2] == "| "]
    # The header, its rule, and a row of two finite timings per reduction.
    assert len(rows) == 2 + 7, result.stdout
    for row in rows[2:]:
        timings = [float(cell) for cell in row.strip("| ").split(" | ")[-2:]]
        assert all(math.isfinite(t) and t > 0 for t in timings), row


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiprocess_benchmark_counts(tmp_path, backend):
    """Two processes: the all-reduces of a step, read from the profiler,
    the graph or the compiled program, are those docs/guides/distributed.md
    states for a batch norm of C channels."""
    result = backend_process.run(
        backend,
        "benchmarks/multiprocess.py",
        "--rounds",
        "1",
        "--steps",
        "2",
        "--channels",
        "8",
        "--output-dir",
        tmp_path,
        "--timeout",
        "300",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / f"multiprocess_{backend}.json").read_text())
    layers, c = report["batch_norm_layers"], report["channels"]
    rows = report["variants"]
    for row in rows.values():
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
    synchronized = rows["keras_bn synchronized=True"]["all_reduce_floats"]
    local = rows["keras_bn synchronized=False"]["all_reduce_floats"]
    keras_layer = rows["keras synchronized=False"]["all_reduce_floats"]
    bare = rows["no batch norm"]["all_reduce_floats"]
    # gamma and beta add their gradients to the gradients' all-reduce.
    gradients = max(bare) + 2 * c * layers
    if backend == "jax":
        assert sorted(synchronized) == sorted(
            [c] * 2 * layers + [2 * c] * 2 * layers + [max(bare)]
        )
        # XLA merges the moving statistics into the gradients' all-reduce.
        assert local == [gradients + 2 * c * layers]
    else:
        # Sums and counts, then deviations and squares; their gradients.
        assert sorted(synchronized) == sorted(
            [2 * c] * 4 * layers + [gradients]
        )
        # One all-reduce per layer: sums, squares and counts stacked.
        assert sorted(local) == sorted([3 * c] * layers + [gradients])
        assert keras_layer == [gradients]


MODEL_VARIANTS = [
    "keras",
    "keras_bn",
    "ghost",
    "keras_ragged",
    "ghost_ragged",
    "debiased",
    "frozen_statistics",
    "floor",
]


NETWORKS = ("resnet", "tabnet", "sequence")

# Every network and variant on eager PyTorch; on the compiled engines, each
# variant on one network or two (the networks are the same Keras code on
# every backend, and each compiled model costs seconds here); torch.compile,
# which compiles each model for a minute or more, on one network and one
# variant beside its references.
MODEL_RUNS = [
    pytest.param(
        "tensorflow",
        ["--networks", "tabnet", "sequence"],
        ("tabnet", "sequence"),
        MODEL_VARIANTS,
        id="tensorflow",
    ),
    pytest.param(
        "jax",
        ["--networks", "resnet"],
        ("resnet",),
        MODEL_VARIANTS,
        id="jax",
    ),
    pytest.param(
        "torch", ["--engines", "eager"], NETWORKS, MODEL_VARIANTS, id="torch"
    ),
    pytest.param(
        "torch",
        ["--engines", "compile", "--networks", "tabnet"]
        + ["--variants", "ghost_ragged"],
        ("tabnet",),
        ["keras", "keras_ragged", "ghost_ragged", "floor"],
        id="torch_compile",
    ),
]


@pytest.mark.parametrize("backend,arguments,networks,variants", MODEL_RUNS)
def test_models_benchmark_runs(
    tmp_path, backend, arguments, networks, variants
):
    """`benchmarks/models.py --tiny` times the networks, engines and
    variants it is asked for, with finite ratios against the right
    reference, and peak memory wherever the backend can tell it."""
    result = backend_process.run(
        backend,
        "benchmarks/models.py",
        "--tiny",
        *arguments,
        "--output-dir",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / f"models_{backend}.json").read_text())
    engines = _option(arguments, "--engines", ENGINES[backend])
    assert [(r["network"], r["engine"]) for r in report["results"]] == [
        (network, engine) for network in networks for engine in engines
    ]
    for network in report["results"]:
        rows = network["variants"]
        assert list(rows) == variants
        for name, row in rows.items():
            keys = ["step_seconds", "step_vs_keras"]
            if memory_measured(backend):
                keys.append("peak_vs_keras")
                assert row["peak_bytes"] > 0, name
            else:
                assert "peak_bytes" not in row, name
            for key in keys:
                assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert rows["keras"]["step_vs_keras"] == 1.0
        assert rows["keras_ragged"]["step_vs_keras"] == 1.0
        assert rows["floor"]["batch_norm_share"] == 0.0
    table = (tmp_path / f"models_{backend}.md").read_text()
    assert table.count("| ghost_ragged |") == len(report["results"])


@functools.cache
def memory_measured(backend):
    """Whether the benchmarks can read the backend's peak memory here:
    TensorFlow's CPU allocator keeps statistics only with oneDNN on, its
    default only on some CPUs."""
    if backend != "tensorflow":
        return True
    result = backend_process.run(
        backend,
        "-c",
        "import tensorflow as tf; "
        "tf.config.experimental.reset_memory_stats('CPU:0')",
    )
    return result.returncode == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_recalibrate_benchmark_runs(tmp_path, backend):
    result = backend_process.run(
        backend, "benchmarks/recalibrate.py", "--tiny", "--output-dir", tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / f"recalibrate_{backend}.json").read_text())
    assert [r["model"] for r in report["results"]] == ["cnn", "masked"]
    for row in report["results"]:
        for key in (
            "first_ratio",
            "median_ratio",
            "median_ratio_to_training_forward",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, key
