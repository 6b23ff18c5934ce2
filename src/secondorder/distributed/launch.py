"""Local ranks for checks, tests and benchmarks: ``spawn(fn, ranks, *args)`` runs
``fn(rank, ranks, address, *args)`` on ``ranks`` new processes (``torch.multiprocessing``,
start method spawn) and waits for all of them; ``address`` is a free ``tcp://127.0.0.1:PORT``
for ``torch.distributed.init_process_group(init_method=address, ...)``. Each process gets one
intra-op thread, so that ranks on the same cores do not oversubscribe them.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any


def free_address() -> str:
    """``tcp://127.0.0.1:PORT`` with a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def spawn(fn: Callable[..., None], ranks: int, *args: Any, timeout: float = 600.0) -> None:
    """Run ``fn(rank, ranks, address, *args)`` on ``ranks`` spawned processes (``fn`` must be
    importable: defined at a module's top level). Raises the first rank's failure, or
    RuntimeError when they run past ``timeout`` seconds (the processes are then terminated)."""
    import torch.multiprocessing as mp

    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        context = mp.start_processes(_run_and_leave, args=(fn, ranks, free_address(), *args),
                                     nprocs=ranks, join=False, start_method="spawn")
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.terminate()
            raise RuntimeError(f"the {ranks} ranks did not finish within {timeout:g} s")


def _run_and_leave(rank: int, fn: Callable[..., None], *args: Any) -> None:
    """``fn(rank, *args)``, then leave the process at once with status 0 (its output flushed)
    when ``fn`` returned. The gloo backend's C++ teardown at interpreter exit sometimes aborts
    ("terminate called without an active exception", SIGABRT) after every rank has finished
    its work and destroyed its process group: 2 runs in 13 of a two-rank test here. A failure
    of ``fn`` propagates as usual (torch.multiprocessing reports it to the parent)."""
    fn(rank, *args)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
