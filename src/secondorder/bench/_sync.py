"""Waiting for the device, so that a timer stops when the work is done, not when it is queued."""

from __future__ import annotations

from typing import Any

from .. import backends


def wait(backend: backends.Backend, tree: Any) -> None:
    """Block until every leaf of ``tree`` has been computed (``backend.synchronize``:
    ``block_until_ready`` on JAX arrays, a device synchronisation for CUDA torch tensors and for
    CuPy arrays). NumPy and CPU torch results are ready when returned."""
    backend.synchronize(tree)
