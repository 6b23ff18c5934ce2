"""PyTorch backend: ``torch.func`` and the autograd tape for autodiff, CPU and CUDA devices.

The namespace is ``array_api_compat.torch``, with its most called two-argument functions sent
straight to torch where that is the standard's result (:mod:`._torch_namespace`). ``jvp``,
``vjp``, ``grad`` and ``linearize`` are derivatives of a function of one (tree) argument; ``hvp``
is forward over reverse (``jvp`` of ``grad``). Outside every ``torch.func`` transform (an eager
step) gradients and VJPs are recorded on the autograd tape and JVPs pushed with dual tensors of
``torch.autograd.forward_ad``: the same derivative formulas and kernels as ``torch.func``, without
its wrapping of every tensor, which costs a fixed 0.1 to 0.2 ms a product. Inside a transform
(``torch.func.vmap``, ``linearize``, a ``jvp`` of a ``jvp``) the ``torch.func`` transforms are
used. A forward-mode pass that meets a kernel without a forward-mode formula which torch can
replace (fused attention, oneDNN's and cuDNN's LSTM) runs again on one with a formula. Loops run
in Python."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.func
from torch.autograd import forward_ad

from .._pytree import check_same_structure, flatten, unflatten
from ..errors import AutodiffUnavailableError
from ._base import Array, Backend, Tree
from ._torch_namespace import namespace


def _eager() -> bool:
    """True outside every torch.func transform and forward-mode AD level (``torch.func.linearize``
    traces through dual tensors) and outside inference mode: there derivatives can be taken on
    the autograd tape (``torch.autograd.grad``, under ``torch.enable_grad``) and with dual tensors
    (``torch.autograd.forward_ad``), which cost less than ``torch.func``'s wrapping of every
    tensor (the same kernels, the same numbers)."""
    return (not torch.is_inference_mode_enabled() and forward_ad._current_level < 0
            and torch._C._functorch.peek_interpreter_stack() is None)


def _differentiable(leaves: list[Array]) -> bool:
    """Whether every leaf is a floating (or complex) tensor, as the tape paths need."""
    return all(isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex())
               for a in leaves)


def _autograd_value_and_grad(f: Callable, x: Tree) -> tuple[Array, Tree]:
    """``(f(x), grad f(x))`` by reverse mode on the autograd tape, for a scalar ``f``; the
    results are detached, like ``torch.func``'s."""
    leaves, treedef = flatten(x)
    inputs = _tape_inputs(leaves)
    with torch.enable_grad():
        value = f(unflatten(treedef, inputs))
    return _detach(value), unflatten(treedef, _tape_grads([value], [None], inputs, False))


def _tape_vjp(g: Callable, x_leaves: list[Array], x_def: Any, has_aux: bool) -> Any:
    """``torch.func.vjp`` of ``g`` (a function of the leaf list) on the autograd tape: one
    forward pass recorded at detached copies of the leaves; the pullback is
    ``torch.autograd.grad`` with the graph kept for the next call. Outputs (and aux) come back
    detached, and a leaf the outputs do not depend on gets a zero cotangent, as torch.func's."""
    inputs = _tape_inputs(x_leaves)
    with torch.enable_grad():
        out = g(inputs)
    aux = None
    if has_aux:
        out, aux = out
        aux_leaves, aux_def = flatten(aux)
        aux = unflatten(aux_def, [_detach(a) for a in aux_leaves])
    out_leaves, out_def = flatten(out)

    def pullback(u: Tree) -> Tree:
        u_leaves, u_def = flatten(u)
        check_same_structure(out_def, u_def)
        return unflatten(x_def, _tape_grads(out_leaves, u_leaves, inputs, True))

    y = unflatten(out_def, [_detach(o) for o in out_leaves])
    return (y, pullback, aux) if has_aux else (y, pullback)


def _tape_inputs(leaves: list[Array]) -> list[Array]:
    """Detached copies of the leaves that the tape records from."""
    return [leaf.detach().requires_grad_(True) for leaf in leaves]


def _tape_grads(outputs: list[Any], cotangents: list[Any], inputs: list[Array],
                retain: bool) -> list[Array]:
    """sum_i cotangent_i^T d output_i / d input by ``torch.autograd.grad`` (a None cotangent
    for a scalar output), over the outputs recorded on the tape; zero for an input that no
    output reaches. ``retain`` keeps the graph for another call."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents)
             if isinstance(o, torch.Tensor) and o.requires_grad]
    grads: Any = [None] * len(inputs)
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs],
                                    retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(a) if d is None else d for a, d in zip(inputs, grads)]


def _detach(a: Any) -> Any:
    return a.detach() if isinstance(a, torch.Tensor) else a


def _dual_jvp(g: Callable, x_leaves: list[Array], v_leaves: list[Array]) -> tuple[Tree, Tree]:
    """``torch.func.jvp`` of ``g`` (a function of the leaf list) with dual tensors of
    ``torch.autograd.forward_ad``: the same forward-mode formulas, without torch.func's
    wrappers. An output that does not depend on the leaves gets a zero tangent."""
    with forward_ad.dual_level():
        out = g([forward_ad.make_dual(a.detach(), t) for a, t in zip(x_leaves, v_leaves)])
        out_leaves, out_def = flatten(out)
        primals, tangents = [], []
        for o in out_leaves:
            if not isinstance(o, torch.Tensor):
                raise RuntimeError(  # what torch.func.jvp says of such an output
                    "jvp: expected the function to return only tensors, got an output of type "
                    f"{type(o).__name__}")
            primal, tangent = forward_ad.unpack_dual(o)
            primals.append(primal)
            tangents.append(torch.zeros_like(primal) if tangent is None else tangent)
    return unflatten(out_def, primals), unflatten(out_def, tangents)


def _jvp_any(g: Callable, x_leaves: list[Array], v_leaves: list[Array]) -> tuple[Tree, Tree]:
    """Dual tensors where no transform is active (:func:`_dual_jvp`), else ``torch.func.jvp``;
    also ``torch.func.jvp`` when ``g`` itself takes a forward-mode derivative (torch nests no
    dual levels, torch.func does)."""
    if _eager() and _differentiable(x_leaves):
        try:
            return _dual_jvp(g, x_leaves, v_leaves)
        except RuntimeError as err:
            if "Nested forward mode AD" not in str(err):
                raise
    return torch.func.jvp(g, (x_leaves,), (v_leaves,))


@contextmanager
def _math_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on its math kernel (nn.MultiheadAttention, the
    Transformer layers)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def _without_mkldnn() -> Iterator[None]:
    """oneDNN off: CPU recurrent layers (nn.LSTM) take aten's own kernels."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


@contextmanager
def _without_cudnn() -> Iterator[None]:
    """cuDNN off: CUDA recurrent layers take aten's own kernels."""
    with torch.backends.cudnn.flags(enabled=False):
        yield


#: kernels without a forward-mode formula, by a word of torch's error, and the context under
#: which the same operation runs on kernels that have one; whether to keep that context for
#: every later forward-mode pass (attention's math kernel changes nothing else; oneDNN and cuDNN
#: off would slow the convolutions of any other model in the process)
_FORWARD_MODE_KERNELS: dict[str, tuple[Callable[[], Any], bool]] = {
    "attention": (_math_attention, True),
    "mkldnn": (_without_mkldnn, False),
    "cudnn": (_without_cudnn, False),
}
#: the kept contexts of :data:`_FORWARD_MODE_KERNELS`
_FORWARD_MODE_KEPT: set[str] = set()


@contextmanager
def _kernels(words: set[str]) -> Iterator[None]:
    """The contexts of :data:`_FORWARD_MODE_KERNELS` named by ``words``, entered together."""
    with ExitStack() as stack:
        for word in sorted(words):
            stack.enter_context(_FORWARD_MODE_KERNELS[word][0]())
        yield


def _forward_mode(fn: Callable[[], Any]) -> Any:
    """``fn()``, a forward-mode computation. A kernel without a forward-mode formula that torch
    can replace (fused attention, oneDNN's or cuDNN's LSTM: :data:`_FORWARD_MODE_KERNELS`) is
    replaced by one with a formula, the same function, and ``fn`` runs again; any other
    operation without one raises :class:`AutodiffUnavailableError`."""
    tried = set(_FORWARD_MODE_KEPT)
    while True:
        with _kernels(tried):
            try:
                out = fn()
            except AutodiffUnavailableError:
                raise
            except NotImplementedError as err:
                first = str(err).splitlines()[0]
                word = next((w for w in _FORWARD_MODE_KERNELS if w in first and w not in tried),
                            None)
                if word is not None:
                    tried.add(word)
                    continue
                if not any(s in str(err) for s in ("forward AD", "forward mode AD")):
                    raise
                raise AutodiffUnavailableError(
                    "torch has no forward-mode derivative (JVP) for an operation of this model: "
                    f"{first} Methods built on Jacobian-vector products ('curveball', "
                    "'hessian-free', 'newton', 'levenberg-marquardt', GGN and Hessian "
                    "operators) cannot run on it; those that need only gradients ('sgd', "
                    "'adam', 'shampoo', 'tnt', and 'kfac' and 'kbfgs' where every tapped layer "
                    "is called as a module) can.") from err
        _FORWARD_MODE_KEPT.update(w for w in tried if _FORWARD_MODE_KERNELS[w][1])
        return out


def _jvp_of_leaves(g: Callable, x_leaves: list[Array], v_leaves: list[Array]
                   ) -> tuple[Tree, Tree]:
    """The JVP of ``g`` at the leaf list: :func:`_jvp_any` through :func:`_forward_mode`."""
    return _forward_mode(lambda: _jvp_any(g, x_leaves, v_leaves))


def _plain(tensors: list[Array]) -> bool:
    """Whether every one is an eager tensor that autodiff does not watch (no ``requires_grad``,
    not wrapped by a torch.func transform): one the multi-tensor kernels may take and write."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(type(a) is torch.Tensor and not a.requires_grad and not wrapped(a)
               for a in tensors)


#: torch dtypes whose values NumPy scalars hold with the same rounding
_HOST_SCALARS: dict[Any, Any] = {torch.float32: np.float32, torch.float64: np.float64,
                                 torch.int32: np.int32, torch.int64: np.int64}


class TorchBackend(Backend):
    name: ClassVar[str] = "torch"
    supports_gpu: ClassVar[bool] = True
    subspace_route: ClassVar[str] = "theta"
    note: ClassVar[str] = ("autograd tape and dual tensors eagerly, torch.func inside "
                            "transforms (hvp forward over reverse)")

    @property
    def xp(self) -> Any:
        return namespace

    def is_array(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Array:
        dtype = None if dtype is None else self.dtype(dtype)
        return torch.as_tensor(x, dtype=dtype, device=device)

    def to_numpy(self, x: Array) -> np.ndarray:
        return x.detach().cpu().numpy()

    def is_concrete(self, x: Array) -> bool:
        return not torch._C._functorch.is_functorch_wrapped_tensor(x)

    def device(self, x: Array) -> Any:
        return x.device

    def host_scalar(self, x: Array) -> Any:
        kind = _HOST_SCALARS.get(x.dtype)
        if (kind is None or x.device.type != "cpu"
                or torch._C._functorch.is_functorch_wrapped_tensor(x)):
            return None
        return kind(x.item())  # exact: item() gives the float32 / float64 value as a float

    def host_arrays(self, *xs: Array) -> list[np.ndarray] | None:
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        if any(type(x) is not torch.Tensor or x.device.type != "cpu" or wrapped(x) for x in xs):
            return None
        return [x.numpy() for x in xs]

    def devices(self) -> list[str]:
        names = ["cpu"]
        if torch.cuda.is_available():
            names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return names

    # -- autodiff -------------------------------------------------------------------------
    def jvp(self, f: Callable, x: Tree, v: Tree) -> tuple[Tree, Tree]:
        # torch.func sees the leaf lists (in our canonical order, so dict key order cannot
        # differ), and f the tree: torch's pytree code costs more per dict node than ours
        x_leaves, x_def = flatten(x)
        v_leaves, v_def = flatten(v)
        check_same_structure(x_def, v_def)
        return _jvp_of_leaves(_of_leaves(f, x_def), x_leaves, v_leaves)

    def vjp(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        x_leaves, x_def = flatten(x)
        return _vjp_of_leaves(_of_leaves(f, x_def), x_leaves, x_def, has_aux)

    def linearize_vjp(self, f: Callable, x: Tree
                      ) -> tuple[Tree, Callable[[Tree], Tree], Callable[[Tree], Tree]]:
        # the default's products, with x flattened once for the VJP and every JVP
        x_leaves, x_def = flatten(x)
        g = _of_leaves(f, x_def)
        # recorded on the kernels the JVPs use once a fused one refused them, and on CPU on
        # attention's math kernel: its backward is what the vmapped VJPs of to_dense, LM and SMW
        # batch (torch.func.vmap loops over the CPU flash kernel's backward, with a warning);
        # on a GPU the fused kernels, memory-efficient on long sequences, are kept until then
        words = set(_FORWARD_MODE_KEPT)
        if x_leaves and x_leaves[0].device.type == "cpu":
            words.add("attention")
        with _kernels(words):
            y, pullback = _vjp_of_leaves(g, x_leaves, x_def, False)

        def jvp_fn(v: Tree) -> Tree:
            v_leaves, v_def = flatten(v)
            check_same_structure(x_def, v_def)
            return _jvp_of_leaves(g, x_leaves, v_leaves)[1]

        return y, jvp_fn, pullback

    def mean_reduce(self, x: Tree) -> Tree:
        """The mean over the ranks of the default ``torch.distributed`` group (``x`` itself
        on one process): :func:`secondorder.distributed.collectives.mean_over_ranks`."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return x
        from ..distributed.collectives import mean_over_ranks

        return mean_over_ranks(x)

    def linearize(self, f: Callable, x: Tree) -> tuple[Tree, Callable[[Tree], Tree]]:
        """``torch.func.linearize`` (one trace, replayed per product); with more than one
        torch.distributed rank, one ``torch.func.jvp`` per product instead, since a trace
        replays no collective (:mod:`secondorder.distributed`)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return f(x), lambda v: self.jvp(f, x, v)[1]
        def trace() -> tuple[Tree, Callable[[Tree], Tree]]:
            with warnings.catch_warnings():  # torch.fx's constant folding warns on closures
                warnings.simplefilter("ignore", UserWarning)
                return torch.func.linearize(f, x)

        y, jvp_fn = _forward_mode(trace)

        def linear(v: Tree) -> Tree:
            try:
                return jvp_fn(v)
            except RuntimeError as err:
                if not _order_mismatch(err):
                    raise
                return jvp_fn(_like(x, v))

        return y, linear

    def value_and_grad(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        if not has_aux and _eager():
            return _autograd_value_and_grad(f, x)
        g, value = torch.func.grad_and_value(f, has_aux=has_aux)(x)
        return value, g

    def grad(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        if not has_aux and _eager():
            return _autograd_value_and_grad(f, x)[1]
        return torch.func.grad(f, has_aux=has_aux)(x)

    # -- transformations ------------------------------------------------------------------
    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        """``torch.func.vmap`` (``in_axes`` / ``out_axes`` are its ``in_dims`` / ``out_dims``)."""
        if isinstance(in_axes, list):
            in_axes = tuple(in_axes)
        return torch.func.vmap(f, in_dims=in_axes, out_dims=out_axes)

    def synchronize(self, x: Tree = None) -> Tree:
        """``torch.cuda.synchronize`` on the device of ``x`` (every CUDA device in use when
        ``x`` is None); nothing for CPU tensors."""
        if x is None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            return x
        for leaf in flatten(x)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                torch.cuda.synchronize(leaf.device)
                break
        return x

    # -- fused network primitives ---------------------------------------------------------
    def linear(self, a: Array, w: Array, b: Array | None = None) -> Array:
        return torch.nn.functional.linear(a, w, b)

    def logsumexp(self, f: Array, axis: int = -1) -> Array:
        return torch.logsumexp(f, dim=axis, keepdim=True)

    def take_labels(self, f: Array, labels: Array) -> Array:
        return torch.gather(f, 1, labels[:, None].long())[:, 0]

    def add_into(self, x_leaves: list[Array], y_leaves: list[Array]) -> bool:
        if not _plain(x_leaves) or len(x_leaves) != len(y_leaves):
            return False
        with torch.no_grad():
            torch._foreach_add_(x_leaves, y_leaves)  # one call: what torch.optim's foreach does
        return True

    def adam(self, mu: list[Array], nu: list[Array], g: list[Array], b1: Any, b2: Any,
             c1: Array, c2: Array, eps: Any) -> tuple[list[Array], list[Array], list[Array]]:
        """The default's formulas in eight multi-tensor (``torch._foreach_*``) calls for every
        leaf together, as torch.optim.Adam's foreach path, when the arrays are plain eager
        tensors and the hyperparameters numbers (m by lerp, v by addcmul: the same values up
        to rounding); the default otherwise (inside torch.func, batched hyperparameters)."""
        if not (all(isinstance(b, int | float) for b in (b1, b2, eps))
                and _plain([*mu, *nu, *g, c1, c2])):
            return super().adam(mu, nu, g, b1, b2, c1, c2, eps)
        m = torch._foreach_lerp(mu, g, 1.0 - b1)
        v = torch._foreach_mul(nu, b2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - b2)
        denom = torch._foreach_div(v, c2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        d = torch._foreach_div(m, c1)
        torch._foreach_div_(d, denom)
        return d, m, v

    def label_cross_entropy(self, f: Array, labels: Array) -> Array:
        # log_softmax and the label pick fused (with their own backward): fewer dispatches
        # than logsumexp - gather, on a step's small (batch, classes) outputs
        return torch.nn.functional.cross_entropy(f, labels.long(), reduction="none")

    def axpy(self, alpha: Any, x: Array, y: Array) -> Array:
        if isinstance(alpha, int | float):
            return torch.add(y, x, alpha=alpha)  # one kernel instead of two
        if isinstance(alpha, torch.Tensor) and alpha.ndim == 0 and alpha.dtype == x.dtype:
            return torch.addcmul(y, x, alpha)
        return alpha * x + y

    def dot(self, x: Array, y: Array) -> Array:
        if x.ndim == 1:  # a bias: no reshape to dispatch
            return torch.vdot(x, y)
        return torch.vdot(x.reshape(-1), y.reshape(-1))

    def where(self, condition: Array, x: Any, y: Any) -> Array:
        return torch.where(condition, x, y)

    # -- linear algebra -------------------------------------------------------------------
    def einsum(self, subscripts: str, *operands: Array) -> Array:
        return torch.einsum(subscripts, *operands)

    def cholesky(self, a: Array) -> Array:
        factor, info = torch.linalg.cholesky_ex(a)
        if bool(torch.any(info != 0)):
            raise self._not_positive_definite()
        return factor

    def solve_triangular(self, a: Array, b: Array, *, lower: bool = True) -> Array:
        if b.ndim == 1:
            return torch.linalg.solve_triangular(a, b[:, None], upper=not lower)[:, 0]
        return torch.linalg.solve_triangular(a, b, upper=not lower)

    def cholesky_solve(self, factor: Array, b: Array) -> Array:
        if b.ndim == 1:
            return torch.cholesky_solve(b[:, None], factor)[:, 0]
        return torch.cholesky_solve(b, factor)

    def cholesky_inverse(self, factor: Array) -> Array:
        # LAPACK's potri: a third of the time of solving against the identity (cholesky_solve)
        return torch.cholesky_inverse(factor)


def _vjp_of_leaves(g: Callable, x_leaves: list[Array], x_def: Any, has_aux: bool) -> Any:
    """``torch.func.vjp`` of ``g`` (a function of the leaf list) with a pullback that takes a
    cotangent tree and returns the tree of structure ``x_def``; on the autograd tape where no
    transform is active (:func:`_tape_vjp`)."""
    if _eager() and _differentiable(x_leaves):
        return _tape_vjp(g, x_leaves, x_def, has_aux)
    if has_aux:
        y, vjp_fn, aux = torch.func.vjp(g, x_leaves, has_aux=True)
    else:
        y, vjp_fn = torch.func.vjp(g, x_leaves)

    def pullback(u: Tree) -> Tree:
        try:
            cotangent = vjp_fn(u)[0]
        except RuntimeError as err:
            if not _order_mismatch(err):
                raise
            cotangent = vjp_fn(_like(y, u))[0]
        return unflatten(x_def, cotangent)

    return (y, pullback, aux) if has_aux else (y, pullback)


def _of_leaves(f: Callable, treedef: Any) -> Callable:
    """``f`` as a function of the leaf list of a tree of structure ``treedef``."""
    return lambda leaves: f(unflatten(treedef, leaves))


def _like(x: Tree, v: Tree) -> Tree:
    """``v`` rebuilt with the dict key order of ``x`` (a named error if the structures differ)."""
    x_def = flatten(x)[1]
    v_leaves, v_def = flatten(v)
    check_same_structure(x_def, v_def)
    return unflatten(x_def, v_leaves)


def _order_mismatch(err: RuntimeError) -> bool:
    """Whether ``err`` is torch.func's complaint about two trees' structures (which, for trees
    that are equal to us, can only be dict key order)."""
    msg = str(err)
    return "same python structure" in msg or "same argspec" in msg or "pytree structure" in msg
