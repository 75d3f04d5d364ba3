"""Data loading and reporting shared by the examples in this folder.

The example scripts import this module, which sits next to them (`python
examples/compare.py` puts `examples/` on the import path): copy it along
with the script you take.

Datasets:

- `digits` (the default): scikit-learn's bundled 8×8 handwritten digits,
  1797 images, offline. Pixel values are scaled to [0, 1]. The split into
  train (1149), validation (288) and test (360) is stratified and fixed,
  whatever `--seed` says.
- `breast_cancer`, `wine`: scikit-learn's bundled tables, each feature
  standardized with the training split's mean and standard deviation.
- Any image classification dataset of tensorflow-datasets with `train` and
  `test` splits (`mnist`, `fashion_mnist`, `cifar10`, ...), loaded with
  `tfds.load` into `--data-dir` and streamed through `tf.data` into `fit`
  on every backend; the last 10% of `train` is the validation split. Images
  are scaled to [0, 1], channels last. This needs `tensorflow-datasets` and
  TensorFlow, whatever the Keras backend.
"""

import argparse
import json
import math
import os
import time

import keras
import numpy as np

IMAGE_DATASETS = ("digits",)
TABULAR_DATASETS = ("breast_cancer", "wine")
TFDS_SPLITS = {
    "train": "train[:90%]",
    "validation": "train[90%:]",
    "test": "test",
}


def argument_parser(
    description,
    epochs,
    batch_size,
    output_dir,
    repeats=None,
    dataset="digits",
    momentum=0.9,
):
    """A parser of the flags every example has, and `--repeats` if
    `repeats`, whose help starts with `description` as written."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bundled = ", ".join(IMAGE_DATASETS + TABULAR_DATASETS)
    parser.add_argument(
        "--dataset",
        default=dataset,
        help=f"{bundled} (bundled with scikit-learn; tables only where the "
        "model takes them), or a tensorflow-datasets image dataset: mnist, "
        "fashion_mnist, cifar10, ... (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        help="tensorflow-datasets data directory (default: "
        "~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        help="use at most this many examples of each split (quick trials)",
    )
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument(
        "--momentum",
        type=float,
        default=momentum,
        help="momentum of the batch-norm moving statistics "
        "(default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights and the order of the batches "
        "(default: %(default)s)",
    )
    if repeats is not None:
        parser.add_argument(
            "--repeats",
            type=int,
            default=repeats,
            help="runs of each setting, with seeds --seed, --seed + 1, ...; "
            "the results are their averages (default: %(default)s)",
        )
    parser.add_argument("--output-dir", default=output_dir)
    return parser


class Data:
    """A dataset split into train, validation and test.

    Each split is a pair of NumPy arrays `(x, y)` or an unbatched
    `tf.data.Dataset` of `(x, y)`; `batches` turns one into what `fit`,
    `evaluate` and `keras_bn.recalibrate` take.
    """

    def __init__(self, name, splits, input_shape, num_classes):
        self.name = name
        self.splits = splits
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

    def batches(self, split, batch_size, shuffle=False, seed=0):
        """The split in batches, reshuffled every epoch if `shuffle`."""
        data = self.splits[split]
        if isinstance(data, tuple):
            return ArrayBatches(*data, batch_size, shuffle, seed)
        import tensorflow as tf

        if shuffle:
            data = data.shuffle(10_000, seed=seed)
        return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class ArrayBatches(keras.utils.PyDataset):
    """Batches of NumPy arrays, in an order that depends only on `seed`:
    the same batches on every backend."""

    def __init__(self, x, y, batch_size, shuffle=False, seed=0):
        super().__init__()
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(x))
        self.on_epoch_end()

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        if index >= len(self):
            raise IndexError(index)
        batch = self.order[
            index * self.batch_size : (index + 1) * self.batch_size
        ]
        return self.x[batch], self.y[batch]

    def on_epoch_end(self):
        if self.shuffle:
            self.rng.shuffle(self.order)


def load(args, tabular=False):
    """Loads `args.dataset` (tables too if `tabular`), at most `args.limit`
    examples per split."""
    if args.dataset in TABULAR_DATASETS and not tabular:
        raise SystemExit(
            f"--dataset {args.dataset} is a table, and this example's model "
            f"takes images: use {', '.join(IMAGE_DATASETS)} or an image "
            "dataset of tensorflow-datasets"
        )
    if args.dataset in IMAGE_DATASETS + TABULAR_DATASETS:
        return _scikit_learn(args.dataset, args.limit)
    return _tensorflow_datasets(args.dataset, args.data_dir, args.limit)


def _scikit_learn(name, limit):
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    x = x.astype("float32")
    y = y.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_train, y_train, test_size=0.2, stratify=y_train, random_state=0
    )
    if name == "digits":
        shift, scale = 0.0, 16.0  # pixel values are 0..16
        shape = (8, 8, 1)
    else:
        shift, scale = x_train.mean(0), x_train.std(0)
        shape = x.shape[1:]
    splits = {
        split: (((x - shift) / scale).reshape((-1, *shape))[:limit], y[:limit])
        for split, x, y in (
            ("train", x_train, y_train),
            ("validation", x_val, y_val),
            ("test", x_test, y_test),
        )
    }
    return Data(name, splits, shape, int(y.max()) + 1)


def _tensorflow_datasets(name, data_dir, limit):
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise SystemExit(
            f"--dataset {name} reads tensorflow-datasets, which needs "
            "TensorFlow whatever the Keras backend: pip install "
            f"tensorflow-datasets tensorflow-cpu ({error})"
        ) from None
    try:
        datasets, info = tfds.load(
            name,
            split=list(TFDS_SPLITS.values()),
            data_dir=data_dir,
            as_supervised=True,
            with_info=True,
        )
    except tfds.core.DatasetNotFoundError:
        raise SystemExit(
            f"--dataset {name}: no such dataset in tensorflow-datasets; use "
            f"{', '.join(IMAGE_DATASETS)} or a name from "
            "https://www.tensorflow.org/datasets/catalog"
        ) from None
    except Exception as error:
        directory = data_dir or os.path.join("~", "tensorflow_datasets")
        raise SystemExit(
            f"Could not load {name!r} from {directory} or download it "
            f"({type(error).__name__}: {error}).\n"
            "On a machine with internet access, run\n"
            f'    python -c "import tensorflow_datasets as tfds; '
            f"tfds.load('{name}', data_dir='DIR')\"\n"
            "then copy DIR here and pass --data-dir DIR."
        ) from None
    image, label = info.supervised_keys

    def prepare(x, y):
        scale = 255.0 if x.dtype == tf.uint8 else 1.0
        return tf.cast(x, "float32") / scale, tf.cast(y, "int32")

    splits = {}
    for split, dataset in zip(TFDS_SPLITS, datasets, strict=True):
        if limit:
            dataset = dataset.take(limit)
        # Decoded once, kept in memory as uint8, scaled on the fly.
        splits[split] = dataset.cache().map(
            prepare, num_parallel_calls=tf.data.AUTOTUNE
        )
    shape = info.features[image].shape
    return Data(name, splits, shape, info.features[label].num_classes)


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each epoch (training and validation)."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def fit_and_evaluate(model, optimizer, data, args, decay=True, **overrides):
    """Compiles `model` for classification with `optimizer`, trains it with
    Keras's progress bar for `args.epochs` in batches of `args.batch_size`
    shuffled with `args.seed` (each overridden by a keyword argument of the
    same name, as `callbacks` adds callbacks), then evaluates it on the test
    split. With `decay`, the learning rate falls from its initial value to
    zero along a cosine, one step per epoch.

    Returns the test metrics, the median time per epoch and the history.
    """
    settings = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "callbacks": (),
        **overrides,
    }
    epochs, batch_size = settings["epochs"], settings["batch_size"]
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    callbacks = [timer, *settings["callbacks"]]
    if decay:
        initial = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        callbacks.append(
            keras.callbacks.LearningRateScheduler(
                lambda epoch: (
                    initial * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
                )
            )
        )
    history = model.fit(
        data.batches("train", batch_size, shuffle=True, seed=settings["seed"]),
        validation_data=data.batches("validation", batch_size),
        epochs=epochs,
        # The batches come shuffled; `fit` cannot shuffle tf.data anyway.
        shuffle=False,
        callbacks=callbacks,
    )
    return {
        **evaluate(model, data),
        "seconds_per_epoch": float(np.median(timer.seconds)),
        "history": {
            key: [float(value) for value in values]
            for key, values in history.history.items()
        },
    }


def repeat(run, repeats, seed):
    """Calls `run(seed)` (which returns what `fit_and_evaluate` does) for
    `repeats` seeds from `seed` on, and averages the results: the test
    metrics, the time per epoch and the curves, with the standard deviation
    of the test accuracy and the runs themselves."""
    results = []
    for index in range(repeats):
        if repeats > 1:
            print(f"repeat {index + 1} of {repeats}, seed {seed + index}")
        keras.utils.set_random_seed(seed + index)
        results.append(run(seed + index))
    averaged = {
        key: float(np.mean([result[key] for result in results]))
        for key in ("test_accuracy", "test_loss", "seconds_per_epoch")
    }
    averaged["test_accuracy_std"] = float(
        np.std([result["test_accuracy"] for result in results])
    )
    averaged["history"] = {
        key: np.mean(
            [result["history"][key] for result in results], axis=0
        ).tolist()
        for key in results[0]["history"]
    }
    averaged["repeats"] = results
    return averaged


def evaluate(model, data):
    """Test loss and accuracy."""
    results = model.evaluate(
        data.batches("test", 256), verbose=0, return_dict=True
    )
    return {
        "test_accuracy": float(results["accuracy"]),
        "test_loss": float(results["loss"]),
    }


def report(args, data, results, name_header, extra_columns=(), summary=""):
    """Prints `results` as a Markdown table (test accuracy, its standard
    deviation over repeats if any, test loss, `extra_columns`, time per
    epoch) and writes `metrics.json` and `curves.png` into
    `args.output_dir`."""
    title = f"{data.name}, {keras.backend.backend()} backend"
    print(f"\n{title}{summary}")
    columns = [(name_header, "name"), ("test accuracy", "test_accuracy", ".4f")]
    if "test_accuracy_std" in results[0]:
        columns.append(("± std", "test_accuracy_std", ".4f"))
    columns += [
        ("test loss", "test_loss", ".4f"),
        *extra_columns,
        ("s / epoch", "seconds_per_epoch", ".3f"),
    ]
    print_table(results, columns)
    write_metrics(args.output_dir, args, results)
    plot_curves(os.path.join(args.output_dir, "curves.png"), results, title)


def print_table(rows, columns):
    """Prints `rows` (dicts) as a Markdown table of `columns`: pairs of a
    header and a key, or a header, a key and a format."""
    print("\n| " + " | ".join(column[0] for column in columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        cells = []
        for _, key, *form in columns:
            value = row[key]
            if value is None:
                cells.append("n/a")
            else:
                cells.append(format(value, form[0]) if form else str(value))
        print("| " + " | ".join(cells) + " |")
    print()


def write_metrics(output_dir, args, results):
    """Writes `metrics.json`: the arguments, the backend and the results."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "metrics.json")
    with open(path, "w") as file:
        json.dump(
            {
                "backend": keras.backend.backend(),
                "keras": keras.__version__,
                "arguments": vars(args),
                "results": results,
            },
            file,
            indent=2,
        )
    print(f"wrote {path}")


def plot_curves(path, results, title):
    """Draws loss and accuracy per epoch, training (solid) and validation
    (dashed), one colour per entry of `results`; the first entries are
    drawn wider, so that curves which coincide stay visible."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    handles = []
    for index, result in enumerate(results):
        history = result["history"]
        epochs = np.arange(1, len(history["loss"]) + 1)
        width = 1.2 * (len(results) - index)
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
            for prefix, style in (("", "-"), ("val_", "--")):
                ax.plot(
                    epochs,
                    history[prefix + metric],
                    style,
                    color=f"C{index}",
                    linewidth=width,
                    alpha=0.8,
                )
        handles.append(
            Line2D([], [], color=f"C{index}", lw=width, label=result["name"])
        )
    handles += [
        Line2D([], [], color="gray", linestyle="-", label="training"),
        Line2D([], [], color="gray", linestyle="--", label="validation"),
    ]
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(handles=handles, fontsize="small", loc="lower right")
    figure.suptitle(title)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")
