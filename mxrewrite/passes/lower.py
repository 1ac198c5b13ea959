"""Stage 5, lower: say which implementation the rewritten modules' ops will run on the target device.

The custom ops are ``torch.library.triton_op`` s: on CUDA they launch Triton
kernels that ``torch.compile`` (Inductor) sees and schedules with the rest of the
graph; on CPU they run their PyTorch reference. Nothing is rewritten here: the
choice is made per call from the tensors' device, so a model moved to another
device after ``optimize`` runs the right kernels there.
"""

from __future__ import annotations

import logging

import torch

from mxrewrite.ops import kernels
from mxrewrite.ops.matmul import default_backend

log = logging.getLogger(__name__)

__all__ = ["lower"]


def lower(device: torch.device | None) -> None:
    """Log the norm-cast and MX matmul implementations used on ``device``."""
    device = device or torch.device("cpu")
    norm_impl = "Triton kernel" if device.type == "cuda" and kernels.available() else "PyTorch reference"
    log.info("norm_cast / rms_norm_backward on %s: %s; MX matmul backend: %s", device, norm_impl,
             default_backend(device))
