"""
Title: Inputs with a large common offset
Description: Errors of the batch variance, the training outputs and the
gradients, Keras's layer vs keras-bn, against float64.

Feeds float32 inputs `offset + N(0, 1)` through one training step of each
layer with `momentum=0` (so the moving variance is the batch variance) and
compares, with float64 NumPy on the same data:

- `variance`: the moving variance, relative to the variance;
- `outputs`: the training outputs, relative to their scale (the largest
  of them);
- `x grad`, `gamma grad`: the gradients of `sum(outputs * upstream)` for a
  random `upstream`, each relative to its own scale.

```
KERAS_BACKEND=jax python benchmarks/large_offset.py
```
"""

import argparse

import keras
import numpy as np

import keras_bn

EPSILON = 1e-3


def value_and_gradients(fn, x, gamma):
    """`fn(x, gamma)` and its gradients with respect to both."""
    backend = keras.backend.backend()
    x = keras.ops.convert_to_tensor(x)
    gamma = keras.ops.convert_to_tensor(gamma)
    if backend == "jax":
        import jax

        value, gradients = jax.jit(jax.value_and_grad(fn, (0, 1)))(x, gamma)
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch([x, gamma])
            value = fn(x, gamma)
        gradients = tape.gradient(value, [x, gamma])
    else:
        x, gamma = x.requires_grad_(True), gamma.requires_grad_(True)
        value = fn(x, gamma)
        value.backward()
        gradients = [x.grad, gamma.grad]
    return [keras.ops.convert_to_numpy(g) for g in (value, *gradients)]


def reference(x, upstream):
    """Outputs and gradients of batch norm with `gamma = 1`, `beta = 0`, in
    float64 over every axis but the last."""
    x, upstream = x.astype("float64"), upstream.astype("float64")
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    mean = mean + (x - mean).mean(axes)
    variance = ((x - mean) ** 2).mean(axes)
    inverse = 1.0 / np.sqrt(variance + EPSILON)
    xhat = (x - mean) * inverse
    count = x.size // x.shape[-1]
    dx = inverse * (
        upstream
        - upstream.sum(axes) / count
        - xhat * (upstream * xhat).sum(axes) / count
    )
    return variance, xhat, dx, (upstream * xhat).sum(axes)


def errors(layer_cls, x, upstream, expected):
    layer = layer_cls(momentum=0.0, epsilon=EPSILON)
    layer.build(x.shape)
    upstream_tensor = keras.ops.convert_to_tensor(upstream)

    def loss(x, gamma):
        non_trainable = [v.value for v in layer.non_trainable_variables]
        outputs, _ = layer.stateless_call(
            [gamma, layer.beta.value], non_trainable, x, training=True
        )
        return keras.ops.sum(outputs * upstream_tensor)

    _, dx, dgamma = value_and_gradients(loss, x, layer.gamma.value)
    outputs = keras.ops.convert_to_numpy(layer(x, training=True))
    variance = keras.ops.convert_to_numpy(layer.moving_variance)

    def relative(actual, wanted, scale=None):
        scale = np.max(np.abs(wanted)) if scale is None else scale
        return float(np.max(np.abs(actual - wanted) / scale))

    expected_variance, xhat, expected_dx, expected_dgamma = expected
    return {
        "variance": relative(
            variance, expected_variance, np.abs(expected_variance)
        ),
        "outputs": relative(outputs, xhat),
        "x grad": relative(dx, expected_dx),
        "gamma grad": relative(dgamma, expected_dgamma),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument(
        "--shape", type=int, nargs="+", default=[64, 16, 16, 64]
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    shape = tuple(args.shape)
    print(f"backend: {keras.backend.backend()}, shape {shape}, float32\n")
    names = ("variance", "outputs", "x grad", "gamma grad")
    print("| offset | layer | " + " | ".join(names) + " |")
    print("| --- | --- |" + " --- |" * len(names))
    for offset in (0.0, 1e2, 1e3, 1e4):
        x = (offset + rng.normal(size=shape)).astype("float32")
        upstream = rng.normal(size=shape).astype("float32")
        expected = reference(x, upstream)
        for name, cls in (
            ("keras", keras.layers.BatchNormalization),
            ("keras_bn", keras_bn.BatchNormalization),
        ):
            row = errors(cls, x, upstream, expected)
            cells = " | ".join(f"{row[key]:.1e}" for key in names)
            print(f"| {offset:.0e} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
