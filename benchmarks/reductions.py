"""
Title: How fast XLA on CPU reduces batch-norm tensors, by layout
Description: The reductions behind a batch-norm step, timed alone in the
layouts that keras-bn and Keras use.

A batch-norm training step is a handful of reductions over the whole tensor
(the sum, the sum of squared deviations, and their gradients), some with a
product fused in. XLA on CPU reduces the same numbers at very different
speeds depending on the layout it is handed, differently in TensorFlow and
in JAX; these timings are why `keras_bn` lays its tensors out as it does
(see docs/performance.md).

Each reduction sums over the axes named, either the input `x` or the
product `x * u` (as the gradient's reductions do), compiled with
`jax.jit` or `tf.function(jit_compile=True)`. Medians over `--repeats`
calls, in milliseconds.

```
KERAS_BACKEND=jax python benchmarks/reductions.py
KERAS_BACKEND=tensorflow python benchmarks/reductions.py
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= \\
    KERAS_BACKEND=jax python benchmarks/reductions.py  # without YNNPACK
```
"""

import argparse
import time

import keras
import numpy as np
from keras import ops

# (name, shape of the input, samples reduced (all if None), view they are
# reduced in, axes of the view)
REDUCTIONS = [
    ("image, input layout", (256, 16, 16, 64), None, None, (0, 1, 2)),
    ("image, (elements, C)", (256, 16, 16, 64), None, (65536, 64), (0,)),
    ("image, (1, elements, C)", (256, 16, 16, 64), None, (1, 65536, 64), (1,)),
    ("image, 8 ghost batches", (256, 16, 16, 64), None, (8, 8192, 64), (1,)),
    ("dense, input layout", (4096, 512), None, None, (0,)),
    ("dense, 128 ghost batches", (4096, 512), None, (128, 32, 512), (1,)),
    (
        "dense, ragged: its full ghost batches",
        (4090, 512),
        4064,
        (127, 32, 512),
        (1,),
    ),
]


def compile_function(function):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    raise ValueError(
        "This script times XLA: run it with KERAS_BACKEND=jax or "
        f"tensorflow. Received: backend={backend}"
    )


def median_milliseconds(function, args, repeats):
    for _ in range(3):
        ops.convert_to_numpy(function(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ops.convert_to_numpy(function(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    print(f"{keras.backend.backend()}, milliseconds per reduction\n")
    print("| reduction | view | axes | sum of x | sum of x * u |")
    print("| --- | --- | --- | --- | --- |")
    for name, shape, samples, view, axes in REDUCTIONS:
        x, u = (
            ops.convert_to_tensor(rng.normal(size=shape).astype("float32"))
            for _ in range(2)
        )
        view = view or shape
        samples = samples or shape[0]

        def total(x, view=view, axes=axes, samples=samples):
            return ops.sum(ops.reshape(x[:samples], view), axis=axes)

        def product_total(x, u, view=view, axes=axes, samples=samples):
            product = x[:samples] * u[:samples]
            return ops.sum(ops.reshape(product, view), axis=axes)

        plain = median_milliseconds(compile_function(total), (x,), args.repeats)
        product = median_milliseconds(
            compile_function(product_total), (x, u), args.repeats
        )
        print(
            f"| {name} | {view} | {axes} | {plain:.2f} | {product:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
