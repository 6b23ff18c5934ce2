"""Operators composed from others: ``Sum`` (A + B), ``Product`` (A B), ``Scaled`` (alpha A) and
``Adjoint`` (A^T). They are what ``+``, ``@``, ``*`` and ``.T`` on operators return."""

from __future__ import annotations

from typing import Any

from .._pytree import tree_map
from ..errors import MixedBackendError, ShapeError
from ..tree import scale
from .operator import LinearOperator, Tree


def same_backend(operators: tuple[LinearOperator, ...] | list[LinearOperator]) -> None:
    """Raise :class:`MixedBackendError` unless all operators hold arrays of one framework."""
    names = {op.backend.name for op in operators}
    if len(names) > 1:
        raise MixedBackendError(
            f"cannot combine operators of different frameworks ({', '.join(sorted(names))}); "
            "build them from arrays of one framework"
        )


def _add_trees(trees: list[Tree]) -> Tree:
    total = trees[0]
    for t in trees[1:]:
        total = tree_map(lambda a, b: a + b, total, t)
    return total


def _flatten_operands(kind: type, operators: tuple[LinearOperator, ...]) -> list[LinearOperator]:
    """The operands of a ``kind`` (Sum or Product), with nested operators of that kind spliced
    in; raises on no operands or on mixed frameworks."""
    if not operators:
        raise ValueError(f"{kind.__name__} needs at least one operator")
    flat: list[LinearOperator] = []
    for op in operators:
        flat.extend(op.operators if isinstance(op, kind) else [op])
    same_backend(flat)
    return flat


class Sum(LinearOperator):
    """A_1 + A_2 + ... (all with one input and one output structure)."""

    def __init__(self, *operators: LinearOperator):
        flat = _flatten_operands(Sum, operators)
        first = flat[0]
        for op in flat[1:]:
            if op.in_structure != first.in_structure or op.out_structure != first.out_structure:
                raise ShapeError(
                    f"cannot add operators {first!r} and {op!r}: their input and output "
                    "structures differ"
                )
        super().__init__(first.in_structure, first.out_structure, first.backend, first.device)
        self.operators = tuple(flat)

    def _matvec(self, v: Tree) -> Tree:
        return _add_trees([op._matvec(v) for op in self.operators])

    def _rmatvec(self, u: Tree) -> Tree:
        return _add_trees([op._rmatvec(u) for op in self.operators])

    def transpose(self) -> LinearOperator:
        return Sum(*(op.T for op in self.operators))

    def to_dense(self) -> Any:
        total = self.operators[0].to_dense()
        for op in self.operators[1:]:
            total = total + op.to_dense()
        return total

    def diagonal(self) -> Tree:
        self._require_square("diagonal()")
        return _add_trees([op.diagonal() for op in self.operators])


class Product(LinearOperator):
    """A_1 A_2 ... A_n: applies A_n first."""

    def __init__(self, *operators: LinearOperator):
        flat = _flatten_operands(Product, operators)
        for left, right in zip(flat[:-1], flat[1:]):
            if left.in_structure != right.out_structure:
                raise ShapeError(
                    f"cannot compose {left!r} @ {right!r}: the right operator's output "
                    "structure is not the left one's input structure"
                )
        super().__init__(flat[-1].in_structure, flat[0].out_structure, flat[0].backend,
                         flat[0].device)
        self.operators = tuple(flat)

    def _matvec(self, v: Tree) -> Tree:
        for op in reversed(self.operators):
            v = op._matvec(v)
        return v

    def _rmatvec(self, u: Tree) -> Tree:
        for op in self.operators:
            u = op._rmatvec(u)
        return u

    def transpose(self) -> LinearOperator:
        return Product(*(op.T for op in reversed(self.operators)))

    def to_dense(self) -> Any:
        total = self.operators[0].to_dense()
        for op in self.operators[1:]:
            total = total @ op.to_dense()
        return total

    def inv(self) -> LinearOperator:
        return Product(*(op.inv() for op in reversed(self.operators)))


class Scaled(LinearOperator):
    """alpha A for a scalar alpha (a Python number or a 0-d array)."""

    def __init__(self, alpha: Any, operator: LinearOperator):
        if isinstance(operator, Scaled):
            alpha, operator = alpha * operator.alpha, operator.operator
        super().__init__(operator.in_structure, operator.out_structure, operator.backend,
                         operator.device)
        self.alpha = alpha
        self.operator = operator

    def _matvec(self, v: Tree) -> Tree:
        return scale(self.alpha, self.operator._matvec(v))

    def _rmatvec(self, u: Tree) -> Tree:
        return scale(self.alpha, self.operator._rmatvec(u))

    def transpose(self) -> LinearOperator:
        return Scaled(self.alpha, self.operator.T)

    def to_dense(self) -> Any:
        return self.alpha * self.operator.to_dense()

    def diagonal(self) -> Tree:
        return scale(self.alpha, self.operator.diagonal())

    def inv(self) -> LinearOperator:
        return Scaled(1.0 / self.alpha, self.operator.inv())


class Adjoint(LinearOperator):
    """A^T: swaps ``matvec`` and ``rmatvec``."""

    def __init__(self, operator: LinearOperator):
        super().__init__(operator.out_structure, operator.in_structure, operator.backend,
                         operator.device)
        self.operator = operator

    def _matvec(self, v: Tree) -> Tree:
        return self.operator._rmatvec(v)

    def _rmatvec(self, u: Tree) -> Tree:
        return self.operator._matvec(u)

    def transpose(self) -> LinearOperator:
        return self.operator

    def to_dense(self) -> Any:
        return self.xp.linalg.matrix_transpose(self.operator.to_dense())

    def diagonal(self) -> Tree:
        return self.operator.diagonal()

    def inv(self) -> LinearOperator:
        return Adjoint(self.operator.inv())
