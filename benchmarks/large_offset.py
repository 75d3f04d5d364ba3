"""
Title: Variance of inputs with a large common offset
Description: Relative error of the batch variance, Keras's layer vs keras-bn.

Feeds float32 inputs `offset + N(0, 1)` through one training step of each
layer with `momentum=0` (so the moving variance is the batch variance) and
compares it with the float64 variance of the same data.

```
KERAS_BACKEND=torch python benchmarks/large_offset.py
```
"""

import argparse

import keras
import numpy as np

import keras_bn


def relative_variance_error(layer_cls, x):
    layer = layer_cls(momentum=0.0)
    layer(x, training=True)
    variance = keras.ops.convert_to_numpy(layer.moving_variance)
    expected = x.astype("float64").var(axis=0)
    return float(np.max(np.abs(variance - expected) / expected))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"backend: {keras.backend.backend()}")
    print(f"{'offset':>8}  {'keras':>12}  {'keras_bn':>12}")
    for offset in (0.0, 1e2, 1e3, 1e4):
        x = (offset + rng.normal(size=(args.batch_size, 8))).astype("float32")
        errors = [
            relative_variance_error(cls, x)
            for cls in (
                keras.layers.BatchNormalization,
                keras_bn.BatchNormalization,
            )
        ]
        print(f"{offset:>8.0e}  {errors[0]:>12.2e}  {errors[1]:>12.2e}")


if __name__ == "__main__":
    main()
