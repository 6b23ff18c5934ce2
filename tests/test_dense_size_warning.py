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
