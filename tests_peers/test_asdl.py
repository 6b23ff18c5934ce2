"""Our K-BFGS and SMW-NG against ASDL 0.1a5 (``asdfghjkl``; ``nox -s peers-asdl``), torch float64.

Both libraries get the same ``torch.nn.Module`` (an MLP with biases, and the same MLP without
them; ours through ``from_torch``), the same weights and the same batches.

SMW-NG (ASDL's ``SmwEmpNaturalGradientMaker``): ASDL replaces the gradient of the mean loss by
(F + lambda I)^{-1} g, F = (1/m) sum_i g_i g_i^T the empirical Fisher of the batch, through the
Woodbury identity on the m x m Gram matrix of the per-example gradients (divided by m, as our
D = lambda I + K / N2). Ours with N2 = N1 = m, lr = 1 and lambda_LM + tau = ASDL's damping
takes the step p = -(F + lambda I)^{-1} g: agreement to 1e-10 as it is. Given the summed loss
(``reduction="sum"``) ASDL leaves its Gram matrix unnormalised and returns
(m F + lambda I)^{-1} (m g) = (F + (lambda / m) I)^{-1} g: our step with lambda / m.

K-BFGS (ASDL's ``KronBfgsGradientMaker``, dense and convolution layers; here dense). Four
defects of ASDL 0.1a5, each shown exactly by a test:

* **it never changes its inverse factors**: ``bfgs_inv_update_(H, s, y)`` first rebinds
  ``H = (H + H.T) / 2`` and then updates that copy in place, so the stored H_A stays
  (A_0 + lambda_A I)^{-1} of the first batch and H_G stays the identity it was created as
  (``test_asdl_kbfgs_as_released_keeps_its_first_factors``);
* **Powell's damping has the wrong sign**: ``powell_lm_damping_`` forms
  s~ = theta s - (1 - theta) H y instead of theta s + (1 - theta) H y (Algorithm 8, and
  Powell), so s~^T y >= mu1 y^T H y no longer holds (``test_asdl_powell_sign``: ASDL's H_G is
  the recursion with the minus sign);
* **its second pass mixes two batches**: the pass that updates H_G at the start of step k
  restores the inputs of batch k - 1 but not its labels (it restores the model's arguments,
  not the loss's), so y_G compares (x_{k-1}, y_{k-1}) at the old weights with (x_{k-1}, y_k)
  at the new ones (``test_asdl_second_pass_reads_the_new_labels``); the agreement tests give
  every batch the same labels;
* that pass also calls ``backward``, so the gradient ASDL preconditions at step k >= 1 is that
  of batch k plus that of batch k - 1 at the new weights (every K-BFGS test accounts for it,
  ``_two_batch_gradient``).

The agreement test gives ASDL a ``bfgs_inv_update_`` that writes ASDL's own formula,
H + (s^T y + y^T H y) s s^T / (s^T y)^2 - (H y s^T + s y^T H) / s^T y, back into H, and a
``powell_lm_damping_`` with the plus sign; the pairs, the statistics, the damping split and the
schedule are ASDL's own. ASDL also creates H_G with ``torch.eye`` in the default dtype: the
tests set float64 as the default.

Conventions aligned (``test_kbfgs_matches_asdl``, 1e-10 relative):

* schedule: ASDL updates H_A from the current batch *before* it preconditions that batch's
  gradient, and H_G at the start of the next step (the second pass on the previous batch at
  the new weights); its first step is not preconditioned. Ours (Algorithm 9) updates both
  after the step. So the trajectories are kept equal by giving ASDL our weights before every
  step, and the factors compare as: ASDL's H_A after its step k = ours after step k; ASDL's H_G
  at step k + 1 = ours after step k; ASDL's preconditioned gradient at step k >= 1 =
  H_G(ours, k - 1) grad H_A(ours, k) with the two-batch gradient above (ours preconditions
  the gradient of batch k with H_A(ours, k - 1));
* the mean vs the sum of the loss: ASDL's y_G is the batch mean of the output gradients of the
  loss it is given, ours the mean of the per-sample output gradients (m times those of the
  mean loss); Powell's and the Levenberg-Marquardt dampings are not scale invariant, so ASDL
  gets the summed loss and its preconditioned gradient is divided by m;
* ASDL's A is the mean over the batch with ``data_size = m``; its moving average of A has
  ``ema_decay = 1`` (the current batch's A, as ours), and its pairs for G are not averaged
  (ours with ``statistics_decay = 0``); T = 1 (``curvature_interval=1``), no momentum;
* damping: both split lambda as sqrt(lambda) for A and G of a dense layer, both use the
  Powell + Levenberg-Marquardt damping (Algorithm 8) with mu2 = lambda_G; ASDL starts H_G at I,
  ours at I / lambda_G (Algorithm 9, line 3): equal at lambda = 1, and at lambda = 4 both are
  shown to be the same recursion from their own H_G(0);
* the bias: ours treats [W b] as one block with the homogeneous input (a, 1), so H_A is
  (d_in + 1) x (d_in + 1); ASDL's H_A covers the inputs a alone and the bias gradient is
  preconditioned by H_G only. Without biases the H_A agree directly; with biases each equals
  the Hessian-action recursion written out in the test, on (a, 1) for ours and on a for ASDL;
* ASDL's ``minibatch_hessian_action=True`` (the thesis's Ch. 3 "minibatch Hessian action") forms
  y_A = sum_n a_n a_n^T s + lambda_A s, the batch *sum*, although its H_A starts from the
  inverse of the batch *mean*; the test shows it is the recursion with m A_k in place of A_k
  (ours uses A_k, eq. 3.15). The tests of agreement use ``minibatch_hessian_action=False``,
  whose y_A = A_k s + lambda_A s is ours.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
asdl = pytest.importorskip("asdl")

import asdl.precondition.kbfgs as asdl_kbfgs  # noqa: E402
from asdl.precondition import (  # noqa: E402
    KronBfgsGradientMaker,
    PreconditioningConfig,
    SmwEmpNaturalGradientConfig,
    SmwEmpNaturalGradientMaker,
)

from secondorder import losses  # noqa: E402
from secondorder.models import from_torch  # noqa: E402
from secondorder.optim import KBFGS, SMWNG  # noqa: E402

RTOL = 1e-10
M = 7  # batch size
STEPS = 4
MU1 = 0.2
F = torch.nn.functional


@pytest.fixture(autouse=True)
def float64_default():  # ASDL's H_G is torch.eye(d) in the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mlp(bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4, bias=bias), torch.nn.Tanh(),
                               torch.nn.Linear(4, 4, bias=bias), torch.nn.Sigmoid(),
                               torch.nn.Linear(4, 3, bias=bias)).double()


def _batches(n: int, same_labels: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of M samples; new inputs in each, and the same labels in each unless
    ``same_labels`` is False (ASDL's second pass reads the labels of the new batch)."""
    rng = np.random.default_rng(6)  # a seed where Powell's damping is active (tests check)
    labels = torch.as_tensor(rng.integers(0, 3, M))
    return [(torch.as_tensor(rng.standard_normal((M, 5))),
             labels if same_labels else torch.as_tensor(rng.integers(0, 3, M)))
            for _ in range(n)]


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    assert ours.shape == ref.shape, what
    err = _max_rel(ours, ref)
    print(f"{what}: max relative difference {err:.2e}")
    assert err <= RTOL, f"{what}: {err:.3e} > {RTOL}"
    return err


def _load(module: torch.nn.Module, params: dict) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module if isinstance(m, torch.nn.Linear)]


def _bfgs(h: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The BFGS inverse update written out (the oracle of the recursions below)."""
    rho = 1.0 / (s @ y)
    eye = torch.eye(h.shape[0])
    return (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s)) \
        + rho * torch.outer(s, s)


def _bfgs_inv_update_written_back(h: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
    """ASDL's own update formula, written into ``h`` (what ``bfgs_inv_update_`` intends)."""
    sty = s @ y
    hy = h @ y
    hys = torch.outer(hy, s)
    h.add_(torch.outer(s, s) * (sty + y @ hy) / sty ** 2 - (hys + hys.T) / sty)


# ------------------------------------------------------------------------------ runs
class OurRun:
    """Our K-BFGS on ``batches``: the weights before each step (and after the last) and the
    state after each step."""

    def __init__(self, module: torch.nn.Module, batches: list, damping: float):
        apply, params = from_torch(module)
        params = {k: v.detach().clone() for k, v in params.items()}
        opt = KBFGS(apply, losses.as_loss(torch.nn.CrossEntropyLoss()), lr=0.1,
                    damping=damping, momentum=0.0, statistics_decay=0.0, mu1=MU1,
                    curvature_interval=1)
        state = opt.init(params)
        self.params, self.states = [], []
        for batch in batches:
            self.params.append(params)
            params, state, info = opt.step(params, state, batch)
            assert bool(info.finite)
            self.states.append(state)
        self.params.append(params)


class AsdlRun:
    """ASDL's K-BFGS on the same batches, given our weights before every step: its factors
    after each step (H_G as it is at the start of the next one) and its preconditioned
    gradients (divided by m: it is given the summed loss)."""

    def __init__(self, module: torch.nn.Module, ours: OurRun, batches: list, damping: float,
                 hessian_action: bool = False):
        config = PreconditioningConfig(data_size=M, damping=damping, ema_decay=1.0)
        maker = KronBfgsGradientMaker(module, config, minibatch_hessian_action=hessian_action,
                                      mu1=MU1)
        layers = _linears(module)
        self.h_a, self.h_g, self.directions = [], [], []
        for k, (x, y) in enumerate(batches):
            _load(module, ours.params[k])
            module.zero_grad()
            out = maker.setup_model_call(module, x)
            maker.setup_loss_call(F.cross_entropy, out, y, reduction="sum")
            maker.forward_and_backward()
            if k > 0:  # H_G of step k - 1 was updated at the start of this step
                self.h_g.append([lay.bfgs.kron.B_inv.clone() for lay in layers])
            self.h_a.append([lay.bfgs.kron.A_inv.clone() for lay in layers])
            self.directions.append({n: p.grad.clone() / M for n, p in module.named_parameters()})


def _inputs(module: torch.nn.Module, params: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Every Linear layer's input on ``x`` at ``params``."""
    _load(module, params)
    seen = []
    hooks = [lay.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
             for lay in _linears(module)]
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return seen


def _hessian_action_recursion(module, ours: OurRun, batches, lam_a: float, homogeneous: bool,
                              sum_after_first: bool = False) -> list[list[torch.Tensor]]:
    """H_A after each step, written out: H_0 = (A_0 + lambda_A I)^{-1}, then
    H <- BFGS(H; s = H a_bar_k, y = c A_k s + lambda_A s) with a_bar_k, A_k the mean input and
    the mean of a a^T on batch k at the weights before step k; a = (input, 1) if
    ``homogeneous``; c = m from the second update on if ``sum_after_first`` (else 1)."""
    out, hs = [], None
    for k, (x, _) in enumerate(batches):
        acts = _inputs(module, ours.params[k], x)
        if homogeneous:
            acts = [torch.cat([a, torch.ones(a.shape[0], 1)], dim=1) for a in acts]
        mats = [a.T @ a / M for a in acts]
        if hs is None:
            hs = [torch.linalg.inv(A + lam_a * torch.eye(A.shape[0])) for A in mats]
        c = M if sum_after_first and k > 0 else 1
        new = []
        for h, a, A in zip(hs, acts, mats):
            s = h @ a.mean(dim=0)
            new.append(_bfgs(h, s, c * (A @ s) + lam_a * s))
        hs = new
        out.append(hs)
    return out


def _pair_recursion(ours: OurRun, h0: float, lam_g: float, sign: float = 1.0
                    ) -> tuple[list[list[torch.Tensor]], int]:
    """H_G after each step, written out from H_G(0) = h0 I with our pairs (s_G, y_G) (no moving
    average: statistics_decay = 0): Powell's damping s~ = theta s + sign (1 - theta) H y (sign
    1: Algorithm 8; -1: ASDL 0.1a5), y~ = y + lambda_G s~, BFGS. Also returns how often
    Powell's damping was active (theta < 1)."""
    hs, out, active = None, [], 0
    for state in ours.states:
        if hs is None:
            hs = [h0 * torch.eye(lay.s_g.shape[0]) for lay in state.layers]
        new = []
        for h, lay in zip(hs, state.layers):
            s, y = lay.s_g, lay.y_g
            hy = h @ y
            sty, yhy = s @ y, y @ hy
            theta = 1.0
            if sty < MU1 * yhy:
                theta, active = (1 - MU1) * yhy / (yhy - sty), active + 1
            s_t = theta * s + sign * (1 - theta) * hy
            new.append(_bfgs(h, s_t, y + lam_g * s_t))
        hs = new
        out.append(hs)
    return out, active


def _powell_lm_damping_fixed_(h: torch.Tensor, s: torch.Tensor, y: torch.Tensor, mu1: float,
                              mu2: float) -> None:
    """ASDL's ``powell_lm_damping_`` with Powell's sign as in Algorithm 8:
    s~ = theta s + (1 - theta) H y (ASDL subtracts (1 - theta) H y)."""
    hy = h @ y
    yhy, sty = y @ hy, s @ y
    theta = (1 - mu1) * yhy / (yhy - sty) if sty < mu1 * yhy else 1.0
    s.mul_(theta).add_(hy, alpha=1 - theta)
    y.add_(s, alpha=mu2)


@pytest.fixture
def written_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """ASDL with its BFGS update written back into H (its only change)."""
    monkeypatch.setattr(asdl_kbfgs, "bfgs_inv_update_", _bfgs_inv_update_written_back)


@pytest.fixture
def fixed(monkeypatch: pytest.MonkeyPatch, written_back: None) -> None:
    """ASDL with its BFGS update written back and Powell's sign as in Algorithm 8."""
    monkeypatch.setattr(asdl_kbfgs, "powell_lm_damping_", _powell_lm_damping_fixed_)


def _two_batch_gradient(module: torch.nn.Module, params: dict, batches: list, k: int) -> tuple:
    """The gradient at ``params`` of the mean loss of batch k plus that of batch k - 1: what
    ASDL's preconditioner is applied to at step k >= 1 (its second pass on batch k - 1, which
    updates H_G, also calls backward, and its gradient adds to ``.grad``)."""
    _load(module, params)
    value = sum(F.cross_entropy(module(x), y) for x, y in batches[k - 1:k + 1])
    return torch.autograd.grad(value, list(module.parameters()))


# ------------------------------------------------------------------------------ K-BFGS
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("damping", [1.0, 4.0])
def test_kbfgs_matches_asdl(bias: bool, damping: float, fixed: None) -> None:
    module, batches = _mlp(bias), _batches(STEPS + 1)
    ours = OurRun(module, batches[:STEPS], damping)
    peer = AsdlRun(module, ours, batches, damping)
    root = damping ** 0.5  # lambda_A = lambda_G for dense layers
    names = [n for n, _ in module.named_parameters()]
    per = 2 if bias else 1

    # H_G: the same pairs and dampings; the same H_G(0) at lambda = 1
    ours_g, active = _pair_recursion(ours, 1.0 / root, root)
    peer_g, _ = _pair_recursion(ours, 1.0, root)
    assert active > 0  # Powell's damping is exercised
    for k in range(STEPS):
        for i, lay in enumerate(ours.states[k].layers):
            assert_close(lay.h_g, ours_g[k][i], f"ours H_G step {k} layer {i} (recursion)")
            assert_close(peer.h_g[k][i], peer_g[k][i], f"ASDL H_G step {k} layer {i} "
                         "(recursion from I)")
            if damping == 1.0:
                assert_close(lay.h_g, peer.h_g[k][i], f"H_G step {k} layer {i}")
            else:
                assert _max_rel(lay.h_g, peer.h_g[k][i]) > 1e-3  # H_G(0) = I / 2 vs I

    # H_A: the Hessian-action recursion, on (a, 1) for ours and on a for ASDL
    ours_a = _hessian_action_recursion(module, ours, batches[:STEPS], root, homogeneous=bias)
    peer_a = _hessian_action_recursion(module, ours, batches[:STEPS], root, homogeneous=False)
    for k in range(STEPS):
        for i, lay in enumerate(ours.states[k].layers):
            assert_close(lay.h_a, ours_a[k][i], f"ours H_A step {k} layer {i} (recursion)")
            assert_close(peer.h_a[k][i], peer_a[k][i], f"ASDL H_A step {k} layer {i} "
                         "(recursion)")
            if not bias:
                assert_close(lay.h_a, peer.h_a[k][i], f"H_A step {k} layer {i}")

    # ASDL's preconditioned gradient at step k >= 1: H_G(k - 1) grad H_A(k), with its own H_A
    # and the gradient of batches k and k - 1 (``_two_batch_gradient``)
    for k in range(1, STEPS):
        grads = _two_batch_gradient(module, ours.params[k], batches, k)
        for i in range(len(ours.states[k].layers)):
            g_w = grads[per * i]
            h_g = ours.states[k - 1].layers[i].h_g if damping == 1.0 else peer_g[k - 1][i]
            h_a = ours.states[k].layers[i].h_a if not bias else peer.h_a[k][i]
            assert_close(peer.directions[k][names[per * i]], h_g @ g_w @ h_a,
                         f"ASDL direction step {k} layer {i} weight")
            if bias:  # the bias by H_G alone (ours: the bias column of H_G [dW db] H_A)
                assert_close(peer.directions[k][names[per * i + 1]], h_g @ grads[per * i + 1],
                             f"ASDL direction step {k} layer {i} bias")


def test_asdl_minibatch_hessian_action_uses_the_batch_sum(written_back: None) -> None:
    module, batches = _mlp(False), _batches(STEPS)
    ours = OurRun(module, batches, 1.0)
    peer = AsdlRun(module, ours, batches, 1.0, hessian_action=True)
    ref_sum = _hessian_action_recursion(module, ours, batches, 1.0, homogeneous=False,
                                        sum_after_first=True)
    for k in range(STEPS):
        for i, lay in enumerate(ours.states[k].layers):
            assert_close(peer.h_a[k][i], ref_sum[k][i], f"ASDL H_A (m A_k) step {k} layer {i}")
            if k > 0:
                assert _max_rel(lay.h_a, peer.h_a[k][i]) > 1e-3


def test_asdl_powell_sign(written_back: None) -> None:
    """ASDL's Powell damping subtracts (1 - theta) H y: its H_G is the recursion with that
    sign, which differs from ours (Algorithm 8) once the damping is active."""
    module, batches = _mlp(True), _batches(STEPS + 1)
    ours = OurRun(module, batches[:STEPS], 1.0)
    peer = AsdlRun(module, ours, batches, 1.0)
    ref, active = _pair_recursion(ours, 1.0, 1.0, sign=-1.0)
    assert active > 0
    for k in range(STEPS):
        for i in range(len(ours.states[k].layers)):
            assert_close(peer.h_g[k][i], ref[k][i], f"ASDL H_G step {k} layer {i} (sign -1)")
    assert max(_max_rel(lay.h_g, peer.h_g[-1][i])
               for i, lay in enumerate(ours.states[-1].layers)) > 1e-3


def test_asdl_kbfgs_as_released_keeps_its_first_factors() -> None:
    """Without the write-back, ASDL's H_A stays (A_0 + lambda_A I)^{-1} and H_G stays I, so
    its direction at step k >= 1 is grad_W (A_0 + lambda_A I)^{-1} (the bias gradient as it
    is; the gradient of two batches, ``_two_batch_gradient``), while ours has moved."""
    module, batches = _mlp(True), _batches(STEPS + 1)
    damping = 4.0
    ours = OurRun(module, batches[:STEPS], damping)
    peer = AsdlRun(module, ours, batches, damping)
    acts = _inputs(module, ours.params[0], batches[0][0])
    first = [torch.linalg.inv(a.T @ a / M + damping ** 0.5 * torch.eye(a.shape[1]))
             for a in acts]
    for k in range(STEPS):
        for i, lay in enumerate(ours.states[k].layers):
            assert_close(peer.h_a[k][i], first[i], f"ASDL H_A step {k} layer {i}")
            assert torch.equal(peer.h_g[k][i], torch.eye(lay.h_g.shape[0]))
            assert _max_rel(lay.h_g, torch.eye(lay.h_g.shape[0]) / damping ** 0.5) > 1e-3
    names = [n for n, _ in module.named_parameters()]
    grads = _two_batch_gradient(module, ours.params[2], batches, 2)
    for i in range(len(first)):
        assert_close(peer.directions[2][names[2 * i]], grads[2 * i] @ first[i],
                     f"ASDL direction layer {i} weight")
        assert_close(peer.directions[2][names[2 * i + 1]], grads[2 * i + 1],
                     f"ASDL direction layer {i} bias")


def _output_gradient_means(module: torch.nn.Module, params: dict, x: torch.Tensor,
                           y: torch.Tensor) -> list[torch.Tensor]:
    """Every Linear layer's output gradient of the summed loss, averaged over the batch."""
    _load(module, params)
    outs = []

    def keep(_: object, __: object, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    hooks = [lay.register_forward_hook(keep) for lay in _linears(module)]
    F.cross_entropy(module(x), y, reduction="sum").backward()
    for h in hooks:
        h.remove()
    return [o.grad.mean(dim=0) for o in outs]


def test_asdl_second_pass_reads_the_new_labels(fixed: None, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """ASDL's second pass (start of step k) restores the inputs of batch k - 1 but not its
    labels: its y_G is the change of the mean output gradient from (x_{k-1}, y_{k-1}) at the old
    weights to (x_{k-1}, y_k) at the new ones. Ours (and Algorithm 9) keeps the batch."""
    module, batches = _mlp(True), _batches(STEPS + 1, same_labels=False)
    ours = OurRun(module, batches[:STEPS], 1.0)
    pairs = []

    def spy(h, s, y, mu1, mu2):
        pairs.append(y.clone())
        _powell_lm_damping_fixed_(h, s, y, mu1, mu2)

    monkeypatch.setattr(asdl_kbfgs, "powell_lm_damping_", spy)
    AsdlRun(module, ours, batches, 1.0)
    layers = len(ours.states[0].layers)
    for k in range(STEPS):
        x_old, y_old = batches[k]
        new = _output_gradient_means(module, ours.params[k + 1], x_old, batches[k + 1][1])
        old = _output_gradient_means(module, ours.params[k], x_old, y_old)
        for i in range(layers):
            assert_close(pairs[k * layers + i], new[i] - old[i], f"ASDL y_G step {k} layer {i}")
            assert _max_rel(ours.states[k].layers[i].y_g, new[i] - old[i]) > 1e-3


# ------------------------------------------------------------------------------ SMW-NG
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_smw_ng_matches_asdl(bias: bool, reduction: str) -> None:
    module = _mlp(bias)
    x, y = _batches(1)[0]
    lam_lm, tau = 0.05, 1e-3
    lam = lam_lm + tau
    # ours: lambda = lambda_LM + tau; ASDL with the summed loss: lambda / m (docstring)
    ours_lm = lam_lm if reduction == "mean" else lam / M - tau
    apply, params = from_torch(module)
    params = {k: v.detach().clone() for k, v in params.items()}
    opt = SMWNG(apply, losses.as_loss(torch.nn.CrossEntropyLoss()), lr=1.0, damping=ours_lm,
                tau=tau, curvature_batch=M)
    new, _, info = opt.step(params, opt.init(params), (x, y))
    assert bool(info.finite)
    maker = SmwEmpNaturalGradientMaker(module, SmwEmpNaturalGradientConfig(data_size=M,
                                                                          damping=lam))
    module.zero_grad()
    out = maker.setup_model_call(module, x)
    maker.setup_loss_call(F.cross_entropy, out, y, reduction=reduction)
    maker.forward_and_backward()
    for name, p in module.named_parameters():
        assert_close(params[name] - new[name], p.grad, f"SMW-NG direction {name}")
