"""Our K-FAC against kfac-jax 0.0.8 on jax 0.7.2 (``nox -s peers-kfac-jax``), float64.

The same MLP (our reference :class:`~secondorder.models.MLP` on the jax backend; a hand-written
JAX function with its dense layers registered through ``kfac_jax.register_dense`` for
kfac-jax), the same weights and batch, softmax cross-entropy or squared error. kfac-jax's
``BlockDiagonalCurvature`` estimates its Kronecker factors with ``estimation_mode="ggn_exact"``
(against our ``mode="exact"``, the type-2 Fisher: no sampling on either side) or
``"fisher_empirical"`` (against ``mode="empirical"``), in one update with ``ema_old = 0``.
Compared, to 1e-10 relative: every layer's factors, and the damped block-diagonal direction
applied to the gradient, ``multiply_inverse`` with ``exact_power=False`` (kfac-jax's pi-adjusted
factored damping) against our ``damped_inverse(damping, "pi")`` and with ``exact_power=True``
against ``"exact"``.

Conventions aligned here:

* layout: kfac-jax's dense kernel is (d_in, d_out) with the bias as a last row, ours is
  W (d_out, d_in) with the bias as a last column, so its input factor is our A and its output
  factor our G, and the directions are compared after a transpose;
* losses: kfac-jax registers per-sample losses (normalised by the ``batch_size`` given to the
  update); its squared error is ``weight * ||f - y||^2``, so ``weight=0.5`` is our MSE;
* the empirical Fisher: kfac-jax divides the per-sample gradients by sqrt(batch_size) before
  the statistics (so that its G is the second moment of the mini-batch gradient's terms),
  which makes its G ours divided by the batch size m; the test compares m G_kfac_jax with our
  G, and our direction with G / m against kfac-jax's;
* the pi-split: both use pi^2 = (tr A / dim A) / (tr G / dim G) (kfac-jax's "avg_diag" norm)
  and d_A = pi sqrt(damping), d_G = sqrt(damping) / pi, so nothing needs aligning.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
kfac_jax = pytest.importorskip("kfac_jax")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

from secondorder import losses  # noqa: E402
from secondorder.curvature import kronecker_factors  # noqa: E402
from secondorder.curvature.kfac import LayerFactors, assemble  # noqa: E402
from secondorder.models import MLP  # noqa: E402

RTOL = 1e-10
DAMPING = 1e-2
SIZES = (5, 4, 6, 3)  # distinct widths: every layer's factors have their own shapes
M = 9


def assert_close(ours: object, ref: object, what: str) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: {ours.shape} != {ref.shape}"
    err = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    print(f"{what}: max relative difference {err:.2e}")
    assert err <= RTOL, f"{what}: {err:.3e} > {RTOL}"
    return err


def _peer_net(kparams: list, x: jax.Array) -> jax.Array:
    h = x
    for i, layer in enumerate(kparams):
        y = h @ layer["w"] + layer["b"]
        y = kfac_jax.register_dense(y, h, layer["w"], layer["b"])
        h = jnp.tanh(y) if i < len(kparams) - 1 else y
    return h


def _peer_loss(name: str) -> object:
    def loss(kparams: list, batch: tuple) -> jax.Array:
        x, y = batch
        f = _peer_net(kparams, x)
        if name == "cross_entropy":
            kfac_jax.register_softmax_cross_entropy_loss(f, y)
            logp = jax.nn.log_softmax(f)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        kfac_jax.register_squared_error_loss(f, y, weight=0.5)
        return 0.5 * jnp.mean(jnp.sum((f - y) ** 2, axis=1))
    return loss


LOSSES = {"cross_entropy": losses.SoftmaxCrossEntropy, "mse": losses.MSE}
MODES = {"exact": "ggn_exact", "empirical": "fisher_empirical"}


class Problem:
    def __init__(self, loss: str, mode: str):
        rng = np.random.default_rng(0)
        self.model = MLP(SIZES, activation="tanh")
        self.params = [{"w": jnp.asarray(rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)),
                        "b": jnp.asarray(0.1 * rng.standard_normal(d_out))}
                       for d_in, d_out in zip(SIZES[:-1], SIZES[1:])]
        x = jnp.asarray(rng.standard_normal((M, SIZES[0])))
        if loss == "cross_entropy":
            y = jnp.asarray(rng.integers(0, SIZES[-1], M))
        else:
            y = jnp.asarray(rng.standard_normal((M, SIZES[-1])))
        self.batch = (x, y)
        self.loss = LOSSES[loss]()
        self.mode = mode
        self.peer_loss = _peer_loss(loss)
        self.gradient = jax.grad(lambda p: self.loss.value(self.model.apply(p, x), y))(
            self.params)
        self.ours = kronecker_factors(self.model, self.loss, self.params, self.batch, mode=mode)

        estimator = kfac_jax.BlockDiagonalCurvature(func=self.peer_loss,
                                                    auto_register_tags=False)
        args = (self.to_peer(self.params), self.batch)
        key = jax.random.PRNGKey(0)
        state = estimator.init(key, args, exact_powers_to_cache=None,
                               approx_powers_to_cache=None, cache_eigenvalues=False)
        self.state = estimator.update_curvature_matrix_estimate(
            state, ema_old=0.0, ema_new=1.0, identity_weight=DAMPING, batch_size=M, rng=key,
            func_args=args, estimation_mode=MODES[mode])
        self.estimator = estimator

    @staticmethod
    def to_peer(tree: list) -> list:
        return [{"w": layer["w"].T, "b": layer["b"]} for layer in tree]

    @staticmethod
    def from_peer(tree: list) -> list:
        return [{"w": layer["w"].T, "b": layer["b"]} for layer in tree]

    def peer_factors(self) -> list[tuple[jax.Array, jax.Array]]:
        """(A, G) of every block, in the G convention of our mode (see the module docstring)."""
        scale = M if self.mode == "empirical" else 1.0
        return [(s.factors[0].value, scale * s.factors[1].value)
                for s in self.state.blocks_states]

    def aligned_factors(self) -> list[LayerFactors]:
        """Our factors in kfac-jax's convention (G / m for the empirical Fisher)."""
        scale = 1.0 / M if self.mode == "empirical" else 1.0
        return [LayerFactors(lf.layer, lf.A, scale * lf.G) for lf in self.ours]


CASES = [(loss, mode) for loss in LOSSES for mode in MODES]


@pytest.fixture(params=CASES, ids=[f"{lo}-{mo}" for lo, mo in CASES], scope="module")
def problem(request: pytest.FixtureRequest) -> Problem:
    return Problem(*request.param)


def test_kfac_factors_match_kfac_jax(problem: Problem) -> None:
    peer = problem.peer_factors()
    assert len(peer) == len(problem.ours)
    for i, (lf, (a, g)) in enumerate(zip(problem.ours, peer)):
        assert_close(lf.A, a, f"layer {i} A ({problem.mode})")
        assert_close(lf.G, g, f"layer {i} G ({problem.mode})")


@pytest.mark.parametrize(("method", "exact_power"), [("pi", False), ("exact", True)])
def test_kfac_damped_direction_matches_kfac_jax(problem: Problem, method: str,
                                                exact_power: bool) -> None:
    ours = assemble(problem.aligned_factors(), problem.params).damped_inverse(DAMPING, method)
    d = ours.matvec(problem.gradient)
    ref = problem.estimator.multiply_inverse(
        problem.state, problem.to_peer(problem.gradient), identity_weight=DAMPING,
        exact_power=exact_power, use_cached=False, pmap_axis_name=None)
    ref = problem.from_peer(ref)
    flat = [np.concatenate([np.ravel(layer["w"]), np.ravel(layer["b"])]) for layer in d]
    flat_ref = [np.concatenate([np.ravel(layer["w"]), np.ravel(layer["b"])]) for layer in ref]
    assert_close(np.concatenate(flat), np.concatenate(flat_ref),
                 f"{method}-damped direction ({problem.mode})")


def test_the_two_dampings_are_different_directions(problem: Problem) -> None:
    """The pi-split and the exact damping give directions far apart at this damping, so the two
    agreements above are separate facts."""
    op = assemble(problem.aligned_factors(), problem.params)
    pi, exact = (np.concatenate([np.ravel(a) for layer in op.damped_inverse(DAMPING, method)
                                 .matvec(problem.gradient) for a in layer.values()])
                 for method in ("pi", "exact"))
    assert np.max(np.abs(pi - exact)) > 1e-3 * np.max(np.abs(exact))
