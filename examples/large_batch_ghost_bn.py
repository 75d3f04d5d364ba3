"""
Title: Large batches with ghost batch norm ("Train longer, generalize better")
Description: The generalization gap of large-batch training, and how much of
it ghost batch norm closes, after Hoffer, Hubara and Soudry (2017).

[Hoffer et al., 2017](https://arxiv.org/abs/1705.08741) observed that a
network trained with large batches generalizes worse than the same network
trained with small ones, and closed much of that gap with three changes: a
learning rate scaled with the square root of the batch size, ghost batch
norm (batch norm over "virtual" batches of the small size inside each large
batch, so that the statistics stay as noisy as with small batches), and
more training steps. This script runs the experiment at small scale with a
small residual network:

1. batch size `--batch-size` (small), plain batch norm: the reference;
2. batch size `--large-batch-size`, plain batch norm;
3. batch size `--large-batch-size`, `keras_bn.BatchNormalization` with
   `virtual_batch_size=--batch-size`.

Every run trains for the same number of epochs, the large-batch runs with
the learning rate multiplied by sqrt(large / small); `--train-longer` adds
a fourth run, the third one trained for as many steps as the first (the
paper's "regime adaptation"). Each run is repeated `--repeats` times with
different seeds (on the 360 test digits, one image is 0.28% of accuracy,
as much as the gap itself can be in a single run). The script prints the
average test accuracies and the share of the generalization gap (run 1
minus run 2) that each large-batch run closes, and writes `metrics.json`
and `curves.png` (averaged curves) into `--output-dir`.

The defaults (scikit-learn's bundled digits) take 1.5 to 2.5 minutes on a
2-core CPU. The paper's setting is CIFAR-10, a ResNet-44, batches of 128
and 4096 and far more epochs (and data augmentation, which this script
leaves out); closer to it, where a GPU and the data are available:

```
KERAS_BACKEND=jax python examples/large_batch_ghost_bn.py --dataset cifar10 \
    --blocks 7 --width 16 --batch-size 128 --large-batch-size 4096 \
    --epochs 100 --learning-rate 0.1 --repeats 1 --train-longer
```

This script imports `common.py` from its folder. Run it on the backend of
your choice:

```
KERAS_BACKEND=jax python examples/large_batch_ghost_bn.py
KERAS_BACKEND=tensorflow python examples/large_batch_ghost_bn.py
KERAS_BACKEND=torch python examples/large_batch_ghost_bn.py
```
"""

import collections
import functools
import math

import common
import keras

import keras_bn

"""
## Model

A ResNet for small images: a 3×3 stem, then three stages of `blocks`
residual blocks of two 3×3 convolutions (`width`, `2 * width` and
`4 * width` channels; the second and third stages start with a stride of
2), global average pooling and a softmax. `blocks=3` is a ResNet-20,
`blocks=7` the paper's ResNet-44. Every convolution is followed by batch
norm, made by `batch_norm()`.
"""


def build_model(data, batch_norm, blocks, width):
    def convolution(x, channels, strides=1):
        x = keras.layers.Conv2D(
            channels, 3, strides, padding="same", use_bias=False
        )(x)
        return batch_norm()(x)

    inputs = keras.Input(data.input_shape)
    x = keras.layers.Activation("relu")(convolution(inputs, width))
    for stage in range(3):
        channels = width * 2**stage
        for block in range(blocks):
            strides = 2 if stage and not block else 1
            shortcut = x
            if strides != 1:
                shortcut = keras.layers.Conv2D(
                    channels, 1, strides, use_bias=False
                )(x)
                shortcut = batch_norm()(shortcut)
            y = keras.layers.Activation("relu")(
                convolution(x, channels, strides)
            )
            y = convolution(y, channels)
            x = keras.layers.Activation("relu")(
                keras.layers.Add()([shortcut, y])
            )
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(data.num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


"""
## The runs

Each run is a batch size, a batch-norm layer, a learning rate and a number
of epochs. Every run starts from the same initial weights (per seed) and
uses SGD with momentum and weight decay, as in the paper, with the learning
rate decayed to zero along a cosine.
"""


Run = collections.namedtuple(
    "Run", ["name", "batch_size", "batch_norm", "learning_rate", "epochs"]
)


def runs(args):
    small, large = args.batch_size, args.large_batch_size
    large_rate = args.learning_rate * math.sqrt(large / small)

    def plain():
        return keras_bn.BatchNormalization(momentum=args.momentum)

    def ghost():
        return keras_bn.BatchNormalization(
            momentum=args.momentum, virtual_batch_size=small
        )

    chosen = [
        Run(f"batch {small}", small, plain, args.learning_rate, args.epochs),
        Run(f"batch {large}", large, plain, large_rate, args.epochs),
        Run(
            f"batch {large}, ghost batches of {small}",
            large,
            ghost,
            large_rate,
            args.epochs,
        ),
    ]
    if args.train_longer:
        chosen.append(
            Run(
                f"batch {large}, ghost batches of {small}, "
                f"{large // small}x the epochs",
                large,
                ghost,
                large_rate,
                args.epochs * large // small,
            )
        )
    return chosen


def train(data, args, run, seed):
    model = build_model(data, run.batch_norm, args.blocks, args.width)
    optimizer = keras.optimizers.SGD(
        run.learning_rate, momentum=0.9, weight_decay=5e-4
    )
    return common.fit_and_evaluate(
        model,
        optimizer,
        data,
        args,
        epochs=run.epochs,
        batch_size=run.batch_size,
        seed=seed,
    )


def main():
    parser = common.argument_parser(
        __doc__,
        epochs=30,
        batch_size=16,
        output_dir="runs/large_batch",
        repeats=3,
    )
    parser.add_argument("--large-batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--train-longer", action="store_true")
    args = parser.parse_args()

    data = common.load(args)
    results = []
    for setting in runs(args):
        print(
            f"\n{setting.name}: learning rate {setting.learning_rate:.3g}, "
            f"{setting.epochs} epochs"
        )
        result = common.repeat(
            functools.partial(train, data, args, setting),
            args.repeats,
            args.seed,
        )
        results.append({"name": setting.name, **result})

    # The generalization gap: the test accuracy lost by going from the
    # small to the large batch with plain batch norm. Each run closes the
    # share of it that it wins back (none when there is no gap).
    gap = results[0]["test_accuracy"] - results[1]["test_accuracy"]
    for result in results:
        won = result["test_accuracy"] - results[1]["test_accuracy"]
        result["gap_closed"] = won / gap if gap > 0 else None
    common.report(
        args,
        data,
        results,
        "run",
        [("gap closed", "gap_closed", ".0%")],
        summary=f", {args.repeats} seeds: generalization gap {gap:.4f}",
    )


if __name__ == "__main__":
    main()
