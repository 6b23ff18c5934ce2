"""Training problems on small data that ships with a package (no download), and a synthetic
teacher-student regression: each gives a model, a loss, identical initial weights from a seed and
identical batches from NumPy's Generator on every backend."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..losses import MSE, SigmoidBCE, SoftmaxCrossEntropy
from ..models import MLP, Autoencoder
from .base import Problem, _backend, _convert


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8 x 8 digits (1797 images): inputs scaled to [0, 1], labels 0-9."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError(
            "the digits problems need scikit-learn (pip install -r backends/data.txt)"
        ) from err
    data = sk_load_digits()
    return data.data / 16.0, data.target.astype(np.int64)


class ModelProblem(Problem):
    """A problem defined by a model from :mod:`secondorder.models` and a data set in memory."""

    def __init__(self, model: Any, loss: Any, x: np.ndarray, y: np.ndarray, batch_size: int):
        self.model, self.loss = model, loss
        self.x, self.y = x, y
        self.batch_size = int(batch_size)

    def apply(self, params: Any, x: Any) -> Any:
        return self.model.apply(params, x)

    def _numpy_start(self, rng: np.random.Generator) -> Any:
        return self.model._numpy_params(rng)

    def _numpy_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.choice(self.x.shape[0], size=self.batch_size, replace=False)
        return self.x[idx], self.y[idx]

    def full_batch(self, backend: Any = None, dtype: str = "float64") -> tuple[Any, Any]:
        """The whole data set on ``backend``."""
        return _convert(_backend(backend), self.x, self.y, dtype)


class DigitsMLP(ModelProblem):
    """Digits classification: MLP 64-32-10 (tanh), softmax cross-entropy."""

    name = "digits-mlp"

    def __init__(self, hidden: int = 32, batch_size: int = 64):
        x, y = load_digits()
        super().__init__(MLP([64, hidden, 10], "tanh"), SoftmaxCrossEntropy(), x, y, batch_size)


class DigitsAutoencoder(ModelProblem):
    """Digits autoencoder 64-32-8-32-64 (sigmoid hidden layers, linear code), sigmoid BCE on
    the pixel intensities."""

    name = "digits-autoencoder"

    def __init__(self, batch_size: int = 64):
        x, _ = load_digits()
        super().__init__(Autoencoder([64, 32, 8, 32, 64], "sigmoid"), SigmoidBCE(), x, x,
                         batch_size)


class TeacherStudent(ModelProblem):
    """Regression on the outputs of a random teacher MLP 8-32-1 (tanh) with Gaussian inputs;
    the student has the same architecture, squared error."""

    name = "teacher-student"

    def __init__(self, n: int = 1024, batch_size: int = 64, seed: int = 1234):
        rng = np.random.default_rng(seed)
        model = MLP([8, 32, 1], "tanh")
        teacher = model._numpy_params(rng)
        x = rng.standard_normal((n, 8))
        y = np.asarray(model.apply(teacher, x))
        super().__init__(model, MSE(), x, y, batch_size)
