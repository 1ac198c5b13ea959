"""mxrewrite: rewrite RMSNorm -> Linear into fused MXFP8/NVFP4 casts with MXNorm."""

from mxrewrite import errors, formats

__all__ = ["errors", "formats"]
__version__ = "0.1.0"
