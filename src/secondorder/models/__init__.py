"""Reference models written once over the array namespace (identical on every backend from the
same seed), with layer taps, and adapters for native torch, JAX, flax (linen, nnx) and equinox
models."""

from .adapters import from_jax, from_torch
from .base import LayerInfo, Model, unless_rejected
from .conv1d import Conv1DNet
from .convnet import ConvNet
from .equinox import EquinoxInputs, EquinoxModel, from_equinox
from .flax import FlaxInputs, FlaxModel, from_flax
from .mlp import AUTOENCODER_SIZES, MLP, Autoencoder
from .nnx import NnxInputs, NnxModel, from_nnx

__all__ = ["AUTOENCODER_SIZES", "MLP", "Autoencoder", "Conv1DNet", "ConvNet", "EquinoxInputs",
           "EquinoxModel", "FlaxInputs", "FlaxModel", "LayerInfo", "Model", "NnxInputs",
           "NnxModel", "from_equinox", "from_flax", "from_jax", "from_nnx", "from_torch",
           "unless_rejected"]
