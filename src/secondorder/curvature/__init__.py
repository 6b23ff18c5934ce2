"""Curvature operators built from ``(apply, loss, params, (x, y))``: the Jacobian, the Hessian,
the generalised Gauss-Newton matrix, the Fisher (Monte-Carlo and empirical), the output-space
Gram matrix J J^T, and per-layer Kronecker statistics from layer taps (K-FAC, KFC)."""

from .base import CurvatureOperator, Linearization
from .fisher import Fisher
from .ggn import GGN
from .hessian import Hessian
from .jacobian import Gram, Jacobian
from .kfac import KFAC, KFACOperator, LayerFactors, LayerKronecker, kronecker_factors

__all__ = ["GGN", "KFAC", "CurvatureOperator", "Fisher", "Gram", "Hessian", "Jacobian",
           "KFACOperator", "LayerFactors", "LayerKronecker", "Linearization", "kronecker_factors"]
