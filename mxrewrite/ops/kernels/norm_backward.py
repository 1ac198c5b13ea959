"""Straight-through norm gradient in one Triton kernel: ``dx = rho*g - (1/D) * rho**3 * x * <g, x>``.

Each program owns ``ROWS`` whole rows (padded to a power of two and masked):
it reads ``grad`` and ``x`` once, forms ``g = grad * gain`` in registers when a
gain is given (so the caller never writes ``g`` to memory), reduces ``<g, x>`` in float32 and writes ``dx``
in ``x.dtype``, with the association of
:func:`mxrewrite.ops.reference.rms_norm_backward_reference`
(``rho * g - ((rho**3) * x) * (<g, x> / D)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxrewrite.ops.kernels.codecs import to_float32
from mxrewrite.ops.kernels.launch import is_interpreted, launch


@triton.jit
def _rms_norm_backward_kernel(grad_ptr, x_ptr, rho_ptr, gain_ptr, dx_ptr, n_rows,
                              HIDDEN: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                              HAS_GAIN: tl.constexpr, INTERPRET: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    if BLOCK_D == HIDDEN:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (cols < HIDDEN)[None, :]
    offs = rows.to(tl.int64)[:, None] * HIDDEN + cols[None, :]
    g = to_float32(tl.load(grad_ptr + offs, mask=mask, other=0.0), INTERPRET)
    if HAS_GAIN:
        gain = to_float32(tl.load(gain_ptr + cols, mask=cols < HIDDEN, other=0.0), INTERPRET)
        g = g * gain[None, :]
    x = to_float32(tl.load(x_ptr + offs, mask=mask, other=0.0), INTERPRET)
    rho = tl.load(rho_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    dot = tl.sum(g * x, axis=1)[:, None]
    dx = rho * g - ((rho * rho * rho) * x) * tl.div_rn(dot, HIDDEN * 1.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def rms_norm_backward_triton(grad: torch.Tensor, x: torch.Tensor, rho: torch.Tensor,
                             gain: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel behind ``mxrewrite::rms_norm_backward``: ``dx`` in ``x.dtype`` and ``x``'s shape."""
    hidden = x.shape[-1]
    x2d = x.reshape(-1, hidden).contiguous()
    g2d = grad.reshape(-1, hidden).contiguous()
    rho1d = rho.reshape(-1).contiguous()
    n_rows = x2d.shape[0]
    dx = torch.empty_like(x2d)
    if n_rows > 0 and hidden > 0:
        block_d = triton.next_power_of_2(hidden)
        rows = max(1, min(8, 4096 // block_d, triton.next_power_of_2(n_rows)))
        num_warps = 4 if rows * block_d <= 2048 else 8 if rows * block_d <= 8192 else 16
        launch(_rms_norm_backward_kernel, (triton.cdiv(n_rows, rows),), g2d, x2d, rho1d,
               gain.contiguous() if gain is not None else rho1d, dx, n_rows,
               HIDDEN=hidden, BLOCK_D=block_d, ROWS=rows, HAS_GAIN=gain is not None,
               INTERPRET=is_interpreted(_rms_norm_backward_kernel), num_warps=num_warps)
    return dx.view(x.shape)
