"""What the tests need from the backend itself: gradients and compilation.

Each branch runs on its own backend, in that backend's pytest process.
"""

import contextlib
import functools

import keras
import numpy as np


def to_numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def value_and_gradients(fn, *args, compiled=True):
    """The value of the scalar function `fn(*args)` and its gradient with
    respect to each argument, as NumPy arrays.

    On JAX, `compiled` runs it under `jax.jit`, as a training step runs:
    one compilation, where op-by-op gradients compile each of their
    operations for each new shape (seven times slower on the randomized
    tests, which draw a new shape each time)."""
    backend = keras.backend.backend()
    args = [keras.ops.convert_to_tensor(arg) for arg in args]
    if backend == "jax":
        import jax

        transform = jax.value_and_grad(fn, argnums=tuple(range(len(args))))
        if compiled:
            transform = jax.jit(transform)
        value, gradients = transform(*args)
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            value = fn(*args)
        gradients = tape.gradient(value, args)
    elif backend == "torch":
        args = [arg.detach().requires_grad_(True) for arg in args]
        value = fn(*args)
        value.backward()
        value = value.detach()
        gradients = [arg.grad for arg in args]
    else:
        raise NotImplementedError(backend)
    return to_numpy(value), [to_numpy(gradient) for gradient in gradients]


def compile_with_dynamic_batch(fn, example):
    """`fn` compiled as the backend compiles a training step, with the batch
    dimension left unknown where the backend allows it."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec((None,) + tuple(example.shape[1:]), "float32")
        return tf.function(fn, input_signature=[spec], jit_compile=False)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


@functools.cache
def channels_first_conv2d_runs():
    """Whether the backend runs a channels-first 2D convolution here.
    TensorFlow's CPU kernel takes NHWC only, unless oneDNN is on (its
    default only on some CPUs, `TF_ENABLE_ONEDNN_OPTS`); Keras compiles
    channels-first 3D convolutions with XLA, not 2D ones."""
    if keras.backend.backend() != "tensorflow":
        return True
    layer = keras.layers.Conv2D(1, 1, data_format="channels_first")
    try:
        layer(np.zeros((1, 1, 2, 2), "float32"))
    except Exception:  # TensorFlow's UnimplementedError
        return False
    return True


def no_gradients():
    """The context `predict` runs a model in: PyTorch records no gradient
    in it; the other backends record none outside a tape or a transform
    anyway."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


@contextlib.contextmanager
def float64_enabled():
    """Lets the backend compute in float64: JAX needs jax_enable_x64, the
    other backends nothing."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)
