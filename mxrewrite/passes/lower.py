"""Stage 5, lower: finish the rewritten graph for the backend that will run it.

The custom ops are registered as Triton ops, so ``torch.compile`` (Inductor)
sees their kernels on CUDA and their PyTorch reference on CPU; nothing here
rewrites them further. This stage checks the graph, fills in the fake-tensor metadata of the new nodes (so the module can be
inspected, re-exported or compiled with dynamic shapes) and logs which
implementation each op will use on the target device.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from mxrewrite.ops import kernels
from mxrewrite.ops.matmul import default_backend

log = logging.getLogger(__name__)


def _propagate_fake_values(gm: fx.GraphModule) -> None:
    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(placeholders)
    if mode is None:
        return
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*placeholders)
    except Exception as exc:  # metadata is informative only; the module runs without it
        log.debug("fake-tensor propagation skipped: %s", exc)


def lower(gm: fx.GraphModule, device: torch.device | None = None) -> fx.GraphModule:
    """Validate and finalise ``gm``; returns it."""
    gm.graph.lint()
    gm.recompile()
    _propagate_fake_values(gm)
    device = device or torch.device("cpu")
    norm_impl = "Triton kernel" if device.type == "cuda" and kernels.available() else "PyTorch reference"
    log.info("norm_cast / rms_norm_backward on %s: %s; MX matmul backend: %s", device, norm_impl,
             default_backend(device))
    return gm
