"""The modules ``optimize`` puts in a model: a rewritten norm and the linears it feeds.

* :class:`MXRMSNorm` replaces an RMSNorm module and returns a :class:`NormCastTensor`;
* :class:`MXLinear` replaces an ``nn.Linear`` fed by such a norm;
* :mod:`~mxrewrite.modules.fp8_weight`: its weight parameter under ``fsdp_fp8_all_gather``, which FSDP2
  gathers as an FP8 cast.

Both share the replaced modules' parameters (see :func:`adopt_state`).
"""

from mxrewrite.modules.adopt import adopt_state
from mxrewrite.modules.cast_tensor import CastSettings, NormCastTensor, NormConstants, norm_cast_tensor
from mxrewrite.modules.linear import MXLinear, UnitScaledMXLinear, replacement_for
from mxrewrite.modules.norm import MXRMSNorm

__all__ = ["CastSettings", "MXLinear", "MXRMSNorm", "NormCastTensor", "NormConstants", "UnitScaledMXLinear",
           "adopt_state", "norm_cast_tensor", "replacement_for"]
