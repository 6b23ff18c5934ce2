"""Our curvature operators against curvlinops 3.0.1 (``nox -s peers-torch``), torch float64.

Both libraries get the same ``torch.nn.Module`` (ours through ``from_torch``), the same weights
and the same batch, and the loss as the torch module (ours through ``losses.as_loss``, with the
"mean" reduction that both treat as the batch mean). Compared, to 1e-10 relative:

* the GGN (= the exact type-2 Fisher for these losses), the Hessian and the empirical Fisher as
  dense matrices and as products with a random vector;
* K-FAC (type-2 and empirical) factor by factor, as a dense matrix, and as the damped inverse
  applied to the gradient, with exact damping and with the pi-split (curvlinops'
  ``use_heuristic_damping``) and equal factor dampings.

Conventions aligned here:

* curvlinops treats a layer's weight and bias as separate blocks unless
  ``separate_weight_and_bias=False``; ours are one block [W b] (bias column last), so the peer
  gets ``separate_weight_and_bias=False``;
* for a convolution with T output positions our A sums over positions and G averages (KFC);
  curvlinops' factors are (A / T, T G). The Kronecker products, and so K-FAC and its exactly
  damped inverse, agree as they are. So does the pi-split inverse: pi scales with
  sqrt(tr A / tr G), so (A + pi sqrt(damping) I) (x) (G + sqrt(damping) / pi I) is the same
  for (c A, G / c) and any c > 0. A split that ignores the traces is not invariant: the same
  damping on both factors (curvlinops' ``damping=(d, d)``, our ``"equal"``) needs our factors
  rescaled to (A / T, T G), which the test does for it (and checks that without the rescaling
  the conv blocks differ while the pi-split ones agree);
* the empirical Fisher under ``nn.MSELoss()`` (mean over the m k squared errors): ours is
  the mean over the m samples of g_n g_n^T, with g_n the gradient of the per-sample loss
  ||f_n - y_n||^2 / k (the batch loss is the mean of per-sample losses, see
  ``secondorder.losses``); curvlinops counts the m k squared errors as its loss terms, with
  the constant 1 / (m k) outside and the per-sample loss ||f_n - y_n||^2, so its empirical
  Fisher, quadratic in the per-sample loss, is k times ours (K-FAC's empirical G as well). The
  test multiplies ours by k (``ef_scale``); under cross-entropy both are the same;
* the flat parameter order: ours is the canonical order of the parameter dict, curvlinops'
  is the list it was given (``module.parameters()``); dense matrices are compared after the
  permutation between the two.

The Monte-Carlo Fisher is not compared: curvlinops samples its labels with torch's generator,
ours with NumPy's, so the two estimates agree only in expectation.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
curvlinops = pytest.importorskip("curvlinops")

from curvlinops import (  # noqa: E402
    EFLinearOperator,
    FisherType,
    GGNLinearOperator,
    HessianLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)

from secondorder import losses  # noqa: E402
from secondorder.curvature import GGN, KFAC, Fisher, Hessian, kronecker_factors  # noqa: E402
from secondorder.curvature.kfac import LayerFactors, assemble  # noqa: E402
from secondorder.models import from_torch  # noqa: E402

RTOL = 1e-10
DAMPING = 1e-2


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4),
                               torch.nn.Sigmoid(), torch.nn.Linear(4, 3, bias=False))


def _cnn() -> torch.nn.Module:
    # 6x6 images, 3x3 kernels, stride 1, padding 1 -> T = 36 output positions in the first
    # convolution; the second (stride 2, no padding, no bias) has T = 4
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(3, 2, 3, stride=2, bias=False), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(8, 3))


MODELS = {"mlp": (_mlp, (5,)), "cnn": (_cnn, (2, 6, 6))}
LOSSES = {"cross_entropy": torch.nn.CrossEntropyLoss, "mse": torch.nn.MSELoss}


class Problem:
    """One model, loss and batch, in both libraries' formats."""

    def __init__(self, model: str, loss: str, m: int = 7):
        make, in_shape = MODELS[model]
        torch.manual_seed(0)
        self.module = make().double()
        rng = np.random.default_rng(1)
        self.x = torch.as_tensor(rng.standard_normal((m, *in_shape)))
        if loss == "cross_entropy":
            self.y = torch.as_tensor(rng.integers(0, 3, m))
        else:
            self.y = torch.as_tensor(rng.standard_normal((m, 3)))
        self.torch_loss = LOSSES[loss]()
        #: curvlinops' empirical Fisher over ours (the module docstring)
        self.ef_scale = float(self.y.shape[1]) if loss == "mse" else 1.0
        self.loss = losses.as_loss(self.torch_loss)
        self.apply, self.params = from_torch(self.module)
        self.batch = (self.x, self.y)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.peer_params = [p for _, p in self.module.named_parameters()]
        self.data = [(self.x, self.y)]

    def peer(self, cls: type, **kwargs: object) -> object:
        return cls(self.module, self.torch_loss, self.peer_params, self.data,
                   progressbar=False, **kwargs)

    def as_list(self, tree: dict) -> list:
        return [tree[n] for n in self.names]

    def random_tree(self, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        return {n: torch.as_tensor(rng.standard_normal(tuple(p.shape)))
                for n, p in self.params.items()}

    def permutation(self, op: object) -> torch.Tensor:
        """perm with ours_flat = peer_flat[perm] (peer order: ``self.names``)."""
        offsets, start = {}, 0
        for n, p in zip(self.names, self.peer_params):
            offsets[n] = torch.arange(start, start + p.numel(), dtype=torch.float64
                                      ).reshape(p.shape)
            start += p.numel()
        return op.in_structure.ravel(offsets, torch).long()

    def peer_dense(self, peer: object) -> torch.Tensor:
        n = sum(p.numel() for p in self.peer_params)
        return peer @ torch.eye(n, dtype=torch.float64)

    def gradient(self) -> dict:
        out = self.module(self.x)
        value = self.torch_loss(out, self.y)
        grads = torch.autograd.grad(value, self.peer_params)
        return dict(zip(self.names, grads))


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def assert_close(ours: object, ref: object, what: str) -> float:
    """Max |ours - ref| / max |ref| over one tensor or a list of tensors, asserted <= RTOL."""
    if isinstance(ref, (list, tuple)):
        ours_flat = torch.cat([torch.as_tensor(o).reshape(-1) for o in ours])
        ref_flat = torch.cat([r.reshape(-1) for r in ref])
    else:
        ours_flat, ref_flat = torch.as_tensor(ours), ref
    assert ours_flat.shape == ref_flat.shape, what
    err = _max_rel(ours_flat, ref_flat)
    print(f"{what}: max relative difference {err:.2e}")
    assert err <= RTOL, f"{what}: {err:.3e} > {RTOL}"
    return err


CASES = [(model, loss) for model in MODELS for loss in LOSSES]


@pytest.fixture(params=CASES, ids=[f"{m}-{lo}" for m, lo in CASES])
def problem(request: pytest.FixtureRequest) -> Problem:
    return Problem(*request.param)


# ----------------------------------------------------------------------------- curvature
CURVATURES = {
    "ggn": (lambda p: GGN(p.apply, p.loss, p.params, p.batch), GGNLinearOperator, {}),
    "hessian": (lambda p: Hessian(p.apply, p.loss, p.params, p.batch), HessianLinearOperator,
                {}),
    "empirical_fisher": (lambda p: Fisher(p.apply, p.loss, p.params, p.batch,
                                          kind="empirical"), EFLinearOperator, {}),
}


@pytest.mark.parametrize("name", list(CURVATURES))
def test_curvature_matches_curvlinops(problem: Problem, name: str) -> None:
    ours_of, peer_cls, kwargs = CURVATURES[name]
    ours, peer = ours_of(problem), problem.peer(peer_cls, **kwargs)
    scale = problem.ef_scale if name == "empirical_fisher" else 1.0
    v = problem.random_tree(2)
    assert_close([scale * t for t in problem.as_list(ours.matvec(v))],
                 peer @ problem.as_list(v), f"{name} matvec")
    perm = problem.permutation(ours)
    dense = problem.peer_dense(peer)
    assert_close(scale * ours.to_dense(), dense[perm][:, perm], f"{name} dense")


# ----------------------------------------------------------------------------------- K-FAC
KFAC_MODES = {"exact": FisherType.TYPE2, "empirical": FisherType.EMPIRICAL}


def _peer_kfac(problem: Problem, mode: str) -> KFACLinearOperator:
    kfac = problem.peer(KFACLinearOperator, fisher_type=KFAC_MODES[mode],
                        separate_weight_and_bias=False)
    if not kfac._gradient_covariances:  # the determinism check may have computed them;
        kfac.compute_kronecker_factors()  # a second call would add to them
    return kfac


def _positions(problem: Problem) -> list[int]:
    """T, the number of output positions, of every tapped layer (1 for dense layers)."""
    return [s[1] if len(s) == 3 else 1 for s in problem.apply.tap_shapes(problem.x)]


def _our_factors(problem: Problem, mode: str) -> list[LayerFactors]:
    """Our factors, G times ``ef_scale`` for the empirical Fisher (the module docstring)."""
    scale = problem.ef_scale if mode == "empirical" else 1.0
    return [LayerFactors(lf.layer, lf.A, scale * lf.G) for lf in kronecker_factors(
        problem.apply, problem.loss, problem.params, problem.batch, mode=mode)]


def _to_peer_convention(problem: Problem, factors: list[LayerFactors]) -> list[LayerFactors]:
    """Our factors rescaled to curvlinops' convolution convention, (A / T, T G)."""
    return [LayerFactors(lf.layer, lf.A / t, lf.G * t)
            for lf, t in zip(factors, _positions(problem))]


@pytest.mark.parametrize("mode", list(KFAC_MODES))
def test_kfac_factors_match_curvlinops(problem: Problem, mode: str) -> None:
    peer = _peer_kfac(problem, mode)
    ours = _our_factors(problem, mode)
    names = list(peer._mapping)
    assert len(names) == len(ours)
    aligned = _to_peer_convention(problem, ours)
    for name, lf in zip(names, aligned):
        assert_close(lf.A, peer._input_covariances[name], f"K-FAC {mode} A of {name}")
        assert_close(lf.G, peer._gradient_covariances[name], f"K-FAC {mode} G of {name}")


@pytest.mark.parametrize("mode", list(KFAC_MODES))
def test_kfac_operator_matches_curvlinops(problem: Problem, mode: str) -> None:
    peer = _peer_kfac(problem, mode)
    if mode == "exact":  # the operator as users build it
        ours = KFAC(problem.apply, problem.loss, problem.params, problem.batch, mode=mode)
    else:
        ours = assemble(_our_factors(problem, mode), problem.params)
    v = problem.random_tree(3)
    assert_close(problem.as_list(ours.matvec(v)), peer @ problem.as_list(v),
                 f"K-FAC {mode} matvec")
    perm = problem.permutation(ours)
    assert_close(ours.to_dense(), problem.peer_dense(peer)[perm][:, perm], f"K-FAC {mode} dense")


# (our method, curvlinops' KFACInverseLinearOperator options, whether the factors must be in
# curvlinops' convolution convention for the two to agree)
DAMPED = {
    "exact": ("exact", {"use_exact_damping": True}, False),
    "pi": ("pi", {"use_heuristic_damping": True, "min_damping": 0.0}, False),
    "equal": ("equal", {"damping": (DAMPING ** 0.5, DAMPING ** 0.5)}, True),
}


@pytest.mark.parametrize("mode", list(KFAC_MODES))
@pytest.mark.parametrize("damped", list(DAMPED))
def test_kfac_damped_direction_matches_curvlinops(problem: Problem, mode: str,
                                                  damped: str) -> None:
    method, peer_options, rescale = DAMPED[damped]
    peer_kfac = _peer_kfac(problem, mode)
    peer_inv = KFACInverseLinearOperator(peer_kfac, **{"damping": DAMPING, **peer_options})
    factors = _our_factors(problem, mode)
    if rescale:
        factors = _to_peer_convention(problem, factors)
    ours = assemble(factors, problem.params).damped_inverse(DAMPING, method)
    g = problem.gradient()
    ref = peer_inv @ problem.as_list(g)
    assert_close(problem.as_list(ours.matvec(g)), ref, f"K-FAC {mode} {damped}-damped direction")


def test_only_trace_blind_splits_see_the_convolution_convention() -> None:
    """With our own conv factors (A summed, G averaged over positions), equal factor dampings
    give conv-layer directions that differ from curvlinops' for the same damping, while the
    dense layer's agree; the pi-split agrees everywhere (it is invariant under (c A, G / c))."""
    problem = Problem("cnn", "cross_entropy")
    peer_kfac = _peer_kfac(problem, "exact")
    ours = KFAC(problem.apply, problem.loss, problem.params, problem.batch)
    g = problem.gradient()
    conv, dense = ("0.weight", "2.weight"), ("5.weight", "5.bias")
    for method, options in (("equal", {"damping": (DAMPING ** 0.5, DAMPING ** 0.5)}),
                            ("pi", {"damping": DAMPING, "use_heuristic_damping": True,
                                    "min_damping": 0.0})):
        peer_inv = KFACInverseLinearOperator(peer_kfac, **options)
        ref = dict(zip(problem.names, peer_inv @ problem.as_list(g)))
        d = ours.damped_inverse(DAMPING, method).matvec(g)
        for name in dense:
            assert _max_rel(d[name], ref[name]) <= RTOL
        for name in conv:
            err = _max_rel(d[name], ref[name])
            assert err > 1e-3 if method == "equal" else err <= RTOL, (method, name, err)
