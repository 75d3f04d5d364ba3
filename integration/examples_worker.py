"""Runs example scripts one after another in one process, each as
`python EXAMPLE ARGS...` would, so that Keras and the backend are imported
once for all of them.

    python integration/examples_worker.py RUNS

RUNS is a JSON list of `[NAME, [EXAMPLE, ARG, ...]]`.

Before each example, `=== start NAME` goes to stdout and stderr; after it,
`=== exit NAME CODE` to stdout, with the code `python EXAMPLE` would have
exited with (a traceback goes to stderr). Every example runs, whatever the
ones before it did.
"""

import json
import os
import runpy
import sys
import traceback


def run(argv):
    """Runs the script `argv[0]` with the arguments `argv[1:]`; returns its
    exit code."""
    sys.argv = list(argv)
    # `python EXAMPLE` puts the example's folder first on the import path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.path.pop(0)
    return 0


def main():
    for name, argv in json.loads(sys.argv[1]):
        for stream in (sys.stdout, sys.stderr):
            print(f"=== start {name}", file=stream, flush=True)
        code = run(argv)
        sys.stderr.flush()
        print(f"=== exit {name} {code}", flush=True)


if __name__ == "__main__":
    main()
