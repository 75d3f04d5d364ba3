"""
Title: Speed of one batch-norm layer
Description: A compiled training step and an inference call, side by side.

Times, in one process, a training step (forward, backward, moving-statistics
update) and an inference call of a single batch-norm layer:
`keras.layers.BatchNormalization`, `keras_bn.BatchNormalization` plain, with
ghost batches of 32, with a ragged last ghost batch, with a mask, with
renorm, and the elementwise floor `x * a + b`. The training step is compiled
as the backend compiles a `fit` step: `tf.function(jit_compile=True)` on
TensorFlow, `jax.jit` on JAX; PyTorch runs eagerly. Prints the medians and
the ratios to Keras's layer and to the floor, and writes them as JSON.

```
KERAS_BACKEND=jax python benchmarks/speed.py
KERAS_BACKEND=tensorflow python benchmarks/speed.py --shape 4096,512
```
"""

import argparse
import json
import os
import statistics
import time

import keras
import numpy as np
from keras import ops

import keras_bn


class Floor(keras.layers.Layer):
    """`x * a + b` with per-channel `a` and `b`: the memory-bound floor."""

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.a = self.add_weight(shape=shape, initializer="ones")
        self.b = self.add_weight(shape=shape, initializer="zeros")

    def call(self, inputs, training=None, mask=None):
        return inputs * self.a + self.b


def variants(shape):
    batch = shape[0]
    return {
        "keras": (keras.layers.BatchNormalization, {}, batch, False),
        "keras_bn": (keras_bn.BatchNormalization, {}, batch, False),
        "ghost_32": (
            keras_bn.BatchNormalization,
            {"virtual_batch_size": 32},
            batch,
            False,
        ),
        "ghost_32_ragged": (
            keras_bn.BatchNormalization,
            {"virtual_batch_size": 32},
            batch - 6,
            False,
        ),
        "masked": (keras_bn.BatchNormalization, {}, batch, True),
        "renorm": (keras_bn.BatchNormalization, {"renorm": True}, batch, False),
        "floor": (Floor, {}, batch, False),
    }


def compile_step(layer, training):
    """A function of (trainable, non_trainable, x, mask, upstream) returning
    the outputs and, in training, the gradients and new statistics."""
    backend = keras.backend.backend()

    def forward(trainable, non_trainable, x, mask):
        kwargs = {} if mask is None else {"mask": mask}
        return layer.stateless_call(
            trainable, non_trainable, x, training=training, **kwargs
        )

    if backend == "jax":
        import jax

        def train(trainable, non_trainable, x, mask, upstream):
            def loss(trainable, x):
                y, updated = forward(trainable, non_trainable, x, mask)
                return ops.sum(y * upstream), updated

            (_, updated), grads = jax.value_and_grad(
                loss, argnums=(0, 1), has_aux=True
            )(trainable, x)
            return grads, updated

        def infer(trainable, non_trainable, x, mask, upstream):
            return forward(trainable, non_trainable, x, mask)[0]

        return jax.jit(train if training else infer)

    if backend == "tensorflow":
        import tensorflow as tf

        def train(trainable, non_trainable, x, mask, upstream):
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                tape.watch(x)
                y, updated = forward(trainable, non_trainable, x, mask)
                loss = tf.reduce_sum(y * upstream)
            return tape.gradient(loss, [trainable, x]), updated

        def infer(trainable, non_trainable, x, mask, upstream):
            return forward(trainable, non_trainable, x, mask)[0]

        return tf.function(train if training else infer, jit_compile=True)

    import torch

    def train(trainable, non_trainable, x, mask, upstream):
        trainable = [t.detach().requires_grad_(True) for t in trainable]
        x = x.detach().requires_grad_(True)
        y, updated = forward(trainable, non_trainable, x, mask)
        grads = torch.autograd.grad((y * upstream).sum(), trainable + [x])
        return grads, updated

    def infer(trainable, non_trainable, x, mask, upstream):
        with torch.no_grad():
            return forward(trainable, non_trainable, x, mask)[0]

    return train if training else infer


def block(result):
    for leaf in keras.tree.flatten(result):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
        else:
            ops.convert_to_numpy(ops.sum(leaf))
    return result


def time_call(fn, args, repeats, warmup):
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--shape", default="256,16,16,64")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/speed")
    args = parser.parse_args()
    shape = tuple(int(size) for size in args.shape.split(","))
    rng = np.random.default_rng(args.seed)

    results = {}
    for name, (cls, kwargs, batch, masked) in variants(shape).items():
        data_shape = (batch,) + shape[1:]
        layer = cls(**kwargs)
        layer.build(data_shape)
        x = ops.convert_to_tensor(rng.normal(size=data_shape).astype("float32"))
        upstream = ops.convert_to_tensor(
            rng.normal(size=data_shape).astype("float32")
        )
        mask = None
        if masked:
            mask = ops.convert_to_tensor(rng.random(data_shape[:-1]) > 0.1)
        trainable = [
            ops.convert_to_tensor(v) for v in layer.trainable_variables
        ]
        non_trainable = [
            ops.convert_to_tensor(v) for v in layer.non_trainable_variables
        ]
        call_args = (trainable, non_trainable, x, mask, upstream)
        results[name] = {
            mode: time_call(
                compile_step(layer, mode == "train"),
                call_args,
                args.repeats,
                args.warmup,
            )
            for mode in ("train", "inference")
        }

    backend = keras.backend.backend()
    print(f"backend: {backend}, shape: {shape}, medians in ms")
    print(
        f"{'variant':<18}{'train':>9}{'/keras':>8}{'/floor':>8}"
        f"{'infer':>9}{'/keras':>8}{'/floor':>8}"
    )
    for name, timing in results.items():
        row = f"{name:<18}"
        for mode in ("train", "inference"):
            seconds = timing[mode]
            row += f"{seconds * 1e3:>9.3f}"
            row += f"{seconds / results['keras'][mode]:>8.2f}"
            row += f"{seconds / results['floor'][mode]:>8.2f}"
        print(row)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(
        args.output, f"{backend}_{'x'.join(map(str, shape))}.json"
    )
    with open(path, "w") as file:
        json.dump(
            {"backend": backend, "shape": shape, "seconds": results}, file
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
