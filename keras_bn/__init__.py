"""keras-bn: a drop-in, backend-agnostic batch normalization for Keras 3."""

from keras_bn._batch_normalization import BatchNormalization

__version__ = "0.1.0"

__all__ = ["BatchNormalization"]
