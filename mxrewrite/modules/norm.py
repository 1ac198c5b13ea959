"""``MXRMSNorm``: the replacement of an RMSNorm module whose output feeds linears.

``forward(x)`` runs the fused norm + cast once (``mxrewrite::norm_cast``: MXNorm's
estimate from the block maxima, or the exact RMSNorm) and returns a
:class:`~mxrewrite.modules.cast_tensor.NormCastTensor`: the MX linears it feeds
multiply the cast, anything else reads the exact RMSNorm output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mxrewrite.errors import BlockShapeError, MXRewriteError
from mxrewrite.formats import get_format
from mxrewrite.modules.adopt import adopt_state
from mxrewrite.modules.cast_tensor import GAIN_OFFSET, CastSettings, NormConstants, norm_cast_tensor

__all__ = ["MXRMSNorm"]

CONSTANTS_BUFFER = "mxrewrite_constants"


class MXRMSNorm(nn.Module):
    """Replaces ``norm`` (any module computing an RMSNorm, however written), sharing its parameters.

    Args:
        norm: the module replaced; its parameters, buffers and children are kept under their names.
        gain: the name of ``norm``'s parameter that is the gain (None for a norm without one).
        settings: how to normalise and cast (format, norm, gradient cast, ...).
        constants: the site's floats (eps, rescale constant, gain offset).
        device: where the constants' buffer lives (default: with ``norm``'s first parameter or buffer).

    The constants are a non-persistent float64 buffer (``mxrewrite_constants``), so torch.compile reads them
    as a graph input and one compiled layer serves every layer (their floats differ per site under
    ``rescale="calibrated"``). ``constants`` stays the source of truth: whatever moves or converts the
    module (``.to(dtype)``, ``.to_empty()`` after meta-device init) gets the exact values back.
    """

    def __init__(self, norm: nn.Module, gain: str | None, settings: CastSettings, constants: NormConstants,
                 device: torch.device | None = None):
        super().__init__()
        adopt_state(self, norm)
        self.gain_name = gain
        self.settings = settings
        self.constants = constants
        self.adds_gain_offset = constants.gain_offset != 0.0  # (a bool: forward reads no float of constants)
        self.source_class = type(norm).__name__
        # unit_scaling's RMSNorm scales its gain's gradient by sqrt(D / numel(x)): keep that backward scale
        self.unit_scaled_gain = gain is not None and type(norm).__module__.startswith("unit_scaling")
        if device is None:
            device = next((t.device for t in (*norm.parameters(), *norm.buffers())), None)
        self.register_buffer(CONSTANTS_BUFFER, constants.tensor(device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self._buffers[CONSTANTS_BUFFER].device
        self._buffers[CONSTANTS_BUFFER] = self.constants.tensor(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x).__name__ == "DTensor":
            raise MXRewriteError(f"{self.source_class} was rewritten by mxrewrite and receives a DTensor (sequence "
                                 "parallel?); parallelize only the linears it feeds (ColwiseParallel)")
        block = get_format(self.settings.fmt).block_size
        if x.shape[-1] % block:
            raise BlockShapeError.for_shape(x.shape, block, self.settings.fmt)
        constants = getattr(self, CONSTANTS_BUFFER)
        if constants.device != x.device:
            constants = constants.to(x.device)
        gain = getattr(self, self.gain_name) if self.gain_name else None
        if type(gain).__name__ == "DTensor":
            gain = gain.full_tensor()
        if self.unit_scaled_gain:
            from unit_scaling.scale import scale_bwd

            gain = scale_bwd(gain, (x.shape[-1] / x.numel()) ** 0.5)
        if gain is not None and self.adds_gain_offset:
            gain = gain.float() + constants[GAIN_OFFSET]
        return norm_cast_tensor(x, gain, constants, self.settings)

    def extra_repr(self) -> str:
        s, c = self.settings, self.constants
        text = f"{self.source_class} -> {s.fmt} {s.norm}"
        if s.norm == "mxnorm":
            text += f" p={s.p} rescale={c.correction:.4f}"
        return text + f", eps={c.eps}"
