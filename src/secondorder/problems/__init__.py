"""Small problems every method can run on, on every backend: the stochastic Rosenbrock function
and the Rahimi & Recht two-layer linear network (the CurveBall paper's Table 1), digits
classification and autoencoding, and a teacher-student regression."""

from .base import Problem
from .datasets import DigitsAutoencoder, DigitsMLP, ModelProblem, TeacherStudent
from .linear_network import LinearNetwork
from .rosenbrock import Rosenbrock

#: problems by the names the command line uses
PROBLEMS = {
    "digits-mlp": DigitsMLP,
    "digits-autoencoder": DigitsAutoencoder,
    "teacher-student": TeacherStudent,
    "rosenbrock": lambda: Rosenbrock("U[0,1]"),
}

__all__ = ["PROBLEMS", "DigitsAutoencoder", "DigitsMLP", "LinearNetwork", "ModelProblem",
           "Problem", "Rosenbrock", "TeacherStudent"]
