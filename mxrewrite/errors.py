"""Exceptions raised by mxrewrite.

Every message names the problem and what to do about it. Each class also
derives from the built-in exception a caller would expect (``ValueError`` for
bad shapes, ``TypeError`` for bad dtypes), so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "MXRewriteError",
    "BlockShapeError",
    "UnsupportedDtypeError",
    "LayoutError",
    "ConfigError",
    "CaptureError",
]


class MXRewriteError(Exception):
    """Base class of every error mxrewrite raises on purpose."""


class BlockShapeError(MXRewriteError, ValueError):
    """A dimension is not divisible by the block size of the number format."""

    @classmethod
    def for_shape(cls, shape, block_size: int, fmt: str, what: str = "input") -> "BlockShapeError":
        last = shape[-1] if len(shape) else None
        return cls(
            f"the last dimension of the {what} (shape {tuple(shape)}, last dim {last}) is not "
            f"divisible by the {fmt} block size {block_size}; pad that dimension to a multiple "
            f"of {block_size} (or leave this tensor in high precision)"
        )


class UnsupportedDtypeError(MXRewriteError, TypeError):
    """A tensor has a dtype the operation does not accept."""

    @classmethod
    def for_dtype(cls, dtype, supported, what: str = "input") -> "UnsupportedDtypeError":
        names = ", ".join(str(d) for d in supported)
        return cls(
            f"unsupported dtype {dtype} for the {what}; supported: {names}. "
            f"Cast it first, e.g. tensor.to(torch.bfloat16)"
        )


class LayoutError(MXRewriteError, ValueError):
    """A tensor's memory layout cannot be interpreted (e.g. a transposed packed tensor)."""


class ConfigError(MXRewriteError, ValueError):
    """A configuration value is out of range or unknown."""


class CaptureError(MXRewriteError, RuntimeError):
    """The model could not be captured into a graph."""
