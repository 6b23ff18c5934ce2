"""Kronecker products A_1 (x) ... (x) A_k applied without forming the product.

Convention (row-major; C. F. Van Loan, "The ubiquitous Kronecker product", J. Comput. Appl. Math.
123, 2000): the operator acts on a tensor X of
shape (n_1, ..., n_k) by mode products,

    (A_1 (x) ... (x) A_k) vec~(X) = vec~(X x_1 A_1 x_2 ... x_k A_k),

so for k = 2, (A (x) B) vec~(X) = vec~(A X B^T). In the column-major convention of K-FAC,
(A (x) G) vec(V) = vec(G V A^T): that is ``Kronecker(A, G)`` applied to V^T. Each mode product
is one ``tensordot`` contracting the leading axis, which cycles the axes back into place after k
steps. Inverses, damped inverses and powers distribute over the factors:
(A (x) B)^{-1} = A^{-1} (x) B^{-1} and (A (x) B)^s = A^s (x) B^s for symmetric PSD factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import NotPositiveDefiniteError, ShapeError
from . import matrix_function as mf
from .operator import LinearOperator, Tree, placement
from .structure import Structure


def mode_products(x: Any, factors: Sequence[Any], xp: Any, *, transpose: bool = False) -> Any:
    """X x_1 U_1 ... x_k U_k (or with every U_i^T when ``transpose``) for a k-way tensor X.

    A matrix (k = 2) takes two matrix products, U_1 X U_2^T (U_1^T X U_2): torch's
    ``tensordot`` copies its operands into a contracted layout first (about 5% of an eager
    K-FAC step on a 784-256-10 MLP)."""
    if len(factors) == 2 and getattr(x, "ndim", None) == 2:
        first, second = factors
        if transpose:
            return xp.matmul(xp.matmul(xp.matrix_transpose(first), x), second)
        return xp.matmul(xp.matmul(first, x), xp.matrix_transpose(second))
    axis = 0 if transpose else 1
    for u in factors:
        x = xp.tensordot(x, u, axes=((0,), (axis,)))
    return x


def kron(a: Any, b: Any, xp: Any) -> Any:
    """The dense Kronecker product of two matrices (tests and small systems only)."""
    (ma, na), (mb, nb) = a.shape, b.shape
    return xp.reshape(a[:, None, :, None] * b[None, :, None, :], (ma * mb, na * nb))


def _kron_all(matrices: Sequence[Any], xp: Any) -> Any:
    """The dense Kronecker product M_1 (x) ... (x) M_k, folded from the left."""
    out = matrices[0]
    for m in matrices[1:]:
        out = kron(out, m, xp)
    return out


def _outer(vectors: Sequence[Any], xp: Any) -> Any:
    """The k-way tensor T[i_1..i_k] = v_1[i_1] ... v_k[i_k]."""
    k = len(vectors)
    out = None
    for i, v in enumerate(vectors):
        shape = [1] * k
        shape[i] = v.shape[0]
        term = xp.reshape(v, tuple(shape))
        out = term if out is None else out * term
    return out


class _KroneckerBase(LinearOperator):
    """Shared plumbing: the tensor shape of inputs and outputs, flat or tensor-shaped vectors."""

    def __init__(self, in_dims: tuple[int, ...], out_dims: tuple[int, ...], dtype: Any,
                 arrays: Sequence[Any], flat: bool):
        self.in_dims, self.out_dims, self.flat = in_dims, out_dims, flat
        in_shape = (math.prod(in_dims),) if flat else in_dims
        out_shape = (math.prod(out_dims),) if flat else out_dims
        super().__init__(Structure.array(in_shape, dtype), Structure.array(out_shape, dtype),
                         *placement(list(arrays)))

    def _as_tensor(self, v: Any, dims: tuple[int, ...]) -> Any:
        return self.xp.reshape(v, dims) if self.flat else v

    def _as_output(self, x: Any, shape: Structure) -> Any:
        return self.xp.reshape(x, shape.shapes[0]) if self.flat else x


class Kronecker(_KroneckerBase):
    """A_1 (x) ... (x) A_k for k >= 1 matrices A_i of shape (m_i, n_i).

    Vectors are tensors of shape (n_1, ..., n_k), or flat vectors of length prod n_i (row-major)
    with ``flat=True``.
    """

    def __init__(self, *factors: Any, flat: bool = False, symmetric: bool = False):
        if not factors:
            raise ValueError("Kronecker needs at least one factor")
        for i, f in enumerate(factors):
            if getattr(f, "ndim", None) != 2:
                raise ShapeError(
                    f"Kronecker factor {i} must be a matrix, got shape {getattr(f, 'shape', ())}"
                )
        self.factors = tuple(factors)
        self.symmetric = symmetric
        super().__init__(
            tuple(f.shape[1] for f in factors),
            tuple(f.shape[0] for f in factors),
            factors[0].dtype,
            factors,
            flat,
        )

    def _matvec(self, v: Tree) -> Tree:
        x = mode_products(self._as_tensor(v, self.in_dims), self.factors, self.xp)
        return self._as_output(x, self.out_structure)

    def _rmatvec(self, u: Tree) -> Tree:
        x = mode_products(self._as_tensor(u, self.out_dims), self.factors, self.xp, transpose=True)
        return self._as_output(x, self.in_structure)

    def transpose(self) -> LinearOperator:
        return self._map(self.xp.linalg.matrix_transpose)

    def to_dense(self) -> Any:
        return _kron_all(self.factors, self.xp)

    def diagonal(self) -> Tree:
        self._require_square("diagonal()")
        xp = self.xp
        d = _outer([xp.linalg.diagonal(f) for f in self.factors], xp)
        return self._as_output(d, self.in_structure)

    def _map(self, fn: Any, symmetric: bool | None = None) -> Kronecker:
        symmetric = self.symmetric if symmetric is None else symmetric
        return Kronecker(*(fn(f) for f in self.factors), flat=self.flat, symmetric=symmetric)

    def inv(self) -> LinearOperator:
        """(A_1 (x) ... (x) A_k)^{-1} = A_1^{-1} (x) ... (x) A_k^{-1};
        :class:`~secondorder.errors.NotPositiveDefiniteError` for a singular factor."""
        self._require_square("inv()")
        return self._map(lambda f: mf.checked_inv(f, "Kronecker.inv()"))

    def power(self, s: float) -> Kronecker:
        """(A_1 (x) ... (x) A_k)^s = A_1^s (x) ... (x) A_k^s for symmetric PSD factors."""
        self._require_square("power()")
        return self._map(lambda f: mf.matrix_power(f, s), symmetric=True)

    def factor_dampings(self, damping: Any, method: str = "pi") -> list[Any]:
        """How a damping lambda is split over the factors for a factored damped inverse.

        ``"equal"``: every factor gets lambda^{1/k}. ``"pi"``: factor i gets pi_i lambda^{1/k}
        with pi_i = t_i / (prod_j t_j)^{1/k}, t_i = tr(A_i) / dim(A_i), so prod pi_i = 1; for
        k = 2 this is K-FAC's pi = sqrt((tr(A)/dim A) / (tr(G)/dim G)) (Martens and Grosse,
        ICML 2015, section 6.3). Where a trace is not positive (a zero factor, NaN statistics)
        the split is ``"equal"``; the damped inverse then reports such a factor.
        """
        xp = self.xp
        k = len(self.factors)
        base = damping ** (1.0 / k)
        if method == "equal":
            return [base] * k
        if method != "pi":
            raise ValueError(f"unknown damping split {method!r}: use 'pi', 'equal' or 'exact'")
        traces = [xp.sum(xp.linalg.diagonal(f)) / f.shape[0] for f in self.factors]
        # where a trace is not > 0 (a zero factor, NaN statistics) the split is undefined: fall
        # back to "equal", as curvature.blocks.split_damping does. Without this it was NaN, so
        # damping 0 became a NaN damping (numpy: HyperparameterError naming a damping of nan)
        positive = None
        for t in traces:
            pos = t > 0
            positive = pos if positive is None else xp.logical_and(positive, pos)
        traces = [xp.where(positive, t, xp.ones_like(t)) for t in traces]
        log_mean = sum(xp.log(t) for t in traces) / k
        return [base * xp.exp(xp.log(t) - log_mean) for t in traces]

    def damped_inverse(self, damping: Any, method: str = "pi") -> LinearOperator:
        """An inverse of the damped operator A_1 (x) ... (x) A_k + lambda I.

        ``method="exact"`` is exact, through the factors' eigendecompositions
        (:class:`KroneckerEigen`). ``"pi"`` and ``"equal"`` distribute the damping over the
        factors, (A_1 + d_1 I)^{-1} (x) ... (x) (A_k + d_k I)^{-1} with d_i from
        :meth:`factor_dampings`, the approximation K-FAC uses.

        A damping given as a number must be finite and >= 0
        (:class:`~secondorder.errors.HyperparameterError`); an operator that is singular or
        indefinite once damped raises :class:`~secondorder.errors.NotPositiveDefiniteError`
        (with zero damping: any singular factor), outside ``jax.jit``; inside it the inverse
        holds inf or NaN.
        """
        self._require_square("damped_inverse()")
        mf._check_damping(damping, "Kronecker.damped_inverse")
        if method == "exact":
            return self.eigendecomposition().shifted(damping).power(-1.0)
        dampings = self.factor_dampings(damping, method)
        return Kronecker(
            *(mf.damped_inverse(f, d) for f, d in zip(self.factors, dampings)),
            flat=self.flat,
            symmetric=True,
        )

    def eigendecomposition(self) -> KroneckerEigen:
        """The operator as (Q_1 (x) ... (x) Q_k) diag(w_1 (x) ... (x) w_k) (Q_1 (x) ...)^T."""
        self._require_square("eigendecomposition()")
        pairs = [mf.eigh(f) for f in self.factors]
        return KroneckerEigen([q for _, q in pairs], [w for w, _ in pairs], flat=self.flat)


def _check_positive(spectrum: Any, backend: Any) -> None:
    """NotPositiveDefiniteError when a (concrete) spectrum to be raised to a negative power has
    an eigenvalue at or below n eps max |eigenvalue| (singular or indefinite), or a NaN."""
    xp = backend.xp
    if not backend.is_concrete(spectrum):
        return
    floor = math.prod(spectrum.shape) * xp.finfo(spectrum.dtype).eps * xp.max(xp.abs(spectrum))
    if not bool(xp.all(spectrum > floor)):
        raise NotPositiveDefiniteError(
            "a negative power of a Kronecker product that is singular or indefinite once "
            "damped (an eigenvalue is <= 0 to working precision, or NaN): add damping > 0 or "
            "check the factors"
        )


class KroneckerEigen(_KroneckerBase):
    """Q (D + shift)^s Q^T, Q = Q_1 (x) ... (x) Q_k orthogonal, D = diag(w_1 (x) ... (x) w_k).

    This is what a symmetric Kronecker operator becomes after eigendecomposing its factors; it
    gives exact damped inverses and powers of the whole product, (A (x) B + lambda I)^s, which do
    not factor over A and B.
    """

    def __init__(self, vectors: Sequence[Any], values: Sequence[Any], *, shift: Any = 0.0,
                 exponent: float = 1.0, flat: bool = False):
        self.vectors, self.values = tuple(vectors), tuple(values)
        self.shift, self.exponent = shift, exponent
        dims = tuple(q.shape[0] for q in vectors)
        super().__init__(dims, dims, vectors[0].dtype, vectors, flat)
        # computed once: values, shift and exponent never change (``_with`` builds a new operator)
        base = _outer(self.values, self.xp) + self.shift
        if exponent < 0:
            _check_positive(base, self.backend)
        self._spectrum = base ** self.exponent

    def spectrum(self) -> Any:
        """The eigenvalues (outer product of the factors' values + shift)^s as a k-way tensor."""
        return self._spectrum

    def _matvec(self, v: Tree) -> Tree:
        xp = self.xp
        z = mode_products(self._as_tensor(v, self.in_dims), self.vectors, xp, transpose=True)
        x = mode_products(z * self._spectrum, self.vectors, xp)
        return self._as_output(x, self.out_structure)

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self

    def to_dense(self) -> Any:
        xp = self.xp
        q = _kron_all(self.vectors, xp)
        lam = xp.reshape(self._spectrum, (-1,))
        return (q * lam[None, :]) @ xp.linalg.matrix_transpose(q)

    def _with(self, shift: Any, exponent: float) -> KroneckerEigen:
        return KroneckerEigen(self.vectors, self.values, shift=shift, exponent=exponent,
                              flat=self.flat)

    def shifted(self, damping: Any) -> KroneckerEigen:
        """(operator + damping I), for exponent 1."""
        if self.exponent != 1.0:
            raise ValueError("shift the operator before raising it to a power")
        return self._with(self.shift + damping, 1.0)

    def power(self, s: float) -> KroneckerEigen:
        """(operator)^s: the exponents multiply."""
        return self._with(self.shift, self.exponent * s)

    def inv(self) -> LinearOperator:
        return self.power(-1.0)
