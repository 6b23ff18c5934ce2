"""The dense methods warn, at ``init``, when their p x p matrix would be larger than
``DENSE_WARNING_BYTES``: the size in the message is p^2 times the dtype's bytes, p counted
leaf by leaf here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from secondorder import losses, optim
from secondorder.errors import DenseSizeWarning
from secondorder.models import MLP
from secondorder.optim import dense_size

METHODS = {
    "Newton": lambda model, loss: optim.Newton(model, loss),
    "LevenbergMarquardt": lambda model, loss: optim.LevenbergMarquardt(model, loss),
    "BFGS": lambda model, loss: optim.BFGS(model, loss),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_dense_methods_warn_above_the_threshold_only(name, monkeypatch):
    model = MLP([5, 7, 3])
    params = model.init(0, "numpy")
    p = sum(a.size for layer in params for a in layer.values())  # 5*7 + 7 + 7*3 + 3 = 66
    assert p == 66
    opt = METHODS[name](model, losses.SoftmaxCrossEntropy())
    bytes_ = p * p * np.dtype(params[0]["w"].dtype).itemsize
    monkeypatch.setattr(dense_size, "DENSE_WARNING_BYTES", bytes_ - 1)
    with pytest.warns(DenseSizeWarning, match=rf"{name} forms a dense 66 x 66 matrix") as seen:
        opt.init(params)
    assert "hessian-free" in str(seen[0].message)
    assert seen[0].filename == __file__  # points at the caller's init(...)
    monkeypatch.setattr(dense_size, "DENSE_WARNING_BYTES", bytes_)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseSizeWarning)
        opt.init(params)  # exactly at the threshold: silent


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_that_factor_the_matrix_warn_above_a_parameter_count(name, monkeypatch):
    """Newton and Levenberg-Marquardt factor the p x p matrix at every step (O(p^3) time, p
    curvature-vector products): they warn above DENSE_WARNING_PARAMETERS whatever the bytes;
    BFGS, whose step is O(p^2), does not."""
    model = MLP([5, 7, 3])
    params = model.init(0, "numpy")
    opt = METHODS[name](model, losses.SoftmaxCrossEntropy())
    monkeypatch.setattr(dense_size, "DENSE_WARNING_PARAMETERS", 65)  # p = 66
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt.init(params)
    dense = [w for w in seen if issubclass(w.category, DenseSizeWarning)]
    if name == "BFGS":
        assert not dense
    else:
        assert len(dense) == 1 and "3e+05 flops and 66 curvature-vector products" in str(
            dense[0].message)
    monkeypatch.setattr(dense_size, "DENSE_WARNING_PARAMETERS", 66)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseSizeWarning)
        opt.init(params)


def test_the_default_parameter_count_warns_for_a_network():
    """With the defaults, Newton on an MLP 64-64-10 (4810 parameters, 93 MB in float64, far
    under the byte threshold) warns."""
    model = MLP([64, 64, 10])
    params = model.init(0, "numpy")
    p = 64 * 64 + 64 + 64 * 10 + 10
    assert p == 4810 and p * p * 8 < dense_size.DENSE_WARNING_BYTES
    with pytest.warns(DenseSizeWarning, match="dense 4810 x 4810") as seen:
        optim.Newton(model, losses.SoftmaxCrossEntropy()).init(params)
    assert len([w for w in seen if issubclass(w.category, DenseSizeWarning)]) == 1
