"""Small problems every method can run on, on every backend: the stochastic Rosenbrock function
and the Rahimi & Recht two-layer linear network (the CurveBall paper's Table 1), digits
classification and autoencoding, MNIST-1D classification with a CNN and an MLP, and a
teacher-student regression."""

from .base import Problem
from .datasets import (
    MNIST1D,
    MNIST1DCNN,
    MNIST1DMLP,
    DigitsAutoencoder,
    DigitsMLP,
    MNIST1DProblem,
    ModelProblem,
    TeacherStudent,
    load_mnist1d,
)
from .linear_network import LinearNetwork
from .rosenbrock import Rosenbrock

#: problems by the names the command line uses
PROBLEMS = {
    "digits-mlp": DigitsMLP,
    "digits-autoencoder": DigitsAutoencoder,
    "mnist1d-cnn": MNIST1DCNN,
    "mnist1d-mlp": MNIST1DMLP,
    "teacher-student": TeacherStudent,
    "rosenbrock": lambda: Rosenbrock("U[0,1]"),
}

__all__ = ["MNIST1D", "MNIST1DCNN", "MNIST1DMLP", "PROBLEMS", "DigitsAutoencoder", "DigitsMLP",
           "LinearNetwork", "MNIST1DProblem", "ModelProblem", "Problem", "Rosenbrock",
           "TeacherStudent", "load_mnist1d"]
