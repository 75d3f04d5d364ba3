"""Synchronized statistics: the one place where backends differ.

The layer reduces a batch to sums; with `synchronized=True` those sums are
added up over every replica before they are used.

- TensorFlow: inside a `tf.distribute` replica context, an all-reduce over
  the replicas (Keras's meaning of `synchronized`).
- JAX: `keras.distribution` runs the step on global, sharded arrays, so a sum
  over the batch axis already covers every device; nothing to add.
- PyTorch: Keras has no data-parallel path of its own. A single process sees
  the whole batch, so nothing to add; a `torch.distributed` job with several
  processes would silently normalize per process, so it is refused.
"""

import keras


def replica_sum_fn(synchronized):
    """Returns the function that sums a statistic over replicas, or `None`
    when the backend already sees the global batch."""
    if not synchronized:
        return None
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_replica_sum
    if backend == "torch":
        _check_single_torch_process()
    return None


def _tensorflow_replica_sum(value):
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _check_single_torch_process():
    import torch.distributed

    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise ValueError(
            "`synchronized=True` is not supported in a torch.distributed job "
            "with several processes on the PyTorch backend: each process "
            "would normalize with its own statistics. Received: "
            f"synchronized=True, world_size="
            f"{torch.distributed.get_world_size()}"
        )
