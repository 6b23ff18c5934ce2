"""Waiting for the device, so that a timer stops when the work is done, not when it is queued."""

from __future__ import annotations

from typing import Any

from .. import backends
from .._pytree import flatten


def wait(backend: backends.Backend, tree: Any) -> None:
    """Block until every leaf of ``tree`` has been computed: ``block_until_ready`` on JAX
    arrays, a device synchronisation for CUDA torch tensors and for CuPy arrays (imported only
    here, when such a leaf is present). NumPy and CPU torch results are ready when returned."""
    for leaf in flatten(tree)[0]:
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
        elif backend.name == "torch" and getattr(leaf, "is_cuda", False):
            import torch

            torch.cuda.synchronize()
            return
        elif backend.name == "cupy":
            import cupy

            cupy.cuda.Device().synchronize()
            return
