"""Property-based tests (hypothesis) of the linear operators, cg and the matrix functions on every
backend, against float64 NumPy oracles built by brute force (np.kron, np.linalg.inv / solve /
eigh of the explicit matrix).

The strategies control what the tolerances depend on: sizes n <= 8 (Kronecker products up to 3
factors of size <= 3), matrices built as Q diag(w) Q^T with a drawn condition number, scales
drawn as powers of ten across the float64 (1e+-300) and float32 (1e+-30) ranges. Tolerances are
the first-order rounding bounds of the computation, never fitted:

* products: a sum of n terms is within n eps of sum |a_i| |x_i| (Higham, Accuracy and
  Stability, 3.5), so ||A v - oracle|| <= (n + 1) eps || |A| |v| || and, for a Kronecker product
  of k factors computed as k mode products, (sum n_i + k) eps || |A_1| (x) ... |A_k| |v| ||;
* inverses, solves and inverse roots: the relative error of a backward stable method is at most
  c n eps kappa (kappa the condition number of the drawn matrix; (A + lambda I)^{-1/p} has
  relative condition number kappa / p <= kappa), with c = 8 covering the oracle's own rounding;
* the coupled Newton iteration stops at max |M - I| <= tol = 1e-6 with X^p A = M, so X is
  within tol / p of the inverse root, plus rounding.

Bad input (NaN / inf in b or in A, singular, indefinite, overflowing): a named error or an honest
report (cg's reason), never a result reported as a success that the oracle contradicts.

Settings: ``derandomize=True`` (the same examples in every run and in CI), no deadline, a few
examples per backend (fewer on jax, whose eager dispatch and loop compilation cost the most, and
on array-api-strict). ``SECONDORDER_PROPERTY_EXAMPLES`` multiplies the counts for a longer run.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import back, to
from secondorder.backends import Backend
from secondorder.errors import NotPositiveDefiniteError
from secondorder.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Kronecker,
    LowRank,
    cg,
    damped_inverse,
    inverse_root,
    matrix_power,
)

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
#: c in the c n eps kappa bound of a backward stable inverse, solve or eigendecomposition
C_STABLE = 8.0
SCALE = float(os.environ.get("SECONDORDER_PROPERTY_EXAMPLES", "1"))
#: examples per test and backend: numpy and torch dispatch in microseconds; jax compiles every
#: primitive for every new shape and every while_loop (about 1 s per example here, so one
#: example per property: the jax-specific paths, lax loops, eigh, Cholesky, are what it adds);
#: array-api-strict wraps every call
EXAMPLES = {"numpy": 15, "torch": 15, "jax": 1, "array_api_strict": 5, "cupy": 10}


def checked(backend: Backend, examples: int | None = None) -> settings:
    n = examples if examples is not None else EXAMPLES.get(backend.name, 8)
    return settings(
        max_examples=max(1, int(n * SCALE)),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _need(backend: Backend, *names: str) -> None:
    if backend.name not in names:
        pytest.skip(f"{backend.name}: this property runs on {', '.join(names)}")


# ---------------------------------------------------------------- strategies
seeds = st.integers(0, 2**32 - 1)


@st.composite
def spd_matrices(draw: Any, max_n: int = 8, max_log_cond: float = 6.0) -> np.ndarray:
    """Q diag(w) Q^T with Q orthogonal (QR of a Gaussian matrix) and eigenvalues from 1 to
    10^log_cond (both ends attained, the rest log-uniform), symmetrised exactly."""
    n = draw(st.integers(1, max_n))
    log_cond = draw(st.floats(0.0, max_log_cond)) if n > 1 else 0.0
    rng = np.random.default_rng(draw(seeds))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = 10.0 ** rng.uniform(0.0, log_cond, n)
    w[0], w[-1] = 1.0, 10.0**log_cond
    a = (q * w) @ q.T
    return (a + a.T) / 2


@st.composite
def general_matrices(draw: Any, max_n: int = 8) -> np.ndarray:
    """A rectangular Gaussian matrix with rows and columns scaled over six decades (products
    then cancel, which the |A| |v| bound must cover)."""
    m, n = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(seeds))
    return (10.0 ** rng.uniform(-3, 3, (m, 1))) * rng.standard_normal((m, n)) * (
        10.0 ** rng.uniform(-3, 3, (1, n)))


def vector(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n)


def cond(a: np.ndarray) -> float:
    """The 2-norm condition number of a symmetric positive definite matrix, in float64."""
    w = np.linalg.eigvalsh(a)
    return float(w[-1] / w[0])


def eig_power(a: np.ndarray, s: float) -> np.ndarray:
    """The oracle (A)^s of a symmetric PD matrix through NumPy's float64 eigendecomposition."""
    w, q = np.linalg.eigh(a)
    return (q * w**s) @ q.T


def assert_within(actual: Any, expected: np.ndarray, bound: float, what: str = "") -> None:
    """||actual - expected|| <= bound (Frobenius / 2-norm), in float64."""
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.linalg.norm(actual - expected))
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e}"


def assert_relative(actual: Any, expected: np.ndarray, rtol: float, what: str = "") -> None:
    assert_within(actual, expected, rtol * float(np.linalg.norm(expected)), what)


def product_bound(a: np.ndarray, v: np.ndarray, terms: int, eps: float = EPS64) -> float:
    """(terms + 1) eps || |A| |v| ||: the rounding bound of A v computed by sums of ``terms``."""
    return (terms + 1) * eps * float(np.linalg.norm(np.abs(a) @ np.abs(v)))


# ---------------------------------------------------------------- operators
def test_dense_products_transpose_and_inverse(backend):
    @checked(backend)
    @given(general_matrices(), spd_matrices(max_log_cond=8.0), seeds)
    def check(a: np.ndarray, s: np.ndarray, seed: int) -> None:
        m, n = a.shape
        v, u = vector(seed, n), vector(seed + 1, m)
        mat = np.random.default_rng(seed).standard_normal((n, 3))
        op = Dense(to(backend, a))
        assert_within(back(backend, op @ to(backend, v)), a @ v, product_bound(a, v, n), "A v")
        assert_within(back(backend, op.rmatvec(to(backend, u))), a.T @ u,
                      product_bound(a.T, u, m), "A^T u")
        assert_within(back(backend, op.T @ to(backend, u)), a.T @ u,
                      product_bound(a.T, u, m), ".T @ u")
        got = back(backend, op.matmat(to(backend, mat)))
        for j in range(3):
            assert_within(got[:, j], a @ mat[:, j], product_bound(a, mat[:, j], n), "A M")
        assert_within(back(backend, op.T.to_dense()), a.T, 0.0, "to_dense of .T")
        k = s.shape[0]
        inv = back(backend, Dense(to(backend, s)).inv().to_dense())
        assert_relative(inv, np.linalg.inv(s), C_STABLE * k * EPS64 * cond(s), "inv")

    check()


@st.composite
def kronecker_factors(draw: Any, square: bool, max_log_cond: float = 3.0) -> list[np.ndarray]:
    k = draw(st.integers(1, 3))
    if square:
        return [draw(spd_matrices(max_n=3, max_log_cond=max_log_cond)) for _ in range(k)]
    out = []
    for _ in range(k):
        m, n = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        out.append(np.random.default_rng(draw(seeds)).standard_normal((m, n)))
    return out


def dense_kron(factors: list[np.ndarray]) -> np.ndarray:
    out = factors[0]
    for f in factors[1:]:
        out = np.kron(out, f)
    return out


def test_kronecker_products_match_np_kron(backend):
    @checked(backend)
    @given(kronecker_factors(square=False), seeds, st.booleans())
    def check(fs: list[np.ndarray], seed: int, flat: bool) -> None:
        big = dense_kron(fs)
        in_dims = tuple(f.shape[1] for f in fs)
        out_dims = tuple(f.shape[0] for f in fs)
        terms = sum(in_dims) + len(fs)
        op = Kronecker(*to(backend, fs), flat=flat)
        v, u = vector(seed, big.shape[1]), vector(seed + 1, big.shape[0])
        shaped = (lambda x, d: x) if flat else (lambda x, d: x.reshape(d))
        got = back(backend, op @ to(backend, shaped(v, in_dims))).ravel()
        assert_within(got, big @ v, product_bound(big, v, terms), "Kronecker A v")
        got = back(backend, op.rmatvec(to(backend, shaped(u, out_dims)))).ravel()
        assert_within(got, big.T @ u, product_bound(big.T, u, sum(out_dims) + len(fs)),
                      "Kronecker A^T u")
        assert_within(back(backend, op.to_dense()), big,
                      len(fs) * EPS64 * float(np.linalg.norm(np.abs(big))), "to_dense")
        assert_within(back(backend, op.T.to_dense()), big.T,
                      len(fs) * EPS64 * float(np.linalg.norm(np.abs(big))), ".T to_dense")
        # the mixed-product identity (A_1 (x) A_2)(B_1 (x) B_2) = A_1 B_1 (x) A_2 B_2, for
        # factors whose shapes chain: the Product of the operators against np.kron of the
        # products (each side exact to rounding)
        chained = [np.random.default_rng(seed + i).standard_normal((f.shape[1], f.shape[1]))
                   for i, f in enumerate(fs)]
        prod = (op @ Kronecker(*to(backend, chained), flat=flat)).to_dense()
        expected = dense_kron([f @ c for f, c in zip(fs, chained)])
        scale = float(np.linalg.norm(np.abs(big) @ np.abs(dense_kron(chained))))
        assert_within(back(backend, prod), expected, 2 * (terms + 1) * EPS64 * scale,
                      "mixed product")

    check()


def test_kronecker_inverse_power_and_damped_inverses(backend):
    @checked(backend)
    @given(kronecker_factors(square=True), st.sampled_from([-1.0, -0.5, -0.25, 0.5, 2.0]),
           st.floats(1e-3, 10.0), st.sampled_from(["exact", "pi", "equal"]))
    def check(fs: list[np.ndarray], s: float, lam: float, method: str) -> None:
        big = dense_kron(fs)
        n, k = big.shape[0], len(fs)
        kappa = math.prod(cond(f) for f in fs)
        op = Kronecker(*to(backend, fs), flat=True)
        tol = C_STABLE * n * EPS64 * kappa
        assert_relative(back(backend, op.inv().to_dense()), np.linalg.inv(big), tol, "inv")
        assert_relative(back(backend, op.power(s).to_dense()), eig_power(big, s),
                        tol * max(1.0, abs(s)), f"power {s}")
        got = back(backend, op.damped_inverse(lam, method).to_dense())
        if method == "exact":
            expected = np.linalg.inv(big + lam * np.eye(n))
        else:
            # the split written out: d_i = pi_i lambda^(1/k), pi_i = t_i / (prod t_j)^(1/k),
            # t_i = tr(A_i) / dim(A_i) ("equal": pi_i = 1)
            t = np.array([np.trace(f) / f.shape[0] for f in fs])
            pi = t / np.prod(t) ** (1.0 / k) if method == "pi" else np.ones(k)
            expected = dense_kron([np.linalg.inv(f + p * lam ** (1.0 / k) * np.eye(len(f)))
                                   for f, p in zip(fs, pi)])
        assert_relative(got, expected, tol, f"damped_inverse {method}")

    check()


def test_lowrank_woodbury_inverse(backend):
    @checked(backend)
    @given(spd_matrices(max_log_cond=3.0), st.integers(1, 3), seeds,
           st.sampled_from(["dense", "diagonal", "kronecker"]))
    def check(b: np.ndarray, r: int, seed: int, base: str) -> None:
        rng = np.random.default_rng(seed)
        if base == "diagonal":
            b = np.diag(np.diag(b))
            base_op = Diagonal(to(backend, np.diag(b).copy()))
        elif base == "kronecker":
            f1, f2 = b[:1, :1] if b.shape[0] < 2 else b[:2, :2], np.array([[2.0, 0.5],
                                                                           [0.5, 1.0]])
            b = np.kron(f1, f2)
            base_op = Kronecker(to(backend, f1), to(backend, f2), flat=True)
        else:
            base_op = Dense(to(backend, b))
        n = b.shape[0]
        u = rng.standard_normal((n, r))
        c = rng.standard_normal((r, r))
        c = c @ c.T + np.eye(r)  # SPD, so B + U C U^T is SPD
        full = b + u @ c @ u.T
        op = LowRank(to(backend, u), to(backend, c), base=base_op)
        v = rng.standard_normal(n)
        assert_within(back(backend, op @ to(backend, v)), full @ v,
                      product_bound(np.abs(b) + np.abs(u) @ np.abs(c) @ np.abs(u.T), v, n + 2 * r),
                      "B + U C U^T v")
        binv = np.linalg.inv(b)
        capacitance = np.linalg.inv(c) + u.T @ binv @ u
        # Woodbury's rounding: B^{-1} (kappa(B)), C^{-1} and the capacitance solve (kappa of
        # each), the result's own conditioning; the product bounds them all
        kappa = cond(b) * cond(c) * cond(capacitance) * cond(full)
        tol = C_STABLE * (n + r) * EPS64 * kappa
        assert_relative(back(backend, op.inv().to_dense()), np.linalg.inv(full), tol, "Woodbury")

    check()


def test_diagonal_block_diagonal_and_sums(backend):
    @checked(backend)
    @given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8), spd_matrices(max_n=4),
           st.sampled_from([-1.0, -0.5, 0.5, 3.0]), seeds)
    def check(d: list[float], s: np.ndarray, power: float, seed: int) -> None:
        d = np.array(d)
        diag = Diagonal(to(backend, d))
        assert_relative(back(backend, diag.inv().to_dense()), np.diag(1.0 / d), EPS64, "inv")
        assert_relative(back(backend, diag.power(power).to_dense()), np.diag(d**power),
                        4 * EPS64 * max(1.0, abs(power)), "power")
        block = BlockDiagonal([diag, Dense(to(backend, s))])
        n1, n2 = len(d), s.shape[0]
        full = np.zeros((n1 + n2, n1 + n2))
        full[:n1, :n1], full[n1:, n1:] = np.diag(d), s
        v = vector(seed, n1 + n2)
        got = block @ (to(backend, v[:n1]), to(backend, v[n1:]))
        got = np.concatenate([back(backend, g) for g in got])
        assert_within(got, full @ v, product_bound(full, v, n2), "block A v")
        inv = block.inv() @ (to(backend, v[:n1]), to(backend, v[n1:]))
        inv = np.concatenate([back(backend, g) for g in inv])
        kappa = max(cond(s), 1.0)
        assert_relative(inv, np.linalg.solve(full, v), C_STABLE * n2 * EPS64 * max(
            kappa, cond(full)), "block inverse")
        sq = Dense(to(backend, s))
        combo = 2.0 * sq + sq.T - sq @ sq
        expected = 3.0 * s - s @ s
        assert_within(back(backend, combo.to_dense()), expected,
                      4 * (n2 + 2) * EPS64 * float(np.linalg.norm(3 * np.abs(s) + np.abs(s) @
                                                                    np.abs(s))), "sum/product")

    check()


# ---------------------------------------------------------------- cg
def test_cg_converged_means_solved(backend):
    """A reported "converged" is true: the residual recomputed in float64 meets tol up to the
    residual gap of finite-precision CG, and x agrees with np.linalg.solve within kappa times
    that. Well-conditioned systems (kappa <= 1e6, n <= 8, 10 n iterations) do converge."""
    tol = 1e-10

    @checked(backend)
    @given(spd_matrices(max_log_cond=6.0), seeds)
    def check(a: np.ndarray, seed: int) -> None:
        n = a.shape[0]
        b = vector(seed, n)
        x, info = cg(Dense(to(backend, a)), to(backend, b), tol=tol)
        x = back(backend, x)
        assert info.reason == "converged", info.reason
        k = int(info.iterations)
        # the gap between the recursive and the true residual: O(k eps (||A|| ||x|| + ||b||))
        gap = 2 * (k + 1) * n * EPS64 * (np.linalg.norm(a, 2) * np.linalg.norm(x)
                                         + np.linalg.norm(b))
        assert np.linalg.norm(b - a @ x) <= tol * np.linalg.norm(b) + gap
        x_star = np.linalg.solve(a, b)
        assert_within(x, x_star, cond(a) * (tol * np.linalg.norm(b) + gap)
                      / np.linalg.eigvalsh(a)[-1] + C_STABLE * n * EPS64 * cond(a)
                      * np.linalg.norm(x_star), "x")

    check()


def _magnitude(x: np.ndarray, exponent: float) -> tuple[float, float]:
    """log10 of the smallest and largest |x_i| 10^exponent (x_i != 0)."""
    nz = np.abs(x[x != 0])
    return float(np.log10(nz.min())) + exponent, float(np.log10(nz.max())) + exponent


def test_cg_extreme_scales_solve_or_report(backend):
    """A 10^ea and b 10^eb across the float64 range: a solution in the normal range is either
    found (to the accuracy of the unscaled system) or the run is reported not converged; one
    that overflows is reported "non_finite"."""
    exps = st.sampled_from([-300, -200, -150, 0, 150, 200, 300])
    tol = 1e-10

    @checked(backend)
    @given(spd_matrices(max_log_cond=4.0), seeds, exps, exps)
    def check(a: np.ndarray, seed: int, ea: int, eb: int) -> None:
        n = a.shape[0]
        b = vector(seed, n)
        x_star = np.linalg.solve(a, b)
        x, info = cg(Dense(to(backend, a * 10.0**ea)), to(backend, b * 10.0**eb), tol=tol)
        lo, hi = _magnitude(x_star, eb - ea)
        if hi > 308.2:  # a component overflows: it cannot be reported solved
            assert info.reason == "non_finite", (info.reason, ea, eb)
            return
        if lo < -307 or info.reason != "converged":
            return  # subnormal components (no relative accuracy), or an honest report
        got = back(backend, x) / 10.0 ** (eb - ea)
        bound = cond(a) * C_STABLE * n * (tol + 10 * n * EPS64) * np.linalg.norm(x_star)
        assert_within(got, x_star, bound, f"x at A 1e{ea}, b 1e{eb}")

    check()


def test_cg_non_finite_input_is_reported(backend):
    """NaN or +-inf in b, or in A, never gives "converged" (or a curvature verdict): the
    reason is "non_finite", with and without a tolerance."""

    @checked(backend)
    @given(spd_matrices(max_log_cond=2.0), seeds, st.sampled_from([np.nan, np.inf, -np.inf]),
           st.booleans(), st.sampled_from([1e-8, None]))
    def check(a: np.ndarray, seed: int, bad: float, in_a: bool, tol: float | None) -> None:
        n = a.shape[0]
        rng = np.random.default_rng(seed)
        b = rng.standard_normal(n)
        i, j = rng.integers(n), rng.integers(n)
        if in_a:
            a = a.copy()
            a[i, j] = bad
        else:
            b[i] = bad
        _, info = cg(Dense(to(backend, a)), to(backend, b), tol=tol, maxiter=2 * n)
        assert info.reason == "non_finite", info.reason

    check()


def test_cg_float32(backend):
    """float32 systems across float32's range (1e+-30): converged means solved to float32
    accuracy, an overflowing solution is reported."""
    if not backend.supports_float64():
        pytest.skip("needs float64 oracles")
    exps = st.sampled_from([-30, -15, 0, 15, 30])
    tol = 1e-5

    @checked(backend)
    @given(spd_matrices(max_log_cond=2.0), seeds, exps, exps)
    def check(a: np.ndarray, seed: int, ea: int, eb: int) -> None:
        n = a.shape[0]
        a32 = (a * 10.0**ea).astype(np.float32)
        b32 = (vector(seed, n) * 10.0**eb).astype(np.float32)
        x_star = np.linalg.solve(a32.astype(np.float64), b32.astype(np.float64))
        x, info = cg(Dense(backend.asarray(a32)), backend.asarray(b32), tol=tol)
        if float(np.abs(x_star).max()) > float(np.finfo(np.float32).max):
            assert info.reason == "non_finite", info.reason
            return
        if np.abs(x_star[x_star != 0]).min() < np.finfo(np.float32).tiny * 1e3:
            return
        if info.reason != "converged":
            return
        bound = cond(a) * C_STABLE * n * (tol + 10 * n * EPS32) * np.linalg.norm(x_star)
        assert_within(back(backend, x), x_star, bound, f"float32 x at 1e{ea}, 1e{eb}")

    check()


# ---------------------------------------------------------------- matrix functions
def _inverse_root_oracle(a: np.ndarray, p: int, damping: float) -> np.ndarray:
    return eig_power(a + damping * np.eye(a.shape[0]), -1.0 / p)


def test_inverse_root_matches_oracle(backend):
    """(A + lambda I)^{-1/p}, p = 1, 2, 4, by eigh (within c n eps kappa) and by the coupled
    Newton iteration (within its stopping tolerance 1e-6 / p plus rounding)."""

    @checked(backend)
    @given(spd_matrices(max_log_cond=6.0), st.sampled_from([1, 2, 4]),
           st.sampled_from([0.0, 1e-3, 0.5]), st.sampled_from(["eigh", "newton"]))
    def check(a: np.ndarray, p: int, damping: float, method: str) -> None:
        n = a.shape[0]
        kappa = cond(a + damping * np.eye(n))
        got = back(backend, inverse_root(to(backend, a), p, damping=damping, method=method))
        tol = C_STABLE * n * EPS64 * kappa + (1e-6 / p if method == "newton" else 0.0)
        assert_relative(got, _inverse_root_oracle(a, p, damping), tol, f"{method} p={p}")

    check()


def test_inverse_root_extreme_scales(backend):
    """s A for s across float64's range: the result is s^{-1/p} times the oracle, or (when
    that overflows) a named error; never a wrong matrix."""

    @checked(backend)
    @given(spd_matrices(max_log_cond=3.0), st.sampled_from([1, 2, 4]),
           st.sampled_from([-300, -200, -30, 30, 200, 300]), st.sampled_from(["eigh", "newton"]))
    def check(a: np.ndarray, p: int, e: int, method: str) -> None:
        n = a.shape[0]
        expected = _inverse_root_oracle(a, p, 0.0)
        try:
            got = back(backend, inverse_root(to(backend, a * 10.0**e), p, method=method))
        except NotPositiveDefiniteError:
            # allowed only where the answer is out of range
            assert np.abs(expected).max() * 10.0 ** (-e / p) > np.finfo(np.float64).max / 10
            return
        tol = C_STABLE * n * EPS64 * cond(a) + (1e-6 / p if method == "newton" else 0.0)
        assert_relative(got * 10.0 ** (e / p), expected, tol, f"{method} p={p} at 1e{e}")

    check()


def test_inverse_root_float32(backend):
    """float32 matrices at scales across float32's range (including 2^+-64, where the Newton
    iteration's own scaling starts): the oracle's value to float32 accuracy, or a named error."""
    exps = st.sampled_from([-30, -19, -10, 0, 10, 19, 30])

    @checked(backend)
    @given(spd_matrices(max_log_cond=2.0), st.sampled_from([1, 2, 4]), exps,
           st.sampled_from(["eigh", "newton"]))
    def check(a: np.ndarray, p: int, e: int, method: str) -> None:
        n = a.shape[0]
        a32 = (a * 10.0**e).astype(np.float32)
        a64 = a32.astype(np.float64)
        got = back(backend, inverse_root(backend.asarray(a32), p, method=method))
        tol = C_STABLE * n * EPS32 * cond(a64) + (1e-6 / p if method == "newton" else 0.0)
        assert_relative(got, _inverse_root_oracle(a64, p, 0.0), tol, f"{method} p={p} 1e{e}")

    check()


@st.composite
def singular_or_indefinite(draw: Any) -> tuple[str, np.ndarray]:
    """A symmetric matrix with an eigenvalue 0 (or below), a NaN or an inf entry."""
    a = draw(spd_matrices(max_n=6, max_log_cond=3.0))
    n = a.shape[0]
    kind = draw(st.sampled_from(["singular", "indefinite", "nan", "inf"]))
    rng = np.random.default_rng(draw(seeds))
    i, j = rng.integers(n), rng.integers(n)
    if kind == "singular":  # exactly: a zero row and column
        a = a.copy()
        a[i, :] = a[:, i] = 0.0
        return kind, a
    if kind == "indefinite":
        w, q = np.linalg.eigh(a)
        w[i] = -w[-1] * rng.uniform(0.01, 1)
        a = (q * w) @ q.T
        return kind, (a + a.T) / 2
    a = a.copy()
    a[i, j] = a[j, i] = np.nan if kind == "nan" else np.inf
    return kind, a


def test_non_positive_definite_input_raises(backend):
    """Singular, indefinite, NaN or inf input with zero damping: NotPositiveDefiniteError from
    inverse_root (both methods, every p), damped_inverse, a negative matrix_power and the
    Kronecker inverses with that factor (every damping split)."""

    @checked(backend)
    @given(singular_or_indefinite(), st.sampled_from([1, 2, 4]),
           st.sampled_from(["eigh", "newton"]), st.sampled_from(["exact", "pi", "equal"]))
    def check(case: tuple[str, np.ndarray], p: int, method: str, split: str) -> None:
        kind, a = case
        x = to(backend, a)
        with pytest.raises(NotPositiveDefiniteError):
            inverse_root(x, p, method=method)
        with pytest.raises(NotPositiveDefiniteError):
            damped_inverse(x, 0.0)
        with pytest.raises(NotPositiveDefiniteError):
            matrix_power(x, -1.0 / p)
        good = to(backend, np.array([[2.0, 0.5], [0.5, 1.0]]))
        with pytest.raises(NotPositiveDefiniteError):
            Kronecker(good, x).damped_inverse(0.0, split)
        if kind != "indefinite":  # an indefinite matrix has an inverse
            with pytest.raises(NotPositiveDefiniteError):
                Kronecker(x, good).inv()
            with pytest.raises(NotPositiveDefiniteError):
                Dense(x).inv()

    check()


def test_diagonal_zero_or_non_finite_entries(backend):
    @checked(backend)
    @given(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=8), st.data(),
           st.sampled_from([0.0, np.nan, np.inf]))
    def check(d: list[float], data: Any, bad: float) -> None:
        d = np.array(d)
        d[data.draw(st.integers(0, len(d) - 1))] = bad
        op = Diagonal(to(backend, d))
        with pytest.raises(NotPositiveDefiniteError):
            op.inv()
        with pytest.raises(NotPositiveDefiniteError):
            op.power(-0.5)

    check()
