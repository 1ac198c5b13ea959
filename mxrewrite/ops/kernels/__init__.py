"""Triton kernels for the GPU path of the custom ops (CPU uses the PyTorch reference).

Tests also run these kernels on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``) by calling them directly; the ops themselves only
dispatch CUDA tensors here. ``MXREWRITE_KERNELS=reference`` makes the ops run
the PyTorch reference on CUDA too (under torch.compile, Inductor then fuses
those ops itself: the unfused baseline of ``benchmarks/bench_layer.py``).
The switch acts when an op runs or is traced: a graph torch.compile has already
compiled (or finds in Inductor's on-disk cache, keyed by the captured graph)
keeps the kernels it was compiled with; set ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``
when comparing the two.
"""

from __future__ import annotations

import functools
import logging
import os

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_op(name: str, mutates_args: tuple[str, ...] = ()):
    """``torch.library.triton_op(name, mutates_args=...)``. Where Triton is not installed (a CPU install, whose
    ops run their PyTorch reference) torch logs "Triton not available" for each op it registers: nothing a
    user could act on, so that line is dropped while ours register."""
    def register(fn):
        torch_logger = logging.getLogger("torch._library.triton")
        quiet = lambda record: "Triton not available" not in record.getMessage()  # noqa: E731
        torch_logger.addFilter(quiet)
        try:
            return torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        finally:
            torch_logger.removeFilter(quiet)
    return register


def available() -> bool:
    """Triton is installed and a CUDA GPU is present."""
    return triton_importable() and torch.cuda.is_available()


def use_triton(x: torch.Tensor) -> bool:
    """Whether the ops run their Triton kernel for this input."""
    return x.is_cuda and available() and os.environ.get("MXREWRITE_KERNELS", "triton") != "reference"


def norm_cast_triton(x, gamma, **kwargs):
    from mxrewrite.ops.kernels.norm_cast import norm_cast_triton as impl

    return impl(x, gamma, **kwargs)


def rms_norm_backward_triton(grad, x, rho, gain=None):
    from mxrewrite.ops.kernels.norm_backward import rms_norm_backward_triton as impl

    return impl(grad, x, rho, gain)


def transpose_triton(t):
    from mxrewrite.ops.kernels.transpose import transpose_triton as impl

    return impl(t)


def fp8_cast_triton(t, scale):
    from mxrewrite.ops.kernels.fp8_cast import fp8_cast_triton as impl

    return impl(t, scale)
