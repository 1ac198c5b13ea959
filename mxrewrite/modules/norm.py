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
from mxrewrite.modules.cast_tensor import CastSettings, carried_settings, norm_cast_tensor

__all__ = ["MXRMSNorm"]


class MXRMSNorm(nn.Module):
    """Replaces ``norm`` (any module computing an RMSNorm, however written), sharing its parameters.

    Args:
        norm: the module replaced; its parameters, buffers and children are kept under their names.
        gain: the name of ``norm``'s parameter that is the gain (None for a norm without one).
        settings: how to normalise and cast (format, norm, eps, rescale constant, ...).
    """

    def __init__(self, norm: nn.Module, gain: str | None, settings: CastSettings):
        super().__init__()
        adopt_state(self, norm)
        self.gain_name = gain
        self.settings = settings
        self.carried_settings = carried_settings(settings)
        self.source_class = type(norm).__name__
        # unit_scaling's RMSNorm scales its gain's gradient by sqrt(D / numel(x)): keep that backward scale
        self.unit_scaled_gain = gain is not None and type(norm).__module__.startswith("unit_scaling")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x).__name__ == "DTensor":
            raise MXRewriteError(f"{self.source_class} was rewritten by mxrewrite and receives a DTensor (sequence "
                                 "parallel?); parallelize only the linears it feeds (ColwiseParallel)")
        block = get_format(self.settings.fmt).block_size
        if x.shape[-1] % block:
            raise BlockShapeError.for_shape(x.shape, block, self.settings.fmt)
        gain = getattr(self, self.gain_name) if self.gain_name else None
        if type(gain).__name__ == "DTensor":
            gain = gain.full_tensor()
        if self.unit_scaled_gain:
            from unit_scaling.scale import scale_bwd

            gain = scale_bwd(gain, (x.shape[-1] / x.numel()) ** 0.5)
        return norm_cast_tensor(x, gain, self.settings, self.carried_settings)

    def extra_repr(self) -> str:
        s = self.settings
        text = f"{self.source_class} -> {s.fmt} {s.norm}"
        if s.norm == "mxnorm":
            text += f" p={s.p} rescale={s.correction:.4f}"
        return text + f", eps={s.eps}"
