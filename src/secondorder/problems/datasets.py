"""Training problems on small data that ships with a package or is generated offline by one (no
download), and a synthetic teacher-student regression: each gives a model, a loss, identical
initial weights from a seed and identical batches from NumPy's Generator on every backend."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import HyperparameterError
from ..losses import MSE, SigmoidBCE, SoftmaxCrossEntropy
from ..models import MLP, Autoencoder, Conv1DNet
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
    """Digits autoencoder (linear code and output layers), sigmoid BCE on the pixel intensities
    summed over the 64 pixels and averaged over the batch.

    Parameters
    ----------
    batch_size : int, default 64
        Images per mini-batch.
    sizes : sequence of int, default (64, 32, 8, 32, 64)
        Layer widths, 64 at both ends; the narrowest inner layer is the linear code.
    activation : str, default "sigmoid"
        The hidden layers' activation ("relu" gives the thesis's autoencoders' shape).
    """

    name = "digits-autoencoder"

    def __init__(self, batch_size: int = 64, sizes: Sequence[int] = (64, 32, 8, 32, 64),
                 activation: str = "sigmoid"):
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 3 or sizes[0] != 64 or sizes[-1] != 64:
            raise HyperparameterError(
                f"sizes={sizes}: an autoencoder of the 8 x 8 digits needs at least three "
                "layer widths, 64 first and last")
        x, _ = load_digits()
        super().__init__(Autoencoder(sizes, activation), SigmoidBCE(), x, x, batch_size)


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


class MNIST1D(NamedTuple):
    """MNIST-1D split into training, validation and test sets: inputs (n, 40) float64, labels
    (n,) int64 in 0-9. The validation set is carved from the generator's 4000 training signals;
    the test set is the generator's own 1000."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.lru_cache(maxsize=1)
def _mnist1d_generated() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The generator's (x, y, x_test, y_test), made once per process (about 2 s) and kept
    read-only. ``make_dataset`` seeds NumPy's and Python's global generators; both are put back
    as they were, so loading the data does not change a caller's random streams."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(
            "the MNIST-1D problems need the mnist1d package (pip install -r backends/data.txt)"
        ) from err
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"], dtype=np.int64),
              np.asarray(data["x_test"], dtype=np.float64),
              np.asarray(data["y_test"], dtype=np.int64))
    for a in arrays:
        a.setflags(write=False)
    return arrays


def load_mnist1d(validation: int = 500, seed: int = 0) -> MNIST1D:
    """MNIST-1D (S. Greydanus and D. Kobak, "Scaling down deep learning with MNIST-1D", ICML
    2024), generated offline by the ``mnist1d`` package with its default arguments
    (``make_dataset(get_dataset_args())``: 4000 training and 1000 test signals of length 40,
    10 classes, standardised to mean 0 and standard deviation 1 over the whole set).

    Parameters
    ----------
    validation : int, default 500
        How many of the 4000 training signals go to the validation set (0 to 3999); they are
        drawn without replacement by ``numpy.random.default_rng(seed)`` and removed from the
        training set. The test set is never split.
    seed : int, default 0
        Seed of the validation draw.

    Returns an :class:`MNIST1D` of fresh arrays (the generated data is cached, read-only, per
    process, and copied here: torch will not wrap read-only arrays without a warning).
    """
    x, y, x_test, y_test = _mnist1d_generated()
    n = x.shape[0]
    if isinstance(validation, bool) or not isinstance(validation, (int, np.integer)) \
            or not 0 <= validation < n:
        raise HyperparameterError(
            f"validation must be a whole number of signals from 0 to {n - 1}, got {validation!r}")
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:validation]), np.sort(order[validation:])
    return MNIST1D(x[train], y[train], x[val], y[val], x_test.copy(), y_test.copy())


class MNIST1DProblem(ModelProblem):
    """Classification of MNIST-1D signals (see :func:`load_mnist1d`) with softmax
    cross-entropy. ``x``, ``y`` are the training set; ``x_val``, ``y_val`` the validation set
    carved from it and ``x_test``, ``y_test`` the test set, for the reproduction's model
    selection and reports. The default batch size, 100, is the MNIST-1D authors'."""

    def __init__(self, model: Any, batch_size: int = 100, validation: int = 500,
                 seed: int = 0):
        data = load_mnist1d(validation, seed)
        super().__init__(model, SoftmaxCrossEntropy(), data.x_train, data.y_train, batch_size)
        self.x_val, self.y_val = data.x_val, data.y_val
        self.x_test, self.y_test = data.x_test, data.y_test
        self.validation, self.split_seed = int(validation), int(seed)


class MNIST1DCNN(MNIST1DProblem):
    """MNIST-1D with the authors' small CNN (:class:`~secondorder.models.Conv1DNet` with its
    defaults: three ReLU convolutions, 25 channels, kernels 5, 3, 3, stride 2, padding 1, then a
    linear layer 125 -> 10; the authors report about 94% test accuracy).

    Parameters: ``batch_size`` (default 100), ``validation`` (signals held out of the 4000
    training signals for model selection, default 500) and ``seed`` (of that draw, default 0).
    """

    name = "mnist1d-cnn"

    def __init__(self, batch_size: int = 100, validation: int = 500, seed: int = 0):
        super().__init__(Conv1DNet(), batch_size, validation, seed)


class MNIST1DMLP(MNIST1DProblem):
    """MNIST-1D with the authors' MLP 40-100-100-10 (ReLU; they report about 68% test
    accuracy).

    Parameters: ``hidden`` (width of both hidden layers, default 100), ``batch_size`` (default
    100), ``validation`` (default 500) and ``seed`` (default 0), as for :class:`MNIST1DCNN`.
    """

    name = "mnist1d-mlp"

    def __init__(self, hidden: int = 100, batch_size: int = 100, validation: int = 500,
                 seed: int = 0):
        super().__init__(MLP([40, hidden, hidden, 10], "relu"), batch_size, validation, seed)
