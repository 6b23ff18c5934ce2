"""Optimisers on one interface: ``opt = Method(apply, loss, ...)``, ``state = opt.init(params)``,
``params, state, info = opt.step(params, state, batch)``."""

from ..checking import checked
from . import directions, step_rules, transforms
from .base import Optimizer, StepInfo
from .bfgs import BFGS
from .curveball import CurveBall
from .gradient_descent import SGD, Adam, AdamW, GradientDescent
from .grouped_newton import GroupedNewton
from .hessian_free import HessianFree
from .kbfgs import KBFGS, KBFGSL
from .kfac import KFAC
from .levenberg_marquardt import LevenbergMarquardt
from .newton import Newton
from .prox_linear import ProxLinear
from .shampoo import Shampoo
from .smw import SMWGN, SMWNG
from .tnt import TNT

__all__ = ["SGD", "Adam", "AdamW", "CurveBall", "HessianFree", "Optimizer", "StepInfo"]
__all__ += ["BFGS", "LevenbergMarquardt", "Newton"]
__all__ += ["ProxLinear"]
__all__ += ["GroupedNewton"]
__all__ += ["GradientDescent", "transforms"]
__all__ += ["directions", "step_rules"]
__all__ += ["checked"]
__all__ += ["Shampoo"]
__all__ += ["TNT"]
__all__ += ["KFAC"]
__all__ += ["KBFGS", "KBFGSL"]
__all__ += ["SMWGN", "SMWNG"]
