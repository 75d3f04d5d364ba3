"""keras-bn: a drop-in, backend-agnostic batch normalization for Keras 3."""

from keras_bn import callbacks
from keras_bn._batch_normalization import BatchNormalization
from keras_bn._from_torch import from_torch
from keras_bn._model_tools import convert
from keras_bn._model_tools import fold
from keras_bn._model_tools import revert
from keras_bn._recalibrate import recalibrate

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "callbacks",
    "convert",
    "fold",
    "from_torch",
    "recalibrate",
    "revert",
]
