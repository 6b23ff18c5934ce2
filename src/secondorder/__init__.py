"""secondorder: second-order optimisation for deep learning, one source on NumPy, CuPy, PyTorch
and JAX.

    import secondorder
    secondorder.use("jax")                 # or: with secondorder.use("torch"): ...
    secondorder.backends.available()       # what is installed and what each backend can do
"""

from . import backends, checkpoint, errors, linalg, tree
from .backends import backend_of, namespace, use

__version__ = "0.1.0"

__all__ = ["__version__", "backend_of", "backends", "checkpoint", "errors", "linalg", "namespace",
           "tree", "use"]
