"""mxrewrite: rewrite RMSNorm -> Linear into fused MXFP8/NVFP4 casts with MXNorm.

    import mxrewrite
    opt = mxrewrite.optimize(model, example_inputs)        # or config=RewriteConfig(...), format="nvfp4", ...
    print(mxrewrite.get_report(opt))
    print(mxrewrite.verify(model, opt, example_inputs))
    compiled = torch.compile(opt, fullgraph=True)
"""

from mxrewrite import errors, formats, modules, ops
from mxrewrite.api import get_report, optimize
from mxrewrite.config import RewriteConfig
from mxrewrite.modules.fp8_weight import precompute_fp8_scales
from mxrewrite.report import Report, Site
from mxrewrite.verify import Thresholds, VerifyResult, verify

__all__ = [
    "Report",
    "RewriteConfig",
    "Site",
    "Thresholds",
    "VerifyResult",
    "errors",
    "formats",
    "modules",
    "get_report",
    "ops",
    "optimize",
    "precompute_fp8_scales",
    "verify",
]
__version__ = "0.1.0"
