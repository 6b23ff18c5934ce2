"""Structural questions about operators, answered per class by ``functools.singledispatch``.

``is_symmetric(op)`` is True when the operator is known to equal its adjoint. Classes register an
answer here instead of carrying flags; an operator of unknown kind is not assumed symmetric.
"""

from __future__ import annotations

from functools import singledispatch

from .block import BlockDiagonal
from .composite import Adjoint, Product, Scaled, Sum
from .dense import Dense
from .diagonal import Diagonal, ScaledIdentity
from .kronecker import Kronecker, KroneckerEigen
from .lowrank import LowRank
from .operator import FunctionOperator, LinearOperator


@singledispatch
def is_symmetric(op: LinearOperator) -> bool:
    """Whether ``op`` is known to be symmetric (A = A^T)."""
    return False


@is_symmetric.register(Dense)
@is_symmetric.register(FunctionOperator)
@is_symmetric.register(Kronecker)
def _(op: Dense | FunctionOperator | Kronecker) -> bool:
    return op.symmetric


@is_symmetric.register(Diagonal)
@is_symmetric.register(ScaledIdentity)
@is_symmetric.register(KroneckerEigen)
def _(op: LinearOperator) -> bool:
    return True


@is_symmetric.register
def _(op: Sum) -> bool:
    return all(is_symmetric(o) for o in op.operators)


@is_symmetric.register
def _(op: Scaled) -> bool:
    return is_symmetric(op.operator)


@is_symmetric.register
def _(op: Adjoint) -> bool:
    return is_symmetric(op.operator)


@is_symmetric.register
def _(op: BlockDiagonal) -> bool:
    return all(is_symmetric(b) for b in op.blocks)


@is_symmetric.register
def _(op: LowRank) -> bool:
    return op.symmetric_update and op.c is None and (op.base is None or is_symmetric(op.base))


@is_symmetric.register
def _(op: Product) -> bool:
    return len(op.operators) == 1 and is_symmetric(op.operators[0])
