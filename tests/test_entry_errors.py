"""A new user's first calls: a framework's model object or ``model.parameters()`` where the pure
API takes ``apply(params, x)``, and a framework's loss module where it takes a library loss."""

from __future__ import annotations

import numpy as np
import pytest

from secondorder.errors import StructureError, UnsupportedLossError
from secondorder.losses import SoftmaxCrossEntropy
from secondorder.models import from_torch
from secondorder.optim import CurveBall, HessianFree
from secondorder.optim.registry import METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_torch_module_is_pointed_to_its_adapters(name):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(StructureError, match="from_torch") as err:
        METHODS[name](model, SoftmaxCrossEntropy())
    assert "integrations.torch.Optimizer" in str(err.value)
    with pytest.raises(StructureError, match="integrations.torch.Optimizer"):
        METHODS[name](model.parameters(), SoftmaxCrossEntropy())


def test_flax_and_equinox_modules_are_pointed_to_their_adapters():
    nn = pytest.importorskip("flax.linen")
    eqx = pytest.importorskip("equinox")
    jax = pytest.importorskip("jax")
    with pytest.raises(StructureError, match="from_flax"):
        CurveBall(nn.Dense(3), SoftmaxCrossEntropy())
    with pytest.raises(StructureError, match="from_equinox"):
        CurveBall(eqx.nn.Linear(2, 3, key=jax.random.key(0)), SoftmaxCrossEntropy())


def test_a_torch_loss_module_works_in_the_pure_api():
    """nn.CrossEntropyLoss(reduction="sum") in the pure API gives the step of the library loss
    with the same scale (independent reference: the library's own Scaled loss, c = m)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    apply, params = from_torch(torch.nn.Sequential(torch.nn.Linear(4, 3)).double())
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    ours = HessianFree(apply, torch.nn.CrossEntropyLoss(reduction="sum"), cg_iters=3)
    ref = HessianFree(apply, SoftmaxCrossEntropy(reduction="sum"), cg_iters=3)
    a, _, info_a = ours.step(params, ours.init(params), (x, y))
    b, _, info_b = ref.step(params, ref.init(params), (x, y))
    expected = torch.nn.functional.cross_entropy(apply(params, x), y, reduction="sum")
    assert float(info_a.loss) == pytest.approx(float(expected), rel=1e-12)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


def test_a_plain_function_is_not_a_loss():
    with pytest.raises(UnsupportedLossError, match="SoftmaxCrossEntropy"):
        CurveBall(lambda p, x: x, lambda f, y: ((f - y) ** 2).mean())


def test_a_flax_nnx_module_is_pointed_to_from_nnx():
    """from_flax takes linen modules; an nnx module gets an UnsupportedModelError that names
    from_nnx, and the model from_nnx returns trains: CurveBall steps it as the same network
    built by hand as a pure function."""
    jax = pytest.importorskip("jax")
    nnx = pytest.importorskip("flax.nnx")
    import re

    from secondorder.errors import UnsupportedModelError
    from secondorder.losses import SoftmaxCrossEntropy
    from secondorder.models import from_flax, from_jax, from_nnx
    from secondorder.optim import CurveBall

    jnp = jax.numpy

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    net = Net(nnx.Rngs(0))
    with pytest.raises(UnsupportedModelError, match="flax.nnx module") as err:
        from_flax(net)
    assert re.search(r"from_nnx\(module\)", str(err.value))
    model, params = from_nnx(net)

    def by_hand(p, x):
        w1, b1, w2, b2 = p
        return jnp.tanh(x @ w1 + b1) @ w2 + b2

    weights = (net.l1.kernel[...], net.l1.bias[...], net.l2.kernel[...], net.l2.bias[...])
    hand, _ = from_jax(by_hand, weights)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 4)), dtype=jnp.float32)  # nnx's default dtype
    y = jnp.asarray(rng.integers(0, 3, 16))
    runs = []
    for m, p in ((model, params), (hand, weights)):
        opt = CurveBall(m, SoftmaxCrossEntropy())
        state = opt.init(p)
        for _ in range(3):
            p, state, info = opt.step(p, state, (x, y))
        runs.append(float(info.loss))
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)
