"""The speed benchmark keeps working: `benchmarks/speed.py --tiny` runs on
every backend, in two processes whose figures it combines, and writes a
complete report (every case, engine and variant, with finite timings,
ratios and memory figures)."""

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_speed_benchmark_runs(tmp_path, backend):
    result = backend_process.run(
        backend,
        "benchmarks/speed.py",
        "--tiny",
        "--processes",
        "2",
        "--output-dir",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / f"speed_{backend}.json").read_text())
    assert report["environment"]["backend"] == backend
    assert report["environment"]["processes"] == 2
    cases = [(r["case"], r["engine"]) for r in report["results"]]
    expected = [
        (case, engine)
        for case in ("image", "dense", "image, mixed_float16")
        for engine in ENGINES[backend]
    ]
    assert cases == expected
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
        assert set(rows) == names
        for name, row in rows.items():
            assert "error" not in row, (name, row)
            for key in (
                "train_seconds",
                "inference_seconds",
                "train_vs_keras",
                "inference_vs_floor",
                "train_bandwidth_fraction",
            ):
                assert math.isfinite(row[key]) and row[key] > 0, (name, key)
            assert row["train_peak_bytes"] >= 0
        assert rows["keras"]["train_vs_keras"] == 1.0
    table = (tmp_path / f"speed_{backend}.md").read_text()
    assert table.count("| keras_bn |") == len(expected)


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
