"""``transform=`` on the Kronecker-factored methods and SMW, against independent references.

K-FAC, Shampoo, TNT, K-BFGS and K-BFGS(L) send the gradient through the user's transform
before their weight decay, momentum and preconditioning (torch's ``clip_grad_norm_`` before
``optimizer.step()``); SMW-GN and SMW-NG, which take a step of their own length, transform the
step (as Levenberg-Marquardt). References: the norm of the gradient from a hand-written
torch.func forward pass, linearity (a method whose curvature does not depend on the gradient
is linear in it, so ``scale(s)`` is the learning rate times s), Shampoo on the loss scaled by s
(its statistics are built from the gradient), and the dense GGN of the quadratic model that
K-FAC's damping adaptation uses.
"""

from __future__ import annotations

import numpy as np
import pytest

from secondorder import backends, losses, tree
from secondorder.errors import HyperparameterError
from secondorder.models import MLP
from secondorder.optim import KBFGS, KBFGSL, KFAC, SMWGN, SMWNG, TNT, Shampoo
from secondorder.optim.transforms import clip_by_global_norm, scale

pytest.importorskip("autograd")

NP = backends.get("numpy")
MODEL = MLP([4, 6, 3], "tanh")
LOSS = losses.SoftmaxCrossEntropy()
# options under which a method's curvature does not depend on the gradient's scale
LINEAR = {
    KFAC: {"lr": 0.05, "damping": 0.1, "statistics_interval": 2, "inverse_interval": 2},
    TNT: {"lr": 0.05, "eps": 0.1, "statistics_interval": 2, "inverse_interval": 2},
    KBFGS: {"lr": 0.05, "damping": 0.3, "curvature_interval": 2},
    KBFGSL: {"lr": 0.05, "damping": 0.3, "curvature_interval": 2, "memory": 3},
    SMWGN: {"lr": 0.5, "damping": 1.0, "curvature_batch": 6},
    SMWNG: {"lr": 0.5, "damping": 1.0, "curvature_batch": 6},
}


def _batches(seed: int, steps: int, m: int = 12) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((m, 4)), rng.integers(0, 3, m)) for _ in range(steps)]


def _flat(t) -> np.ndarray:
    return np.asarray(tree.ravel(t)[0])


def _run(opt, params, batches):
    state = opt.init(params)
    for batch in batches:
        params, state, info = opt.step(params, state, batch)
        assert bool(info.finite)
    return params, state


def _torch_gradient_norm(params, x, y) -> float:
    """|grad| of the mean cross-entropy of the MLP, from torch autograd on a forward pass
    written here (tanh hidden layer, weights (d_out, d_in))."""
    torch = pytest.importorskip("torch")
    ws = [{k: torch.tensor(v, requires_grad=True) for k, v in layer.items()} for layer in params]
    h = torch.tanh(torch.tensor(x) @ ws[0]["w"].T + ws[0]["b"])
    f = h @ ws[1]["w"].T + ws[1]["b"]
    torch.nn.functional.cross_entropy(f, torch.tensor(y)).backward()
    return float(torch.sqrt(sum((t.grad ** 2).sum() for layer in ws for t in layer.values())))


@pytest.mark.parametrize("cls", list(LINEAR), ids=lambda c: c.__name__)
def test_scaling_by_a_transform_is_scaling_the_learning_rate(cls):
    """With the gradient (or, for SMW, the step) multiplied by s at every step, every method
    here takes the steps of its learning rate times s: their curvature comes from the passes
    and sampled targets, not from the gradient, and momentum is linear."""
    params = MODEL.init(0, NP)
    batches = _batches(1, 5)
    options = LINEAR[cls]
    s = 0.3
    scaled, _ = _run(cls(MODEL, LOSS, transform=scale(s), **options), params, batches)
    slower, _ = _run(cls(MODEL, LOSS, **{**options, "lr": s * options["lr"]}), params, batches)
    moved = tree.norm(tree.sub(scaled, params))
    assert float(moved) > 1e-3
    np.testing.assert_allclose(_flat(scaled), _flat(slower), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [KFAC, TNT, KBFGS, SMWGN], ids=lambda c: c.__name__)
def test_clipping_scales_the_first_step_by_c_over_the_gradient_norm(cls):
    """A first step (zero momentum) with clip_by_global_norm(c), c below |g|, is the
    unclipped step times c / |g| (|g| from torch autograd); for SMW the step itself is clipped
    to length c."""
    params = MODEL.init(2, NP)
    (x, y), = _batches(3, 1)
    options = LINEAR[cls]
    plain, _ = _run(cls(MODEL, LOSS, **options), params, [(x, y)])
    step = tree.sub(plain, params)
    if cls is SMWGN:
        c = 0.5 * float(tree.norm(step))
        factor = c / float(tree.norm(step))
    else:
        norm = _torch_gradient_norm(params, x, y)
        c = 0.4 * norm
        factor = c / norm
    clipped, _ = _run(cls(MODEL, LOSS, transform=clip_by_global_norm(c), **options), params,
                      [(x, y)])
    np.testing.assert_allclose(_flat(tree.sub(clipped, params)),
                               factor * _flat(step), rtol=1e-10, atol=1e-15)


def test_shampoo_with_a_scaled_gradient_is_shampoo_on_the_scaled_loss():
    """Shampoo's statistics, momentum and graft all see the transformed gradient: with
    scale(s) it is Shampoo on the loss s l, step for step (decoupled weight decay is applied
    to the step, so it is unaffected)."""
    params = MODEL.init(4, NP)
    batches = _batches(5, 5)
    for options in ({"graft": None, "weight_decay": 0.01},
                    {"graft": "adam", "root_interval": 2},
                    {"graft": "sgd", "decoupled_weight_decay": False}):
        s = 0.3
        wd = options.get("weight_decay", 0.0)
        common = {"lr": 0.05, "eps": 1e-3, **options}
        if not options.get("decoupled_weight_decay", True):
            common["weight_decay"] = 0.0  # the L2 term would be scaled on one side only
        moved, _ = _run(Shampoo(MODEL, LOSS, transform=scale(s), **common), params, batches)
        ref, _ = _run(Shampoo(MODEL, losses.Scaled(LOSS, s), **common), params, batches)
        np.testing.assert_allclose(_flat(moved), _flat(ref), rtol=1e-10, atol=1e-14)
        assert float(tree.norm(tree.sub(moved, params))) > 1e-3, wd


def test_a_clipping_transform_keeps_its_state_in_the_methods_state():
    """A stateful transform (Adam's moments as the user's transform) lives in the state's
    ``transform`` field and advances with every accepted step."""
    from secondorder.optim.transforms import scale_by_adam

    params = MODEL.init(0, NP)
    for cls in (Shampoo, TNT, SMWNG):
        opt = cls(MODEL, LOSS, transform=scale_by_adam())
        _, state = _run(opt, params, _batches(6, 3))
        assert int(np.asarray(tree.leaves(state.transform)[0])) == 3, cls.__name__


@pytest.mark.parametrize("cls", [KFAC, Shampoo, TNT, KBFGS, KBFGSL, SMWGN, SMWNG],
                         ids=lambda c: c.__name__)
def test_a_transform_without_init_and_update_is_refused(cls):
    with pytest.raises(HyperparameterError, match="init"):
        cls(MODEL, LOSS, transform=lambda g: g)


def test_kfac_adaptive_damping_models_the_gradient_not_the_momentum():
    """The reduction ratio's quadratic model M(u) - M(0) = g^T u + 1/2 u^T (C + (lambda + wd) I) u
    takes the gradient g of the regularised batch loss (not the momentum-averaged, clipped
    direction), C the dense GGN of the batch: checked on the second step, with momentum,
    weight decay and clipping, against torch.func on a forward pass written here."""
    torch = pytest.importorskip("torch")
    model, loss = MLP([3, 4, 2], "tanh"), losses.MSE()
    params = model.init(1, NP)
    rng = np.random.default_rng(7)
    batches = [(rng.standard_normal((8, 3)), rng.standard_normal((8, 2))) for _ in range(2)]
    wd = 0.01
    opt = KFAC(model, loss, lr=0.05, momentum=0.9, weight_decay=wd, damping=0.1,
               adapt_damping=True, damping_interval=1, transform=clip_by_global_norm(0.05))
    state = opt.init(params)
    params, state, _ = opt.step(params, state, batches[0])
    lam = float(state.damping)
    new, _, info = opt.step(params, state, batches[1])
    x, y = (torch.tensor(a) for a in batches[1])
    w = [{k: torch.tensor(v) for k, v in layer.items()} for layer in params]
    u = [{k: torch.tensor(new[i][k] - params[i][k]) for k in layer}
         for i, layer in enumerate(params)]

    def forward(w):
        return torch.tanh(x @ w[0]["w"].T + w[0]["b"]) @ w[1]["w"].T + w[1]["b"]

    def objective(w):
        return 0.5 * ((forward(w) - y) ** 2).sum(1).mean()

    g = torch.func.grad(objective)(w)
    _, ju = torch.func.jvp(forward, (w,), (u,))
    dot = sum(((g[i][k] + wd * w[i][k]) * u[i][k]).sum() for i in range(2) for k in w[i])
    uu = sum((u[i][k] ** 2).sum() for i in range(2) for k in w[i])
    expected = float(dot + 0.5 * ((ju ** 2).sum() / 8 + (lam + wd) * uu))
    assert abs(expected) > 1e-6
    np.testing.assert_allclose(float(info.extras["predicted"]), expected, rtol=1e-10)


def test_prox_linear_refuses_a_second_order_method_as_its_optimizer():
    """ProxLinear(optimizer=...) takes a GradientDescent method's update rule; K-FAC with a
    transform= (an add-on, not its update rule) is refused instead of being replaced by the
    clip alone."""
    from secondorder.optim import ProxLinear

    with pytest.raises(HyperparameterError, match="GradientDescent"):
        ProxLinear(MODEL, LOSS, update="spl",
                   optimizer=KFAC(MODEL, LOSS, transform=clip_by_global_norm(1.0)))
