"""
Title: Keras batch norm, keras-bn batch norm, ghost batch norm and debiased
moving statistics, side by side
Description: The same small network trained four ways on real data.

Trains one small convolutional network four times, from the same initial
weights on the same batches, with a different batch-normalization layer
each time:

- `keras.layers.BatchNormalization`;
- `keras_bn.BatchNormalization`, its drop-in replacement;
- `keras_bn.BatchNormalization(virtual_batch_size=16)`: ghost batch norm,
  each group of 16 consecutive samples of a batch normalized with its own
  statistics during training;
- `keras_bn.BatchNormalization(moving_average="debiased")`: training as
  the drop-in's, but moving statistics that are the average of the batches
  seen so far from the first step on, where an exponential average still
  holds mostly its initial values: the validation accuracy of the first
  epochs is the one that shows it.

It prints a table (test accuracy, test loss, time per epoch) and writes
`metrics.json` and `curves.png` (training and validation curves) into
`--output-dir` (default `runs/compare/`). The default dataset,
scikit-learn's 8×8 handwritten digits, is bundled and offline; the defaults
take about half a minute on a 2-core CPU. `--dataset mnist` (or
`fashion_mnist`, `cifar10`, ...) reads tensorflow-datasets instead.

This script imports `common.py` from its folder. Run it on the backend of
your choice:

```
KERAS_BACKEND=jax python examples/compare.py
KERAS_BACKEND=tensorflow python examples/compare.py
KERAS_BACKEND=torch python examples/compare.py --dataset mnist --epochs 5
```
"""

import common
import keras

import keras_bn

"""
## Model

Two stages of two 3×3 convolutions, each followed by batch norm and ReLU,
with max pooling in between, then global average pooling and a softmax. The
convolutions have no bias: the batch norm that follows adds one. The
momentum of 0.9 (Keras's default is 0.99) lets the moving statistics keep up
with a training of a few hundred steps.
"""


def build_model(data, batch_norm, widths=(32, 64)):
    inputs = keras.Input(data.input_shape)
    hidden = inputs
    for stage, width in enumerate(widths):
        if stage:
            hidden = keras.layers.MaxPooling2D()(hidden)
        for _ in range(2):
            hidden = keras.layers.Conv2D(
                width, 3, padding="same", use_bias=False
            )(hidden)
            hidden = batch_norm()(hidden)
            hidden = keras.layers.Activation("relu")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(data.num_classes, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


"""
## The four variants

Each is a function that makes one batch-norm layer. Every variant starts
from the same seed, hence the same initial weights, and sees the same
batches in the same order.
"""


def variants(virtual_batch_size, momentum):
    return {
        "keras.layers.BatchNormalization": lambda: (
            keras.layers.BatchNormalization(momentum=momentum)
        ),
        "keras_bn.BatchNormalization": lambda: keras_bn.BatchNormalization(
            momentum=momentum
        ),
        f"keras_bn, virtual_batch_size={virtual_batch_size}": lambda: (
            keras_bn.BatchNormalization(
                momentum=momentum, virtual_batch_size=virtual_batch_size
            )
        ),
        'keras_bn, moving_average="debiased"': lambda: (
            keras_bn.BatchNormalization(
                momentum=momentum, moving_average="debiased"
            )
        ),
    }


"""
## Training

Adam, with the learning rate decayed to zero along a cosine over the
epochs; `common.fit_and_evaluate` compiles, trains with Keras's progress
bar, times the epochs and evaluates on the test split.
"""


def main():
    parser = common.argument_parser(
        __doc__, epochs=20, batch_size=64, output_dir="runs/compare"
    )
    parser.add_argument("--virtual-batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()

    data = common.load(args)
    results = []
    for name, batch_norm in variants(
        args.virtual_batch_size, args.momentum
    ).items():
        print(f"\n{name}")
        keras.utils.set_random_seed(args.seed)
        model = build_model(data, batch_norm)
        optimizer = keras.optimizers.Adam(args.learning_rate)
        result = common.fit_and_evaluate(model, optimizer, data, args)
        results.append({"name": name, **result})

    summary = f", {args.epochs} epochs, batch size {args.batch_size}"
    common.report(args, data, results, "batch norm", summary=summary)


if __name__ == "__main__":
    main()
