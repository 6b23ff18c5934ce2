"""Nox sessions for secondorder.

``nox`` (no arguments) runs ``lint`` and ``tests``. Each backend also has its own session
(``nox -s numpy``, ``nox -s torch``, ...) that installs only that backend and runs the test
suite restricted to it with ``pytest --backend <name>``.

Requirement files live in ``backends/``; the backend sessions are generated from the files
found there, so adding a backend means adding ``backends/<name>.txt``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.reuse_venv = "yes"  # a second run does not reinstall torch
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).resolve().parent
BACKENDS_DIR = ROOT / "backends"

# Files in backends/ that are not a single backend.
NOT_BACKENDS = {"all", "dev", "data", "gpu"}
# Backends that need a CUDA GPU, with the extra requirement files they also need.
GPU_BACKENDS = {"cupy": ["torch"]}


def requirements(name: str) -> str:
    """Path (relative to the repository root) of ``backends/<name>.txt``."""
    path = BACKENDS_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(path)
    return str(path.relative_to(ROOT))


def backend_names() -> list[str]:
    """Backend names, read from the requirement files in backends/."""
    names = (p.stem for p in BACKENDS_DIR.glob("*.txt"))
    return sorted(n for n in names if n not in NOT_BACKENDS)


def dev_pin(package: str) -> str:
    """The requirement line for ``package`` in backends/dev.txt (e.g. ``ruff==0.17.6``)."""
    for line in (BACKENDS_DIR / "dev.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        name = line.split("==")[0].split(">=")[0].split("<")[0].strip().lower()
        if name == package:
            return line
    raise LookupError(f"{package} is not listed in backends/dev.txt")


def install_with(session: nox.Session, *names: str) -> None:
    """Install the given backends/ files, the dev tools and the package itself (editable)."""
    args: list[str] = []
    for name in (*names, "dev"):
        args += ["-r", requirements(name)]
    session.install(*args)
    session.install("-e", ".")


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint (formatting is not enforced)."""
    session.install(dev_pin("ruff"))
    session.run("ruff", "check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Full test suite with every CPU backend installed (backends/all.txt), spread over every
    core by pytest-xdist (``nox -s tests -- -n 0`` runs it in one process)."""
    install_with(session, "all")
    session.run("pytest", "-n", "auto", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """On an NVIDIA GPU: tests/test_gpu.py (every method with its arrays placed on the GPU by
    hand, torch, JAX and CuPy, against NumPy on the CPU; the torch.optim and optax entry points;
    checkpoints), then the suite on CuPy and the JAX suite with the GPU as JAX's default device.
    (``pytest --device cuda`` also makes it torch's default device; the torch-specific modules
    still build host data there, so torch's GPU coverage is tests/test_gpu.py's.)"""
    if shutil.which("nvidia-smi") is None:
        session.skip("the gpu session needs an NVIDIA GPU")
    install_with(session, "gpu")
    gpu_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # several pytest workers share it
    session.run("pytest", "tests/test_gpu.py", *session.posargs, env=gpu_env)
    session.run("pytest", "-n", "auto", "--backend", "cupy", *session.posargs, env=gpu_env)
    session.run("pytest", "-n", "auto", "--device", "cuda", "--backend", "jax",
                *session.posargs, env=gpu_env)


@nox.session
def slow(session: nox.Session) -> None:
    """Only the tests marked ``slow`` (each takes more than about 30 s on two cores: the dense
    Newton fixtures, the JAX dense oracles, the multi-process and paper checks). ``tests`` runs
    them too, first, so that they do not finish last."""
    install_with(session, "all")
    session.run("pytest", "-n", "auto", "-m", "slow", *session.posargs)


def _make_backend_session(backend: str) -> None:
    extra = GPU_BACKENDS.get(backend)

    def run_backend(session: nox.Session) -> None:
        if extra is not None and shutil.which("nvidia-smi") is None:
            session.skip(f"the {backend} backend needs an NVIDIA GPU")
        install_with(session, backend, *(extra or []))
        session.run("pytest", "--backend", backend, *session.posargs)

    gpu_note = " (needs a GPU)" if extra is not None else ""
    run_backend.__doc__ = f"Tests restricted to the {backend} backend{gpu_note}."
    nox.session(name=backend)(run_backend)


for _backend in backend_names():
    _make_backend_session(_backend)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks on every CPU backend (writes JSON under benchmarks/results/)."""
    install_with(session, "all")
    session.run("python", "benchmarks/curvature_products.py", "--json",
                "benchmarks/results/curvature_products.json", *session.posargs)
    session.run("python", "benchmarks/overhead.py", "--json", "benchmarks/results/overhead.json")
    session.run("python", "benchmarks/step_time.py", "--json",
                "benchmarks/results/step_time.json", *session.posargs)
    session.run("python", "benchmarks/prox_linear.py", "--json",
                "benchmarks/results/prox_linear.json")
    session.run("python", "benchmarks/prox_linear_digits.py", "--json",
                "benchmarks/results/prox_linear_digits.json")
    session.run("python", "benchmarks/grouped_newton.py", "--json",
                "benchmarks/results/grouped_newton.json")
    session.run("python", "benchmarks/kronecker.py", "--json",
                "benchmarks/results/kronecker.json")
    session.run("python", "benchmarks/kbfgs_smw.py", "--json",
                "benchmarks/results/kbfgs_smw.json")


@nox.session
def distributed(session: nox.Session) -> None:
    """Data-parallel equivalence in full: every registered method on 2 and 4 torch.distributed
    ranks (gloo, local processes) and on 1, 2 and 4 JAX host devices against one process, to
    1e-12 in float64 after 10 steps, with and without a NaN on one shard; then the
    communication benchmark (``benchmarks/distributed.py``, which exits 1 when a step's
    collectives differ from its communication model). The default ``tests`` session runs the
    2-rank part (``secondorder check --ranks 2``, the torch.optim integration) and the JAX
    sharding of four methods on 4 devices."""
    install_with(session, "all")
    full = {"SECONDORDER_FULL_DISTRIBUTED": "1"}
    session.run("pytest", "-p", "no:cacheprovider", "tests/test_distributed.py",
                "tests/test_jax_sharding.py", *session.posargs, env=full)
    session.run("pytest", "-p", "no:cacheprovider", "tests/test_cli.py", "-k", "ranks",
                *session.posargs, env=full)
    session.run("python", "benchmarks/distributed.py", "--json",
                "benchmarks/results/distributed.json")


@nox.session(name="bench-peers")
def bench_peers(session: nox.Session) -> None:
    """Peer comparison on torch against curvlinops, in its own environment; run after
    ``bench``: it adds ``curvlinops_ms`` and ``ours_over_curvlinops`` (ours / curvlinops, both
    timed in this run) under "torch" in the same JSON file, and times the dense GGN of the digits
    CNN against curvlinops' (``benchmarks/results/spectral_peers.json``).

    curvlinops-for-pytorch pulls torchvision and with it its own torch build, so it never enters
    the default install or test environments.
    """
    session.install("curvlinops-for-pytorch", "-r", requirements("data"))
    session.install("-e", ".")
    session.run("python", "benchmarks/curvature_products.py", "--backends", "torch", "--peers",
                "--json", "benchmarks/results/curvature_products.json", *session.posargs)
    session.run("python", "benchmarks/spectral.py", "--backends", "torch", "--peers", "--json",
                "benchmarks/results/spectral_peers.json")


# The peer libraries that the peer sessions check our curvature against; pinned, because the
# tests align with the conventions of these releases.
CURVLINOPS = "curvlinops-for-pytorch==3.0.1"
# torchvision (through curvlinops' BackPACK dependency) would otherwise pull the newest torch, a
# multi-GB CUDA build; 0.28.0 is the release built for torch 2.13, the pin in backends/torch.txt.
TORCHVISION_FOR_PINNED_TORCH = "torchvision==0.28.0"
# kfac-jax's latest release, 0.0.8, fails in its graph matcher on jax 0.9 and 0.10.
KFAC_JAX = ["jax==0.7.2", "jaxlib==0.7.2", "kfac-jax==0.0.8"]


@nox.session(name="peers-torch")
def peers_torch(session: nox.Session) -> None:
    """Our curvature against curvlinops 3.0.1 (torch, float64): tests_peers/test_curvlinops.py.

    The same nn.Module, weights and batch go to both libraries, ours through ``from_torch``.
    The GGN, the Hessian, the exact (type-2) and empirical Fisher agree as dense matrices and as
    products with a vector; K-FAC agrees factor by factor and as the damped inverse applied to
    the gradient (exact damping, the pi-split, equal factor dampings), on an MLP and a CNN with
    two Conv2d layers, under cross-entropy and squared error. Conventions that the test aligns
    (its module docstring has the details): weight and bias as one K-FAC block; the convolution
    factors (here A sums over output positions and G averages, curvlinops does the opposite:
    the products, the exactly damped and the pi-split inverses agree as they are, equal factor
    dampings need the factors rescaled by the number of positions T); the empirical Fisher of
    ``nn.MSELoss()``, which curvlinops normalises per squared error instead of per sample (k
    times ours for k outputs).

    curvlinops never enters the default install or test path (backends/all.txt, ``tests``); the
    peer tests live outside ``testpaths`` so the default ``pytest`` never collects them.
    """
    session.install("-r", requirements("numpy"), "-r", requirements("torch"),
                    TORCHVISION_FOR_PINNED_TORCH, CURVLINOPS, dev_pin("pytest"))
    session.install("-e", ".")
    session.run("pytest", "tests_peers/test_curvlinops.py", *session.posargs)


@nox.session(name="peers-kfac-jax")
def peers_kfac_jax(session: nox.Session) -> None:
    """Our K-FAC against kfac-jax 0.0.8 on jax 0.7.2 (float64): tests_peers/test_kfac_jax.py.

    kfac-jax's block-diagonal curvature estimator, with the MLP's dense layers registered by
    hand and the exact (type-2) Fisher so that no sampling differs, gets the same weights and
    batch as our K-FAC: the Kronecker factors and the damped block-diagonal direction applied to
    the gradient (kfac-jax's pi-adjusted factored damping against our pi-split, its exact
    damping against ours) agree, under cross-entropy and squared error, for the exact (type-2)
    and the empirical Fisher. Conventions that the test aligns: kfac-jax's transposed kernel
    layout; its squared-error weight (0.5 is our MSE); its empirical Fisher, whose G is ours
    divided by the batch size (it scales the per-sample gradients by 1/sqrt(m) before the
    statistics). Its pi-split is ours, so nothing there needs aligning.

    This is the only place jax 0.7.2 is installed: the default environments pin the jax of
    backends/jax.txt, which kfac-jax 0.0.8 does not run on.
    """
    session.install("-r", requirements("numpy"), *KFAC_JAX, dev_pin("pytest"))
    session.install("-e", ".")
    session.run("pytest", "tests_peers/test_kfac_jax.py", *session.posargs)


# ASDL's last release (2024); it requires only torch>=1.13 and numpy, so the pinned CPU torch of
# backends/torch.txt satisfies it and nothing else is pulled.
ASDL = "asdfghjkl==0.1a5"


@nox.session(name="peers-asdl")
def peers_asdl(session: nox.Session) -> None:
    """Our K-BFGS and SMW-NG against ASDL 0.1a5 (torch, float64): tests_peers/test_asdl.py.

    The same nn.Module (an MLP with and without biases), weights and batches go to both
    libraries, ours through ``from_torch``. SMW-NG: ASDL's direction (F + lambda I)^{-1} g
    (empirical Fisher of the batch) is our step with lambda_LM + tau = lambda, N2 = m; with
    ASDL's summed loss it is ours with lambda / m. K-BFGS: H_A, H_G and ASDL's preconditioned
    gradient agree once ASDL's schedule (H_A updated before the step, H_G at the start of the
    next one), its summed loss for y_G, its bias convention (bias outside H_A) and its H_G(0) =
    I (ours I / lambda_G) are aligned, and after two ASDL defects are corrected in the test:
    its BFGS update never reaches the stored matrices, and its Powell damping has the wrong
    sign. Further tests show exactly how ASDL as released differs: its factors stay at their
    first values, its second pass reads the new batch's labels and adds its gradient, and
    ``minibatch_hessian_action=True`` uses the batch sum of a a^T where ours uses the mean.
    The test module's docstring has the details.
    """
    session.install("-r", requirements("numpy"), "-r", requirements("torch"), ASDL,
                    dev_pin("pytest"))
    session.install("-e", ".")
    session.run("pytest", "tests_peers/test_asdl.py", *session.posargs)
