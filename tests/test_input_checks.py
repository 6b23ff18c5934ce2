"""Bad input where it enters: every registered method, on numpy, torch and jax, turns a bad batch
into a named error (labels out of range, negative or fractional -> LabelError; x and y of
different lengths or an empty batch -> ShapeError; a float32 batch for float64 parameters ->
DTypeError; a batch or state of another framework -> MixedBackendError / StateError), and every
constructor turns a NaN or infinite hyperparameter into a HyperparameterError that names it.
Inside jax.jit, optim.checked(step) raises the LabelError that the eager step raises.

Tiny problems (an MLP 3-4-3 on 6 samples): each bad step fails before any real work.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest

from secondorder import backends, losses, tree
from secondorder.errors import (
    DTypeError,
    HyperparameterError,
    LabelError,
    MixedBackendError,
    SecondOrderError,
    ShapeError,
    StateError,
    StructureError,
)
from secondorder.models import MLP
from secondorder.optim import SGD, checked
from secondorder.optim.registry import METHODS

NAMES = sorted(METHODS)
BACKENDS = ("numpy", "torch", "jax")
MODEL = MLP([3, 4, 3], "tanh")
LOSS = losses.SoftmaxCrossEntropy()
RNG = np.random.default_rng(3)
X = RNG.standard_normal((6, 3))
Y = np.array([0, 1, 2, 2, 1, 0])


def _backend(name):
    pytest.importorskip("autograd" if name == "numpy" else name)
    return backends.get(name)


def _setup(method, b):
    opt = METHODS[method](MODEL.apply, LOSS)
    params = MODEL.init(0, b, dtype="float64")
    return opt, params, opt.init(params)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("method", NAMES)
def test_bad_batches_raise_named_errors(method, backend_name):
    b = _backend(backend_name)
    opt, params, state = _setup(method, b)
    x = b.asarray(X)
    bad_labels = {
        "out of range": np.array([0, 1, 2, 3, 1, 0]),
        "negative": np.array([0, 1, -1, 2, 1, 0]),
    }
    for labels in bad_labels.values():
        with pytest.raises(LabelError, match=r"\[0, 2\]"):
            opt.step(params, state, (x, b.asarray(labels)))
    with pytest.raises(LabelError, match="integer dtype"):  # fractional labels
        opt.step(params, state, (x, b.asarray(Y + 0.5)))
    with pytest.raises(ShapeError, match="6 samples.*5"):
        opt.step(params, state, (x, b.asarray(Y[:5])))
    with pytest.raises(ShapeError, match="empty"):
        opt.step(params, state, (b.asarray(X[:0]), b.asarray(Y[:0])))
    with pytest.raises(DTypeError, match="float32"):
        opt.step(params, state, (b.asarray(X.astype(np.float32)), b.asarray(Y)))
    other = backends.get("torch" if backend_name == "numpy" else "numpy")
    with pytest.raises(StateError, match="initialise the state"):
        opt.step(params, opt.init(MODEL.init(0, other, dtype="float64")), (x, b.asarray(Y)))
    # good batches still step: tests/test_contract.py runs every method on them


HALF = ("bfloat16", "float16")


@pytest.mark.parametrize("backend_name", ("torch", "jax"))
@pytest.mark.parametrize("method", sorted(n for n in NAMES if METHODS[n].cls.param_dtypes))
def test_methods_that_factorise_refuse_half_precision_parameters(method, backend_name):
    """Half-precision parameters reach a Cholesky or LU that the frameworks do not have in
    half precision (torch: "cholesky_cpu not implemented for 'BFloat16'"): each such method
    refuses them at the step's entry with a DTypeError that says what to do."""
    b = _backend(backend_name)
    opt, params, state = _setup(method, b)
    module = pytest.importorskip("torch" if backend_name == "torch" else "jax.numpy")

    def cast(a, half):  # the framework's own cast: secondorder's asarray refuses half
        return a.to(getattr(module, half)) if backend_name == "torch" else a.astype(half)

    for half in HALF:
        low = tree.tree_map(lambda a, half=half: cast(a, half), params)
        batch = (cast(b.asarray(X), half), b.asarray(Y))
        with pytest.raises(DTypeError, match=f"float32 or float64 parameters, not {half}"):
            opt.step(low, state, batch)


def test_batch_structure_framework_and_probability_rows():
    torch = pytest.importorskip("torch")
    b = backends.get("torch")
    opt, params, state = _setup("sgd", b)
    x, y = b.asarray(X), b.asarray(Y)
    with pytest.raises(StructureError, match=r"pair \(x, y\)"):
        opt.step(params, state, (x, y, y))
    with pytest.raises(MixedBackendError, match="numpy.ndarray"):
        opt.step(params, state, (X, y))
    rows = torch.full((6, 3), 0.5, dtype=torch.float64)  # rows summing to 1.5
    with pytest.raises(LabelError, match="probability vectors"):
        opt.step(params, state, (x, rows))
    good = rows / 1.5
    _, _, info = opt.step(params, state, (x, good))
    assert bool(info.finite)


def test_labels_are_checked_once_per_batch_and_again_after_an_in_place_change():
    """The memo follows torch's version counter: refilling the label tensor in place with a bad
    label is caught on the next step."""
    pytest.importorskip("torch")
    b = backends.get("torch")
    opt, params, state = _setup("sgd", b)
    x, y = b.asarray(X), b.asarray(Y.copy())
    params, state, _ = opt.step(params, state, (x, y))
    y[0] = 7
    with pytest.raises(LabelError, match="from 0 to 7"):
        opt.step(params, state, (x, y))


def _numeric_arguments(method):
    """The constructor arguments of a registered method that take a number: those with a numeric
    default (in the signature or the registry) or a float/int annotation."""
    spec = METHODS[method]
    out = []
    for name, p in inspect.signature(spec.cls.__init__).parameters.items():
        if name in ("self", "apply", "loss") or p.kind is not p.KEYWORD_ONLY:
            continue
        default = spec.defaults.get(name, p.default)
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric or any(t in str(p.annotation) for t in ("float", "int")):
            out.append(name)
    return out


@pytest.mark.parametrize("method", NAMES)
def test_nan_and_inf_hyperparameters_are_named(method):
    names = _numeric_arguments(method)
    assert names, method
    for name in names:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(HyperparameterError, match=rf"{name}={bad!r}") as err:
                METHODS[method](MODEL.apply, LOSS, **{name: bad})
            assert isinstance(err.value, ValueError) and isinstance(err.value, SecondOrderError)
            assert METHODS[method].cls.__name__ in str(err.value)


def test_ranges_are_in_the_message_and_arrays_and_schedules_pass():
    with pytest.raises(HyperparameterError, match=r"lr=-0.1 is not valid; lr must be a finite "
                                                  r"number >= 0"):
        SGD(MODEL.apply, LOSS, lr=-0.1)  # 0 is a zero step (a warm-up's start)
    with pytest.raises(HyperparameterError, match=r"lr=-0.1 is not valid; lr must be a finite "
                                                  r"number > 0"):
        METHODS["kfac"](MODEL.apply, LOSS, lr=-0.1)
    with pytest.raises(HyperparameterError, match=r"b1 must be a finite number in \[0, 1\)"):
        METHODS["adam"](MODEL.apply, LOSS, b1=1.0)
    with pytest.raises(HyperparameterError, match="cg_iters must be a finite integer >= 1"):
        METHODS["hessian-free"](MODEL.apply, LOSS, cg_iters=0)
    with pytest.raises(HyperparameterError, match=r"lambda_thresholds\[1\]=inf"):
        METHODS["curveball"](MODEL.apply, LOSS, lambda_thresholds=(0.5, math.inf))
    SGD(MODEL.apply, LOSS, lr=lambda count: 0.1)  # a schedule is not a number
    SGD(MODEL.apply, LOSS, lr=np.float64(0.1))
    with pytest.raises(HyperparameterError):
        SGD(MODEL.apply, LOSS, lr=np.float32("nan"))  # NumPy scalars are numbers


def test_checked_mode_catches_bad_labels_under_jit():
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    opt, params, state = _setup("sgd", b)
    x = b.asarray(X)
    bad = b.asarray(np.array([0, 1, 2, 3, 1, 0]))
    # documented behaviour: plain jax.jit cannot raise on values
    _, _, info = jax.jit(opt.step)(params, state, (x, bad))
    step = checked(opt.step)
    with pytest.raises(LabelError, match=r"\[0, 2\] for 3 outputs; got values from 0 to 3"):
        step(params, state, (x, bad))
    good = b.asarray(Y)
    p1, _, i1 = step(params, state, (x, good))
    p2, _, i2 = jax.jit(opt.step)(params, state, (x, good))
    assert float(i1.loss) == float(i2.loss)
    for a, c in zip(tree.leaves(p1), tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_bce_targets_outside_unit_interval(backend_name):
    """SigmoidBCE targets outside [0, 1] gave a finite loss unbounded below and finite=True;
    now LabelError. Targets in [0, 1] step, and the loss is the float64 oracle's."""
    b = _backend(backend_name)
    model = MLP([3, 4, 2], "tanh")
    opt = SGD(model.apply, losses.SigmoidBCE())
    params = model.init(0, b, dtype="float64")
    state = opt.init(params)
    x = b.asarray(X)
    for bad in (2.0, -0.5):
        y = np.full((6, 2), 0.5)
        y[3, 1] = bad
        with pytest.raises(LabelError, match=r"\[0, 1\]"):
            opt.step(params, state, (x, b.asarray(y)))
    y = np.tile([0.0, 1.0], (6, 1))
    _, _, info = opt.step(params, state, (x, b.asarray(y)))
    f = np.asarray(b.to_numpy(model.apply(params, x)), dtype=np.float64)
    expected = np.mean(np.sum(np.logaddexp(0.0, f) - y * f, axis=1))
    assert float(info.loss) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mse_and_bce_targets_of_another_shape(backend_name):
    """Targets whose shape is not the outputs' gave the framework's broadcast error (numpy
    ValueError, torch RuntimeError, jax TypeError) inside the step; now ShapeError."""
    b = _backend(backend_name)
    x = b.asarray(X)
    for loss in (losses.MSE(), losses.SigmoidBCE()):
        opt = SGD(MODEL.apply, loss)
        params = MODEL.init(0, b, dtype="float64")
        state = opt.init(params)
        for y in (np.zeros((6, 2)), np.zeros(6)):
            with pytest.raises(ShapeError, match=r"targets have shape"):
                opt.step(params, state, (x, b.asarray(y)))


@pytest.mark.parametrize("method", NAMES)
def test_hyperparameters_of_the_wrong_type_are_named(method):
    """A string or a list where a ranged number belongs ("0.1", [0.1]) was accepted, or raised a
    bare TypeError / ValueError from int() or a comparison; now HyperparameterError naming it."""
    ranged = METHODS[method].cls.hyperparameters
    names = [n for n in _numeric_arguments(method) if n in ranged]
    for name in names:
        for bad in ("0.1", [0.1]):
            with pytest.raises(HyperparameterError, match=re.escape(f"{name}={bad!r} is not")):
                METHODS[method](MODEL.apply, LOSS, **{name: bad})


def test_curveball_thresholds_must_be_two_numbers():
    """lambda_thresholds of the wrong shape or type raised a bare unpacking error."""
    for bad in ("ab", 0.5, [1.0], ("a", "b"), (1.5, 0.5)):
        with pytest.raises(HyperparameterError, match="lambda_thresholds"):
            METHODS["curveball"](MODEL.apply, LOSS, lambda_thresholds=bad)


@pytest.mark.parametrize(("name", "bad"), [("tau", 0), ("mu_g", 1.0), ("mu_eta", -0.1),
                                           ("max_iter", 0), ("rcond", -1.0),
                                           ("plateau_factor", 0.0)])
def test_grouped_newton_ranges(name, bad):
    """GroupedNewton's constructor goes through the one hyperparameter rule (its table)."""
    with pytest.raises(HyperparameterError, match=re.escape(f"{name}={bad!r} is not valid")):
        METHODS["grouped-newton"](MODEL.apply, LOSS, **{name: bad})
