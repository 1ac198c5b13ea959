"""Spawning the ranks of a CPU (gloo) test and waiting for them, shared by the distributed tests."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port nobody listens on now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_ranks(context, deadline: float) -> str | None:
    """Wait for the ranks of ``torch.multiprocessing.start_processes(..., join=False)`` until ``deadline``
    (``time.monotonic()``); the reason they failed, or None. Ranks still alive then are terminated."""
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                return "the ranks did not finish in time"
    except Exception as exc:  # a rank raised (ProcessRaisedException) or died
        return f"{type(exc).__name__}: {exc}"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return None
