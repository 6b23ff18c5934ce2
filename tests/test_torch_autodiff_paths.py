"""The torch backend's two ways to differentiate: outside every transform it records on the
autograd tape (VJPs, gradients) and pushes dual tensors (JVPs); inside a torch.func transform,
or where the function takes a forward-mode derivative of its own, it uses torch.func. Each case
is held to torch.func itself (the independent reference) on a float64 tanh network, to 1e-12,
and the results must come back detached, as torch.func's do."""

from __future__ import annotations

import numpy as np
import pytest

from secondorder import backends

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-12


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = r(7, 5)
    params = {"w1": r(4, 5), "b1": r(4), "w2": r(3, 4), "b2": r(3)}
    tangent = {k: r(*v.shape) for k, v in params.items()}
    cotangent = r(7, 3)
    return x, params, tangent, cotangent


def _net(x):
    def apply(p):
        return F.linear(torch.tanh(F.linear(x, p["w1"], p["b1"])), p["w2"], p["b2"])

    return apply


def _mismatch(a, b) -> float:
    """The largest excess of |a - b| over TOL (1 + |b|) across matching leaves (<= 0 when all
    agree to TOL, as np.allclose with rtol = atol = TOL); inf when a result still carries an
    autograd graph (torch.func's come back detached)."""
    la = a if isinstance(a, (list, tuple)) else [a]
    lb = b if isinstance(b, (list, tuple)) else [b]
    worst = -np.inf
    for u, v in zip(la, lb, strict=True):
        if isinstance(u, dict):
            worst = max(worst, _mismatch([u[k] for k in sorted(u)], [v[k] for k in sorted(v)]))
            continue
        if u.requires_grad or u.grad_fn is not None:
            return np.inf
        u_, v_ = u.numpy(), v.detach().numpy()
        worst = max(worst, float(np.max(np.abs(u_ - v_) - TOL * (1.0 + np.abs(v_)))))
    return worst


@pytest.mark.parametrize("context", ["plain", "no_grad", "parameters"])
def test_jvp_vjp_linearize_vjp_match_torch_func(problem, context):
    """Plain tensors, a caller's torch.no_grad and nn.Parameters (requires_grad) all give
    torch.func's products; nothing returned carries an autograd graph."""
    b = backends.get("torch")
    x, params, tangent, cotangent = problem
    if context == "parameters":
        params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    f = _net(x)
    ref_out, ref_jvp = torch.func.jvp(f, (params,), (tangent,))
    ref_vjp = torch.func.vjp(f, params)[1](cotangent)[0]
    with torch.no_grad() if context == "no_grad" else torch.enable_grad():
        out, jv = b.jvp(f, params, tangent)
        y, pullback = b.vjp(f, params)
        vj = pullback(cotangent)
        vj_again = pullback(2.0 * cotangent)  # the graph is kept for further products
        y2, jvp_fn, pullback2 = b.linearize_vjp(f, params)
        jv2, vj2 = jvp_fn(tangent), pullback2(cotangent)
    assert _mismatch([out, jv, y, y2, jv2], [ref_out, ref_jvp, ref_out, ref_out, ref_jvp]) <= 0
    assert _mismatch([vj, vj2], [ref_vjp, ref_vjp]) <= 0
    assert _mismatch([vj_again], [{k: 2.0 * v for k, v in ref_vjp.items()}]) <= 0


def test_vjp_with_aux_tree_outputs_and_unused_leaves(problem):
    """A tree of outputs, aux data, and a leaf no output depends on (zero cotangent, as
    torch.func gives)."""
    b = backends.get("torch")
    x, params, _, cotangent = problem
    params = dict(params, unused=torch.ones(2, dtype=torch.float64))
    f = _net(x)

    def g(p):
        out = f(p)
        return {"out": out, "sq": (out ** 2).sum(1)}, {"mean": out.mean()}

    cot = {"out": cotangent, "sq": cotangent[:, 0]}
    y, pullback, aux = b.vjp(g, params, has_aux=True)
    ref_y, ref_pullback, ref_aux = torch.func.vjp(g, params, has_aux=True)
    assert _mismatch([y["out"], y["sq"], aux["mean"]],
                     [ref_y["out"], ref_y["sq"], ref_aux["mean"]]) <= 0
    got, ref = pullback(cot), ref_pullback(cot)[0]
    assert _mismatch([got], [ref]) <= 0
    assert float(got["unused"].abs().sum()) == 0.0
    # an output that does not depend on the inputs at all: a zero tangent and cotangent
    const = torch.arange(3.0, dtype=torch.float64)
    _, jv = b.jvp(lambda p: const, params, params)
    assert _mismatch([jv], [torch.zeros(3, dtype=torch.float64)]) <= 0
    assert _mismatch([b.vjp(lambda p: const, params)[1](const)],
                     [{k: torch.zeros_like(v) for k, v in params.items()}]) <= 0
    # an output that is not a tensor is refused, as torch.func refuses it
    with pytest.raises(RuntimeError, match="only tensors"):
        b.jvp(lambda p: (f(p), 2.0), params, params)
    with pytest.raises(RuntimeError, match="only tensors"):
        torch.func.jvp(lambda p: (f(p), 2.0), (params,), (params,))


def test_nested_forward_mode_and_transforms_use_torch_func(problem):
    """A JVP of a Hessian-vector product (forward over forward over reverse, as GroupedNewton
    takes third derivatives) and the backend's products under torch.func.vmap match the
    all-torch.func computation."""
    b = backends.get("torch")
    x, params, tangent, _ = problem
    f = _net(x)

    def scalar(p):
        return (torch.tanh(f(p)) ** 2).sum()

    def hvp_ref(p):
        return torch.func.jvp(torch.func.grad(scalar), (p,), (tangent,))[1]

    got = b.jvp(lambda p: b.hvp(scalar, p, tangent), params, tangent)
    ref = torch.func.jvp(hvp_ref, (params,), (tangent,))
    assert _mismatch([got[0], got[1]], [ref[0], ref[1]]) <= 0
    # inside vmap: a batch of two tangents
    batched = {k: torch.stack([v, -2.0 * v]) for k, v in tangent.items()}
    got_v = torch.func.vmap(lambda t: b.jvp(f, params, t)[1])(batched)
    ref_v = torch.func.vmap(lambda t: torch.func.jvp(f, (params,), (t,))[1])(batched)
    assert _mismatch([got_v], [ref_v]) <= 0


class _Square(torch.autograd.Function):
    """x^2 with a backward formula and no forward-mode (jvp) formula."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2.0 * x * g


def test_an_operation_without_forward_mode_raises_a_named_error():
    """A JVP through an operation torch has no forward-mode formula for raises
    AutodiffUnavailableError (still a NotImplementedError) naming what can run instead; VJPs
    through it still work (d/dx x^2 = 2x); a CurveBall step through the torch.optim adapter
    raises it and leaves the module's weights as they were."""
    from secondorder.errors import AutodiffUnavailableError
    from secondorder.integrations.torch import Optimizer

    b = backends.get("torch")
    w = {"w": torch.arange(1.0, 4.0, dtype=torch.float64)}
    with pytest.raises(AutodiffUnavailableError, match="'kfac'") as err:
        b.jvp(lambda p: _Square.apply(p["w"]), w, w)
    assert isinstance(err.value, NotImplementedError)
    cot = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    pulled = b.vjp(lambda p: _Square.apply(p["w"]), w)[1](cot)
    assert _mismatch([pulled], [{"w": 2.0 * w["w"] * cot}]) <= 0

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(_Square.apply(x @ torch.ones(3, 3) + self.lin.weight.sum()))

    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    with pytest.raises(AutodiffUnavailableError, match="curveball"):
        Optimizer(net, torch.nn.CrossEntropyLoss(), "curveball").step((x, y))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.isfinite(Optimizer(net, torch.nn.CrossEntropyLoss(), "sgd", lr=0.1).step((x, y)))
