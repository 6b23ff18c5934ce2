"""secondorder.integrations.torch.Optimizer against the pure init/step API and plain torch.

The references are independent of the integration: the pure API (``from_torch`` and
``build(name, apply, loss)``, with the defaults the integration takes, stepped by hand), a plain
train-mode forward pass of a copy of the module for running statistics, and torch's own
generator for dropout masks.
"""

from __future__ import annotations

import copy
import io
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from secondorder import losses  # noqa: E402
from secondorder.errors import (  # noqa: E402
    HyperparameterError,
    MissingBatchError,
    StateError,
    StructureError,
    UnsupportedModelError,
)
from secondorder.integrations.torch import Optimizer, _step_seed  # noqa: E402
from secondorder.losses import SoftmaxCrossEntropy  # noqa: E402
from secondorder.models import from_torch  # noqa: E402
from secondorder.optim.base import StepInfo  # noqa: E402
from secondorder.optim.registry import CLASS_DEFAULTS, METHODS, SMALL_ONLY  # noqa: E402
from secondorder.optim.transforms import (  # noqa: E402
    EmptyState,
    chain,
    clip_by_global_norm,
    scale,
    scale_by_schedule,
)
from secondorder.tree import leaves as tree_leaves  # noqa: E402

DT = torch.float64


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def batches(n: int, m: int = 12, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, 4, generator=g, dtype=DT), torch.randint(0, 3, (m,), generator=g))
            for _ in range(n)]


class CNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> Linear, on 1 x 6 x 6 images, 3 classes. The
    normalisation comes before the dropout, so its statistics do not depend on the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.4)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.flatten(1))


def cnn(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    return CNN().to(DT)


def image_batches(n: int, m: int = 8, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, 1, 6, 6, generator=g, dtype=DT),
             torch.randint(0, 3, (m,), generator=g)) for _ in range(n)]


def build(name: str, apply: object, loss: object, **hp: object) -> object:
    """The method as the integration builds it: the class's own defaults for the methods of
    CLASS_DEFAULTS, the registry's for the others."""
    factory = METHODS[name].cls if name in CLASS_DEFAULTS else METHODS[name]
    return factory(apply, loss, **hp)


def pure_run(module: nn.Module, name: str, data: list, **hp: object) -> dict:
    apply, params = from_torch(module)
    opt = build(name, apply, SoftmaxCrossEntropy(), **hp)
    state = opt.init(params)
    for batch in data:
        params, state, _ = opt.step(params, state, batch)
    return params


def module_params(module: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / max(float(b[k].norm()), 1e-300)) for k in b)


# ------------------------------------------------------------------ (a) the pure API, every method
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_matches_the_pure_api(name: str) -> None:
    data = batches(2 if name in SMALL_ONLY else 3)  # dense p x p methods: ~0.3 s a step
    expected = pure_run(mlp(), name, data)
    model = mlp()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method=name)
    losses_seen = [opt.step(batch) for batch in data]
    assert max_rel_diff(module_params(model), expected) <= 1e-12
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in losses_seen)
    assert opt.info is not None and opt.method_state is not None


def test_parameters_are_written_in_place() -> None:
    model = mlp()
    tensors = [p for p in model.parameters()]
    before = [p.detach().clone() for p in tensors]
    Optimizer(model, SoftmaxCrossEntropy(), method="curveball").step(batches(1)[0])
    assert all(a is b for a, b in zip(tensors, model.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before, tensors))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_donated_gradient_step_is_the_pure_step_written_in_place(name: str) -> None:
    """``step(..., donate=True)`` (what the Optimizer uses for gradient methods) adds the update
    into the given tensors: the pure step's parameters to the bit, in the caller's storage; a
    rejected step (a NaN batch) writes nothing and keeps the state."""
    apply, params = from_torch(mlp())
    method = build(name, apply, SoftmaxCrossEntropy())
    state = method.init(params)
    data = batches(3)
    for batch in data[:2]:  # a momentum buffer that is not zero
        params, state, _ = method.step(params, state, batch)
    expected, expected_state, _ = method.step({k: v.clone() for k, v in params.items()},
                                              state, data[2])
    donated = {k: v.clone() for k, v in params.items()}
    storage = {k: v.data_ptr() for k, v in donated.items()}
    out, out_state, info = method.step(donated, state, data[2], donate=True)
    assert bool(info.finite)
    assert all(out[k] is donated[k] and out[k].data_ptr() == storage[k] for k in out)
    assert all(torch.equal(out[k], expected[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(out_state),
                                                 tree_leaves(expected_state)))
    x, y = data[2]
    bad = (torch.where(torch.arange(len(x))[:, None] == 0, float("nan"), x), y)
    before = {k: v.clone() for k, v in out.items()}
    kept, kept_state, info = method.step(out, out_state, bad, donate=True)
    assert not bool(info.finite) and kept_state is out_state
    assert all(torch.equal(out[k], before[k]) and kept[k] is out[k] for k in out)


def test_leftover_backward_and_zero_grad_are_harmless() -> None:
    data = batches(3)
    clean = mlp()
    opt = Optimizer(clean, SoftmaxCrossEntropy(), method="hessian-free")
    for batch in data:
        opt.step(batch)
    model = mlp()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="hessian-free")
    criterion = nn.CrossEntropyLoss()
    for x, y in data:  # a torch loop with only the step line changed
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        opt.step((x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean.parameters()))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not hasattr(losses, "as_loss"), reason="secondorder.losses.as_loss missing")
def test_torch_loss_module_is_mapped() -> None:
    data = batches(2)
    expected = pure_run(mlp(), "curveball", data)
    model = mlp()
    opt = Optimizer(model, nn.CrossEntropyLoss(), method="curveball")
    for batch in data:
        opt.step(batch)
    assert max_rel_diff(module_params(model), expected) <= 1e-12


# ------------------------------------------------------------------ (b) checkpoints
@pytest.mark.parametrize("name", ["curveball", "hessian-free"])
def test_save_and_load_resume_bit_identically(name: str) -> None:
    data = image_batches(4)
    hp = {"cg_iters": 3} if name == "hessian-free" else {}
    straight = cnn()
    opt = Optimizer(straight, SoftmaxCrossEntropy(), method=name, dropout_seed=5, **hp)
    for batch in data:
        opt.step(batch)

    first = cnn()
    opt = Optimizer(first, SoftmaxCrossEntropy(), method=name, dropout_seed=5, **hp)
    for batch in data[:2]:
        opt.step(batch)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = cnn(seed=9)  # other weights and another dropout seed, overwritten by the load
    opt = Optimizer(resumed, SoftmaxCrossEntropy(), method=name, dropout_seed=11, **hp)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for batch in data[2:]:
        opt.step(batch)
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_refuses_another_methods_state() -> None:
    opt = Optimizer(mlp(), SoftmaxCrossEntropy(), method="curveball")
    opt.step(batches(1)[0])
    other = Optimizer(mlp(), SoftmaxCrossEntropy(), method="hessian-free")
    with pytest.raises(StateError, match="curveball"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(StateError, match="not saved"):
        other.load_state_dict(torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict())


# ------------------------------------------------------------------ (c) schedulers
def test_step_lr_changes_sgds_learning_rate() -> None:
    data = batches(3)
    model = mlp()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="sgd", lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for batch in data:
        opt.step(batch)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)

    apply, params = from_torch(mlp())
    state = build("sgd", apply, SoftmaxCrossEntropy(), lr=0.1, momentum=0.9).init(params)
    for t, batch in enumerate(data):
        method = build("sgd", apply, SoftmaxCrossEntropy(), lr=0.1 * 0.5**t, momentum=0.9)
        params, state, _ = method.step(params, state, batch)
    assert max_rel_diff(module_params(model), params) <= 1e-12
    unscheduled = pure_run(mlp(), "sgd", data, lr=0.1, momentum=0.9)
    assert max_rel_diff(module_params(model), unscheduled) > 1e-6


def test_step_lr_scales_curveballs_step() -> None:
    data = batches(3)
    model = mlp()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="curveball")
    assert opt.param_groups[0]["lr"] == 1.0
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for batch in data:
        opt.step(batch)
        sched.step()

    apply, params = from_torch(mlp())
    state = build("curveball", apply, SoftmaxCrossEntropy()).init(params)
    for t, batch in enumerate(data):
        lr = 0.5**t
        method = build("curveball", apply, SoftmaxCrossEntropy(),
                                      transform=None if lr == 1 else scale(lr))
        if lr != 1:
            state = state._replace(transform=EmptyState())
        params, state, _ = method.step(params, state, batch)
    assert max_rel_diff(module_params(model), params) <= 1e-12
    unscheduled = pure_run(mlp(), "curveball", data)
    assert max_rel_diff(module_params(model), unscheduled) > 1e-6


def test_user_transform_and_a_schedule_as_lr() -> None:
    """A transform of the user's own is applied before the lr multiplier; an lr given as a
    schedule (a callable of the step count) is kept on the optimiser, not in the group."""
    data = batches(3)

    def schedule(t: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + t)

    model = mlp()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="curveball",
                    transform=clip_by_global_norm(0.05), lr=schedule)
    for batch in data:
        opt.step(batch)
    assert "lr" not in opt.param_groups[0] and "transform" not in opt.param_groups[0]
    expected = pure_run(mlp(), "curveball", data,
                        transform=chain(clip_by_global_norm(0.05), scale_by_schedule(schedule)))
    assert max_rel_diff(module_params(model), expected) <= 1e-12


def test_float32_module_trains_in_float32() -> None:
    model = mlp().float()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="curveball")
    x, y = batches(1)[0]
    loss = opt.step((x.float(), y))
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all())
               for p in model.parameters())


def test_changed_group_value_rebuilds_the_method() -> None:
    model = mlp()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="hessian-free", cg_iters=3)
    opt.step(batches(1)[0])
    assert opt._current_method().cg_iters == 3
    opt.param_groups[0]["cg_iters"] = 5
    assert opt._current_method().cg_iters == 5


# ------------------------------------------------------------------ (d) BatchNorm and Dropout
def _beside_torch_optim(opt, ref, theirs, data, *, schedulers=(), before=None,
                        criterion=None) -> None:
    """Step ``opt`` and the torch.optim reference ``ref`` (on the module ``theirs``, with
    ``criterion``, by default nn.CrossEntropyLoss()) over ``data`` in lockstep: ``before(t)``
    ahead of step t, the schedulers after every step."""
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    for t, (x, y) in enumerate(data):
        if before is not None:
            before(t)
        opt.step((x, y))
        ref.zero_grad()
        criterion(theirs(x), y).backward()
        ref.step()
        for s in schedulers:
            s.step()


@pytest.mark.parametrize(("name", "start", "change"), [
    ("sgd", {"momentum": 0.0}, {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9}, {"momentum": 0.0}),
    ("sgd", {"momentum": 0.9}, {"weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.01}, {"weight_decay": 0.0, "nesterov": True}),
    ("adam", {}, {"weight_decay": 0.01}),
])
def test_momentum_and_weight_decay_changed_between_steps_follow_torch_optim(
        name: str, start: dict, change: dict) -> None:
    """Switching momentum or weight decay on or off in the parameter group adds or drops a
    transform's state; the other buffers carry on (Adam's moments, the momentum buffer) as in
    torch.optim.SGD / Adam, the reference here, with the same changes at the same step."""
    data = batches(5)
    ours, theirs = mlp(), mlp()
    lr = 0.1 if name == "sgd" else 0.01
    opt = Optimizer(ours, SoftmaxCrossEntropy(), method=name, lr=lr, **start)
    ref = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)(
        theirs.parameters(), lr=lr, **start)

    def change_at_2(t: int) -> None:
        if t == 2:
            opt.param_groups[0].update(change)
            ref.param_groups[0].update(change)

    _beside_torch_optim(opt, ref, theirs, data, before=change_at_2)
    assert max_rel_diff(module_params(ours), module_params(theirs)) <= 1e-12


def test_label_smoothing_of_the_torch_loss_follows_torch_optim() -> None:
    """nn.CrossEntropyLoss(label_smoothing=0.1) as the Optimizer's loss: SGD with momentum
    and Adam take torch.optim's steps on the same smoothed loss."""
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)):
        ours, theirs = mlp(), mlp()
        opt = Optimizer(ours, criterion, method=name, lr=0.05, momentum=0.9) if name == "sgd" \
            else Optimizer(ours, criterion, method=name, lr=0.01)
        ref = cls(theirs.parameters(), lr=0.05, momentum=0.9) if name == "sgd" \
            else cls(theirs.parameters(), lr=0.01)
        _beside_torch_optim(opt, ref, theirs, batches(4), criterion=criterion)
        assert max_rel_diff(module_params(ours), module_params(theirs)) <= 1e-12


def test_a_changed_momentum_keeps_kfacs_factors() -> None:
    """K-FAC's curvature factors are not a transform's state: switching momentum off keeps
    them, and the next step is the one a K-FAC built with momentum 0 takes from that state."""
    data = batches(3)
    model = mlp()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="kfac", lr=0.1, momentum=0.9)
    opt.step(data[0])
    before = opt.method_state
    opt.param_groups[0]["momentum"] = 0.0
    start = module_params(model)
    opt.step(data[1])
    apply, _ = from_torch(mlp())
    method = build("kfac", apply, SoftmaxCrossEntropy(), lr=0.1, momentum=0.0)
    fresh = method.init(start)
    state = fresh._replace(**{f: getattr(before, f) for f in before._fields
                              if f != "transform"})
    expected, _, _ = method.step(start, state, data[1])
    assert max_rel_diff(module_params(model), expected) <= 1e-12


@pytest.mark.parametrize("name", ["curveball", "hessian-free"])
def test_running_statistics_follow_one_forward_pass(name: str) -> None:
    model = cnn()
    hp = {"cg_iters": 3} if name == "hessian-free" else {}
    opt = Optimizer(model, SoftmaxCrossEntropy(), method=name, **hp)
    for x, y in image_batches(3):
        reference = copy.deepcopy(model).train()
        with torch.no_grad():
            reference(x)  # one plain train-mode pass at the parameters the step starts from
        opt.step((x, y))
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(model.bn, key), getattr(reference.bn, key)), key
    assert int(model.bn.num_batches_tracked) == 3


@pytest.mark.parametrize(("update_buffers", "per_step"), [("auto", 1), (True, 2), (False, 1)])
def test_a_leftover_forward_pass_updates_the_statistics_once(update_buffers: object,
                                                             per_step: int) -> None:
    """A torch loop that still runs model(x) in train mode: with "auto" that pass is the one
    update per step (the statistics equal those of the user's passes alone); True adds the
    optimiser's own pass, False leaves only the user's."""
    model = cnn()
    shadow = cnn()  # the same module, run only by the "user"
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="curveball",
                    update_buffers=update_buffers)
    criterion = nn.CrossEntropyLoss()
    for x, y in image_batches(3):
        shadow.load_state_dict(model.state_dict())
        with torch.no_grad():
            shadow(x)
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step((x, y))
        assert int(model.bn.num_batches_tracked) == int(shadow.bn.num_batches_tracked) + (
            per_step - 1)
        if per_step == 1:
            assert torch.equal(model.bn.running_mean, shadow.bn.running_mean)
            assert torch.equal(model.bn.running_var, shadow.bn.running_var)


def test_eval_mode_keeps_running_statistics_and_uses_them() -> None:
    model = cnn()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
    model.eval()
    before = {k: v.clone() for k, v in model.bn.named_buffers()}
    x, y = image_batches(1)[0]
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y)
    loss = Optimizer(model, SoftmaxCrossEntropy(), method="curveball").step((x, y))
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    assert all(torch.equal(b, before[k]) for k, b in model.bn.named_buffers())


class Probe(nn.Module):
    """Records a draw from torch's generator at every forward call, then applies dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.draws.append(torch.rand(5, dtype=DT))
        return nn.functional.dropout(h, 0.5, self.training)


def test_one_dropout_mask_per_step() -> None:
    torch.manual_seed(0)
    probe = Probe()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), probe, nn.Linear(6, 3)).to(DT)
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="hessian-free", cg_iters=4)
    first, second = batches(2)
    generator = torch.get_rng_state()
    opt.step(first)
    assert torch.equal(torch.get_rng_state(), generator)  # the caller's stream is untouched
    calls = list(probe.draws)
    assert len(calls) > 3  # Hessian-free calls the network many times per step
    assert all(torch.equal(d, calls[0]) for d in calls)  # with per-call masks these differ
    probe.draws.clear()
    opt.step(second)
    assert all(torch.equal(d, probe.draws[0]) for d in probe.draws)
    assert not torch.equal(probe.draws[0], calls[0])  # a new mask for the next step


def test_the_step_uses_the_dropout_mask_it_draws() -> None:
    """The loss a step reports is the loss of a plain forward pass with the step's mask."""
    model = cnn()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="curveball", update_buffers=False)
    x, y = image_batches(1)[0]
    reference = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(_step_seed(opt.dropout_seed, 0))
        expected = nn.functional.cross_entropy(reference(x), y)
    assert torch.allclose(opt.step((x, y)), expected, rtol=1e-12, atol=0)
    assert int(model.bn.num_batches_tracked) == 0  # update_buffers=False


# ------------------------------------------------------------------ (e) bad input
def test_bad_input_raises_named_errors() -> None:
    model = mlp()
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="curveball")
    with pytest.raises(MissingBatchError, match=r"opt.step\(\(x, y\)\)"):
        opt.step(lambda: 0.0)
    with pytest.raises(MissingBatchError, match="closure"):
        opt.step(closure=lambda: 0.0)
    with pytest.raises(MissingBatchError, match="needs the batch"):
        opt.step()
    with pytest.raises(MissingBatchError, match="pair"):
        opt.step((1, 2, 3))
    with pytest.raises(StructureError, match="no parameters"):
        Optimizer(nn.ReLU(), SoftmaxCrossEntropy())
    with pytest.raises(StructureError, match="nn.Module itself"):
        Optimizer(model.parameters(), SoftmaxCrossEntropy())
    with pytest.raises(HyperparameterError, match="unknown method 'lbfgs'"):
        Optimizer(model, SoftmaxCrossEntropy(), method="lbfgs")
    with pytest.raises(HyperparameterError, match="no hyperparameter learning_rate"):
        Optimizer(model, SoftmaxCrossEntropy(), method="sgd", learning_rate=0.1)
    with pytest.raises(HyperparameterError, match="no learning rate"):
        Optimizer(model, SoftmaxCrossEntropy(), method="bfgs", lr=0.5)
    extra = nn.Linear(2, 2).to(DT)
    opt.add_param_group({"params": list(extra.parameters())})
    with pytest.raises(HyperparameterError, match="one parameter group"):
        opt.step(batches(1)[0])


@pytest.mark.parametrize("name", ["curveball", "sgd"])
def test_frozen_parameters_stay_fixed(name):
    """A layer with requires_grad=False is a constant of the forward pass: it keeps its values,
    and the trainable ones equal the pure API on a hand-written function in which the frozen
    weights are captured constants."""
    model = mlp(3)
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model[0].state_dict().items()}
    data = batches(3)
    opt = Optimizer(model, SoftmaxCrossEntropy(), method=name)
    for batch in data:
        opt.step(batch)
    for k, v in model[0].state_dict().items():
        assert torch.equal(v, frozen[k])

    reference = mlp(3)
    w0, b0 = reference[0].weight.detach(), reference[0].bias.detach()

    def apply(p, x):
        return torch.tanh(x @ w0.T + b0) @ p["2.weight"].T + p["2.bias"]

    params = {n: t.detach().clone() for n, t in reference[2].named_parameters()}
    params = {"2.weight": params["weight"], "2.bias": params["bias"]}
    pure = build(name, apply, SoftmaxCrossEntropy())
    state = pure.init(params)
    for batch in data:
        params, state, _ = pure.step(params, state, batch)
    assert torch.allclose(model[2].weight, params["2.weight"], rtol=0, atol=1e-12)
    assert torch.allclose(model[2].bias, params["2.bias"], rtol=0, atol=1e-12)


class _Anchored(NamedTuple):
    anchor: dict


class _KeepsItsInput:
    """A method whose state keeps the very parameters it was given (as a proximal method keeps
    its anchor): the in-place write-back must not change that state's values."""

    State = _Anchored

    def __init__(self, apply, loss, lr: float = 0.1):
        self.apply, self.loss, self.lr = apply, loss, lr

    def init(self, params):
        return _Anchored({k: v.clone() for k, v in params.items()})

    def step(self, params, state, batch):
        new = {k: v - self.lr for k, v in params.items()}
        loss = torch.zeros((), dtype=DT)
        return new, _Anchored(params), StepInfo(loss, loss, loss, torch.tensor(True),
                                                torch.tensor(0), loss)


def test_write_back_keeps_a_state_that_holds_the_input(monkeypatch):
    monkeypatch.setitem(METHODS, "keeps-its-input", _KeepsItsInput)
    model = mlp(4)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = Optimizer(model, SoftmaxCrossEntropy(), method="keeps-its-input")
    opt.step(batches(1)[0])
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k] - 0.1)  # the module moved ...
        assert torch.equal(opt.method_state.anchor[k], before[k])  # ... the anchor did not


def test_step_runs_torch_optim_hooks_and_the_profiler_label():
    """step keeps torch.optim's step protocol: global and per-optimiser pre-hooks (which may
    replace the arguments) and post-hooks, in torch's order, and the profiler's label."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model = mlp()
    opt = Optimizer(model, nn.CrossEntropyLoss(), method="sgd")
    (x, y), (x2, y2) = batches(2)
    calls = []

    def swap(o, args, kwargs):
        calls.append("pre")
        return (args[0], (x2, y2)), kwargs

    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               opt.register_step_pre_hook(swap),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("post", a[1][0] is x2))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        loss = opt.step((x, y))
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", ("post", True), "global post"]
    reference = Optimizer(mlp(), nn.CrossEntropyLoss(), method="sgd")
    assert torch.equal(loss, reference.step((x2, y2)))  # the step ran on the swapped batch
    with torch.profiler.profile() as prof:
        opt.step((x, y))
    assert any(e.name == "Optimizer.step#Optimizer.step" for e in prof.events())


class _Flattened(nn.Module):
    """``net`` with its outputs reshaped to (batch, k): the layout the curvature code was
    checked on against dense oracles."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0], -1)


class _Squeezed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


@pytest.mark.parametrize(("name", "hp"), [("curveball", {}), ("kfac", {}),
                                          ("kfac", {"mode": "exact"}), ("kbfgs", {})])
@pytest.mark.parametrize("criterion", [nn.MSELoss(), nn.BCEWithLogitsLoss()])
def test_image_and_squeezed_outputs_step_as_their_flattened_model(name, hp, criterion) -> None:
    """Outputs of shape (m, C, H, W) (a convolutional autoencoder) and (m,) (a squeezed
    regression head) with torch's mean-reduced MSELoss / BCEWithLogitsLoss: every output of
    a sample counts in k, so the steps equal those of the same module with its outputs
    reshaped to (m, k). The curvature used k = C (one axis) before, 36x too large here;
    K-FAC's exact mode (the loss's square root) raised ValueError."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 6, 6, generator=g, dtype=DT)
    y = torch.rand(6, 2, 6, 6, generator=g, dtype=DT)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(2, 2, 3, padding=1)).to(DT)
    flat = _Flattened(copy.deepcopy(net))
    ours, ref = Optimizer(net, criterion, name, **hp), Optimizer(flat, criterion, name, **hp)
    for _ in range(3):
        ours.step((x, y))
        ref.step((x, y.reshape(6, -1)))
    assert max_rel_diff(module_params(net), module_params(flat.net)) <= 1e-12

    x1, y1 = torch.randn(8, 4, generator=g, dtype=DT), torch.rand(8, generator=g, dtype=DT)
    torch.manual_seed(0)
    squeezed = _Squeezed().to(DT)
    column = copy.deepcopy(squeezed.fc)
    ours, ref = (Optimizer(squeezed, criterion, name, **hp),
                 Optimizer(column, criterion, name, **hp))
    for _ in range(3):
        ours.step((x1, y1))
        ref.step((x1, y1[:, None]))
    assert max_rel_diff(module_params(squeezed.fc), module_params(column)) <= 1e-12


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_warm_up_from_zero_and_a_tensor_lr_follow_torch_optim(name: str) -> None:
    """LambdaLR(lambda s: s / 3) gives lr = 0 at the first step: SGD and Adam take it (a zero
    step, as torch.optim does); an lr given as a 0-d tensor goes into the group as a number,
    where the scheduler scales it. Reference: torch.optim.SGD / Adam with the same scheduler."""
    data = batches(5)
    ours, theirs = mlp(), mlp()
    extra = {"momentum": 0.9} if name == "sgd" else {}
    opt = Optimizer(ours, SoftmaxCrossEntropy(), method=name, lr=torch.tensor(0.05, dtype=DT),
                    **extra)
    assert opt.param_groups[0]["lr"] == 0.05
    ref = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)(theirs.parameters(), lr=0.05,
                                                                   **extra)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / 3)) for o in (opt, ref)]
    _beside_torch_optim(opt, ref, theirs, data, schedulers=scheds)
    assert max_rel_diff(module_params(ours), module_params(theirs)) <= 1e-12


def test_lr_zero_for_a_damped_method_says_how_to_warm_up() -> None:
    with pytest.raises(HyperparameterError, match="warm-up must start above 0"):
        Optimizer(mlp(), SoftmaxCrossEntropy(), method="kfac", lr=0.0)


class _DictInput(nn.Module):
    """The mlp's layers behind a forward that takes a dict batch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(batch["x"])


class _TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3).to(DT)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.fc(x), x


@pytest.mark.parametrize("name", ["kfac", "kbfgs"])
def test_dict_batches_and_wrapped_modules_step_as_the_plain_module(name: str) -> None:
    """A forward that takes a dict, a DataParallel and a torch.compile wrapper: the layer
    taps read the dict's tensors, the wrappers are unwrapped (their forward is not used; they
    share the parameters), and the steps equal the plain module's."""
    data = batches(3)
    plain = mlp()
    reference = Optimizer(plain, SoftmaxCrossEntropy(), name, lr=0.1)
    for batch in data:
        reference.step(batch)
    dicts = _DictInput(mlp())
    wrapped = [nn.DataParallel(mlp()), torch.compile(mlp())]
    opts = [Optimizer(m, SoftmaxCrossEntropy(), name, lr=0.1) for m in (dicts, *wrapped)]
    for x, y in data:
        opts[0].step(({"x": x}, y))
        for opt in opts[1:]:
            opt.step((x, y))
    for net in (dicts.net, wrapped[0].module, wrapped[1]._orig_mod):
        assert max_rel_diff(module_params(net), module_params(plain)) <= 1e-12


def test_a_forward_returning_a_tuple_raises_a_named_error() -> None:
    model = _TupleOutput()
    before = module_params(model)
    opt = Optimizer(model, SoftmaxCrossEntropy(), "curveball")
    with pytest.raises(UnsupportedModelError, match="returned a tuple"):
        opt.step(batches(1)[0])
    assert max_rel_diff(module_params(model), before) == 0.0
    assert opt.method_state is None or int(opt.method_state.count) == 0


@pytest.mark.parametrize("name", ["adam", "kfac", "curveball"])
def test_a_float32_state_loads_into_a_float64_module_as_float64(name: str) -> None:
    """load_state_dict casts the floating state to the parameters' dtype (torch.optim does):
    a float32 run resumed on the module converted with .double() kept float32 buffers next to
    float64 parameters, and CurveBall's matmul raised."""
    data = batches(2)
    model = mlp().float()
    opt = Optimizer(model, SoftmaxCrossEntropy(), name)
    opt.step((data[0][0].float(), data[0][1]))
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    model.double()
    resumed = Optimizer(model, SoftmaxCrossEntropy(), name)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    floats = [(a, b) for a, b in zip(tree_leaves(resumed.method_state),
                                     tree_leaves(opt.method_state))
              if isinstance(a, torch.Tensor) and a.is_floating_point()]
    assert floats and all(a.dtype == DT and torch.equal(a, b.double()) for a, b in floats)
    resumed.step(data[1])
    assert resumed.info is not None and bool(resumed.info.finite)


def test_a_layer_frozen_mid_training_stays_fixed_as_with_torch_optim() -> None:
    """requires_grad switched off after the optimiser was built: the parameter keeps its value
    (torch.optim skips it) and a warning says that the curvature still includes it. SGD with
    momentum against torch.optim.SGD with the same freeze at the same step."""
    data = batches(4)
    ours, theirs = mlp(), mlp()
    opt = Optimizer(ours, SoftmaxCrossEntropy(), method="sgd", lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    frozen = []

    def freeze_at_2(t: int) -> None:
        if t == 2:
            for model in (ours, theirs):
                model[0].weight.requires_grad_(False)
            frozen.append(ours[0].weight.detach().clone())

    with pytest.warns(UserWarning, match="frozen after the optimiser was built"):
        _beside_torch_optim(opt, ref, theirs, data, before=freeze_at_2)
    assert torch.equal(ours[0].weight, frozen[0])
    assert max_rel_diff(module_params(ours), module_params(theirs)) <= 1e-12


def test_one_cycle_lr_cycles_adams_betas_as_with_torch_optim() -> None:
    """Adam's (b1, b2) are the group's "betas", so OneCycleLR (which cycles momentum through
    "momentum" or "betas") runs on it; betas= is accepted. Reference: torch.optim.Adam with
    the same OneCycleLR."""
    data = batches(5)
    ours, theirs = mlp(), mlp()
    opt = Optimizer(ours, SoftmaxCrossEntropy(), method="adam", lr=0.01, betas=(0.9, 0.99))
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and "b1" not in opt.param_groups[0]
    ref = torch.optim.Adam(theirs.parameters(), lr=0.01, betas=(0.9, 0.99))
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=len(data))
              for o in (opt, ref)]
    _beside_torch_optim(opt, ref, theirs, data, schedulers=scheds)
    assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
    assert max_rel_diff(module_params(ours), module_params(theirs)) <= 1e-12


def test_a_scheduler_cycling_betas_or_momentum_keeps_the_state_without_a_new_template(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """OneCycleLR changes Adam's betas (and SGD's momentum) at every step; those changes keep
    the state's structure, so the rebuilt method does not initialise a template state (a copy
    of the parameters and zeroed moments) each step, while a momentum switched to 0 does."""
    from secondorder.optim import SGD, Adam

    calls = {"n": 0}
    for cls in (SGD, Adam):
        original = cls.init

        def counted(self, params, original=original):
            calls["n"] += 1
            return original(self, params)

        monkeypatch.setattr(cls, "init", counted)
    for name in ("adam", "sgd"):
        calls["n"] = 0
        opt = Optimizer(mlp(), SoftmaxCrossEntropy(), method=name, lr=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
        for x, y in batches(4):
            opt.step((x, y))
            sched.step()
        assert calls["n"] == 1, name  # the first step's state only
    opt.param_groups[0]["momentum"] = 0.0  # SGD's momentum off: the trace state is dropped
    opt.step(batches(1)[0])
    assert calls["n"] == 2 and len(opt.method_state.transform.states) == 1


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_gradient_clipping_as_a_transform_follows_clip_grad_norm(name: str) -> None:
    """transform=clip_by_global_norm(c) clips SGD's / Adam's gradient before the weight decay
    and the momentum, as torch's clip_grad_norm_(params, c) before optimizer.step() does (the
    integration refused transform= for these methods); the reference clips by hand, with
    clip_grad_norm_'s formula less its 1e-6. c is below the gradient norms here."""
    data = batches(4)
    ours, theirs = mlp(), mlp()
    hp = ({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01} if name == "sgd"
          else {"lr": 0.01, "weight_decay": 0.01})
    opt = Optimizer(ours, SoftmaxCrossEntropy(), method=name,
                    transform=clip_by_global_norm(0.05), **hp)
    ref = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)(theirs.parameters(), **hp)
    criterion = nn.CrossEntropyLoss()
    for x, y in data:
        opt.step((x, y))
        ref.zero_grad()
        criterion(theirs(x), y).backward()
        # clip_grad_norm_ without its 1e-6 in the denominator (a 1e-7 relative difference)
        norm = torch.sqrt(sum((p.grad**2).sum() for p in theirs.parameters()))
        assert float(norm) > 0.05
        for p in theirs.parameters():
            p.grad.mul_(0.05 / norm)
        ref.step()
    assert max_rel_diff(module_params(ours), module_params(theirs)) <= 1e-12


@pytest.mark.parametrize("name", ["kfac", "tnt", "kbfgs", "kbfgs-l"])
def test_kronecker_methods_clip_the_gradient_as_clip_grad_norm(name: str) -> None:
    """transform=clip_by_global_norm(c) on a Kronecker-factored method clips the gradient
    before its momentum and preconditioning: the first step (zero momentum; the curvature does
    not depend on the gradient) is the unclipped step times c / |g|, |g| the total norm that
    torch's clip_grad_norm_ reports after a backward pass of the module."""
    (x, y), = batches(1)
    reference = mlp()
    nn.CrossEntropyLoss()(reference(x), y).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf")))
    c = 0.3 * norm
    steps = []
    for transform in (None, clip_by_global_norm(c)):
        module = mlp()
        start = module_params(module)
        opt = Optimizer(module, nn.CrossEntropyLoss(), method=name, transform=transform)
        opt.step((x, y))
        steps.append({k: v - start[k] for k, v in module_params(module).items()})
    plain, clipped = steps
    assert max_rel_diff(clipped, {k: v * (c / norm) for k, v in plain.items()}) <= 1e-10


def test_clipping_dot_grad_warns_that_the_step_does_not_read_it() -> None:
    """clip_grad_norm_ between backward() and step() changes .grad in place, which the step
    does not read: one warning says so and names transform=; the plain loop of the README
    (backward, then step) does not warn, nor does autograd's own in-place accumulation (a
    weight used twice in the loss, two backward passes)."""
    import warnings

    (x, y), = batches(1)
    criterion = nn.CrossEntropyLoss()
    model = mlp()
    opt = Optimizer(model, criterion, method="kfac")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            (criterion(model(x), y) + 1e-3 * (model[0].weight ** 2).sum()).backward()
            criterion(model(x), y).backward()
            assert model[0].weight.grad._version > 0  # accumulated in place by autograd
            opt.step((x, y))
    criterion(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    with pytest.warns(UserWarning, match="clip_by_global_norm"):
        opt.step((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimiser
        opt.step((x, y))


def test_kfac_with_a_frozen_bias_preconditions_the_weight_alone() -> None:
    """A Linear whose bias is frozen (requires_grad=False): the bias is a constant, so K-FAC's
    A factor of that layer is (1/m) X^T X without the column of ones (a ShapeError before),
    and the bias keeps its value."""
    (x, y), = batches(1)
    model = mlp()
    model[0].bias.requires_grad_(False)
    bias = model[0].bias.detach().clone()
    opt = Optimizer(model, nn.CrossEntropyLoss(), method="kfac", statistics_interval=1,
                    inverse_interval=1)
    opt.step((x, y))
    assert bool(opt.info.finite) and torch.equal(model[0].bias, bias)
    a_factor = opt.method_state.blocks[0].factors[1]
    assert torch.allclose(a_factor, x.T @ x / x.shape[0], rtol=1e-13, atol=1e-15)


def test_setting_b1_beside_the_groups_betas_raises() -> None:
    opt = Optimizer(mlp(), SoftmaxCrossEntropy(), method="adam")
    opt.step(batches(1)[0])
    opt.param_groups[0]["b1"] = 0.0
    with pytest.raises(HyperparameterError, match="set group\\['betas'\\]"):
        opt.step(batches(1)[0])


def test_a_non_finite_loss_at_the_current_parameters_warns_once_that_no_step_can_follow(
        ) -> None:
    """Parameters at which the loss overflows (a weight of 1e308 in float64 gives logits past
    the largest double, an inf loss): the step is rejected and the module keeps its
    parameters, and one NonFiniteLossWarning, pointing at the user's line, says that every
    later step will be rejected too; a finite rejected step would not warn."""
    import warnings

    from secondorder.errors import NonFiniteLossWarning

    (x, y), = batches(1)
    model = mlp()
    with torch.no_grad():
        model[-1].weight.fill_(1e308)
    before = module_params(model)
    opt = Optimizer(model, nn.CrossEntropyLoss(), method="kfac")
    with pytest.warns(NonFiniteLossWarning, match="every later step") as record:
        loss = opt.step((x, y))
    assert not bool(opt.info.finite) and not torch.isfinite(loss)
    assert record[0].filename == __file__
    assert max_rel_diff(module_params(model), before) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimiser
        opt.step((x, y))
