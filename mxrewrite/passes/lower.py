"""Stage 5, lower: say which implementation the rewritten modules' ops will run on the target device, and warn
when that is an emulation slower than the model it replaces (an MX format on a GPU before Blackwell).

The custom ops are ``torch.library.triton_op`` s: on CUDA they launch Triton
kernels that ``torch.compile`` (Inductor) sees and schedules with the rest of the
graph; on CPU they run their PyTorch reference. Nothing is rewritten here: the
choice is made per call from the tensors' device, so a model moved to another
device after ``optimize`` runs the right kernels there.
"""

from __future__ import annotations

import logging
import warnings

import torch

from mxrewrite.formats import get_format
from mxrewrite.ops import kernels
from mxrewrite.ops.matmul import default_backend

log = logging.getLogger(__name__)

__all__ = ["lower", "warn_if_emulated"]


def lower(device: torch.device | None, fmt: str = "mxfp8") -> None:
    """Log the norm-cast and MX matmul implementations used on ``device``; warn if ``fmt`` runs emulated there."""
    warn_if_emulated(fmt, device)
    device = device or torch.device("cpu")
    norm_impl = "Triton kernel" if device.type == "cuda" and kernels.available() else "PyTorch reference"
    log.info("norm_cast / rms_norm_backward on %s: %s; MX matmul backend: %s", device, norm_impl,
             default_backend(device))


def warn_if_emulated(fmt: str, device: torch.device | None) -> None:
    """Warn when an MX format will run emulated: a CUDA GPU older than Blackwell has no MX tensor cores."""
    if device is None or device.type != "cuda" or not get_format(fmt).block_scaled:
        return
    if torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 10:
        return
    name = torch.cuda.get_device_name(device)
    warnings.warn(
        f"mxrewrite: format={fmt!r} runs emulated on {name} (no MX tensor cores before Blackwell, sm_100): each MX "
        "GEMM dequantises to bf16 first, so the model gets slower, not faster (H200, Llama-3-8B layer fwd+bwd: "
        "MXFP8 0.91x bf16). Use format='fp8' (FP8 tensor cores with per-tensor scales, 1.39x bf16 on the same "
        "layer with linears='all'), or keep the MX format to study its numerics.", stacklevel=5)
