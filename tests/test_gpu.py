"""Every method on a CUDA device, against the same computation on the CPU in float64.

Runs where a GPU is present (``nox -s gpu``; skipped with the reason elsewhere). The parameters
and the batches are placed on the device explicitly, as a user's ``model.to("cuda")`` does, and
nothing sets a default device, so an array the library creates on the host (a noise draw, an
identity, a random key) and then meets device arrays with fails here as it would for a user.

- every registered method, 4 steps in float64 on each GPU backend (torch on ``cuda:0``, JAX on
  its first GPU, CuPy), agrees with the NumPy run to 1e-10, and the parameters and every array
  of the state stay on that device;
- the torch.optim adapter on a module moved to the GPU writes the CPU module's parameters;
- ``as_optax`` in a jitted step with the parameters on the GPU gives the CPU updates;
- a checkpoint saved from the GPU loads back onto it bit-identically, and onto the CPU;
- on CuPy, a derivative of a function closing over CuPy arrays raises MixedBackendError.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

from helpers import assert_close, back
from secondorder import backends, checkpoint, losses, tree
from secondorder.errors import MixedBackendError
from secondorder.models import MLP
from secondorder.optim.registry import METHODS, SMALL_ONLY

pytestmark = pytest.mark.gpu

NAMES = sorted(METHODS)
MODEL = MLP([3, 5, 3], "tanh")
LOSS = losses.SoftmaxCrossEntropy()


def _gpu(name: str) -> Any:
    """The first GPU of backend ``name`` as ``asarray(..., device=)`` takes it, or None."""
    if importlib.util.find_spec(name) is None:
        return None
    if name == "torch":
        import torch

        return torch.device("cuda:0") if torch.cuda.is_available() else None
    if name == "jax":
        import jax

        try:
            return jax.devices("gpu")[0]
        except RuntimeError:
            return None
    if name == "cupy":
        import cupy

        return 0 if cupy.cuda.is_available() else None
    return None


@pytest.fixture(params=["torch", "jax", "cupy"])
def gpu(request: pytest.FixtureRequest) -> tuple[backends.Backend, Any]:
    """A GPU backend and its first device."""
    device = _gpu(request.param)
    if device is None:
        pytest.skip(f"{request.param}: no CUDA device (or {request.param} is not installed)")
    return backends.get(request.param), device


def _on(backend: backends.Backend, device: Any, t: Any) -> Any:
    return tree.map(lambda a: backend.asarray(a, device=device), t)


def _device_kind(backend: backends.Backend, a: Any) -> str:
    if backend.name == "torch":
        return a.device.type
    if backend.name == "jax":
        return next(iter(a.devices())).platform
    return "gpu"  # a cupy.ndarray lives on a GPU


def _assert_on_gpu(backend: backends.Backend, t: Any) -> None:
    arrays = [a for a in tree.leaves(t) if backend.is_array(a)]
    places = {_device_kind(backend, a) for a in arrays}
    assert places <= {"cuda", "gpu"}, f"arrays on {places}"


def _batches(n: int, seed: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((16, 3)), rng.integers(0, 3, 16)) for _ in range(n)]


def _run(name: str, backend: backends.Backend, device: Any, batches: list) -> tuple:
    opt = METHODS[name](MODEL.apply, LOSS)
    params = _on(backend, device, MODEL.init(0, backend))
    state = opt.init(params)
    info = None
    for batch in batches:
        params, state, info = opt.step(params, state, _on(backend, device, batch))
    return params, state, info


@pytest.mark.parametrize("name", NAMES)
def test_every_method_steps_on_the_gpu_as_numpy_does(gpu, name):
    backend, device = gpu
    batches = _batches(2 if name in SMALL_ONLY else 4)
    numpy = backends.get("numpy")
    reference, _, _ = _run(name, numpy, None, batches)
    params, state, info = _run(name, backend, device, batches)
    assert bool(info.finite)
    assert_close(params, back(numpy, reference), rtol=1e-10, backend=backend)
    _assert_on_gpu(backend, (params, state))


def test_a_checkpoint_from_the_gpu_loads_back_there_and_on_the_cpu(gpu, tmp_path):
    backend, device = gpu
    params, state, _ = _run("kfac", backend, device, _batches(2))
    checkpoint.save(tmp_path / "run.ckpt", state, params)
    again, again_params, _ = checkpoint.load(tmp_path / "run.ckpt", device=device)
    _assert_on_gpu(backend, (again, again_params))
    for a, b in zip(tree.leaves((state, params)), tree.leaves((again, again_params))):
        assert np.array_equal(backend.to_numpy(a), backend.to_numpy(b))
    on_host, _, _ = checkpoint.load(tmp_path / "run.ckpt", backend="numpy")
    assert_close(on_host, back(backend, state), rtol=0.0)


# ------------------------------------------------------------------- torch.optim on a CUDA module
def _torch_cnn(device: str) -> Any:
    """Conv -> BatchNorm -> ReLU -> Linear, float64 (no dropout: CUDA and CPU masks differ)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 3))
    return model.to(dtype=torch.float64, device=device)


@pytest.mark.parametrize("name", ["curveball", "hessian-free", "kfac", "shampoo", "kbfgs",
                                  "smw-ng", "adam"])
def test_the_torch_optimizer_on_a_cuda_module_takes_the_cpu_steps(name):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch: no CUDA device")
    from secondorder.integrations.torch import Optimizer

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    runs = []
    for device in ("cpu", "cuda"):
        model = _torch_cnn(device)
        opt = Optimizer(model, torch.nn.CrossEntropyLoss(), method=name)
        for x, y in data:
            opt.step((x.to(device), y.to(device)))
        assert bool(opt.info.finite)
        runs.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if device == "cuda":
            assert all(p.is_cuda for p in model.parameters())
    for key, expected in runs[0].items():  # parameters and running statistics
        if expected.is_floating_point():
            actual = runs[1][key]
            assert float((actual - expected).norm()) <= 1e-10 * max(float(expected.norm()), 1.0)


# --------------------------------------------------------------------- optax on a JAX GPU array
@pytest.mark.parametrize("name", ["curveball", "kfac", "tnt"])
def test_as_optax_in_a_jitted_step_on_the_gpu_gives_the_cpu_updates(name):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    if _gpu("jax") is None:
        pytest.skip("jax: no GPU")
    from secondorder.integrations.optax import as_optax

    results = []
    for device in (jax.devices("cpu")[0], jax.devices("gpu")[0]):
        with jax.default_device(device):
            tx = as_optax(METHODS[name](MODEL.apply, LOSS))
            params = jax.device_put(MODEL.init(0, "jax"), device)
            opt_state = tx.init(params)

            @jax.jit
            def train_step(params, opt_state, x, y, tx=tx):
                updates, opt_state = tx.update(None, opt_state, params, batch=(x, y))
                return optax.apply_updates(params, updates), opt_state

            for x, y in _batches(3):
                params, opt_state = train_step(params, opt_state, jax.device_put(x, device),
                                               jax.device_put(y, device))
        assert {a.devices().pop() for a in jax.tree.leaves(params)} == {device}
        results.append(back(backends.get("jax"), params))
    assert_close(results[1], results[0], rtol=1e-10)


def test_a_cupy_derivative_of_a_closure_over_cupy_arrays_is_a_named_error():
    if _gpu("cupy") is None:
        pytest.skip("cupy: no CUDA device")
    cupy_backend = backends.get("cupy")
    x = cupy_backend.asarray(np.ones((4, 3)))
    w = cupy_backend.asarray(np.arange(3.0))
    with pytest.raises(MixedBackendError, match="from_dlpack"):
        cupy_backend.value_and_grad(lambda v: backends.namespace(v).sum(x @ v), w)
    # what the message says to do: the closed-over array as a torch tensor
    import torch

    x_torch = torch.from_dlpack(x)
    value, grad = cupy_backend.value_and_grad(lambda v: backends.namespace(v).sum(x_torch @ v), w)
    assert float(value) == 12.0
    assert np.array_equal(cupy_backend.to_numpy(grad), np.full(3, 4.0))
