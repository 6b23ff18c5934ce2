"""Reference models written once over the array namespace (identical on every backend from the
same seed), with layer taps, and adapters for native torch and JAX models."""

from .adapters import from_jax, from_torch
from .base import LayerInfo, Model
from .convnet import ConvNet
from .mlp import AUTOENCODER_SIZES, MLP, Autoencoder

__all__ = ["AUTOENCODER_SIZES", "MLP", "Autoencoder", "ConvNet", "LayerInfo", "Model",
           "from_jax", "from_torch"]
