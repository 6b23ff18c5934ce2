"""Optimisers by name, with the defaults the command line uses.

``METHODS[name](apply, loss)`` builds the optimiser. ``SMALL_ONLY`` lists the methods that form
p x p matrices and are meant for problems with few parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import (
    BFGS,
    SGD,
    Adam,
    CurveBall,
    GroupedNewton,
    HessianFree,
    LevenbergMarquardt,
    Newton,
    ProxLinear,
)

Factory = Callable[[Any, Any], Any]

METHODS: dict[str, Factory] = {
    "sgd": lambda apply, loss: SGD(apply, loss, lr=0.1, momentum=0.9),
    "adam": lambda apply, loss: Adam(apply, loss, lr=1e-2),
    "curveball": lambda apply, loss: CurveBall(apply, loss, damping=1.0),
    "hessian-free": lambda apply, loss: HessianFree(apply, loss, cg_iters=10),
    "newton": lambda apply, loss: Newton(apply, loss, variant="abs", damping=1e-3,
                                         line_search="cubic"),
    "levenberg-marquardt": lambda apply, loss: LevenbergMarquardt(apply, loss),
    "bfgs": lambda apply, loss: BFGS(apply, loss),
    "prox-linear": lambda apply, loss: ProxLinear(apply, loss, solver="dual", inner_steps=2,
                                                  update="armijo"),
    "grouped-newton": lambda apply, loss: GroupedNewton(apply, loss),
}
SMALL_ONLY = frozenset({"newton", "levenberg-marquardt", "bfgs"})
#: what ``secondorder compare`` runs with no --method. Hessian-free is left out: its inner CG at
#: low damping amplifies last-bit differences between frameworks about tenfold per step, so over
#: 100 steps its runs drift apart past any fixed tolerance (see the README). GroupedNewton is left
#: out too: when the root of its cubic step's secular equation sits next to -lambda_min(K) (the
#: "hard case"), last-bit differences move eta by ~1e-4 (seen on teacher-student in 4 steps)
DEFAULT_METHODS = ("sgd", "adam", "curveball", "prox-linear")


def register(name: str, factory: Factory, *, small_only: bool = False,
             default: bool = False) -> None:
    """Add a method (used by methods that land later and by users' own optimisers)."""
    global SMALL_ONLY, DEFAULT_METHODS
    METHODS[name] = factory
    if small_only:
        SMALL_ONLY = SMALL_ONLY | {name}
    if default and name not in DEFAULT_METHODS:
        DEFAULT_METHODS = (*DEFAULT_METHODS, name)
