"""Where a warning points: the user's line, not the library's or a framework's."""

from __future__ import annotations

import sys

#: top-level packages whose frames are never the user's line
INTERNAL = frozenset({"secondorder", "optax", "jax", "jaxlib", "flax", "equinox", "torch"})


def caller_level() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function name the first
    frame outside :data:`INTERNAL` (a user's ``opt.init(params)``, jitted step or training
    loop), however many of the library's wrappers and the frameworks' tracing frames lie
    between."""
    frame, level = sys._getframe(1), 1  # noqa: SLF001 - no public way to walk the stack
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
            INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
