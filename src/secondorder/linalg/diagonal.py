"""Diagonal operators: ``Diagonal`` (entries given as a tree), ``ScaledIdentity`` (c I) and
``Identity``. Inverses and powers are entrywise."""

from __future__ import annotations

import numbers
from typing import Any

from .._pytree import flatten, tree_map
from ..errors import NotPositiveDefiniteError
from ..tree import scale
from .operator import LinearOperator, Tree, placement
from .structure import Structure


class Diagonal(LinearOperator):
    """diag(d) with ``d`` a tree (or array): (diag(d) v)_i = d_i v_i leaf by leaf."""

    def __init__(self, d: Tree):
        backend, device = placement(d)
        s = Structure.of(d)
        super().__init__(s, s, backend, device)
        self.d = d

    def _matvec(self, v: Tree) -> Tree:
        return tree_map(lambda a, b: a * b, self.d, v)

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self

    def matmat(self, mat: Any) -> Any:
        return self.in_structure.ravel(self.d, self.xp)[:, None] * mat

    def to_dense(self) -> Any:
        xp = self.xp
        flat = self.in_structure.ravel(self.d, xp)
        n = flat.shape[0]
        return xp.eye(n, dtype=flat.dtype, device=self.device) * flat[None, :]

    def diagonal(self) -> Tree:
        return self.d

    def inv(self) -> LinearOperator:
        """diag(1 / d); :class:`~secondorder.errors.NotPositiveDefiniteError` when an entry is 0
        or not finite (checked for concrete arrays; inside ``jax.jit`` the entry becomes inf)."""
        xp, backend = self.xp, self.backend
        for a in flatten(self.d)[0]:
            if not backend.is_concrete(a):
                continue
            usable = xp.all(xp.isfinite(a) & (a != 0))  # traced when a is closed over in jit
            if backend.is_concrete(usable) and not bool(usable):
                raise NotPositiveDefiniteError(
                    "Diagonal.inv(): the diagonal has a zero, NaN or inf entry, so it is singular; "
                    "add damping (Diagonal(d + damping)) or check the curvature estimate"
                )
        return Diagonal(tree_map(lambda a: 1.0 / a, self.d))

    def power(self, p: float) -> LinearOperator:
        """diag(d)^p entrywise (d >= 0 for fractional p);
        :class:`~secondorder.errors.NotPositiveDefiniteError` when an entry of a concrete d is
        NaN or inf, or its power is not finite (0 to a negative power, a negative entry to a
        fractional one), instead of an operator holding inf or NaN."""
        xp, backend = self.xp, self.backend
        out = tree_map(lambda a: a**p, self.d)
        for a, b in zip(flatten(self.d)[0], flatten(out)[0]):
            if backend.is_concrete(b) and not bool(xp.all(xp.isfinite(a) & xp.isfinite(b))):
                raise NotPositiveDefiniteError(
                    f"Diagonal.power({p}): the diagonal has an entry that is NaN, inf, or whose "
                    f"power is not finite (0 to a negative power, a negative entry to a "
                    "fractional one); add damping (Diagonal(d + damping)) or check the estimate"
                )
        return Diagonal(out)


class ScaledIdentity(LinearOperator):
    """c I on the space of ``like`` (a tree or array giving the structure), c a scalar."""

    def __init__(self, scale: Any, like: Tree):
        backend, device = placement(like)
        s = Structure.of(like)
        super().__init__(s, s, backend, device)
        self.scale = scale
        self.like = like

    def _matvec(self, v: Tree) -> Tree:
        return scale(self.scale, v)

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self

    def matmat(self, mat: Any) -> Any:
        return self.scale * mat

    def to_dense(self) -> Any:
        n = self.in_structure.size
        return self.scale * self.xp.eye(n, dtype=self.dtype, device=self.device)

    def diagonal(self) -> Tree:
        return tree_map(lambda a: self.scale * self.xp.ones_like(a), self.like)

    def inv(self) -> LinearOperator:
        """(1 / c) I; :class:`~secondorder.errors.NotPositiveDefiniteError` for a number c that
        is 0 or not finite."""
        c = self.scale
        if isinstance(c, numbers.Real) and not (c != 0 and abs(c) < float("inf")):
            raise NotPositiveDefiniteError(f"ScaledIdentity.inv(): the scale {c!r} is singular")
        return ScaledIdentity(1.0 / self.scale, self.like)

    def power(self, p: float) -> LinearOperator:
        return ScaledIdentity(self.scale**p, self.like)


class Identity(ScaledIdentity):
    """I on the space of ``like``."""

    def __init__(self, like: Tree):
        super().__init__(1.0, like)

    def _matvec(self, v: Tree) -> Tree:
        return v

    _rmatvec = _matvec

    def inv(self) -> LinearOperator:
        return self

