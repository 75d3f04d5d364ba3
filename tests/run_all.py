"""Runs the whole test suite and prints one summary, skips by reason.

The unit tests run once per backend, each in its own process (Keras fixes its
backend at import), two suites at once on the machine's two cores, then the
integration tests, in two pytest workers; ruff checks the code first.

    python tests/run_all.py                   # everything
    python tests/run_all.py --backends jax    # one backend, no integration
    python tests/run_all.py -- -k ghost       # extra arguments for pytest
"""

import argparse
import collections
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")


def _pytest(name, paths, env, pytest_args, reports, log=None):
    """Runs pytest on `paths`; its output goes to the terminal, or into the
    file `log`. Returns the suite's name, counts, seconds and the number of
    skipped tests per reason."""
    report = reports / f"{name}.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        *paths,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *pytest_args,
    ]
    header = f"\n=== {name}: {' '.join(command[3:])}"
    start = time.monotonic()
    if log is None:
        print(header, flush=True)
        code = subprocess.call(command, cwd=ROOT, env=env)
    else:
        with open(log, "w") as file:
            print(header, file=file, flush=True)
            code = subprocess.call(
                command, cwd=ROOT, env=env, stdout=file, stderr=file
            )
    seconds = time.monotonic() - start
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    reasons = collections.Counter()
    if report.exists():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total = int(suite.get("tests"))
        failed = int(suite.get("failures")) + int(suite.get("errors"))
        counts["skipped"] = int(suite.get("skipped"))
        counts["failed"] = failed
        counts["passed"] = total - failed - counts["skipped"]
        # One line per reason, however pytest wrapped it.
        reasons.update(
            " ".join(skipped.get("message", "no reason given").split())
            for skipped in suite.iter("skipped")
        )
    if code != 0 and counts["failed"] == 0:
        # pytest failed outside any test (collection, or no test ran).
        counts["failed"] = 1
    return name, counts, seconds, reasons


def _unit_tests(backends, env, args, reports):
    """The unit tests of each backend, in `args.jobs` lanes at once: JAX's,
    the longest, in a lane of its own, the others one after another in the
    second. Each suite's output is printed whole once it has finished."""
    lanes = [[b for b in backends if b == "jax"], []]
    lanes[1] = [b for b in backends if b != "jax"]
    lanes = [lane for lane in lanes if lane]
    if args.jobs < 2 or len(lanes) < 2:
        lanes = [list(backends)]

    def run(lane):
        done = []
        for backend in lane:
            log = reports / f"{backend}.log" if len(lanes) > 1 else None
            result = _pytest(
                backend,
                ["tests"],
                {**env, "KERAS_BACKEND": backend},
                args.pytest_args,
                reports,
                log,
            )
            if log is not None:
                print(log.read_text(), flush=True)
            done.append(result)
        return done

    with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        finished = list(pool.map(run, lanes))
    by_name = {result[0]: result for lane in finished for result in lane}
    return [by_name[backend] for backend in backends]


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
        help="comma-separated backends for the unit tests",
    )
    parser.add_argument(
        "--no-integration",
        action="store_true",
        help="skip the integration tests",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="unit-test suites, and integration-test workers, run at once, "
        "one per core (default: 2; 1 runs them one after another)",
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; use {BACKENDS}")
    integration = not args.no_integration and backends == list(BACKENDS)

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    results = [_lint()]
    with tempfile.TemporaryDirectory() as reports:
        reports = pathlib.Path(reports)
        results += _unit_tests(backends, env, args, reports)
        if integration:
            # Integration tests mostly wait on processes of their own: one
            # pytest worker per job, each test module on one of them (the
            # modules share their costly fixtures between their tests).
            workers = ["-n", str(args.jobs), "--dist", "loadfile"]
            results.append(
                _pytest(
                    "integration",
                    ["integration"],
                    env,
                    (workers if args.jobs > 1 else []) + args.pytest_args,
                    reports,
                )
            )

    print("\n=== summary")
    print(
        f"{'suite':<12}{'passed':>8}{'failed':>8}{'skipped':>9}{'seconds':>9}"
    )
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for name, counts, seconds, _ in results:
        print(
            f"{name:<12}{counts['passed']:>8}{counts['failed']:>8}"
            f"{counts['skipped']:>9}{seconds:>9.0f}"
        )
        for key in totals:
            totals[key] += counts[key]
    print(
        f"{totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped"
    )
    _print_skips(results)
    return 1 if totals["failed"] else 0


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
