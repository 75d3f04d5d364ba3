"""
Title: Precise batch norm after weight averaging
Description: Stale moving statistics after a fast-moving training and a
weight average, and `keras_bn.recalibrate` to recompute them.

Stochastic weight averaging ([Izmailov et al., 2018](
https://arxiv.org/abs/1803.05407)) averages the weights of checkpoints taken
along a training with a high, constant learning rate. Batch norm's moving
statistics do not fit such weights: they are averages over the last hundred
or so steps (momentum 0.99, Keras's default) of weights that kept moving,
and the average of the checkpoints' statistics describes none of the
networks, the averaged one included. `keras_bn.recalibrate` (precise BN,
[Wu and Johnson, 2021](https://arxiv.org/abs/2105.07576)) runs a network
over training data and sets each batch-norm layer's moving statistics to
the average of the batch statistics it computes, without touching any
other weight.

This script trains a small network with SGD at a constant learning rate
and with weight decay (which keeps the weights moving), keeps the weights
after each of the last `--checkpoints` epochs, and evaluates the last
checkpoint and the average of the checkpoints (moving statistics
averaged too), each as it is and after `keras_bn.recalibrate`. It prints
how far the averaged moving variances are from the recalibrated ones and a
table of the four, and writes `metrics.json` and `accuracy.png` into
`--output-dir`.

This script imports `common.py` from its folder. Run it on the backend of
your choice:

```
KERAS_BACKEND=jax python examples/recalibrate.py
KERAS_BACKEND=tensorflow python examples/recalibrate.py
KERAS_BACKEND=torch python examples/recalibrate.py
```
"""

import os

import common
import keras
import numpy as np

import keras_bn

"""
## Model

Three fully connected layers, each followed by ghost batch norm (virtual
batches of 16) and ReLU. `recalibrate` averages ghost-batch statistics for
ghost-batch layers, as training does.
"""


def build_model(data, units, virtual_batch_size, momentum):
    layers = [keras.Input(data.input_shape), keras.layers.Flatten()]
    for _ in range(3):
        layers += [
            keras.layers.Dense(units, use_bias=False),
            keras_bn.BatchNormalization(
                momentum=momentum, virtual_batch_size=virtual_batch_size
            ),
            keras.layers.Activation("relu"),
        ]
    layers.append(keras.layers.Dense(data.num_classes, activation="softmax"))
    return keras.Sequential(layers)


"""
## Checkpoints

A callback keeps a copy of every weight, moving statistics included, at the
end of each of the last epochs.
"""


class KeepWeights(keras.callbacks.Callback):
    def __init__(self, from_epoch):
        super().__init__()
        self.from_epoch = from_epoch
        self.checkpoints = []

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.from_epoch:
            self.checkpoints.append(self.model.get_weights())


def moving_variances(model):
    return [
        layer.moving_variance.numpy()
        for layer in model.layers
        if isinstance(layer, keras_bn.BatchNormalization)
    ]


def plot(path, results, ratios, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    names = [result["name"] for result in results]
    accuracies = [result["test_accuracy"] for result in results]
    rows = range(len(names))[::-1]
    bars = left.barh(rows, accuracies, color=["C0", "C1", "C3", "C2"])
    left.bar_label(bars, fmt="%.4f", padding=3)
    left.set_yticks(rows, names)
    left.set_xlim(min(accuracies) - 0.05, 1.01)
    left.set_xlabel("test accuracy")
    right.bar(range(1, len(ratios) + 1), ratios, color="C3")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks(range(1, len(ratios) + 1))
    right.set_xlabel("batch-norm layer")
    right.set_ylabel("moving variance, averaged / recalibrated")
    figure.suptitle(title)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def main():
    parser = common.argument_parser(
        __doc__,
        epochs=30,
        batch_size=64,
        output_dir="runs/recalibrate",
        momentum=0.99,
    )
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--virtual-batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.02)
    parser.add_argument(
        "--recalibration-batches",
        type=int,
        help="batches of training data for keras_bn.recalibrate (default: "
        "all, one epoch)",
    )
    args = parser.parse_args()

    data = common.load(args)
    keras.utils.set_random_seed(args.seed)
    model = build_model(
        data, args.units, args.virtual_batch_size, args.momentum
    )
    optimizer = keras.optimizers.SGD(
        args.learning_rate, momentum=0.9, weight_decay=args.weight_decay
    )
    keep = KeepWeights(from_epoch=max(args.epochs - args.checkpoints, 0))
    last = common.fit_and_evaluate(
        model, optimizer, data, args, decay=False, callbacks=[keep]
    )
    results = [{"name": "last checkpoint", **last}]

    # Recalibration: a pass over the training data, in batches of the
    # training size so that the ghost batches are those of training.
    def recalibrate():
        keras_bn.recalibrate(
            model,
            data.batches(
                "train", args.batch_size, shuffle=True, seed=args.seed
            ),
            steps=args.recalibration_batches,
        )

    recalibrate()
    results.append(
        {
            "name": "last checkpoint, recalibrated",
            **common.evaluate(model, data),
        }
    )

    # The average of the checkpoints, weight by weight, the moving
    # statistics included.
    average = [
        np.mean(weights, axis=0)
        for weights in zip(*keep.checkpoints, strict=True)
    ]
    model.set_weights(average)
    stale = moving_variances(model)
    results.append(
        {
            "name": f"average of {len(keep.checkpoints)} checkpoints",
            **common.evaluate(model, data),
        }
    )
    recalibrate()
    ratios = [
        float(np.median(old / new))
        for old, new in zip(stale, moving_variances(model), strict=True)
    ]
    results.append(
        {"name": "average, recalibrated", **common.evaluate(model, data)}
    )

    print(
        f"\n{data.name}, {keras.backend.backend()} backend: moving variance, "
        "averaged / recalibrated (median per layer): "
        + ", ".join(f"{ratio:.2f}" for ratio in ratios)
    )
    common.print_table(
        results,
        [
            ("weights", "name"),
            ("test accuracy", "test_accuracy", ".4f"),
            ("test loss", "test_loss", ".4f"),
        ],
    )
    common.write_metrics(
        args.output_dir, args, {"models": results, "variance_ratios": ratios}
    )
    plot(
        os.path.join(args.output_dir, "accuracy.png"),
        results,
        ratios,
        f"{data.name}, {keras.backend.backend()} backend",
    )


if __name__ == "__main__":
    main()
