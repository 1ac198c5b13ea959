"""The numerical step: confirm a structural candidate by running it against the RMSNorm formula.

The candidate's subgraph is run on random rows whose mean square spans several
decades, including rows where ``mean(x**2) ~ eps`` (where eps inside and outside
the root differ by ~40%), with a random gain, and compared in float64 with

    y = x / sqrt(mean(x**2) + eps) * (gamma + offset)      (or sqrt(mean(x**2)) + eps)

A false positive silently changes a model, so anything that does not agree
within the tolerance of its dtype is rejected, with the reason. Two measures are
checked: each row's relative error, against the rounding error of the lowest
precision the candidate computes in, and the rows' common scale (the mean over
rows, on rows where eps is negligible, of the factor that best maps the
reference onto the output), against an 8 times tighter bound. Rounding errors
differ from row to row and average out; a constant factor (``mean * D / (D - 1)``,
``0.99 * mean``) is the same in every row, so a bfloat16 graph cannot hide one
below its per-row tolerance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from mxrewrite.passes.match.candidates import _Candidate, _Reject
from mxrewrite.passes.match.evaluate import _evaluate, _hint, _Unevaluable
from mxrewrite.passes.match.fx_utils import _is_tensor_node, _val

# the largest input the numerical check will build when it must use the traced example shape
_MAX_CHECK_ELEMENTS = 1 << 22


class _NumericCheck:
    """Run the candidate on rows of chosen mean square and compare with the RMSNorm formula."""

    GENERIC_SCALES = (1e-2, 1.0, 1e2, 1e4)

    def __init__(self, gm: fx.GraphModule, x: fx.Node, output: fx.Node, nodes: set[fx.Node], cand: _Candidate,
                 hidden: int):
        self.gm, self.x, self.output, self.nodes, self.cand, self.hidden = gm, x, output, nodes, cand, hidden
        self.in_dtype = _val(x).dtype
        dtypes = [self.in_dtype] + [_val(n).dtype for n in nodes if _is_tensor_node(n)]
        floats = [d for d in dtypes if d.is_floating_point] or [torch.float32]
        self.compute_dtype = max(floats, key=lambda d: torch.finfo(d).eps)
        self.rtol = max(1e-5, 4 * torch.finfo(self.compute_dtype).eps)

    def run(self) -> None:
        if not self.in_dtype.is_floating_point:
            raise _Reject(f"normalises a {self.in_dtype} tensor")
        generator = torch.Generator().manual_seed(0)
        for use_hints in (False, True):
            try:
                shape = self._shape(use_hints)
                self._check_all(shape, generator, use_hints)
                return
            except _Unevaluable as exc:
                if use_hints:
                    raise _Reject(f"depends on another activation ({exc})") from None
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                if use_hints:
                    raise _Reject(f"numerical check could not run the candidate: {str(exc).splitlines()[0]}") from None

    def _shape(self, use_hints: bool) -> list[int]:
        val = _val(self.x)
        if use_hints:
            shape = [int(_hint(s)) for s in val.shape]
            if math.prod(shape) > _MAX_CHECK_ELEMENTS:
                raise _Reject(f"numerical check needs the traced input shape {shape}, too large to check")
            return shape
        small = [32, 3, 5, 2, 3]   # at least 32 rows per scale, so the mean row scale averages rounding out
        return [small[i % len(small)] for i in range(val.dim() - 1)] + [self.hidden]

    def _scales(self) -> list[float]:
        eps, in_root = self.cand.eps, self.cand.eps_in_root
        scales = list(self.GENERIC_SCALES)
        if eps > 0:
            around = [eps / 4, eps, 4 * eps] if in_root else [(eps / 4) ** 2, eps ** 2, (4 * eps) ** 2]
            scales = around + scales
        else:
            scales = [1e-8] + scales
        if self.in_dtype == torch.float16:   # keep x and x*x representable
            scales = [s for s in scales if 1e-7 <= s <= 1e2]
        return scales

    def _check_all(self, shape: list[int], generator: torch.Generator, use_hints: bool) -> None:
        gamma_value = self._random_gamma(generator)
        worst = (0.0, None)
        largest = None
        row_scales = []
        for scale in self._scales():
            x = self._rows(shape, scale, generator)
            ref = self._reference(x, gamma_value)
            env: dict[fx.Node, Any] = {self.x: x.clone()}
            if self.cand.gamma is not None:
                env[self.cand.gamma] = gamma_value.clone()
            with torch.no_grad():
                y = _evaluate(self.gm, self.output, env, hints=use_hints)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                raise _Reject(f"output shape {getattr(y, 'shape', None)} differs from the input's {tuple(x.shape)}")
            err = self._row_error(y, ref)
            if err > worst[0] or not math.isfinite(err):
                worst = (err, scale)
            largest = (y, ref)
            if self._eps_negligible(scale):
                row_scales.append(self._row_scales(y, ref))
        if worst[0] <= self.rtol and math.isfinite(worst[0]):
            common = torch.cat(row_scales).mean().item() if row_scales else 1.0
            if abs(common - 1) <= self.rtol / 8:
                return
            raise _Reject(f"numerical check failed: the output is {common:.5g} times RMSNorm with eps={self.cand.eps:g}"
                          f"{'' if self.cand.eps_in_root else ' outside the root'} (a constant factor; "
                          f"tolerance {self.rtol / 8:.1g})")
        y, ref = largest
        ratio = (y.double() / ref).flatten()
        ratio = ratio[torch.isfinite(ratio)]
        if ratio.numel():
            c = ratio.abs().median().item()
            if math.isclose(c, 1 / math.sqrt(self.hidden), rel_tol=0.05) and self.hidden > 1:
                raise _Reject("L2 normalisation (unit L2 norm per row, as F.normalize), not RMS")
        raise _Reject(f"numerical check failed: relative error {worst[0]:.3g} at mean(x^2) = {worst[1]:.3g} "
                      f"(tolerance {self.rtol:.1g}) against RMSNorm with eps={self.cand.eps:g}"
                      f"{'' if self.cand.eps_in_root else ' outside the root'}")

    def _eps_negligible(self, scale: float) -> bool:
        """Whether eps moves rows of mean square ``scale`` by under 1%, so its rounding in a low-precision graph
        (a systematic error of every row) cannot pass for a constant factor."""
        if self.cand.eps_in_root:
            return scale >= 100 * self.cand.eps
        return math.sqrt(scale) >= 100 * self.cand.eps

    def _random_gamma(self, generator: torch.Generator) -> torch.Tensor | None:
        if self.cand.gamma is None:
            return None
        val = _val(self.cand.gamma)
        shape = [int(_hint(s)) for s in val.shape]
        magnitude = 0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)
        sign = torch.where(torch.rand(shape, generator=generator) < 0.2, -1.0, 1.0).double()
        return (magnitude * sign - self.cand.gamma_offset).to(val.dtype)

    def _rows(self, shape: list[int], scale: float, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        z = z / z.square().mean(-1, keepdim=True).sqrt()
        spread = torch.exp(torch.empty(shape[:-1] + [1], dtype=torch.float64).uniform_(
            math.log(0.5), math.log(2.0), generator=generator))
        return (z * (scale * spread).sqrt()).to(self.in_dtype)

    def _reference(self, x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        xd = x.double()
        ms = xd.square().mean(-1, keepdim=True)
        eps = self.cand.eps
        r = (ms + eps).sqrt() if self.cand.eps_in_root else ms.sqrt() + eps
        y = xd / r
        if gamma is not None:
            y = y * (gamma.double().reshape(-1) + self.cand.gamma_offset)
        return y

    @staticmethod
    def _row_scales(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per row, the factor c minimising |y - c * ref|."""
        y, ref = y.double().reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
        return (y * ref).sum(-1) / ref.square().sum(-1).clamp_min(1e-300)

    @staticmethod
    def _row_error(y: torch.Tensor, ref: torch.Tensor) -> float:
        diff = (y.double() - ref).flatten(0, -2) if ref.dim() > 1 else (y.double() - ref)[None]
        base = ref.flatten(0, -2) if ref.dim() > 1 else ref[None]
        num = diff.square().sum(-1).sqrt()
        den = base.square().sum(-1).sqrt().clamp_min(1e-300)
        err = (num / den).max().item()
        return err if math.isfinite(err) else math.inf
