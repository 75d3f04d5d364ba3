"""Runs an example script as `python EXAMPLE ARGS...` would, with
tensorflow-datasets either mocked or offline.

    python integration/tfds_worker.py mock EXAMPLE ARGS...
    python integration/tfds_worker.py offline EXAMPLE ARGS...

`mock`: `tfds.testing.mock_data` makes every `tfds.load` return random
examples of the dataset's real structure (shapes, dtypes, classes), with no
download. `offline`: downloads fail at once (no retries; the caller points
the proxy variables at a closed port) instead of after minutes of retries.
"""

import os
import runpy
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch

    # With TensorFlow (loaded by tensorflow-datasets) in the same process,
    # PyTorch's oneDNN convolutions hang in a 1x1 convolution's backward
    # pass, or abort with "double free or corruption", on an AMD EPYC CPU
    # (torch 2.13, TensorFlow 2.21); its own convolutions do not.
    torch.backends.mkldnn.enabled = False

import tensorflow_datasets as tfds  # noqa: E402

MOCK_EXAMPLES = 64


def main():
    mode, script, *args = sys.argv[1:]
    # `python EXAMPLE` puts the example's folder first on the import path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.argv = [script, *args]
    if mode == "mock":
        with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
            runpy.run_path(script, run_name="__main__")
    elif mode == "offline":
        from tensorflow_datasets.core.download import downloader

        downloader.MAX_RETRIES = 0
        runpy.run_path(script, run_name="__main__")
    else:
        raise SystemExit(f"unknown mode {mode!r}: use mock or offline")


if __name__ == "__main__":
    main()
