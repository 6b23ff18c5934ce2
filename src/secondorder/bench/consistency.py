"""The cross-backend consistency check behind ``secondorder check``.

One problem, drawn once with NumPy's Generator: symmetric positive definite Kronecker factors
A (n_a x n_a) and G (n_g x n_g), a damping lambda and a right-hand side B of shape (n_a, n_g).
On every backend, in float64, it solves (A (x) G + lambda I) vec~(X) = vec~(B) twice:

* ``kron-solve``: the exact damped inverse through the factors' eigendecompositions;
* ``cg``: conjugate gradients on the Kronecker operator plus the scaled identity.

Each result is compared with a dense float64 NumPy oracle (``numpy.linalg.solve`` on the explicit
Kronecker product); the deviation is ||X - X_ref|| / ||X_ref||.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import backends
from ..linalg import Kronecker, ScaledIdentity, cg
from ._sync import wait

#: a deviation above this fails the check (float64 everywhere)
TOLERANCE = 1e-10


@dataclass
class CheckResult:
    """One task on one backend: ``deviation`` ||X - X_ref|| / ||X_ref|| from the dense oracle,
    ``time_ms`` the median time of the timed repeats, ``iterations`` the CG iterations (None for
    the Kronecker solve), ``ok`` whether the deviation is within ``TOLERANCE``, ``error`` the
    exception's text when the task could not run."""

    backend: str
    device: str
    task: str
    deviation: float
    time_ms: float
    iterations: int | None = None
    ok: bool = True
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_problem(n_a: int = 24, n_g: int = 32, damping: float = 1e-2, seed: int = 0) -> dict:
    """The system, drawn with ``numpy.random.default_rng(seed)``: factors A (n_a x n_a) and
    G (n_g x n_g), each M M^T + 0.1 I with M standard normal / sqrt(2n) of shape (n, 2n), a
    standard normal right-hand side B (n_a x n_g), and the oracle X solving
    (kron(A, G) + damping I) vec(X) = vec(B) with ``numpy.linalg.solve``. Returns
    ``{"A", "G", "B", "damping", "X"}``."""
    rng = np.random.default_rng(seed)

    def spd(n: int) -> np.ndarray:
        m = rng.standard_normal((n, 2 * n)) / np.sqrt(2 * n)
        return m @ m.T + 0.1 * np.eye(n)

    a, g = spd(n_a), spd(n_g)
    b = rng.standard_normal((n_a, n_g))
    dense = np.kron(a, g) + damping * np.eye(n_a * n_g)
    x_ref = np.linalg.solve(dense, b.ravel()).reshape(n_a, n_g)
    return {"A": a, "G": g, "B": b, "damping": damping, "X": x_ref}


def _deviation(backend: backends.Backend, x: Any, x_ref: np.ndarray) -> float:
    got = np.asarray(backend.to_numpy(x), dtype=np.float64)
    return float(np.linalg.norm(got - x_ref) / np.linalg.norm(x_ref))


def _timed(fn: Any, backend: backends.Backend, repeats: int) -> tuple[Any, float]:
    out = fn()  # warm-up (and compilation on jax)
    wait(backend, out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        wait(backend, out)
        times.append(time.perf_counter() - start)
    return out, 1e3 * float(np.median(times))


def run_check(names: list[str] | None = None, *, repeats: int = 5, seed: int = 0,
              n_a: int = 24, n_g: int = 32) -> list[CheckResult]:
    """Run both tasks (``kron-solve``, and ``cg`` until the residual is below 1e-12 ||B||) on
    each named backend (default: every installed, usable one) in float64, on the system of
    :func:`make_problem` (``n_a``, ``n_g``, ``seed``); each task is run once to warm up (and
    compile, under ``jax.jit`` on JAX), then ``repeats`` times timed. A backend that cannot be
    set up or a task that raises is reported as a failed :class:`CheckResult`, not raised."""
    problem = make_problem(n_a, n_g, seed=seed)
    if names is None:
        names = [i.name for i in backends.available() if i.installed and i.usable]
    results = []
    for name in names:
        try:
            backend = backends.get(name)
            if name == "jax":
                import jax

                jax.config.update("jax_enable_x64", True)
            a, g, b = (backend.asarray(problem[k], dtype="float64") for k in ("A", "G", "B"))
        except Exception as err:  # report, do not crash: a broken install is a finding
            results.append(CheckResult(name, "-", "setup", float("nan"), float("nan"),
                                       ok=False, error=f"{type(err).__name__}: {err}"))
            continue
        device = str(backend.device(a))
        lam = problem["damping"]

        def kron_solve(a=a, g=g, b=b, lam=lam) -> Any:
            return Kronecker(a, g).damped_inverse(lam, method="exact").matvec(b)

        def cg_solve(a=a, g=g, b=b, lam=lam) -> Any:
            return cg(Kronecker(a, g) + ScaledIdentity(lam, b), b, tol=1e-12)

        for task, fn in (("kron-solve", kron_solve), ("cg", cg_solve)):
            if name == "jax":
                import jax

                fn = jax.jit(fn)
            try:
                out, ms = _timed(fn, backend, repeats)
            except Exception as err:
                results.append(CheckResult(name, device, task, float("nan"), float("nan"),
                                           ok=False, error=f"{type(err).__name__}: {err}"))
                continue
            iterations = None
            if task == "cg":
                out, info = out
                iterations = int(info.iterations)
            dev = _deviation(backend, out, problem["X"])
            results.append(CheckResult(name, device, task, dev, ms, iterations,
                                       ok=bool(dev <= TOLERANCE)))
    return results
