"""Launching our Triton kernels so that torch.compile sees them, and under Triton's interpreter.

Kernels launched through :func:`torch.library.wrap_triton` inside a
``torch.library.triton_op`` are traced by torch.compile into Inductor's graph
(no graph break, no opaque custom op). The interpreter's kernels
(``TRITON_INTERPRET=1`` when they were defined, used by the CPU tests) cannot be
wrapped; they run eagerly on CPU tensors.
"""

from __future__ import annotations

import torch
import triton


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was defined under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through ``wrap_triton`` unless interpreted."""
    if is_interpreted(kernel):
        kernel[grid](*args, **kwargs)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
