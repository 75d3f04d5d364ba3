"""
Title: Training steps of whole networks
Description: The step `fit` compiles, with keras-bn's layer, Keras's layer
and the elementwise floor in the same network.

Times, in one process, `train_on_batch` (the training step `fit` compiles
and runs, optimizer update included) of three networks, each built once per
variant of its batch norms:

- **resnet**: a ResNet-style CNN on 32x32x3 images, batch 128: a stem and
  4 residual blocks, 9 conv + batch norm + ReLU, then global pooling and a
  classifier.
- **tabnet**: a TabNet-style dense network on 64 features, batch 4096: a
  batch norm on the inputs (whose gradient nothing needs: only `gamma` and
  `beta` train), then 4 dense + batch norm + ReLU blocks of 256 units. Its
  ghost batches are TabNet's, 128 samples, with TabNet's momentum.
- **sequence**: a masked sequence model, `Embedding(mask_zero=True)` on
  64 tokens with padding, batch 256, two batch norms over the time steps.

The variants: Keras's layer (`keras`); keras-bn plain (`keras_bn`); ghost
batches (`ghost`, of 32 samples, 128 for tabnet); ghost batches with a
ragged last one (`ghost_ragged`: the batch minus 6, set beside Keras's layer
on the same batch, `keras_ragged`); `moving_average="debiased"`;
`training_statistics="moving"` (frozen statistics); and the floor, each
batch norm replaced by `x * a + b` with per-channel `a` and `b` (the least
any normalization can cost). The batch norms' share of a step is
`1 - floor / step`.

The engines: JAX's `jit` (what `fit` uses), TensorFlow with
`jit_compile=True`, PyTorch eagerly and with `jit_compile=True`
(`torch.compile`). The variants are timed in turns, round after round, so
that a change in the machine's load hits them all alike; the figures are
medians over the rounds, after warm-up. Peak memory is what a step
allocates beyond its inputs, as `speed.py` measures it (on JAX, for the
compiled forward and backward pass of the model's `stateless_call`).

It prints a Markdown table per network and engine and writes
`models_BACKEND.json` and `models_BACKEND.md` into `--output-dir`.

```
KERAS_BACKEND=jax python benchmarks/models.py
KERAS_BACKEND=tensorflow python benchmarks/models.py
KERAS_BACKEND=torch python benchmarks/models.py
KERAS_BACKEND=jax python benchmarks/models.py --tiny  # a smoke test
```
"""

import argparse
import collections
import json
import os
import time

import keras
import numpy as np
import speed

import keras_bn

RAGGED = 6  # samples fewer than the batch, for a ragged last ghost batch
Network = collections.namedtuple(
    "Network", ["build", "data", "batch", "ghost", "momentum"]
)


def resnet(batch_norm, tiny):
    size, widths = (8, (8, 8, 16, 16)) if tiny else (32, (32, 32, 64, 64))
    inputs = keras.Input((size, size, 3))

    def conv(x, filters, strides=1):
        x = keras.layers.Conv2D(
            filters, 3, strides, padding="same", use_bias=False
        )(x)
        return batch_norm()(x)

    x = keras.layers.ReLU()(conv(inputs, widths[0]))
    for index, filters in enumerate(widths):
        strides = 2 if index and filters != widths[index - 1] else 1
        shortcut = x
        if strides != 1 or x.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(filters, 1, strides)(x)
        y = keras.layers.ReLU()(conv(x, filters, strides))
        y = conv(y, filters)
        x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def resnet_data(batch, tiny, rng):
    size = 8 if tiny else 32
    x = rng.normal(0.5, 0.25, (batch, size, size, 3)).astype("float32")
    return x, rng.integers(0, 10, batch).astype("int32")


def tabnet(batch_norm, tiny):
    features, units = (8, 16) if tiny else (64, 256)
    inputs = keras.Input((features,))
    x = batch_norm()(inputs)
    for _ in range(4):
        x = keras.layers.Dense(units, use_bias=False)(x)
        x = keras.layers.ReLU()(batch_norm()(x))
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def tabnet_data(batch, tiny, rng):
    features = 8 if tiny else 64
    x = rng.normal(3.0, 2.0, (batch, features)).astype("float32")
    return x, rng.integers(0, 10, batch).astype("int32")


def sequence(batch_norm, tiny):
    steps, width = (8, 8) if tiny else (64, 64)
    tokens = keras.Input((steps,), dtype="int32")
    x = keras.layers.Embedding(5000, width, mask_zero=True)(tokens)
    x = batch_norm()(x)
    x = keras.layers.Dense(2 * width, activation="relu")(x)
    x = batch_norm()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(10)(x))


def sequence_data(batch, tiny, rng):
    steps = 8 if tiny else 64
    x = rng.integers(1, 5000, (batch, steps)).astype("int32")
    lengths = rng.integers(steps // 8, steps + 1, batch)
    x[np.arange(steps)[None, :] >= lengths[:, None]] = 0
    return x, rng.integers(0, 10, batch).astype("int32")


def networks(tiny):
    return {
        "resnet": Network(resnet, resnet_data, 32 if tiny else 128, 32, 0.99),
        "tabnet": Network(
            tabnet, tabnet_data, 512 if tiny else 4096, 128, 0.98
        ),
        "sequence": Network(
            sequence, sequence_data, 64 if tiny else 256, 32, 0.99
        ),
    }


def variants(network):
    """Variant name: (batch-norm factory, batch size)."""
    momentum = {"momentum": network.momentum}

    def ours(**kwargs):
        return lambda: keras_bn.BatchNormalization(**momentum, **kwargs)

    ghost = ours(virtual_batch_size=network.ghost)
    ragged = network.batch - RAGGED
    return {
        "keras": (lambda: keras.layers.BatchNormalization(**momentum), None),
        "keras_bn": (ours(), None),
        "ghost": (ghost, None),
        "keras_ragged": (
            lambda: keras.layers.BatchNormalization(**momentum),
            ragged,
        ),
        "ghost_ragged": (ghost, ragged),
        "debiased": (ours(moving_average="debiased"), None),
        "frozen_statistics": (ours(training_statistics="moving"), None),
        "floor": (speed.Floor, None),
    }


# What each variant's step time is set beside.
REFERENCES = {"ghost_ragged": "keras_ragged", "keras_ragged": "keras_ragged"}


def _with_references(chosen):
    """The variants `chosen`, with what their figures are set beside."""
    return (
        set(chosen)
        | {"keras", "floor"}
        | {REFERENCES[variant] for variant in chosen if variant in REFERENCES}
    )


def engines():
    if keras.backend.backend() == "torch":
        import torch

        # Dynamo compiles a function at most `recompile_limit` times (8),
        # then runs it eagerly; the variants' models share Keras's
        # functions.
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
        # Each batch size compiled as it is: with automatic dynamic shapes,
        # Inductor fails to lower a convolution's backward pass for a batch
        # of any size (torch 2.13, Keras's layer as keras-bn's).
        torch._dynamo.config.automatic_dynamic_shapes = False
    return {
        "tensorflow": {"xla": True},
        "jax": {"jit": True},
        "torch": {"eager": False, "compile": True},
    }[keras.backend.backend()]


def compiled(network, make, jit_compile, tiny):
    keras.utils.set_random_seed(0)
    model = network.build(make, tiny)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def peak_memory(model, x, y):
    """Bytes a training step allocates beyond its inputs, at its highest."""
    if keras.backend.backend() != "jax":
        return speed.peak_memory(model.train_on_batch, (x, y))
    import jax

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def forward(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return loss(y, logits), non_trainable

    step = jax.jit(jax.value_and_grad(forward, has_aux=True))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    return speed.peak_memory(step, (trainable, non_trainable, x, y))


def run(name, network, engine, jit_compile, rounds, warmup, tiny, chosen):
    rng = np.random.default_rng(0)
    steps, memory = {}, {}
    for variant, (make, batch) in variants(network).items():
        if chosen and variant not in _with_references(chosen):
            continue
        model = compiled(network, make, jit_compile, tiny)
        x, y = network.data(batch or network.batch, tiny, rng)
        x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
        steps[variant] = lambda model=model, x=x, y=y: model.train_on_batch(
            x, y
        )
        memory[variant] = peak_memory(model, x, y)
    times = speed.time_rounds(steps, rounds, warmup)
    rows = {}
    for variant, seconds in times.items():
        reference = REFERENCES.get(variant, "keras")
        # Ratios are medians of ratios within a round: a change of the
        # machine's load between rounds cancels out.
        rows[variant] = {
            "step_seconds": float(np.median(seconds)),
            "step_vs_keras": float(np.median(seconds / times[reference])),
            "batch_norm_share": float(
                np.median(1.0 - times["floor"] / seconds)
            ),
        }
        if memory[variant] is not None:
            rows[variant]["peak_bytes"] = memory[variant]
            rows[variant]["peak_vs_keras"] = memory[variant] / max(
                memory[reference], 1
            )
    return {
        "network": name,
        "engine": engine,
        "batch": network.batch,
        "ghost": network.ghost,
        "variants": rows,
    }


def markdown(results):
    lines = []
    for result in results:
        lines += [
            f"{result['network']}, batch {result['batch']}, {result['engine']}",
            "",
            "| variant | step ms | × Keras | peak MiB | × Keras "
            "| batch norms' share |",
            "|" + " --- |" * 6,
        ]
        for variant, row in result["variants"].items():
            peak, peak_ratio = "n/a", "n/a"
            if "peak_bytes" in row:
                peak = f"{row['peak_bytes'] / 2**20:.1f}"
                peak_ratio = f"{row['peak_vs_keras']:.2f}"
            lines.append(
                f"| {variant} | {row['step_seconds'] * 1e3:.1f} "
                f"| {row['step_vs_keras']:.2f} | {peak} | {peak_ratio} "
                f"| {row['batch_norm_share']:.0%} |"
            )
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--networks", nargs="+", default=None)
    parser.add_argument("--engines", nargs="+", default=None)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="the variants to time (their references are timed too)",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--output-dir", default="runs/models")
    args = parser.parse_args()
    if args.tiny:
        args.rounds, args.warmup = 2, 1
    environment = speed.environment()
    results = []
    for name, network in networks(args.tiny).items():
        if args.networks and name not in args.networks:
            continue
        for engine, jit_compile in engines().items():
            if args.engines and engine not in args.engines:
                continue
            start = time.perf_counter()
            result = run(
                name,
                network,
                engine,
                jit_compile,
                args.rounds,
                args.warmup,
                args.tiny,
                args.variants,
            )
            results.append(result)
            print(markdown([result]), flush=True)
            print(f"({time.perf_counter() - start:.0f} s)\n", flush=True)
    backend = environment["backend"]
    os.makedirs(args.output_dir, exist_ok=True)
    report = {"environment": environment, "results": results}
    with open(
        os.path.join(args.output_dir, f"models_{backend}.json"), "w"
    ) as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.output_dir, f"models_{backend}.md"), "w") as f:
        f.write(markdown(results))


if __name__ == "__main__":
    main()
