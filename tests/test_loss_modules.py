"""PyTorch loss modules through ``as_loss``, and the library losses' ``reduction`` and ``scale``.

References: torch's own modules (values, and gradients by torch.autograd) for the mapping;
brute-force NumPy formulas for the scaled per-sample quantities; the unscaled library operator
times the stated constant for the curvature (GGN, Monte-Carlo Fisher).
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from helpers import assert_close, raveled, softmax, to
from secondorder import backends, losses, tree
from secondorder._pytree import flatten, unflatten
from secondorder.curvature import GGN, Fisher
from secondorder.errors import HyperparameterError, LabelError, UnsupportedLossError
from secondorder.models import MLP

M, K = 5, 3


def _targets(kind, rng, m=M, k=K):
    if kind == "labels":
        return rng.integers(0, k, size=m)
    if kind == "probs":
        return rng.dirichlet(np.ones(k), size=m)
    if kind == "binary":
        return (rng.random((m, k)) < 0.5).astype(float)
    return rng.standard_normal((m, k))


# (torch module name, target kind, library loss, constant c as a function of (m, k))
MODULES = {
    ("CrossEntropyLoss", "mean", "labels"): ("softmax_cross_entropy", lambda m, k: 1.0),
    ("CrossEntropyLoss", "sum", "labels"): ("softmax_cross_entropy", lambda m, k: m),
    ("CrossEntropyLoss", "mean", "probs"): ("softmax_cross_entropy", lambda m, k: 1.0),
    ("CrossEntropyLoss", "sum", "probs"): ("softmax_cross_entropy", lambda m, k: m),
    ("MSELoss", "mean", "real"): ("mse", lambda m, k: 2.0 / k),
    ("MSELoss", "sum", "real"): ("mse", lambda m, k: 2.0 * m),
    ("BCEWithLogitsLoss", "mean", "binary"): ("sigmoid_bce", lambda m, k: 1.0 / k),
    ("BCEWithLogitsLoss", "sum", "binary"): ("sigmoid_bce", lambda m, k: m),
    ("BCEWithLogitsLoss", "mean", "real01"): ("sigmoid_bce", lambda m, k: 1.0 / k),
}


def _torch_batch(torch, kind, rng, m=M, k=K):
    f = torch.tensor(2.0 * rng.standard_normal((m, k)), dtype=torch.float64)
    y = _targets(kind, rng, m, k)
    if kind == "real01":
        y = rng.random((m, k))
    y = torch.tensor(y) if y.dtype.kind in "iu" else torch.tensor(y, dtype=torch.float64)
    return f, y


@pytest.mark.parametrize("case", sorted(MODULES), ids="-".join)
def test_torch_module_value_and_gradient(case, rng):
    torch = pytest.importorskip("torch")
    name, reduction, kind = case
    module = getattr(torch.nn, name)(reduction=reduction)
    loss = losses.as_loss(module)
    base_name, constant = MODULES[case]
    for m, k in [(M, K), (7, 4)]:
        f, y = _torch_batch(torch, kind, rng, m, k)
        loss.check(f, y)
        expected = module(f, y)
        assert_close(loss.value(f, y).item(), expected.item())
        # the library's batch loss is the mean of per_sample for every loss
        assert_close(torch.mean(loss.per_sample(f, y)).item(), expected.item())
        fr = f.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(module(fr, y), fr)
        assert_close(loss.grad(f, y).numpy() / m, g.numpy())
        # the constant: grad = c * grad of the library's unscaled loss
        plain = losses.get(base_name)
        assert loss.factor(f) == pytest.approx(constant(m, k), rel=1e-15)
        assert_close(loss.grad(f, y).numpy(), constant(m, k) * plain.grad(f, y).numpy())


def test_library_loss_is_returned_unchanged():
    for loss in (losses.MSE(), losses.SoftmaxCrossEntropy(reduction="sum"),
                 losses.Scaled(losses.SigmoidBCE(), 3.0)):
        assert losses.as_loss(loss) is loss


def _mlp_setup(backend, kind, rng, m=4, k=3):
    model = MLP([2, 4, k], "tanh")
    params = model.init(0, backend)
    x = to(backend, rng.standard_normal((m, 2)))
    y = _targets(kind, rng, m, k)
    y = backend.asarray(y) if y.dtype.kind in "iu" else to(backend, y)
    return model, params, (x, y)


@pytest.mark.parametrize("name,reduction,kind,base,constant", [
    ("MSELoss", "sum", "real", "mse", lambda m, k: 2.0 * m),
    ("MSELoss", "mean", "real", "mse", lambda m, k: 2.0 / k),
    ("CrossEntropyLoss", "sum", "labels", "softmax_cross_entropy", lambda m, k: m),
    ("CrossEntropyLoss", "mean", "labels", "softmax_cross_entropy", lambda m, k: 1.0),
    ("BCEWithLogitsLoss", "mean", "binary", "sigmoid_bce", lambda m, k: 1.0 / k),
])
def test_ggn_with_a_torch_module_is_the_scaled_library_ggn(name, reduction, kind, base,
                                                           constant, rng):
    torch = pytest.importorskip("torch")
    backend = backends.get("torch")
    model, params, batch = _mlp_setup(backend, kind, rng)
    m, k = 4, 3
    mapped = losses.as_loss(getattr(torch.nn, name)(reduction=reduction))
    g_mapped = GGN(model.apply, mapped, params, batch).to_dense()
    g_plain = GGN(model.apply, losses.get(base), params, batch).to_dense()
    assert_close(g_mapped.numpy(), constant(m, k) * g_plain.numpy())


def test_ggn_of_mse_sum_is_the_hessian_of_torch_mse_sum(rng):
    """For a model linear in its parameters the GGN is the Hessian: the GGN with
    ``as_loss(nn.MSELoss(reduction="sum"))`` against torch.func.hessian of torch's own loss."""
    torch = pytest.importorskip("torch")
    m, k, d = 4, 3, 2
    x = torch.tensor(rng.standard_normal((m, d)))
    y = torch.tensor(rng.standard_normal((m, k)))
    w = torch.tensor(rng.standard_normal(k * d + k))

    def apply(w, x):
        return x @ w[:k * d].reshape(k, d).T + w[k * d:]

    module = torch.nn.MSELoss(reduction="sum")
    hess = torch.func.hessian(lambda w: module(apply(w, x), y))(w)
    g = GGN(apply, losses.as_loss(module), w, (x, y)).to_dense()
    assert_close(g.numpy(), hess.numpy())
    plain = GGN(apply, losses.MSE(), w, (x, y)).to_dense()
    assert_close(g.numpy(), 2 * m * plain.numpy())


# ---------------------------------------------------------------------------------------------
# the library losses' options on every backend, against brute-force formulas

def _sig(f):
    return 1.0 / (1.0 + np.exp(-f))


def _np_reference(name, f, y):
    """(per-sample loss, grad, Hessians) of the unscaled library loss, written out in NumPy."""
    m, k = f.shape
    if name == "mse":
        return 0.5 * ((f - y) ** 2).sum(1), f - y, np.broadcast_to(np.eye(k), (m, k, k))
    if name == "softmax_cross_entropy":
        s = softmax(f)
        rows = np.eye(k)[y] if y.ndim == 1 else y
        lse = np.log(np.exp(f - f.max(1, keepdims=True)).sum(1)) + f.max(1)
        h = np.einsum("ij,jk->ijk", s, np.eye(k)) - s[:, :, None] * s[:, None, :]
        return lse - (f * rows).sum(1), s - rows, h
    s = _sig(f)
    return ((np.logaddexp(0.0, f) - y * f).sum(1), s - y,
            np.einsum("ij,jk->ijk", s * (1 - s), np.eye(k)))


OPTIONS = [dict(reduction="sum"), dict(scale=0.3), dict(scale=2.0, outputs="mean"),
           dict(scale=1.5, reduction="sum", outputs="mean")]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                    o.items()))
@pytest.mark.parametrize("name,kind", [("mse", "real"), ("softmax_cross_entropy", "labels"),
                                       ("softmax_cross_entropy", "probs"),
                                       ("sigmoid_bce", "real01")])
@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_scaled_quantities_match_brute_force(backend_name, rng, name, kind, options):
    if backend_name != "numpy":
        pytest.importorskip(backend_name)
    backend = backends.get(backend_name)
    m, k = 6, 4
    f = 2.0 * rng.standard_normal((m, k))
    y = rng.random((m, k)) if kind == "real01" else _targets(kind, rng, m, k)
    loss = losses.get(name, **options)
    assert isinstance(loss, losses.Scaled) and not isinstance(loss, losses.LOSSES[name])
    # outputs="mean" averages over a sample's outputs: its k entries for MSE and BCE, its one
    # prediction (one softmax) for cross-entropy on (m, k) outputs
    n = 1 if name == "softmax_cross_entropy" else k
    c = options.get("scale", 1.0) * (m if options.get("reduction") == "sum" else 1)
    c /= n if options.get("outputs") == "mean" else 1
    per, g, h = _np_reference(name, f, y)
    total = per.sum() if options.get("reduction") == "sum" else per.mean()
    total *= options.get("scale", 1.0) / (n if options.get("outputs") == "mean" else 1)

    bf = to(backend, f)
    by = backend.asarray(y) if y.dtype.kind in "iu" else to(backend, y)
    v = rng.standard_normal((m, k))
    bv = to(backend, v)
    assert loss.factor(bf) == pytest.approx(c, rel=1e-15)
    assert_close(loss.value(bf, by), total, backend=backend)
    assert_close(loss.per_sample(bf, by), c * per, backend=backend)
    assert_close(loss.grad(bf, by), c * g, backend=backend)
    assert_close(loss.hvp(bf, by, bv), c * np.einsum("ijk,ik->ij", h, v), backend=backend)
    assert_close(loss.hvp_at(bf, by)(bv), c * np.einsum("ijk,ik->ij", h, v), backend=backend)
    assert_close(loss.hessian(bf, by), c * h, backend=backend)
    s = np.asarray(backend.to_numpy(loss.hessian_sqrt(bf, by)))
    assert_close(np.einsum("ijk,ilk->ijl", s, s), c * h)
    pinv = np.stack([np.linalg.pinv(c * hi) for hi in h])
    assert_close(loss.pinv_hvp(bf, by, bv), np.einsum("ijk,ik->ij", pinv, v), rtol=1e-10,
                 backend=backend)
    proj = np.einsum("ijk,ikl,il->ij", h, pinv * c, v)
    assert_close(loss.projector(bf, by, bv), proj, rtol=1e-10, backend=backend)
    # Fenchel-Young equality at a = grad: l*(a) = <a, f> - l(f) for the scaled loss
    a = loss.grad(bf, by)
    expected = (c * g * f).sum(1) - c * per
    assert_close(loss.conjugate(a, by), expected, rtol=1e-10, backend=backend)
    assert_close(loss.targets(bf, by), losses.get(name).targets(bf, by), backend=backend)


def test_defaults_are_the_plain_loss():
    for cls in (losses.MSE, losses.SoftmaxCrossEntropy, losses.SigmoidBCE):
        for loss in (cls(), cls(reduction="mean"), cls(scale=1.0), cls(outputs="sum")):
            assert type(loss) is cls
            assert (loss.reduction, loss.scale, loss.outputs) == ("mean", 1.0, "sum")


def test_scaled_nesting_repr_and_pickle():
    loss = losses.Scaled(losses.MSE(reduction="sum"), 3.0, outputs="mean")
    assert (type(loss.loss), loss.scale, loss.reduction, loss.outputs) == (
        losses.MSE, 3.0, "sum", "mean")
    assert repr(loss) == "Scaled(MSE(), scale=3.0, reduction='sum', outputs='mean')"
    back_ = pickle.loads(pickle.dumps(loss))
    assert repr(back_) == repr(loss)
    with pytest.raises(HyperparameterError):
        losses.Scaled(losses.MSE(reduction="sum"), reduction="sum")
    for bad in (dict(reduction="none"), dict(scale=0.0), dict(scale=-1.0), dict(scale="2"),
                dict(outputs="max"), dict(scale=float("inf"))):
        with pytest.raises(HyperparameterError):
            losses.MSE(**bad)
    with pytest.raises(UnsupportedLossError):
        losses.Scaled(lambda f, y: f)


# ---------------------------------------------------------------------------------------------
# sampling: the Fisher of c l is c times the Fisher of l

@pytest.mark.parametrize("name", ["mse", "softmax_cross_entropy", "sigmoid_bce"])
def test_scaled_sampling_gives_c_times_the_fisher(rng, name):
    m, k, c = 5, 3, 2.5
    f = rng.standard_normal((m, k))
    plain, scaled = losses.get(name), losses.get(name, scale=c)
    noise = plain.noise((m, k), np.random.default_rng(1))
    t, t_scaled = plain.sample(f, noise), scaled.sample(f, noise)
    # the scaled residual is sqrt(c) times the unscaled one at the same noise
    assert_close(scaled.grad(f, t_scaled), np.sqrt(c) * plain.grad(f, t))
    if name == "mse":
        assert_close(t_scaled, f + noise / np.sqrt(c))  # the Gaussian with precision c
    # in expectation: E[r r^T] = c H (the GGN's middle factor), checked on many draws
    draws = 20000
    big = np.repeat(f[:1], draws, axis=0)
    r = scaled.grad(big, scaled.sample(big, scaled.noise((draws, k), rng)))
    cov = r.T @ r / draws
    assert_close(cov, scaled.hessian(f[:1], t[:1])[0], rtol=0.05)


def test_mc_fisher_of_cross_entropy_sum_is_m_times_fisher(rng):
    torch = pytest.importorskip("torch")
    backend = backends.get("torch")
    model, params, batch = _mlp_setup(backend, "labels", rng)
    mapped = losses.as_loss(torch.nn.CrossEntropyLoss(reduction="sum"))
    fs = Fisher(model.apply, mapped, params, batch, samples=3, seed=4).to_dense()
    fp = Fisher(model.apply, losses.SoftmaxCrossEntropy(), params, batch, samples=3,
                seed=4).to_dense()
    assert_close(fs.numpy(), 4 * fp.numpy())
    # the empirical Fisher uses the gradients of the scaled loss: c^2 = m^2 times
    es = Fisher(model.apply, mapped, params, batch, kind="empirical").to_dense()
    ep = Fisher(model.apply, losses.SoftmaxCrossEntropy(), params, batch,
                kind="empirical").to_dense()
    assert_close(es.numpy(), 16 * ep.numpy())


def test_sampling_with_a_key_on_jax():
    pytest.importorskip("jax")
    from secondorder import random

    backend = backends.get("jax")
    f = to(backend, np.random.default_rng(0).standard_normal((4, 3)))
    loss = losses.MSE(scale=4.0)
    key = random.key(3, backend)
    t = loss.sample(f, key=key)
    e = losses.MSE().sample(f, key=key) - f
    assert_close(t, np.asarray(f) + np.asarray(e) / 2.0, backend=backend)


# ---------------------------------------------------------------------------------------------
# what as_loss refuses

def _refused(torch):
    nn = torch.nn
    return [
        nn.CrossEntropyLoss(weight=torch.ones(3)),
        nn.CrossEntropyLoss(ignore_index=0),
        nn.CrossEntropyLoss(reduction="none"),
        nn.MSELoss(reduction="none"),
        nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)),
        nn.BCEWithLogitsLoss(weight=torch.ones(3)),
        nn.BCELoss(),
        nn.NLLLoss(),
        nn.L1Loss(),
        nn.Linear(2, 2),
    ]


def test_unsupported_torch_options_raise_a_named_error():
    torch = pytest.importorskip("torch")
    for module in _refused(torch):
        with pytest.raises(UnsupportedLossError, match="(?i)use|drop|pass|remove|call"):
            losses.as_loss(module)
    with pytest.raises(UnsupportedLossError, match="BCEWithLogitsLoss"):
        losses.as_loss(torch.nn.BCELoss())
    # the default ignore_index (-100) is no valid class and is accepted
    assert isinstance(losses.as_loss(torch.nn.CrossEntropyLoss()), losses.SoftmaxCrossEntropy)


# ---------------------------------------------------------------------------------------------
# label smoothing

@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4)])
def test_label_smoothing_is_torchs(name, shape, rng):
    """SoftmaxCrossEntropy(label_smoothing=eps) (outputs="mean" on a sequence): value and
    gradient against torch's F.cross_entropy(label_smoothing=eps) on the flattened tokens, on
    every backend; the converted nn.CrossEntropyLoss carries eps."""
    torch = pytest.importorskip("torch")
    if name != "numpy":
        pytest.importorskip(name)
    b = backends.get(name)
    eps, k = 0.2, shape[-1]
    f = 2.0 * rng.standard_normal(shape)
    y = rng.integers(0, k, shape[:-1])
    ft = torch.tensor(f, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(ft.reshape(-1, k), torch.tensor(y).reshape(-1),
                                                 label_smoothing=eps)
    (g,) = torch.autograd.grad(expected, ft)
    loss = losses.SoftmaxCrossEntropy(label_smoothing=eps, outputs="mean")
    fb, yb = b.asarray(f), b.asarray(y)
    assert_close(float(loss.value(fb, yb)), expected.item(), rtol=1e-14)
    assert_close(np.asarray(b.to_numpy(loss.grad(fb, yb))) / shape[0], g.numpy(), rtol=1e-13)
    if len(shape) == 2:
        module = torch.nn.CrossEntropyLoss(label_smoothing=eps, reduction="sum")
        mapped = losses.as_loss(module)
        assert_close(mapped.value(torch.tensor(f), torch.tensor(y)).item(),
                     module(torch.tensor(f), torch.tensor(y)).item(), rtol=1e-14)


def test_label_smoothing_is_optaxs(rng):
    """Against optax: softmax_cross_entropy with optax.smooth_labels' rows."""
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    f, y = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    rows = optax.smooth_labels(jnp.eye(3)[y], 0.3)
    expected = float(optax.softmax_cross_entropy(jnp.asarray(f), rows).mean())
    loss = losses.SoftmaxCrossEntropy(label_smoothing=0.3)
    assert_close(float(loss.value(jnp.asarray(f), jnp.asarray(y))), expected, rtol=1e-6)


def test_label_smoothing_changes_the_targets_not_the_curvature(rng):
    """The GGN and the Monte-Carlo Fisher (same noise) equal the unsmoothed loss's, whose
    sampled labels become unsmoothed one-hot rows; the empirical Fisher is built from the
    per-sample gradients at the smoothed targets (autograd of torch's smoothed loss)."""
    torch = pytest.importorskip("torch")
    backend = backends.get("torch")
    model, params, batch = _mlp_setup(backend, "labels", rng)
    plain, smooth = losses.SoftmaxCrossEntropy(), losses.SoftmaxCrossEntropy(label_smoothing=0.1)
    for build in (lambda loss: GGN(model.apply, loss, params, batch),
                  lambda loss: Fisher(model.apply, loss, params, batch, samples=2, seed=3)):
        assert_close(build(smooth).to_dense().numpy(), build(plain).to_dense().numpy(),
                     rtol=1e-14)
    x, y = batch
    leaves, treedef = flatten(params)
    grads = []
    for i in range(x.shape[0]):
        p = [v.clone().requires_grad_(True) for v in leaves]
        value = torch.nn.functional.cross_entropy(model.apply(unflatten(treedef, p), x[i:i + 1]),
                                                  y[i:i + 1], label_smoothing=0.1)
        g = torch.autograd.grad(value, p)
        grads.append(tree.ravel(unflatten(treedef, list(g)))[0])
    gs = torch.stack(grads)
    empirical = Fisher(model.apply, smooth, params, batch, kind="empirical").to_dense()
    assert_close(empirical.numpy(), (gs.T @ gs / x.shape[0]).numpy(), rtol=1e-12)


def test_label_smoothing_bad_values_and_rows_with_torch():
    torch = pytest.importorskip("torch")
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(HyperparameterError, match="label_smoothing"):
            losses.SoftmaxCrossEntropy(label_smoothing=bad)
    mapped = losses.as_loss(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    f = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(LabelError, match="smooths probability-row targets too"):
        mapped.value(f, torch.full((2, 3), 1 / 3, dtype=torch.float64))
    assert repr(mapped) == "TorchCrossEntropy(label_smoothing=0.1)"


def test_plain_callables_and_other_objects_raise():
    with pytest.raises(UnsupportedLossError, match="callable"):
        losses.as_loss(lambda f, y: ((f - y) ** 2).mean())
    with pytest.raises(UnsupportedLossError, match="not a loss"):
        losses.as_loss("mse")
    # the error is also a TypeError and a ValueError, for generic handlers
    with pytest.raises(TypeError):
        losses.as_loss(3)
    with pytest.raises(ValueError):
        losses.as_loss(3)


def test_as_loss_does_not_import_torch():
    code = ("import sys\n"
            "from secondorder import errors, losses\n"
            "losses.as_loss(losses.MSE())\n"
            "try:\n    losses.as_loss(len)\nexcept errors.UnsupportedLossError:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# the optimisers take scaled losses unchanged

def _train_setup(kind, rng, m=6):
    backend = backends.get("torch")
    model = MLP([3, 4, 3], "tanh")
    params = model.init(1, backend)
    x = to(backend, rng.standard_normal((m, 3)))
    y = _targets(kind, rng, m, 3)
    y = backend.asarray(y) if y.dtype.kind in "iu" else to(backend, y)
    return model, params, (x, y)


def test_newton_step_is_invariant_to_the_scale(rng):
    """The undamped Newton step -H^{-1} g does not change when the loss is multiplied by 2m."""
    torch = pytest.importorskip("torch")
    from secondorder.optim import Newton

    model, params, batch = _train_setup("real", rng)
    steps = []
    for loss in (losses.MSE(), losses.as_loss(torch.nn.MSELoss(reduction="sum"))):
        opt = Newton(model.apply, loss, variant="abs")
        new, _, _ = opt.step(params, opt.init(params), batch)
        steps.append(raveled(backends.get("torch"), new))
    assert_close(steps[1], steps[0], rtol=1e-10)


@pytest.mark.parametrize("solver", ["dual", "primal"])
def test_prox_linear_with_a_sum_is_the_mean_with_gamma_times_m(rng, solver):
    """(1/m) sum_i m q_i + |d|^2 / (2 gamma) is (1/m) sum_i q_i + |d|^2 / (2 m gamma): the
    prox-linear step of CrossEntropyLoss(sum) with gamma is the library's with gamma m."""
    torch = pytest.importorskip("torch")
    from secondorder.optim import ProxLinear

    m, gamma = 6, 0.05
    model, params, batch = _train_setup("labels", rng, m)
    out = []
    for loss, g in ((losses.SoftmaxCrossEntropy(), gamma * m),
                    (losses.as_loss(torch.nn.CrossEntropyLoss(reduction="sum")), gamma)):
        opt = ProxLinear(model.apply, loss, solver=solver, gamma=g, inner_steps=3)
        new, _, info = opt.step(params, opt.init(params), batch)
        out.append((raveled(backends.get("torch"), new), info.loss))
    assert_close(out[1][0], out[0][0], rtol=1e-10)
    assert_close(float(out[1][1]), m * float(out[0][1]))


def test_code_for_the_unscaled_formulas_refuses_a_scaled_loss(rng):
    from secondorder.optim import ProxLinear

    model, params, batch = _train_setup("labels", rng)
    for options in (dict(scaled=True), dict(solver="exact-dual")):
        with pytest.raises(HyperparameterError):
            opt = ProxLinear(model.apply, losses.SoftmaxCrossEntropy(reduction="sum"), **options)
            opt.step(params, opt.init(params), batch)


def test_scaled_loss_under_jax_jit(rng):
    jax = pytest.importorskip("jax")
    backend = backends.get("jax")
    loss = losses.MSE(scale=2.0, outputs="mean")
    f = to(backend, rng.standard_normal((4, 3)))
    y = to(backend, rng.standard_normal((4, 3)))
    assert_close(jax.jit(loss.value)(f, y), float(loss.value(f, y)))
    assert_close(jax.jit(loss.grad)(f, y), loss.grad(f, y), backend=backend)
