"""Runs the layer's tests and the benchmarks on an NVIDIA GPU, in minutes.

On a machine with an NVIDIA GPU (`nvidia-smi` lists one), for each of
JAX, PyTorch and TensorFlow: installs the backend's CUDA build where the
installed one sees no GPU (skipped with `--no-install`, for a machine
without network access), checks that the backend places its arrays on the
GPU, runs the layer's tests there (`tests/run_all.py --quick`'s set: the
layer's unit tests, Keras's own test module, the properties at a few
examples each; the suite turns TF32 off, so its float32 tolerances hold),
then `benchmarks/speed.py` and `benchmarks/models.py` with fewer rounds.
A backend whose GPU build does not install is reported and left out. It
writes every figure into one Markdown file, `runs/gpu_check/gpu_check.md`
by default, and exits 1 if a test failed.

On a machine without an NVIDIA GPU it says so and exits 0 without running
anything; `--device cpu` runs the same check on the CPU (without
installing), to try the script.

    python tests/gpu_check.py
    python tests/gpu_check.py --no-install --backends jax torch
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import time

from run_all import LAYER_TESTS
from run_all import read_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "torch", "tensorflow")
# What pip installs for each backend where the installed build sees no GPU.
CUDA_BUILDS = {
    "jax": ["jax[cuda12]"],
    "torch": ["torch"],
    "tensorflow": ["tensorflow[and-cuda]"],
}
# Prints the device the backend puts a new array on.
PROBE = """
import keras
x = keras.ops.ones((2,))
backend = keras.backend.backend()
if backend == "jax":
    print(list(x.devices())[0].platform)
elif backend == "torch":
    print(x.device.type)
else:
    print(x.device.split(":")[-2].lower())
"""
# Seconds each step may take; the whole check stays within 8 minutes on a
# GPU machine whose backends are installed.
TEST_TIMEOUT = 150
BENCHMARK_TIMEOUT = 120


def _gpu():
    """The GPUs `nvidia-smi` lists, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True, text=True, check=False
    )
    lines = [line for line in result.stdout.splitlines() if "GPU" in line]
    return lines if result.returncode == 0 and lines else None


def _run(command, env, timeout):
    """Runs `command`; returns its exit code (124 past `timeout`), its
    output and its seconds."""
    start = time.monotonic()
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        code, output = 124, f"stopped after {timeout} s\n{error.output or ''}"
    return code, output, time.monotonic() - start


def _placement(env):
    code, output, _ = _run([sys.executable, "-c", PROBE], env, 120)
    return output.strip().splitlines()[-1] if code == 0 and output else None


def _check_backend(backend, args, out):
    """The section of the report for one backend, and whether its tests
    passed."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    wanted = "cpu" if args.device == "cpu" else "gpu"
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    place = _placement(env)
    if place not in (wanted, "cuda") and args.install and wanted == "gpu":
        print(f"{backend}: installing {CUDA_BUILDS[backend]}", flush=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade"]
        _run(pip + CUDA_BUILDS[backend], env, 600)
        place = _placement(env)
    if place not in (wanted, "cuda"):
        note = f"its arrays are on {place!r}, not the {wanted.upper()}"
        print(f"{backend}: left out, {note}", flush=True)
        return [f"## {backend}", "", f"Left out: {note}.", ""], True

    lines = [f"## {backend}", ""]
    report = out / f"tests_{backend}.xml"
    command = [sys.executable, "-m", "pytest", *LAYER_TESTS, "-q"]
    command += ["-p", "no:cacheprovider", "--hypothesis-profile=quick"]
    command += [f"--junitxml={report}"]
    print(f"{backend}: the layer's tests", flush=True)
    code, output, seconds = _run(command, env, TEST_TIMEOUT)
    (out / f"tests_{backend}.log").write_text(output)
    if report.exists():
        counts, _ = read_report(report)
        summary = ", ".join(f"{n} {key}" for key, n in counts.items())
    else:
        summary = f"no report (exit code {code})"
    passed = code == 0
    lines += [
        f"Layer tests on the {wanted.upper()}: {summary}, {seconds:.0f} s"
    ]
    if not passed:
        lines += ["", "```", output[-3000:], "```"]
    lines.append("")

    for script, options in (
        ("speed.py", ["--processes", "1", "--repeats", "20"]),
        ("models.py", ["--rounds", "8"]),
    ):
        print(f"{backend}: benchmarks/{script}", flush=True)
        command = [sys.executable, ROOT / "benchmarks" / script, *options]
        command += ["--output-dir", out]
        if args.device == "cpu":
            command.append("--tiny")
        code, output, seconds = _run(command, env, BENCHMARK_TIMEOUT)
        table = out / f"{script[:-3]}_{backend}.md"
        lines += [f"### benchmarks/{script} ({seconds:.0f} s)", ""]
        if code == 0 and table.exists():
            lines += [table.read_text(), ""]
        else:
            lines += ["Did not finish:", "", "```", output[-3000:], "```", ""]
    return lines, passed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--no-install", dest="install", action="store_false")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument(
        "--output", default=str(ROOT / "runs" / "gpu_check" / "gpu_check.md")
    )
    args = parser.parse_args()
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; use {BACKENDS}")
    gpus = _gpu()
    if args.device == "gpu" and gpus is None:
        print("No NVIDIA GPU here (nvidia-smi lists none): nothing to check.")
        return 0
    output = pathlib.Path(args.output).resolve()
    out = output.parent
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    lines = ["# keras-bn on " + ("; ".join(gpus) if gpus else "the CPU"), ""]
    passed = True
    for backend in args.backends:
        section, ok = _check_backend(backend, args, out)
        lines += section
        passed = passed and ok
    minutes = (time.monotonic() - start) / 60
    lines.insert(2, f"The whole check took {minutes:.1f} minutes.\n")
    output.write_text("\n".join(lines))
    print(f"wrote {output} ({minutes:.1f} minutes)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
