"""
Title: `keras_bn.recalibrate` beside `model.predict`
Description: The precise-BN pass at forward speed, on the same data.

Times `keras_bn.recalibrate(model, data)`, `model.predict(data)` and the
model's training-mode forward pass over the same data (`predict` of a
model that calls it with `training=True`: compiled and batched as
`predict` is), in turns, round after round, and prints the median of the
rounds' ratios. A recalibration computes every batch norm's batch
statistics, so the training-mode forward pass is its floor; `predict`
normalizes with the moving statistics in one fused pass. `recalibrate` and
`predict` are set beside each other twice: as a user meets them once (each
one's first call on a fresh model, compilation included) and warm, in the
rounds (`recalibrate` reuses the pass it compiled the first time, as
`predict` does).

The models:

- **cnn**: 4 conv + batch norm + ReLU blocks on 32x32x3 images, whose
  batch norms alternate plain and ghost batches of 32; 2048 images in
  batches of 128.
- **masked**: a sequence model, `Embedding(mask_zero=True)` and two batch
  norms over time steps (one with ghost batches of 32), on 2048 sequences
  of 64 tokens with padding, in batches of 128.

It prints a Markdown table and writes `recalibrate_BACKEND.json` into
`--output-dir`.

```
KERAS_BACKEND=jax python benchmarks/recalibrate.py
KERAS_BACKEND=tensorflow python benchmarks/recalibrate.py
KERAS_BACKEND=torch python benchmarks/recalibrate.py
KERAS_BACKEND=jax python benchmarks/recalibrate.py --tiny  # a smoke test
```
"""

import argparse
import json
import os
import platform
import time

import keras
import numpy as np

import keras_bn


def cnn(samples, rng):
    layers = [keras.Input((32, 32, 3))]
    for block, filters in enumerate((32, 32, 64, 64)):
        layers += [
            keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
            keras_bn.BatchNormalization(
                virtual_batch_size=32 if block % 2 else None
            ),
            keras.layers.ReLU(),
        ]
    layers += [
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ]
    x = rng.normal(2.0, 3.0, (samples, 32, 32, 3)).astype("float32")
    return keras.Sequential(layers), x


def masked(samples, rng):
    tokens = keras.Input((64,), dtype="int32")
    hidden = keras.layers.Embedding(1000, 64, mask_zero=True)(tokens)
    hidden = keras_bn.BatchNormalization()(hidden)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    hidden = keras_bn.BatchNormalization(virtual_batch_size=32)(hidden)
    outputs = keras.layers.GlobalAveragePooling1D()(hidden)
    x = rng.integers(1, 1000, (samples, 64)).astype("int32")
    lengths = rng.integers(8, 65, samples)
    x[np.arange(64)[None, :] >= lengths[:, None]] = 0
    return keras.Model(tokens, outputs), x


MODELS = {"cnn": cnn, "masked": masked}


class TrainingForward(keras.Model):
    """`model` in training mode (batch statistics, moving statistics
    updated), for `predict` to compile and batch as it does the model."""

    def __init__(self, model):
        super().__init__(name=f"training_{model.name}")
        self.wrapped = model

    def call(self, inputs):
        return self.wrapped(inputs, training=True)


def _seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(name, samples, batch_size, rounds, seed):
    model, x = MODELS[name](samples, np.random.default_rng(seed))

    def predict():
        model.predict(x, batch_size=batch_size, verbose=0)

    def recalibrate():
        keras_bn.recalibrate(model, x, batch_size=batch_size, verbose=0)

    forward = TrainingForward(model)

    def training_forward():
        forward.predict(x, batch_size=batch_size, verbose=0)

    calls = {
        "predict": predict,
        "recalibrate": recalibrate,
        "training_forward": training_forward,
    }
    first = {variant: _seconds(call) for variant, call in calls.items()}
    times = {variant: [] for variant in calls}
    for _ in range(rounds):
        for variant, call in calls.items():
            times[variant].append(_seconds(call))
    medians = {variant: float(np.median(t)) for variant, t in times.items()}
    # The ratio within each round, then their median: a load that comes
    # and goes on a shared machine touches the calls of a round alike.
    return {
        "model": name,
        "samples": samples,
        "batch_size": batch_size,
        "first_seconds": first,
        "median_seconds": medians,
        "first_ratio": first["recalibrate"] / first["predict"],
        "median_ratio": float(
            np.median(np.divide(times["recalibrate"], times["predict"]))
        ),
        "median_ratio_to_training_forward": float(
            np.median(
                np.divide(times["recalibrate"], times["training_forward"])
            )
        ),
    }


def markdown(results):
    lines = [
        "| model | predict, first | recalibrate, first | ratio "
        "| predict, warm | training forward | recalibrate "
        "| × predict | × training forward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        first, median = r["first_seconds"], r["median_seconds"]
        lines.append(
            f"| {r['model']} | {first['predict']:.3f} s "
            f"| {first['recalibrate']:.3f} s | {r['first_ratio']:.2f}× "
            f"| {median['predict']:.3f} s "
            f"| {median['training_forward']:.3f} s "
            f"| {median['recalibrate']:.3f} s "
            f"| {r['median_ratio']:.2f}× "
            f"| {r['median_ratio_to_training_forward']:.2f}× |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="256 samples and 1 round: checks that the script runs",
    )
    parser.add_argument("--output-dir", default="runs/recalibrate")
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.rounds = 256, 1
    results = [
        run(name, args.samples, args.batch_size, args.rounds, args.seed)
        for name in args.models
    ]
    environment = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    table = markdown(results)
    print(
        f"{environment['backend']}, keras {environment['keras']}, "
        f"{environment['machine']}\n{table}"
    )
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(
        args.output_dir, f"recalibrate_{environment['backend']}.json"
    )
    with open(path, "w") as file:
        json.dump(
            {"environment": environment, "results": results}, file, indent=2
        )


if __name__ == "__main__":
    main()
