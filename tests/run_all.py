"""Runs the whole test suite and prints one summary, skips by reason.

Every suite runs in a process of its own (Keras fixes its backend at
import), `--jobs` of them at once, one per core, the longest first: the
unit tests once per backend, in two parts (the layer's tests, then the
model tools, callbacks, devices and the rest), each integration test
module, and the layer's tests on JAX against the oldest Keras
`pyproject.toml` declares (`tests/oldest_keras.py`). ruff checks the code
first. Each suite's output is printed whole when it ends.

    python tests/run_all.py                   # everything CI runs
    python tests/run_all.py --quick           # the layer's tests, ~6 min
    python tests/run_all.py --backends jax    # one backend's unit tests
    python tests/run_all.py -- -k ghost       # extra arguments for pytest
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")
# The layer's own tests: what `--quick` runs on every backend, what the
# oldest Keras is checked with, and the first part of each unit suite.
LAYER_TESTS = (
    "tests/test_batch_normalization.py",
    "tests/test_moments.py",
    "tests/test_keras_suite.py",
    "tests/test_properties.py",
    "tests/test_large_offsets.py",
    "tests/test_memory.py",
)
# Minutes each suite took in a fresh-clone CI run on a 2-core x86-64 CPU
# (2026-12-03): the
# order in which the suites start, longest first, so that the last one to
# start is a short one. A suite missing here starts last.
MINUTES = {
    "integration/test_benchmarks.py": 7.8,
    "jax-layer": 7.7,
    "integration/test_examples.py": 6.1,
    "torch-tools": 4.8,
    "jax-tools": 3.8,
    "oldest-keras": 3.4,
    "torch-layer": 2.4,
    "integration/test_resume.py": 2.0,
    "tensorflow-tools": 1.8,
    "integration/test_saving_across_backends.py": 1.7,
    "integration/test_export_formats.py": 1.5,
    "tensorflow-layer": 1.6,
    "integration/test_multiprocess.py": 1.5,
    "integration/test_packaging.py": 1.5,
    "integration/test_distributed.py": 1.2,
    "integration/test_docs.py": 0.1,
    "integration/test_gpu_check.py": 0.1,
}


@dataclasses.dataclass
class Suite:
    """One pytest run: its name in the summary, the command before the
    pytest arguments, and the environment."""

    name: str
    command: list
    env: dict


def _pytest(suite, pytest_args, reports, log=None):
    """Runs `suite`; its output goes to the terminal, or into the file
    `log`. Returns the suite's name, counts, seconds and the number of
    skipped tests per reason."""
    report = reports / f"{suite.name.replace('/', '_')}.xml"
    command = [
        *suite.command,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *pytest_args,
    ]
    header = f"\n=== {suite.name}: {' '.join(map(str, command[1:]))}"
    start = time.monotonic()
    if log is None:
        print(header, flush=True)
        code = subprocess.call(command, cwd=ROOT, env=suite.env)
    else:
        with open(log, "w") as file:
            print(header, file=file, flush=True)
            code = subprocess.call(
                command, cwd=ROOT, env=suite.env, stdout=file, stderr=file
            )
    seconds = time.monotonic() - start
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    reasons = collections.Counter()
    if report.exists():
        counts, reasons = read_report(report)
    if code != 0 and counts["failed"] == 0:
        # pytest failed outside any test (collection, or no test ran).
        counts["failed"] = 1
    return suite.name, counts, seconds, reasons


def read_report(report):
    root = ElementTree.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total = int(suite.get("tests"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    counts = {
        "passed": total - failed - skipped,
        "failed": failed,
        "skipped": skipped,
    }
    # One line per reason, however pytest wrapped it.
    reasons = collections.Counter(
        " ".join(skipped.get("message", "no reason given").split())
        for skipped in suite.iter("skipped")
    )
    return counts, reasons


def _suites(args, env):
    """The suites to run, longest first."""
    pytest = [sys.executable, "-m", "pytest"]
    layer = list(LAYER_TESTS)
    suites = []
    for backend in args.backends:
        backend_env = {**env, "KERAS_BACKEND": backend}
        if args.quick:
            quick = [*pytest, *layer, "--hypothesis-profile=quick"]
            suites.append(Suite(backend, quick, backend_env))
            continue
        rest = [f"--ignore={path}" for path in layer]
        suites += [
            Suite(f"{backend}-layer", [*pytest, *layer], backend_env),
            Suite(f"{backend}-tools", [*pytest, "tests", *rest], backend_env),
        ]
    if args.integration:
        suites += [
            Suite(str(path.relative_to(ROOT)), [*pytest, path], env)
            for path in sorted((ROOT / "integration").glob("test_*.py"))
        ]
        oldest = [sys.executable, ROOT / "tests" / "oldest_keras.py", "--"]
        suites.append(Suite("oldest-keras", oldest, env))
    # The quick lane's suites have the layer parts' lengths.
    minutes = {**MINUTES, **{b: MINUTES[f"{b}-layer"] for b in BACKENDS}}
    return sorted(suites, key=lambda suite: -minutes.get(suite.name, 0.0))


def _run_suites(suites, args, reports):
    """Runs `suites`, `args.jobs` at once, in their order; each one's output
    is printed whole once it has finished. Returns their results in the
    order of `suites`."""
    jobs = max(1, min(args.jobs, len(suites)))
    printing = threading.Lock()

    def run(suite):
        if jobs == 1:
            return _pytest(suite, args.pytest_args, reports)
        log = reports / f"{suite.name.replace('/', '_')}.log"
        result = _pytest(suite, args.pytest_args, reports, log)
        with printing:
            print(log.read_text(), flush=True)
        return result

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(run, suites))


def _lint():
    if shutil.which("ruff") is None:
        print("ruff is not installed: skipping the lint step", flush=True)
        counts = {"passed": 0, "failed": 0, "skipped": 1}
        return "lint", counts, 0.0, {"ruff is not installed": 1}
    print("\n=== lint: ruff check . && ruff format --check .", flush=True)
    start = time.monotonic()
    ok = (
        subprocess.call(["ruff", "check", "."], cwd=ROOT) == 0
        and subprocess.call(["ruff", "format", "--check", "."], cwd=ROOT) == 0
    )
    counts = {"passed": int(ok), "failed": int(not ok), "skipped": 0}
    return "lint", counts, time.monotonic() - start, {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated backends for the unit tests; fewer than all "
        "three leaves out the integration tests",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the layer's tests (tests/test_batch_normalization.py, "
        "test_moments.py, Keras's own test module, and the properties at a "
        "few examples each) on every backend: what a change to the layer "
        "runs first",
    )
    parser.add_argument(
        "--no-integration",
        action="store_true",
        help="skip the integration tests and the oldest-Keras run",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="suites run at once, one per core (default: 2; 1 runs them one "
        "after another, their output as it comes)",
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest")
    args = parser.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; use {BACKENDS}")
    args.integration = not (
        args.no_integration or args.quick or args.backends != list(BACKENDS)
    )

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.monotonic()
    results = [_lint()]
    with tempfile.TemporaryDirectory() as reports:
        results += _run_suites(_suites(args, env), args, pathlib.Path(reports))
    _print_summary(results, time.monotonic() - start)
    return 1 if any(counts["failed"] for _, counts, _, _ in results) else 0


def _print_summary(results, seconds):
    width = max(len(name) for name, *_ in results) + 2
    print("\n=== summary")
    print(
        f"{'suite':<{width}}{'passed':>8}{'failed':>8}{'skipped':>9}"
        f"{'seconds':>9}"
    )
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for name, counts, suite_seconds, _ in results:
        print(
            f"{name:<{width}}{counts['passed']:>8}{counts['failed']:>8}"
            f"{counts['skipped']:>9}{suite_seconds:>9.0f}"
        )
        for key in totals:
            totals[key] += counts[key]
    print(
        f"{totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped in {seconds / 60:.1f} minutes"
    )
    _print_skips(results)


def _print_skips(results):
    """The skipped tests by reason, most frequent first, with the suites
    they were skipped in."""
    by_reason = collections.defaultdict(dict)
    for name, _, _, reasons in results:
        for reason, count in reasons.items():
            by_reason[reason][name] = count
    if not by_reason:
        return
    print("skipped, by reason:")
    for reason, by_suite in sorted(
        by_reason.items(), key=lambda item: (-sum(item[1].values()), item[0])
    ):
        where = ", ".join(f"{name} {n}" for name, n in by_suite.items())
        print(f"{sum(by_suite.values()):>5}  {reason} ({where})")


if __name__ == "__main__":
    sys.exit(main())
