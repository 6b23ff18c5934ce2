"""Library overhead: secondorder against the same computation hand-written in the framework.

Problem: MLP 784-256-10 (tanh), softmax cross-entropy, batch 128, float32; torch with one
intra-op thread (``--threads``), JAX jitted. Per backend, in one run, interleaved rounds (one
call of each function per round, after warm-up) and the median of each:

* ``sgd``: ``optim.SGD(model, SoftmaxCrossEntropy(), lr, momentum=0.9).step`` (``jax.jit``-ed on
  JAX) against a functional step written in the framework: value and gradient
  (``torch.func.grad_and_value`` / jitted ``jax.value_and_grad``) of the same MLP and mean
  cross-entropy, then ``b <- mu b + g``, ``w <- w - lr b`` leaf by leaf;
* ``curveball``: ``optim.CurveBall(model, loss, damping=10.0).step`` against the same maths
  written out (curveball sheet, eqs. 16-18): the forward pass with its pullback, J z, the
  pullback of H_L J z + J_L, J Delta, the 2x2 solve with its singular branch, and every fifth
  step the damping update from the reduction ratio (one more forward pass);
* ``ggn``: ``GGN(model, loss, params, batch).matvec(v)`` (built once on torch; on JAX the
  construction and the product are jitted together) against one JVP, the softmax Hessian
  product and the saved pullback;
* ``cg50``: ``linalg.cg(A, b, tol=None, maxiter=50)`` on a 16-leaf dict (8 layers of a
  128 x 128 weight and a bias) with A a positive diagonal per leaf, against textbook CG over a
  list of tensors (a Python loop on torch, a jitted ``fori_loop`` on JAX);
* ``adam_vs_torch_optim`` (torch): our Adam step (lr 1e-3) against ``torch.optim.Adam`` with
  ``loss.backward()`` on the same module (``agreement``: after one step from the same weights);
* ``sgd_vs_torch_optim`` (torch): our SGD step against ``torch.optim.SGD(momentum=0.9)`` with
  ``loss.backward()`` on the equivalent ``nn.Sequential`` (the framework's own optimiser);
* ``curveball_tape`` (torch): our CurveBall step against the same maths with the products
  hand-written on the autograd tape (``torch.autograd.grad``) and with forward-mode dual tensors
  (``torch.autograd.forward_ad``), the primitives our torch backend uses outside transforms:
  what is left of our overhead once both sides avoid torch.func's wrappers.

There are 200 rounds by default: a jitted JAX product takes about 1.5 ms, and with 50 rounds
the ratios of a 2-core shared machine moved by 0.05 from run to run.

Steps are timed in sequence (each call continues from the previous call's parameters and
state), so CurveBall's periodic damping update is in its median as it is in training. The
references are written with the framework's own idioms (``F.linear``, ``F.cross_entropy``,
``jax.nn.log_softmax``) and are checked against ours before timing (``agreement``: relative
difference of the first step or product).

Writes ``{"<backend>": {"<case>": {"ours_ms", "reference_ms", "ratio"}}}`` (ratio = ours /
reference) and ``_meta`` (versions, threads, rounds, problem).

    python benchmarks/overhead.py --json benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import numpy as np

import _setup as setup
from secondorder import optim
from secondorder.curvature import GGN
from secondorder.linalg import cg

SIZES = (784, 256, 10)
LR, MOMENTUM, DAMPING = 0.01, 0.9, 10.0
#: CurveBall's defaults, written out for the reference
INTERVAL, FACTOR, LOW, HIGH = 5, 0.999, 0.5, 1.5
CG_ITERS, CG_LAYERS, CG_WIDTH = 50, 8, 128

Fn = Callable[[], Any]
CASES = ("sgd", "curveball", "ggn", "cg50")


def _case(ms: dict[str, float], ours: str, ref: str, **extra: float) -> dict[str, float]:
    return {"ours_ms": ms[ours], "reference_ms": ms[ref], "ratio": ms[ours] / ms[ref], **extra}


def _chosen(fns: dict[str, Fn], args: argparse.Namespace) -> dict[str, Fn]:
    """The functions of the cases in ``--cases`` (torch.optim goes with sgd, the tape reference
    with curveball)."""
    keep = set(args.cases.split(","))
    companion = {"torch_optim": "sgd", "torch_adam": "sgd", "adam": "sgd",
                 "curveball_tape": "curveball"}
    return {k: f for k, f in fns.items()
            if k.split(".")[0] in keep or companion.get(k.split(".")[0]) in keep}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _cg_problem(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(diagonal, right-hand side) as 16-leaf dicts; keys sort in insertion order."""
    rng = np.random.default_rng(seed)
    diag, rhs = {}, {}
    for i in range(CG_LAYERS):
        for name, shape in (("b", (CG_WIDTH,)), ("w", (CG_WIDTH, CG_WIDTH))):
            key = f"l{i}_{name}"
            diag[key] = rng.uniform(1.0, 100.0, shape).astype(np.float32)
            rhs[key] = rng.standard_normal(shape).astype(np.float32)
    return diag, rhs


def sgd_reference(name: str, params: list[dict[str, Any]], x: Any, y: Any
                  ) -> Callable[[list[Any], list[Any]], tuple]:
    """The SGD + momentum step hand-written in the framework for the tanh MLP with mean softmax
    cross-entropy: ``step(w, buf) -> (w, buf, loss)`` on the list [W0, b0, W1, b1, ...]
    (torch.func; jitted JAX; autograd for NumPy)."""
    n = len(params)
    if name == "torch":
        import torch
        import torch.nn.functional as F  # noqa: N812 - the usual torch alias

        def objective(w: list[Any]) -> Any:
            a = x
            for i in range(n):
                a = F.linear(a, w[2 * i], w[2 * i + 1])
                a = torch.tanh(a) if i < n - 1 else a
            return F.cross_entropy(a, y)

        grad_and_value = torch.func.grad_and_value(objective)

        def step(w: list[Any], buf: list[Any]) -> tuple:
            g, value = grad_and_value(w)
            buf = [MOMENTUM * bi + gi for bi, gi in zip(buf, g)]
            return [wi - LR * bi for wi, bi in zip(w, buf)], buf, value

        return step
    if name == "jax":
        import jax
        import jax.numpy as xp
    else:
        import autograd
        import autograd.numpy as xp

    def log_softmax_ce(w: list[Any]) -> Any:
        a = x
        for i in range(n):
            a = a @ w[2 * i].T + w[2 * i + 1]
            a = xp.tanh(a) if i < n - 1 else a
        shifted = a - xp.max(a, axis=1, keepdims=True)
        log_probs = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
        return -xp.mean(log_probs[xp.arange(a.shape[0]), y])

    value_and_grad = (jax.value_and_grad if name == "jax" else autograd.value_and_grad)(
        log_softmax_ce)

    def plain_step(w: list[Any], buf: list[Any]) -> tuple:
        value, g = value_and_grad(w)
        buf = [MOMENTUM * bi + gi for bi, gi in zip(buf, g)]
        return [wi - LR * bi for wi, bi in zip(w, buf)], buf, value

    return jax.jit(plain_step) if name == "jax" else plain_step


def flat_params(params: list[dict[str, Any]]) -> list[Any]:
    """[W0, b0, W1, b1, ...] from the MLP's list of {"w", "b"} dicts."""
    return [t for layer in params for t in (layer["w"], layer["b"])]


def _like(params: list[dict[str, Any]], flat: list[Any]) -> list[dict[str, Any]]:
    """The MLP's parameter list of dicts (in its own key order) holding ``flat`` = [w0, b0, ...]."""
    by_name = [{"w": flat[2 * i], "b": flat[2 * i + 1]} for i in range(len(params))]
    return [{k: named[k] for k in layer} for layer, named in zip(params, by_name)]


class Sequenced:
    """A step function called in sequence: each call continues from the last one's output."""

    def __init__(self, step: Callable[..., tuple], carry: tuple, *fixed: Any) -> None:
        self.step, self.carry, self.fixed = step, carry, fixed

    def __call__(self) -> Any:
        out = self.step(*self.carry, *self.fixed)
        self.carry = out[: len(self.carry)]
        return out


# --------------------------------------------------------------------------------- torch
def bench_torch(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F  # noqa: N812 - the usual torch alias
    from torch.autograd import forward_ad

    b, model, loss, params, x, y = setup.mlp_problem("torch", SIZES, args.batch, args.seed,
                                                     args.threads)
    batch = (x, y)
    flat0 = flat_params(params)

    def forward(w: list[Any]) -> Any:
        return F.linear(torch.tanh(F.linear(x, w[0], w[1])), w[2], w[3])

    def objective(w: list[Any]) -> Any:
        return F.cross_entropy(forward(w), y)

    # (a) SGD + momentum
    sgd = optim.SGD(model, loss, lr=LR, momentum=MOMENTUM)

    sgd_ref = sgd_reference("torch", params, x, y)

    # (b) CurveBall
    curveball = optim.CurveBall(model, loss, damping=DAMPING)

    def func_linearize(w: list[Any]) -> tuple:
        out, pullback = torch.func.vjp(forward, w)
        return out, lambda u: pullback(u)[0], lambda t: torch.func.jvp(forward, (w,), (t,))[1]

    def tape_linearize(w: list[Any]) -> tuple:
        leaves = [wi.detach().requires_grad_(True) for wi in w]
        with torch.enable_grad():
            out = forward(leaves)

        def jvp(t: list[Any]) -> Any:
            with forward_ad.dual_level():
                tangent = forward_ad.unpack_dual(
                    forward([forward_ad.make_dual(wi, ti) for wi, ti in zip(w, t)])).tangent
            return tangent

        return (out.detach(),
                lambda u: torch.autograd.grad(out, leaves, u, retain_graph=True), jvp)

    def curveball_ref(w: list[Any], z: list[Any], lam: Any, count: int,
                      linearize: Callable = func_linearize) -> tuple:
        out, pullback, jvp = linearize(w)
        m = out.shape[0]
        s = torch.softmax(out, dim=1)
        jl = (s - F.one_hot(y, out.shape[1]).to(out.dtype)) / m

        def h(t: Any) -> Any:
            return (s * t - (s * t).sum(dim=1, keepdim=True) * s) / m

        def dot(p: list[Any], q: list[Any]) -> Any:
            return sum((pi * qi).sum() for pi, qi in zip(p, q))

        u = jvp(z)
        hu = h(u)
        delta = [gi + lam * zi for gi, zi in zip(pullback(hu + jl), z)]
        v = jvp(delta)
        hv = h(v)
        a = (v * hv).sum() + lam * dot(delta, delta)
        bb = (u * hv).sum() + lam * dot(z, delta)
        c = (u * hu).sum() + lam * dot(z, z)
        d, e = (jl * v).sum(), (jl * u).sum()
        det = a * c - bb * bb
        regular = det > torch.finfo(det.dtype).eps * (a * c).abs()
        beta = torch.where(regular, (c * d - bb * e) / det, d / a)
        rho = torch.where(regular, (bb * d - a * e) / det, torch.zeros_like(a))
        z = [rho * zi - beta * di for zi, di in zip(z, delta)]
        new = [wi + zi for wi, zi in zip(w, z)]
        count += 1
        if count % INTERVAL == 0:
            value = F.cross_entropy(out, y)
            gamma = (objective(new) - value) / (0.5 * (rho * e - beta * d))
            lam = torch.where(gamma > HIGH, lam * FACTOR,
                              torch.where(gamma < LOW, lam / FACTOR, lam))
        return new, z, lam, count

    def curveball_tape_ref(w: list[Any], z: list[Any], lam: Any, count: int) -> tuple:
        return curveball_ref(w, z, lam, count, tape_linearize)

    # (c) GGN-vector product
    rng = np.random.default_rng(args.seed + 1)
    v = [b.asarray(rng.standard_normal(tuple(t.shape)), dtype="float32") for t in flat0]
    v_tree = _like(params, v)
    op = GGN(model, loss, params, batch)
    out0, pullback0 = torch.func.vjp(forward, flat0)
    s0 = torch.softmax(out0, dim=1)

    def ggn_ref() -> Any:
        _, jv = torch.func.jvp(forward, (flat0,), (v,))
        return pullback0((s0 * jv - (s0 * jv).sum(dim=1, keepdim=True) * s0) / out0.shape[0])[0]

    # (d) 50 fixed CG iterations
    diag_np, rhs_np = _cg_problem(args.seed)
    diag = {k: b.asarray(a) for k, a in diag_np.items()}
    rhs = {k: b.asarray(a) for k, a in rhs_np.items()}

    def diag_matvec(t: dict[str, Any]) -> dict[str, Any]:
        return {k: diag[k] * t[k] for k in t}

    d_list, b_list = list(diag.values()), list(rhs.values())

    def cg_ref() -> list[Any]:
        xs = [torch.zeros_like(t) for t in b_list]
        r, p = list(b_list), list(b_list)
        rz = sum((t * t).sum() for t in r)
        for _ in range(CG_ITERS):
            ap = [di * pi for di, pi in zip(d_list, p)]
            alpha = rz / sum((pi * qi).sum() for pi, qi in zip(p, ap))
            xs = [xi + alpha * pi for xi, pi in zip(xs, p)]
            r = [ri - alpha * qi for ri, qi in zip(r, ap)]
            rz_new = sum((t * t).sum() for t in r)
            p = [ri + (rz_new / rz) * pi for ri, pi in zip(r, p)]
            rz = rz_new
        return xs

    # (e) torch.optim.SGD with backward on the equivalent module
    net = torch.nn.Sequential(torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.Tanh(),
                              torch.nn.Linear(SIZES[1], SIZES[2]))
    with torch.no_grad():
        for q, t in zip(net.parameters(), flat0):
            q.copy_(t)
    adam_net = copy.deepcopy(net)  # (f) torch.optim.Adam against ours, from the same weights
    adam = optim.Adam(model, loss, lr=1e-3)

    def torch_optim(module: Any, opt: Any) -> Fn:
        """One step of a torch.optim optimiser: zero_grad, the loss, backward, step."""
        def step() -> Any:
            opt.zero_grad()
            value = F.cross_entropy(module(x), y)
            value.backward()
            opt.step()
            return value
        return step

    torch_optim_step = torch_optim(net, torch.optim.SGD(net.parameters(), lr=LR,
                                                        momentum=MOMENTUM))
    torch_adam_step = torch_optim(adam_net, torch.optim.Adam(adam_net.parameters(), lr=1e-3))

    # agreement of each reference with ours, on the first step / product
    def flat(tree: Any) -> np.ndarray:
        return np.concatenate([b.to_numpy(t).ravel() for layer in tree
                               for t in (layer["w"], layer["b"])])

    def flat_list(ts: list[Any]) -> np.ndarray:
        return np.concatenate([t.detach().numpy().ravel() for t in ts])

    zeros = [torch.zeros_like(t) for t in flat0]
    torch_adam_step()  # its first step, for the agreement (timing continues from there)
    adam_first = flat_list([t.detach() for t in adam_net.parameters()])
    agreement = {
        "sgd": _rel(flat(sgd.step(params, sgd.init(params), batch)[0]),
                    flat_list(sgd_ref(flat0, zeros)[0])),
        "curveball": _rel(flat(curveball.step(params, curveball.init(params), batch)[0]),
                          flat_list(curveball_ref(flat0, zeros, torch.tensor(DAMPING), 0)[0])),
        "curveball_tape": _rel(
            flat(curveball.step(params, curveball.init(params), batch)[0]),
            flat_list(curveball_tape_ref(flat0, zeros, torch.tensor(DAMPING), 0)[0])),
        "ggn": _rel(flat(op.matvec(v_tree)), flat_list(ggn_ref())),
        "adam": _rel(flat(adam.step(params, adam.init(params), batch)[0]), adam_first),
        "cg50": _rel(np.concatenate([b.to_numpy(t).ravel() for t in cg(
            diag_matvec, rhs, tol=None, maxiter=CG_ITERS)[0].values()]), flat_list(cg_ref())),
    }

    fns: dict[str, Fn] = {
        "sgd.ours": Sequenced(sgd.step, (params, sgd.init(params)), batch),
        "sgd.reference": Sequenced(sgd_ref, (list(flat0), list(zeros))),
        "torch_optim": torch_optim_step,
        "adam.ours": Sequenced(adam.step, (params, adam.init(params)), batch),
        "torch_adam": torch_adam_step,
        "curveball.ours": Sequenced(curveball.step, (params, curveball.init(params)), batch),
        "curveball.reference": Sequenced(curveball_ref, (list(flat0), list(zeros),
                                                          torch.tensor(DAMPING), 0)),
        "curveball_tape.ours": Sequenced(curveball.step, (params, curveball.init(params)), batch),
        "curveball_tape.reference": Sequenced(curveball_tape_ref, (list(flat0), list(zeros),
                                                                    torch.tensor(DAMPING), 0)),
        "ggn.ours": lambda: op.matvec(v_tree),
        "ggn.reference": ggn_ref,
        "cg50.ours": lambda: cg(diag_matvec, rhs, tol=None, maxiter=CG_ITERS),
        "cg50.reference": cg_ref,
    }
    ms = setup.interleaved_ms(_chosen(fns, args), lambda out: None, warmup=args.warmup,
                              repeats=args.repeats)
    result = {name: _case(ms, f"{name}.ours", f"{name}.reference", agreement=agreement[name])
              for name in (*CASES, "curveball_tape") if f"{name}.ours" in ms}
    if "torch_optim" in ms:
        result["sgd_vs_torch_optim"] = _case(ms, "sgd.ours", "torch_optim")
    if "torch_adam" in ms:
        result["adam_vs_torch_optim"] = _case(ms, "adam.ours", "torch_adam",
                                              agreement=agreement["adam"])
    return result


# ----------------------------------------------------------------------------------- jax
def bench_jax(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    b, model, loss, params, x, y = setup.mlp_problem("jax", SIZES, args.batch, args.seed,
                                                     args.threads)
    batch = (x, y)
    flat0 = flat_params(params)

    def forward(w: list[Any]) -> Any:
        return jnp.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]

    def cross_entropy(out: Any) -> Any:
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))

    def objective(w: list[Any]) -> Any:
        return cross_entropy(forward(w))

    # (a) SGD + momentum
    sgd = optim.SGD(model, loss, lr=LR, momentum=MOMENTUM)

    sgd_ref = sgd_reference("jax", params, x, y)

    # (b) CurveBall
    curveball = optim.CurveBall(model, loss, damping=DAMPING)

    @jax.jit
    def curveball_ref(w: list[Any], z: list[Any], lam: Any, count: Any) -> tuple:
        out, jvp = jax.linearize(forward, w)
        pullback = jax.linear_transpose(jvp, w)
        m = out.shape[0]
        s = jax.nn.softmax(out, axis=1)
        jl = (s - jax.nn.one_hot(y, out.shape[1], dtype=out.dtype)) / m

        def h(t: Any) -> Any:
            return (s * t - (s * t).sum(axis=1, keepdims=True) * s) / m

        def dot(p: list[Any], q: list[Any]) -> Any:
            return sum((pi * qi).sum() for pi, qi in zip(p, q))

        u = jvp(z)
        hu = h(u)
        delta = [gi + lam * zi for gi, zi in zip(pullback(hu + jl)[0], z)]
        v = jvp(delta)
        hv = h(v)
        a = (v * hv).sum() + lam * dot(delta, delta)
        bb = (u * hv).sum() + lam * dot(z, delta)
        c = (u * hu).sum() + lam * dot(z, z)
        d, e = (jl * v).sum(), (jl * u).sum()
        det = a * c - bb * bb
        regular = det > jnp.finfo(det.dtype).eps * jnp.abs(a * c)
        safe = jnp.where(regular, det, 1.0)
        beta = jnp.where(regular, (c * d - bb * e) / safe, d / a)
        rho = jnp.where(regular, (bb * d - a * e) / safe, 0.0)
        z = [rho * zi - beta * di for zi, di in zip(z, delta)]
        new = [wi + zi for wi, zi in zip(w, z)]
        count = count + 1

        def adapt(lam: Any) -> Any:
            gamma = (objective(new) - cross_entropy(out)) / (0.5 * (rho * e - beta * d))
            return jnp.where(gamma > HIGH, lam * FACTOR, jnp.where(gamma < LOW, lam / FACTOR, lam))

        lam = jax.lax.cond(count % INTERVAL == 0, adapt, lambda t: t, lam)
        return new, z, lam, count

    # (c) GGN-vector product
    rng = np.random.default_rng(args.seed + 1)
    v = [b.asarray(rng.standard_normal(tuple(t.shape)), dtype="float32") for t in flat0]
    v_tree = _like(params, v)
    ggn_ours = jax.jit(lambda w, t: GGN(model, loss, w, batch).matvec(t))

    @jax.jit
    def ggn_ref(w: list[Any], t: list[Any]) -> Any:
        out, jv = jax.jvp(forward, (w,), (t,))
        _, pullback = jax.vjp(forward, w)
        s = jax.nn.softmax(out, axis=1)
        return pullback((s * jv - (s * jv).sum(axis=1, keepdims=True) * s) / out.shape[0])[0]

    # (d) 50 fixed CG iterations
    diag_np, rhs_np = _cg_problem(args.seed)
    diag = {k: b.asarray(a) for k, a in diag_np.items()}
    rhs = {k: b.asarray(a) for k, a in rhs_np.items()}

    def diag_matvec(t: dict[str, Any]) -> dict[str, Any]:
        return {k: diag[k] * t[k] for k in t}

    cg_ours = jax.jit(lambda t: cg(diag_matvec, t, tol=None, maxiter=CG_ITERS)[0])
    d_list, b_list = list(diag.values()), list(rhs.values())

    @jax.jit
    def cg_ref(bs: list[Any]) -> list[Any]:
        def body(_: Any, carry: tuple) -> tuple:
            xs, r, p, rz = carry
            ap = [di * pi for di, pi in zip(d_list, p)]
            alpha = rz / sum((pi * qi).sum() for pi, qi in zip(p, ap))
            xs = [xi + alpha * pi for xi, pi in zip(xs, p)]
            r = [ri - alpha * qi for ri, qi in zip(r, ap)]
            rz_new = sum((t * t).sum() for t in r)
            p = [ri + (rz_new / rz) * pi for ri, pi in zip(r, p)]
            return xs, r, p, rz_new

        init = ([jnp.zeros_like(t) for t in bs], bs, bs, sum((t * t).sum() for t in bs))
        return jax.lax.fori_loop(0, CG_ITERS, body, init)[0]

    def flat(tree: Any) -> np.ndarray:
        return np.concatenate([np.asarray(t).ravel() for layer in tree
                               for t in (layer["w"], layer["b"])])

    def flat_list(ts: list[Any]) -> np.ndarray:
        return np.concatenate([np.asarray(t).ravel() for t in ts])

    sgd_step, curveball_step = jax.jit(sgd.step), jax.jit(curveball.step)
    zeros = [jnp.zeros_like(t) for t in flat0]
    lam0, count0 = jnp.asarray(DAMPING, dtype=jnp.float32), jnp.asarray(0)
    agreement = {
        "sgd": _rel(flat(sgd_step(params, sgd.init(params), batch)[0]),
                    flat_list(sgd_ref(flat0, zeros)[0])),
        "curveball": _rel(flat(curveball_step(params, curveball.init(params), batch)[0]),
                          flat_list(curveball_ref(flat0, zeros, lam0, count0)[0])),
        "ggn": _rel(flat(ggn_ours(params, v_tree)), flat_list(ggn_ref(flat0, v))),
        "cg50": _rel(np.concatenate([np.asarray(t).ravel() for t in cg_ours(rhs).values()]),
                     flat_list(cg_ref(b_list))),
    }
    fns: dict[str, Fn] = {
        "sgd.ours": Sequenced(sgd_step, (params, sgd.init(params)), batch),
        "sgd.reference": Sequenced(sgd_ref, (flat0, zeros)),
        "curveball.ours": Sequenced(curveball_step, (params, curveball.init(params)), batch),
        "curveball.reference": Sequenced(curveball_ref, (flat0, zeros, lam0, count0)),
        "ggn.ours": lambda: ggn_ours(params, v_tree),
        "ggn.reference": lambda: ggn_ref(flat0, v),
        "cg50.ours": lambda: cg_ours(rhs),
        "cg50.reference": lambda: cg_ref(b_list),
    }
    ms = setup.interleaved_ms(_chosen(fns, args), jax.block_until_ready, warmup=args.warmup,
                              repeats=args.repeats)
    return {name: _case(ms, f"{name}.ours", f"{name}.reference", agreement=agreement[name])
            for name in CASES if f"{name}.ours" in ms}


BENCHES = {"torch": bench_torch, "jax": bench_jax}


def table(results: dict[str, Any]) -> str:
    rows = ["| backend | case | ours ms | reference ms | ours / reference |",
            "|---|---|---|---|---|"]
    for name, cases in results.items():
        if name.startswith("_") or "skipped" in cases:
            continue
        for case, r in cases.items():
            rows.append(f"| {name} | {case} | {r['ours_ms']:.3f} | {r['reference_ms']:.3f} | "
                        f"{r['ratio']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = setup.parser(__doc__, "overhead", batch=128, warmup=10, repeats=200)
    parser.set_defaults(backends="torch,jax")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated subset of " + ",".join(CASES))
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for name in args.backends.split(","):
        if name not in BENCHES:
            parser.error(f"overhead.py measures {', '.join(BENCHES)}, not {name!r}")
    for name in setup.installed(args.backends, results):
        results[name] = BENCHES[name](args)
    versions = {n: version(n) for n in ("torch", "jax", "jaxlib")
                if importlib.util.find_spec(n) is not None}
    results["_meta"] = {
        "versions": versions,
        "problem": f"MLP {'-'.join(map(str, SIZES))} tanh, softmax CE, batch {args.batch}, "
                   "float32",
        "cg": f"{CG_ITERS} iterations, tol=None, {2 * CG_LAYERS} leaves, diagonal operator",
        "cases": args.cases, "warmup": args.warmup, "repeats": args.repeats,
        "torch_threads": args.threads,
        "machine": platform.machine(), "python": platform.python_version(),
    }
    print(table(results))
    setup.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
