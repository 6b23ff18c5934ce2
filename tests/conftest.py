"""Test configuration: the ``backend`` fixture over every installed backend.

``pytest --backend torch`` (repeatable) restricts the run to the named backends; backends that are
not installed are skipped with the reason, and CuPy only runs where a CUDA device is present.
``pytest --device cuda`` makes the first GPU torch's and JAX's default device.
JAX runs in float64 (x64 mode) so that every backend can be held to the float64 tolerances, and
compiles without XLA's LLVM optimisation passes unless ``SECONDORDER_TEST_XLA_OPTIMIZE=1``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from secondorder import backends

ALL = backends.names()

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)
    # XLA compiles without its LLVM optimisation passes (the HLO graph, and so the arithmetic,
    # is the same; only machine-code generation differs): the suite compiles hundreds of small
    # programs and runs each a few times, and this takes a sixth off the JAX tests' time.
    # SECONDORDER_TEST_XLA_OPTIMIZE=1 runs the suite with XLA's default optimisation.
    # The environment variable carries the setting to the CLI and multi-process tests' children.
    if os.environ.get("SECONDORDER_TEST_XLA_OPTIMIZE") != "1":
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first, the rest in their order: pytest-xdist hands tests out in
    collection order, and a slow test that starts last keeps one worker busy after the others
    have finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        choices=ALL,
        help="run backend-parametrised tests only for this backend (repeatable)",
    )
    parser.addoption(
        "--device",
        default=None,
        choices=["cuda"],
        help="make the first CUDA GPU torch's and JAX's default device, so that the suite's "
             "arrays are made there (tests/test_gpu.py places them explicitly instead)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--device") != "cuda":
        return
    if importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch finds no CUDA device")
        torch.set_default_device("cuda")
    if importlib.util.find_spec("jax") is not None:
        try:
            gpu = jax.devices("gpu")[0]
        except RuntimeError as err:
            raise pytest.UsageError(f"--device cuda: JAX finds no GPU ({err})") from None
        jax.config.update("jax_default_device", gpu)


def _skip_reason(name: str, config: pytest.Config) -> str | None:
    chosen = config.getoption("--backend")
    if chosen and name not in chosen:
        return f"--backend {' '.join(chosen)} excludes {name}"
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed (pip install -r backends/{name}.txt)"
    if name == "cupy":
        import cupy

        if not cupy.cuda.is_available():
            return "cupy needs a CUDA device"
    return None


@pytest.fixture(params=ALL)
def backend(request: pytest.FixtureRequest) -> backends.Backend:
    """Every installed backend in turn."""
    reason = _skip_reason(request.param, request.config)
    if reason:
        pytest.skip(reason)
    return backends.get(request.param)


@pytest.fixture(params=[n for n in ALL if n != "array_api_strict"])
def ad_backend(request: pytest.FixtureRequest) -> backends.Backend:
    """Every installed backend with automatic differentiation."""
    reason = _skip_reason(request.param, request.config)
    if reason:
        pytest.skip(reason)
    found = backends.get(request.param)
    if not found.has_autodiff:
        pytest.skip(f"{request.param}: {found.note}")
    return found


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(20261125)
