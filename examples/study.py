"""
Title: Batch norm, measured
Description: What batch norm does to training, when it fails, and what to
use instead, answered by experiments, each repeated over several seeds.

Four experiments, each printing its table (mean ± standard deviation over
`--repeats` seeds) and writing a plot into `--output-dir` (default
`runs/study/`), with every number in `metrics.json`:

1. **Batch size**: one small convolutional network trained at batch sizes
   2, 4, 8, 16, 32 and 128 without normalization, with Keras's batch norm,
   keras-bn's (plain, with renorm, with ghost batches, with batch
   statistics at inference, recalibrated after training) and with Keras's
   group and layer normalization: the test accuracy, and the gap
   between the accuracy of the network in training mode (batch statistics)
   and in inference mode (moving statistics), which small batches open.
2. **Learning rate**: the same network trained with SGD at learning rates
   from 0.003 to 10, with and without batch norm: the accuracy at each, and
   the largest rate that still trains.
3. **Gradients**: the gradient norm of each layer of a plain (no skip
   connections) 20-layer dense network, at initialization and after
   training, with and without batch norm.
4. **Depth**: plain dense networks of 2 to 32 layers, with and without
   batch norm, trained for the same number of steps.

It also reports what a trained batch-norm layer holds: which of its
statistics are learned weights and which are computed from the data.

The default dataset, scikit-learn's 8×8 digits, is bundled and offline. It
is easy: the networks of `compare.py` reach 0.997–1.000 on its full
training split whatever their batch norm. Here the training set is cut to
`--train-size` examples (default 512) and the networks train for a few
hundred steps, where the variants differ. On a busy 2-core x86-64 CPU
with JAX, the default study took 5.5 minutes and `--quick` (a smoke test
on a smaller grid) 1.5 minutes; TensorFlow is about as fast, PyTorch,
which runs eagerly, several times slower. `--dataset mnist` (or
`fashion_mnist`, `cifar10`, ...) reads tensorflow-datasets instead.

This script imports `common.py` from its folder. Run it on the backend of
your choice:

```
KERAS_BACKEND=jax python examples/study.py
KERAS_BACKEND=tensorflow python examples/study.py --quick
KERAS_BACKEND=torch python examples/study.py --dataset mnist --train-size 2048
```
"""

import collections
import functools
import json
import math
import os
import time

import common
import keras
import numpy as np

import keras_bn

"""
## Data

`common.load` reads the dataset; the study works on NumPy arrays: the
first `--train-size` examples of the training split (shuffled once with a
fixed seed, so that every class is there) and the whole test split (at
most `--test-size` examples of a tensorflow-datasets one).
"""


def arrays(data, split, size, seed=0):
    """The first `size` examples of `split`, as two NumPy arrays."""
    pairs = data.splits[split]
    if isinstance(pairs, tuple):
        x, y = pairs
    else:
        batches = list(pairs.take(size).batch(1024).as_numpy_iterator())
        x = np.concatenate([batch[0] for batch in batches])
        y = np.concatenate([batch[1] for batch in batches])
    if split == "train":
        order = np.random.default_rng(seed).permutation(len(x))
        x, y = x[order], y[order]
    return x[:size].astype("float32"), y[:size].astype("int32")


"""
## The networks

A convolutional network for the batch-size and learning-rate experiments:
two 3×3 convolutions of 16 and 32 channels, each followed by the
normalization under test and ReLU, max pooling in between, then global
average pooling and a softmax. A plain dense network for the gradient and
depth experiments: `depth` dense layers of 64 units, each followed by the
normalization (if any) and ReLU, then a softmax. A layer followed by a
normalization has no bias: the normalization's `beta` replaces it.
"""


def conv_net(data, normalization, widths=(16, 32)):
    inputs = keras.Input(data.input_shape)
    hidden = inputs
    for stage, width in enumerate(widths):
        if stage:
            hidden = keras.layers.MaxPooling2D()(hidden)
        hidden = keras.layers.Conv2D(
            width, 3, padding="same", use_bias=normalization is None
        )(hidden)
        if normalization is not None:
            hidden = normalization()(hidden)
        hidden = keras.layers.Activation("relu")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(data.num_classes, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


def dense_net(data, normalization, depth, width=64):
    inputs = keras.Input(data.input_shape)
    hidden = keras.layers.Flatten()(inputs)
    for _ in range(depth):
        hidden = keras.layers.Dense(width, use_bias=normalization is None)(
            hidden
        )
        if normalization is not None:
            hidden = normalization()(hidden)
        hidden = keras.layers.Activation("relu")(hidden)
    outputs = keras.layers.Dense(data.num_classes, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


"""
## The normalizations

Each is a function that makes one layer. Every batch norm has a momentum
of 0.9 (`--momentum`; Keras's default, 0.99, averages over about 100
steps, and lags behind weights that change over a few hundred). Renorm
(Ioffe, 2017) has the same momentum for its own statistics, and clips its
corrections to the limits the paper reaches after its warm-up. Ghost
batches have 8 examples (`--virtual-batch-size`): at batch sizes of 8 and
less, that is plain batch norm. Group normalization has 4 groups. Layer
normalization normalizes each example over all its axes (height, width
and channels), as Ba et al. (2016) define it; Keras's default, `axis=-1`,
would normalize each position over its channels only.

Two more variants need no training of their own: `inference_statistics=
"batch"` trains exactly as plain keras-bn does, so the trained weights of
plain keras-bn are loaded into a network built with it; and recalibration
(`keras_bn.recalibrate`, "precise BN") recomputes the moving statistics of
that same trained network, averaged over the training set in batches of
the training batch size, the statistics its layers saw.
"""


RENORM_CLIPPING = {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}


def normalizations(momentum, virtual_batch_size):
    return {
        "none": None,
        "keras BatchNormalization": lambda: keras.layers.BatchNormalization(
            momentum=momentum
        ),
        "keras_bn": lambda: keras_bn.BatchNormalization(momentum=momentum),
        "keras_bn renorm": lambda: keras_bn.BatchNormalization(
            momentum=momentum,
            renorm=True,
            renorm_momentum=momentum,
            renorm_clipping=RENORM_CLIPPING,
        ),
        f"keras_bn ghost {virtual_batch_size}": lambda: (
            keras_bn.BatchNormalization(
                momentum=momentum, virtual_batch_size=virtual_batch_size
            )
        ),
        "GroupNormalization(4)": lambda: keras.layers.GroupNormalization(4),
        "LayerNormalization": lambda: keras.layers.LayerNormalization(
            axis=(1, 2, 3)
        ),
    }


BATCH_INFERENCE = 'keras_bn inference_statistics="batch"'
RECALIBRATED = "keras_bn recalibrated"


"""
## Training and evaluation

One `fit` without a progress bar, over a whole number of passes over
the training set, each in an order drawn from the run's seed: at least
`--epochs` passes and at least `--min-steps` steps, so that small batches
see the training set as often as large ones, and large batches take
enough steps. The accuracy in inference mode is the network's test
accuracy (batches of 128); in training mode, every normalization uses the
statistics of the test batch it is given, in batches of the training
batch size, as in training. A training-mode pass updates the moving
statistics of Keras's layer, so it comes last.
"""


class Steps(keras.utils.PyDataset):
    """`steps` batches of `batch_size` examples of `(x, y)`, in one
    "epoch": whole passes over the data, each in its own order, which
    depends only on `seed`."""

    def __init__(self, x, y, batch_size, steps, seed):
        super().__init__()
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.per_pass = len(x) // batch_size
        self.steps = steps
        rng = np.random.default_rng(seed)
        passes = -(-steps // self.per_pass)
        self.order = [rng.permutation(len(x)) for _ in range(passes)]

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        if index >= self.steps:
            raise IndexError(index)
        order = self.order[index // self.per_pass]
        start = (index % self.per_pass) * self.batch_size
        batch = order[start : start + self.batch_size]
        return self.x[batch], self.y[batch]


class Network:
    """A network trained anew from the initial weights of each seed.

    Compiling a training step costs more than the few hundred steps of a
    run here, so the network is built and compiled once, for the first
    seed; for each later seed, its weights (moving statistics included)
    are set to those of a freshly built network of that seed, and the
    optimizer's state to its initial one. The run is the one a new
    network would make, without the compilation.
    """

    def __init__(self, build, optimizer):
        self.build = build
        self.optimizer = optimizer
        self.model = None
        self.training_mode = None

    def train(self, seed, x, y, batch_size, args):
        """Trains the network of `seed` in one `fit`; returns the mean
        training loss of its last pass over the data (`None` if not
        finite)."""
        self.start(seed)
        return self.fit(seed, x, y, batch_size, args)

    def start(self, seed):
        """Sets the network to its initial state for `seed`."""
        seeded(seed)
        fresh = self.build()
        if self.model is None:
            self.model = fresh
            self.model.compile(
                optimizer=self.optimizer(),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
            self.model.optimizer.build(self.model.trainable_variables)
            self.initial_state = [
                keras.ops.convert_to_numpy(variable)
                for variable in self.model.optimizer.variables
            ]
            self.training_mode = TrainingMode(self.model)
        else:
            self.model.set_weights(fresh.get_weights())
            for variable, value in zip(
                self.model.optimizer.variables, self.initial_state, strict=True
            ):
                variable.assign(value)

    def fit(self, seed, x, y, batch_size, args):
        per_pass = len(x) // batch_size
        steps = max(args.epochs * per_pass, args.min_steps)
        steps = -(-steps // per_pass) * per_pass
        losses = LastLosses(per_pass)
        self.model.fit(
            Steps(x, y, batch_size, steps, seed),
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[losses],
        )
        loss = float(np.mean(losses.values))
        return loss if math.isfinite(loss) else None


class LastLosses(keras.callbacks.Callback):
    """The loss of each of the last `count` training steps. `fit` reports
    the mean loss of the epoch so far; each step's is recovered from two
    consecutive means."""

    def __init__(self, count):
        super().__init__()
        self.values = collections.deque(maxlen=count)
        self.mean = 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.values.append((batch + 1) * mean - batch * self.mean)
        self.mean = mean


class TrainingMode(keras.Model):
    """`model` with every layer in training mode, whatever the caller
    asks."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def call(self, x):
        return self.model(x, training=True)


def accuracy(model, x, y, batch_size=128):
    probabilities = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=-1) == y))


def seeded(seed):
    keras.utils.set_random_seed(seed)
    return seed


def mean_std(values):
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def cell(values):
    mean, std = mean_std(values)
    return "—" if mean is None else f"{mean:.3f} ± {std:.3f}"


"""
## Experiment 1: batch size

Adam at a learning rate of 0.003 (`--learning-rate`) for every run. For
each batch size and normalization: the test accuracy (inference mode), the
accuracy in training mode, and their difference. The network of each seed
starts from the same weights at every batch size and with every
normalization of the same shape. With 512 training examples, a run takes
1024 steps at batch size 2, 512 at 4, 256 at 8 and 240 above.
"""


def batch_size_experiment(data, train_xy, test_xy, args):
    variants = normalizations(args.momentum, args.virtual_batch_size)
    names = [*variants, BATCH_INFERENCE, RECALIBRATED]
    results = {
        name: {str(size): [] for size in args.batch_sizes} for name in names
    }
    batch_inference = lambda: keras_bn.BatchNormalization(  # noqa: E731
        momentum=args.momentum, inference_statistics="batch"
    )
    for size in args.batch_sizes:
        # Trained as plain keras-bn is: they take its trained weights.
        copies = {
            BATCH_INFERENCE: conv_net(data, batch_inference),
            RECALIBRATED: conv_net(data, variants["keras_bn"]),
        }
        for name, normalization in variants.items():
            start = time.perf_counter()
            network = Network(
                functools.partial(conv_net, data, normalization),
                functools.partial(keras.optimizers.Adam, args.learning_rate),
            )
            for seed in seeds(args):
                loss = network.train(seed, *train_xy, size, args)
                inference = accuracy(network.model, *test_xy)
                runs = {name: inference}
                if name == "keras_bn":
                    weights = network.model.get_weights()
                    for copy in copies.values():
                        copy.set_weights(weights)
                    keras_bn.recalibrate(
                        copies[RECALIBRATED],
                        train_xy[0],
                        batch_size=size,
                        verbose=0,
                    )
                    for copy_name, copy in copies.items():
                        runs[copy_name] = accuracy(copy, *test_xy)
                # Without batch statistics, both modes are one function;
                # the copies of keras-bn are the same in training mode.
                training = (
                    accuracy(network.training_mode, *test_xy, size)
                    if name.startswith("keras")
                    else None
                )
                for run_name, inference in runs.items():
                    results[run_name][str(size)].append(
                        {
                            "seed": seed,
                            "test_accuracy": inference,
                            "training_mode_accuracy": training,
                            "gap": None
                            if training is None
                            else training - inference,
                            "final_training_loss": loss,
                        }
                    )
            values = [run["test_accuracy"] for run in results[name][str(size)]]
            print(
                f"batch size {size:4d}, {name}: test accuracy "
                f"{cell(values)} ({time.perf_counter() - start:.1f} s)"
            )
    return results


def print_batch_size_tables(results, args):
    sizes = [str(size) for size in args.batch_sizes]
    for key, title in (
        ("test_accuracy", "Test accuracy (inference mode)"),
        ("gap", "Training-mode minus inference-mode test accuracy"),
    ):
        print(f"\n{title}, by batch size")
        rows = [
            {
                "name": name,
                **{
                    size: cell([run[key] for run in by_size[size]])
                    for size in sizes
                },
            }
            for name, by_size in results.items()
        ]
        common.print_table(
            rows, [("normalization", "name"), *[(s, s) for s in sizes]]
        )


def errorbars(ax, results, xs, key="test_accuracy", linestyles=("-",), **style):
    """One line per variant of `results` (variant: x: runs): the mean of
    `key` over the runs at each x, with its standard deviation as error
    bars. A variant without `key` (no training-mode gap without batch
    statistics) is left out, and keeps its color."""
    for index, (name, by_x) in enumerate(results.items()):
        stats = [mean_std([run[key] for run in by_x[str(x)]]) for x in xs]
        if stats[0][0] is None:
            continue
        ax.errorbar(
            xs,
            [mean for mean, _ in stats],
            yerr=[std for _, std in stats],
            label=label(name),
            color=f"C{index}",
            linestyle=linestyles[index % len(linestyles)],
            marker="o",
            **style,
        )


def plot_batch_size(path, results, args, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, key in zip(axes, ("test_accuracy", "gap"), strict=True):
        errorbars(
            ax,
            results,
            args.batch_sizes,
            key,
            linestyles=["-", "--", ":", "-."],
            markersize=3,
            capsize=2,
        )
    for ax, quantity in zip(
        axes,
        ("test accuracy (inference mode)", "training mode − inference mode"),
        strict=True,
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.batch_sizes, [str(s) for s in args.batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="gray", linewidth=0.8)
    axes[0].legend(fontsize="small", loc="lower right")
    figure.suptitle(title)
    save(figure, path)


"""
## Experiment 2: learning rate

SGD with momentum 0.9, batches of 32 (`--batch-size`, as in the
experiments after it), no decay, at each learning rate, with no
normalization and with keras-bn. A run whose loss becomes NaN or infinite
has diverged; the test accuracy of a diverged network is whatever its
outputs give (usually chance). "Trains" means a mean test accuracy of at
least 0.5, five times chance.
"""


def learning_rate_experiment(data, train_xy, test_xy, args):
    variants = {
        "none": None,
        "keras_bn": lambda: keras_bn.BatchNormalization(momentum=args.momentum),
    }
    results = {name: {} for name in variants}
    for rate in args.learning_rates:
        for name, normalization in variants.items():
            network = Network(
                functools.partial(conv_net, data, normalization),
                functools.partial(keras.optimizers.SGD, rate, momentum=0.9),
            )
            runs = []
            for seed in seeds(args):
                loss = network.train(seed, *train_xy, args.batch_size, args)
                runs.append(
                    {
                        "seed": seed,
                        "test_accuracy": accuracy(network.model, *test_xy),
                        "final_training_loss": loss,
                        "diverged": loss is None,
                    }
                )
            results[name][str(rate)] = runs
            print(
                f"learning rate {rate:g}, {name}: test accuracy "
                f"{cell([run['test_accuracy'] for run in runs])}"
            )
    largest = {}
    for name, by_rate in results.items():
        trained = [
            rate
            for rate in args.learning_rates
            if mean_std([run["test_accuracy"] for run in by_rate[str(rate)]])[0]
            >= 0.5
        ]
        largest[name] = max(trained) if trained else None
    return {"runs": results, "largest_rate_that_trains": largest}


def print_learning_rate_table(results, args):
    print(
        "\nTest accuracy by learning rate (SGD, momentum 0.9, batch "
        f"{args.batch_size})"
    )
    names = list(results["runs"])
    rows = []
    for rate in args.learning_rates:
        row = {"rate": f"{rate:g}"}
        for name in names:
            runs = results["runs"][name][str(rate)]
            diverged = sum(run["diverged"] for run in runs)
            row[name] = cell([run["test_accuracy"] for run in runs]) + (
                f" ({diverged} diverged)" if diverged else ""
            )
        rows.append(row)
    common.print_table(
        rows, [("learning rate", "rate"), *[(name, name) for name in names]]
    )
    for name, rate in results["largest_rate_that_trains"].items():
        print(f"largest rate that trains, {name}: {rate}")


def plot_learning_rate(path, results, args, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    errorbars(ax, results["runs"], args.learning_rates, capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD, momentum 0.9)")
    ax.set_ylabel("test accuracy")
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.suptitle(title)
    save(figure, path)


"""
## Experiment 3: gradients

The norm of the gradient of the loss with respect to each dense layer's
kernel, on one batch of 128 training examples in training mode, for a
plain dense network of `--gradient-depth` layers with Keras's default
initialization (Glorot uniform), at initialization and after training
(Adam, 0.003, batches of 32). Keras has no backend-independent gradient
function, so this is the one place where the study asks the backend
directly.
"""


def gradient_norms(model, x, y):
    kernels = [
        layer.kernel
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense)
    ]
    loss = keras.losses.SparseCategoricalCrossentropy()
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [variable.value for variable in model.trainable_variables]
        frozen = [variable.value for variable in model.non_trainable_variables]

        def value(trainable):
            outputs, _ = model.stateless_call(
                trainable, frozen, x, training=True
            )
            return loss(y, outputs)

        by_path = dict(
            zip(
                [variable.path for variable in model.trainable_variables],
                jax.grad(value)(trainable),
                strict=True,
            )
        )
        gradients = [by_path[kernel.path] for kernel in kernels]
    else:
        # A training-mode call updates the moving statistics: put them
        # back afterwards.
        saved = [
            keras.ops.convert_to_numpy(variable)
            for variable in model.non_trainable_variables
        ]
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                value = loss(y, model(x, training=True))
            gradients = tape.gradient(value, [k.value for k in kernels])
        elif backend == "torch":
            import torch

            value = loss(y, model(x, training=True))
            gradients = torch.autograd.grad(value, [k.value for k in kernels])
        else:
            raise SystemExit(f"no gradients on the {backend} backend")
        for variable, array in zip(
            model.non_trainable_variables, saved, strict=True
        ):
            variable.assign(array)
    return [
        float(np.linalg.norm(keras.ops.convert_to_numpy(gradient)))
        for gradient in gradients
    ]


def gradient_experiment(data, train_xy, test_xy, args):
    variants = {
        "none": None,
        "keras_bn": lambda: keras_bn.BatchNormalization(momentum=args.momentum),
    }
    x, y = train_xy[0][:128], train_xy[1][:128]
    results = {}
    for name, normalization in variants.items():
        network = Network(
            functools.partial(
                dense_net, data, normalization, args.gradient_depth
            ),
            functools.partial(keras.optimizers.Adam, args.learning_rate),
        )
        runs = []
        for seed in seeds(args):
            network.start(seed)
            model = network.model
            initial = gradient_norms(model, x, y)
            loss = network.fit(seed, *train_xy, args.batch_size, args)
            runs.append(
                {
                    "seed": seed,
                    "initial": initial,
                    "trained": gradient_norms(model, x, y),
                    "test_accuracy": accuracy(model, *test_xy),
                    "final_training_loss": loss,
                }
            )
        results[name] = runs
        print(
            f"gradients, {name}: test accuracy after training "
            f"{cell([run['test_accuracy'] for run in runs])}"
        )
    return results


def geometric_mean_std(values):
    """The geometric mean and the factor of spread (the exponential of the
    standard deviation of the logarithms)."""
    logs = np.log(np.maximum(values, 1e-30))
    return float(np.exp(np.mean(logs))), float(np.exp(np.std(logs)))


def print_gradient_table(results):
    print(
        "\nGradient norm of each dense kernel (geometric mean over seeds), "
        "input side first"
    )
    columns = [
        (f"{name}, {when}", f"{name} {when}")
        for name in results
        for when in ("initial", "trained")
    ]
    depth = len(results["none"][0]["initial"])
    rows = []
    for layer in range(depth):
        row = {"layer": str(layer + 1)}
        for name, runs in results.items():
            for when in ("initial", "trained"):
                mean, _ = geometric_mean_std([run[when][layer] for run in runs])
                row[f"{name} {when}"] = f"{mean:.2e}"
        rows.append(row)
    common.print_table(rows, [("layer", "layer"), *columns])
    rows = []
    for name, runs in results.items():
        row = {"name": name}
        for when in ("initial", "trained"):
            ratios = [run[when][0] / run[when][-1] for run in runs]
            mean, spread = geometric_mean_std(ratios)
            row[when] = f"{mean:.3g} (×/÷ {spread:.2f})"
        row["accuracy"] = cell([run["test_accuracy"] for run in runs])
        rows.append(row)
    print("First layer's gradient norm over the last layer's")
    common.print_table(
        rows,
        [
            ("normalization", "name"),
            ("at initialization", "initial"),
            ("after training", "trained"),
            ("test accuracy", "accuracy"),
        ],
    )


def plot_gradients(path, results, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, when in zip(axes, ("initial", "trained"), strict=True):
        for index, (name, runs) in enumerate(results.items()):
            norms = np.array([run[when] for run in runs])
            layers = np.arange(1, norms.shape[1] + 1)
            for run in norms:
                ax.plot(layers, run, color=f"C{index}", alpha=0.25)
            ax.plot(
                layers,
                np.exp(np.mean(np.log(np.maximum(norms, 1e-30)), axis=0)),
                color=f"C{index}",
                marker="o",
                markersize=3,
                label=label(name),
            )
        ax.set_yscale("log")
        ax.set_xlabel("dense layer (1 = next to the input)")
        ax.set_title(
            "at initialization" if when == "initial" else "after training"
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient norm of the kernel")
    axes[0].legend()
    figure.suptitle(title)
    save(figure, path)


"""
## Experiment 4: depth

Plain dense networks of each depth in `--depths`, with and without
keras-bn, trained as in the gradient experiment.
"""


def depth_experiment(data, train_xy, test_xy, args):
    variants = {
        "none": None,
        "keras_bn": lambda: keras_bn.BatchNormalization(momentum=args.momentum),
    }
    results = {name: {} for name in variants}
    for depth in args.depths:
        for name, normalization in variants.items():
            network = Network(
                functools.partial(dense_net, data, normalization, depth),
                functools.partial(keras.optimizers.Adam, args.learning_rate),
            )
            runs = []
            for seed in seeds(args):
                loss = network.train(seed, *train_xy, args.batch_size, args)
                runs.append(
                    {
                        "seed": seed,
                        "test_accuracy": accuracy(network.model, *test_xy),
                        "final_training_loss": loss,
                    }
                )
            results[name][str(depth)] = runs
            print(
                f"depth {depth}, {name}: test accuracy "
                f"{cell([run['test_accuracy'] for run in runs])}"
            )
    return results


def print_depth_table(results, args):
    print("\nTest accuracy by depth (plain dense network)")
    rows = [
        {
            "depth": str(depth),
            **{
                name: cell(
                    [run["test_accuracy"] for run in by_depth[str(depth)]]
                )
                for name, by_depth in results.items()
            },
            **{
                f"{name} loss": cell(
                    [run["final_training_loss"] for run in by_depth[str(depth)]]
                )
                for name, by_depth in results.items()
            },
        }
        for depth in args.depths
    ]
    common.print_table(
        rows,
        [
            ("dense layers", "depth"),
            *[(f"{name}: test accuracy", name) for name in results],
            *[
                (f"{name}: final training loss", f"{name} loss")
                for name in results
            ],
        ],
    )


def plot_depth(path, results, args, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    errorbars(ax, results, args.depths, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.depths, [str(depth) for depth in args.depths])
    ax.set_xlabel("dense layers")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.suptitle(title)
    save(figure, path)


"""
## What a batch-norm layer learns

A batch-norm layer normalizes with the mean and standard deviation of the
batch, computed in each training step; it learns only the scale `gamma`
and the shift `beta` that follow. The moving mean and variance are
running averages of the batch statistics, kept for inference, not
trained. For the convolutional network with keras-bn trained in batches of 32:
each layer's weights, learned or not, the median of its learned `gamma`,
and the median over channels of the ratio of its moving standard deviation
to the standard deviation of its inputs over the training set.
"""


def statistics_report(data, train_xy, args):
    network = Network(
        lambda: conv_net(
            data, lambda: keras_bn.BatchNormalization(momentum=args.momentum)
        ),
        functools.partial(keras.optimizers.Adam, args.learning_rate),
    )
    network.train(args.seed, *train_xy, args.batch_size, args)
    model = network.model
    layers = [
        layer
        for layer in model.layers
        if isinstance(layer, keras_bn.BatchNormalization)
    ]
    probe = keras.Model(model.inputs, [layer.input for layer in layers])
    inputs = probe.predict(train_xy[0], batch_size=128, verbose=0)
    rows = []
    for index, (layer, values) in enumerate(zip(layers, inputs, strict=True)):
        std = values.reshape(-1, values.shape[-1]).std(axis=0)
        moving = np.sqrt(keras.ops.convert_to_numpy(layer.moving_variance))
        gamma = keras.ops.convert_to_numpy(layer.gamma)
        rows.append(
            {
                "layer": index + 1,
                "trainable": ", ".join(
                    v.path.split("/")[-1] for v in layer.trainable_weights
                ),
                "non_trainable": ", ".join(
                    v.path.split("/")[-1] for v in layer.non_trainable_weights
                ),
                "median_gamma": float(np.median(gamma)),
                "gamma_range": [float(gamma.min()), float(gamma.max())],
                "median_moving_std_over_data_std": float(
                    np.median(moving / std)
                ),
            }
        )
    return rows


def print_statistics_table(rows, args):
    print(
        "\nWhat each batch-norm layer holds, after training (batch "
        f"{args.batch_size})"
    )
    common.print_table(
        rows,
        [
            ("batch norm", "layer"),
            ("learned (trainable)", "trainable"),
            ("computed (not trainable)", "non_trainable"),
            ("median gamma", "median_gamma", ".3f"),
            ("moving std / data std", "median_moving_std_over_data_std", ".3f"),
        ],
    )


"""
## Running it

`--quick` is a smoke test of every experiment on a smaller grid (batch
sizes 4 and 32, learning rates 0.01 and 10, depths 2 and 4, 256
training examples, at least 60 steps a run): it measures little.
"""


def seeds(args):
    return range(args.seed, args.seed + args.repeats)


def label(name):
    return "no normalization" if name == "none" else name


def save(figure, path):
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


def numbers(text, kind=float):
    return [kind(value) for value in text.split(",")]


def parse_arguments():
    parser = common.argument_parser(
        __doc__,
        epochs=4,
        batch_size=32,
        output_dir="runs/study",
        repeats=3,
        momentum=0.9,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: fewer batch sizes, rates, depths and steps",
    )
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument(
        "--min-steps",
        type=int,
        default=240,
        help="the fewest training steps of a run (default: %(default)s)",
    )
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--virtual-batch-size", type=int, default=8)
    parser.add_argument("--batch-sizes", default="2,4,8,16,32,128")
    parser.add_argument(
        "--learning-rates", default="0.003,0.01,0.03,0.1,0.3,1,3,10"
    )
    parser.add_argument("--gradient-depth", type=int, default=20)
    parser.add_argument("--depths", default="2,8,16,32")
    parser.add_argument(
        "--experiments",
        default="batch_size,learning_rate,gradients,depth,statistics",
        help="which to run, comma-separated (default: all)",
    )
    args = parser.parse_args()
    if args.quick:
        defaults = {
            "batch_sizes": ("2,4,8,16,32,128", "4,32"),
            "learning_rates": ("0.003,0.01,0.03,0.1,0.3,1,3,10", "0.01,10"),
            "depths": ("2,8,16,32", "2,4"),
            "min_steps": (240, 60),
            "epochs": (4, 1),
            "train_size": (512, 256),
            "gradient_depth": (20, 16),
        }
        for name, (default, quick) in defaults.items():
            if getattr(args, name) == default:
                setattr(args, name, quick)
    args.batch_sizes = numbers(args.batch_sizes, int)
    args.learning_rates = numbers(args.learning_rates)
    args.depths = numbers(args.depths, int)
    args.experiments = args.experiments.split(",")
    return args


def main():
    args = parse_arguments()
    start = time.perf_counter()
    data = common.load(args)
    train_xy = arrays(data, "train", args.train_size, args.seed)
    test_xy = arrays(data, "test", args.test_size)
    os.makedirs(args.output_dir, exist_ok=True)
    title = (
        f"{data.name}, {len(train_xy[0])} training examples, "
        f"{keras.backend.backend()} backend, {args.repeats} seeds"
    )
    print(title)
    results = {}
    path = os.path.join

    if "batch_size" in args.experiments:
        results["batch_size"] = batch_size_experiment(
            data, train_xy, test_xy, args
        )
    if "learning_rate" in args.experiments:
        results["learning_rate"] = learning_rate_experiment(
            data, train_xy, test_xy, args
        )
    if "gradients" in args.experiments:
        results["gradients"] = gradient_experiment(
            data, train_xy, test_xy, args
        )
    if "depth" in args.experiments:
        results["depth"] = depth_experiment(data, train_xy, test_xy, args)
    if "statistics" in args.experiments:
        results["statistics"] = statistics_report(data, train_xy, args)

    seconds = time.perf_counter() - start
    metrics = path(args.output_dir, "metrics.json")
    with open(metrics, "w") as file:
        json.dump(
            {
                "backend": keras.backend.backend(),
                "keras": keras.__version__,
                "keras_bn": keras_bn.__version__,
                "arguments": vars(args),
                "train_size": len(train_xy[0]),
                "test_size": len(test_xy[0]),
                "seconds": seconds,
                "results": results,
            },
            file,
            indent=1,
            allow_nan=False,
        )
    print(f"wrote {metrics}")

    # The tables last, after the progress lines.
    print(f"\n{title}, {seconds:.0f} s")
    if "batch_size" in results:
        print_batch_size_tables(results["batch_size"], args)
        plot_batch_size(
            path(args.output_dir, "batch_size.png"),
            results["batch_size"],
            args,
            title,
        )
    if "learning_rate" in results:
        print_learning_rate_table(results["learning_rate"], args)
        plot_learning_rate(
            path(args.output_dir, "learning_rate.png"),
            results["learning_rate"],
            args,
            title,
        )
    if "gradients" in results:
        print_gradient_table(results["gradients"])
        plot_gradients(
            path(args.output_dir, "gradients.png"),
            results["gradients"],
            f"{title}, {args.gradient_depth} dense layers",
        )
    if "depth" in results:
        print_depth_table(results["depth"], args)
        plot_depth(
            path(args.output_dir, "depth.png"), results["depth"], args, title
        )
    if "statistics" in results:
        print_statistics_table(results["statistics"], args)


if __name__ == "__main__":
    main()
