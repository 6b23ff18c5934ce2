"""Small problems every method can run on, on every backend: the stochastic Rosenbrock function
and the Rahimi & Recht two-layer linear network (the CurveBall paper's Table 1)."""

from .base import Problem
from .linear_network import LinearNetwork
from .rosenbrock import Rosenbrock

__all__ = ["LinearNetwork", "Problem", "Rosenbrock"]
