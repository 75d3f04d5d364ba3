"""Rematerialization: a training call that runs twice in one step.

Under `keras.RematScope` or `keras.remat`, Keras's PyTorch backend wraps a
call in `torch.utils.checkpoint`, which runs it once in the forward pass
and again in the backward pass, to recompute the activations it did not
keep (once more for each enclosing rematerialized layer, such as the
model itself). A batch norm's training call also updates its moving
statistics, which must happen once, and its renorm corrections read
statistics that the first run has updated already.
"""

import weakref

import keras
from keras import ops

# What each layer's last call read, for its recomputations.
_reads = weakref.WeakKeyDictionary()


def recomputing():
    """Whether this call recomputes one that has run already: on PyTorch,
    a call made during a backward pass (as PyTorch's own module tracker
    and FSDP tell it). Under `torch.compile`, remat is part of the traced
    graph and the call runs once."""
    if not _eager_torch():
        return False
    import torch

    return torch._C._current_graph_task_id() != -1


def read_once(layer, variables):
    """The values of `variables` as the step's first run of `layer`'s call
    read them: read now, or, in a recomputation, the values read then.

    Only eager PyTorch keeps them (copies: its variables are updated in
    place); elsewhere a call is not run again."""
    if recomputing():
        return _reads[layer]
    values = [ops.convert_to_tensor(variable) for variable in variables]
    if _eager_torch():
        _reads[layer] = [ops.copy(value) for value in values]
    return values


def _eager_torch():
    if keras.backend.backend() != "torch":
        return False
    import torch

    return not torch.compiler.is_compiling()
