"""``verify``: how far the optimized model's numerics are from the original's.

Outputs: relative L2 error, cosine similarity, max absolute error and SQNR
(``10 log10(|ref|^2 / |ref - out|^2)``) for every floating-point output.

Per rewritten norm (recorded from the casts its MXRMSNorm module returns while the model runs, never
re-derived): the estimator ratio ``r / RMS(x)`` over all rows of the example
inputs, and the relative error of the cast activation against the exact
normalised activation. Both also for ``norm="rmsnorm"`` with the same format
(the exact norm fused with the same cast), so MXNorm's own share of the error
is visible next to the cast's. Optionally the parameter gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch.utils._pytree import tree_leaves

from mxrewrite.api import Inputs, optimize, split_inputs
from mxrewrite.errors import MXRewriteError
from mxrewrite.formats import get_format
from mxrewrite.modules import MXRMSNorm, NormCastTensor
from mxrewrite.ops.matmul import BlockScaledMatrix, dequantize_matrix
from mxrewrite.ops.reference import norm_cast_reference
from mxrewrite.recording import run_watching



@dataclass(frozen=True)
class Thresholds:
    """Pass criteria for every compared output (and gradient, when compared)."""

    max_rel_l2: float
    min_cosine: float
    min_sqnr_db: float | None = None

    @classmethod
    def for_format(cls, fmt: str) -> "Thresholds":
        """Defaults: about twice the error of the exact RMSNorm cast on small models."""
        return cls(0.15, 0.99) if fmt == "mxfp8" else cls(0.3, 0.95)


@dataclass(frozen=True)
class TensorMetrics:
    name: str
    rel_l2: float
    cosine: float
    max_abs: float
    sqnr_db: float

    def passes(self, t: Thresholds) -> bool:
        ok = self.rel_l2 <= t.max_rel_l2 and self.cosine >= t.min_cosine
        return ok and (t.min_sqnr_db is None or self.sqnr_db >= t.min_sqnr_db)


@dataclass(frozen=True)
class SiteMetrics:
    norm: str
    ratio_mean: float
    ratio_std: float
    ratio_min: float
    ratio_max: float
    act_rel_l2: float
    baseline_act_rel_l2: float  # norm="rmsnorm", same format


@dataclass(frozen=True)
class VerifyResult:
    thresholds: Thresholds
    outputs: tuple[TensorMetrics, ...]
    sites: tuple[SiteMetrics, ...]
    baseline_outputs: tuple[TensorMetrics, ...] = ()
    grads: tuple[TensorMetrics, ...] = ()

    @property
    def ok(self) -> bool:
        return all(m.passes(self.thresholds) for m in (*self.outputs, *self.grads))

    def __str__(self) -> str:
        t = self.thresholds
        lines = [f"mxrewrite verify: {'OK' if self.ok else 'FAILED'} "
                 f"(rel L2 <= {t.max_rel_l2}, cosine >= {t.min_cosine}"
                 + (f", SQNR >= {t.min_sqnr_db} dB" if t.min_sqnr_db is not None else "") + ")"]
        headers = ["", "rel L2", "cosine", "max abs", "SQNR dB", "pass"]

        def rows(metrics, label=""):
            return [[label + m.name, f"{m.rel_l2:.4f}", f"{m.cosine:.5f}", f"{m.max_abs:.3g}", f"{m.sqnr_db:.1f}",
                     "yes" if m.passes(t) else "NO"] for m in metrics]

        out_rows = rows(self.outputs) + rows(self.baseline_outputs, "rmsnorm baseline: ")
        lines += ["", "Outputs", tabulate(out_rows, headers, tablefmt="simple")]
        if self.sites:
            site_rows = [[s.norm, f"{s.ratio_mean:.4f}", f"{s.ratio_std:.4f}", f"{s.ratio_min:.3f}..{s.ratio_max:.3f}",
                          f"{s.act_rel_l2:.4f}", f"{s.baseline_act_rel_l2:.4f}"] for s in self.sites]
            lines += ["", "Sites (r / RMS over all rows; cast activation error vs exact normalised activation)",
                      tabulate(site_rows, ["norm", "r/RMS mean", "std", "range", "act rel L2",
                                           "rmsnorm act rel L2"], tablefmt="simple")]
        if self.grads:
            worst = sorted(self.grads, key=lambda m: m.cosine)[:10]
            lines += ["", f"Gradients ({len(self.grads)} parameters, worst 10 by cosine)",
                      tabulate(rows(worst), headers, tablefmt="simple")]
        return "\n".join(lines)


def tensor_metrics(name: str, ref: torch.Tensor, out: torch.Tensor) -> TensorMetrics:
    ref, out = ref.detach().double().flatten(), out.detach().double().flatten()
    err = (out - ref).norm().item()
    ref_norm = ref.norm().item()
    if err == 0:
        cosine = 1.0  # identical (including both all-zero)
    else:
        cosine = torch.nn.functional.cosine_similarity(ref, out, dim=0, eps=1e-300).item()
    rel = err / ref_norm if ref_norm else (0.0 if err == 0 else math.inf)
    sqnr = 10 * math.log10(ref_norm**2 / err**2) if err else math.inf
    max_abs = (out - ref).abs().max().item() if ref.numel() else 0.0
    return TensorMetrics(name, rel, cosine, max_abs, sqnr)


def _float_leaves(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _output_metrics(ref, out) -> tuple[TensorMetrics, ...]:
    refs, outs = _float_leaves(ref), _float_leaves(out)
    if len(refs) != len(outs):
        raise MXRewriteError(f"the optimized model returned {len(outs)} tensors, the original {len(refs)}")
    names = ["output"] if len(refs) == 1 else [f"output[{i}]" for i in range(len(refs))]
    return tuple(tensor_metrics(n, r, o) for n, r, o in zip(names, refs, outs))


def _dequantize(fmt: str, data: torch.Tensor, scales: torch.Tensor, tscale: torch.Tensor) -> torch.Tensor:
    spec = get_format(fmt)
    if not spec.block_scaled:  # one scale for the whole tensor
        return data.reshape(-1, data.shape[-1]).view(spec.elem_dtype).double() * tscale.double()
    m = BlockScaledMatrix(data.reshape(-1, data.shape[-1]), scales.reshape(-1, scales.shape[-1]), tscale, spec,
                          spec.elem_dtype)
    return dequantize_matrix(m, torch.float64)


def _recorded_casts(optimized: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, list[NormCastTensor]]:
    """The NormCastTensor every rewritten norm returned while ``optimized`` ran the inputs, by norm name."""
    records: dict[str, list[NormCastTensor]] = {}
    norms = [(n, m) for n, m in optimized.named_modules() if isinstance(m, MXRMSNorm)]
    run_watching(optimized, [(args, kwargs)], norms, lambda name, a, kw, out: records.setdefault(name, []).append(out))
    return records


def _site_metrics(optimized: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[SiteMetrics, ...]:
    metrics = []
    for name, casts in _recorded_casts(optimized, args, kwargs).items():
        ratios, exacts, casts_hp, bases = [], [], [], []
        for h in casts:
            s = h.settings
            gain = h.gain if s.gain_in_cast else None
            rows = h.x.detach().double().reshape(-1, h.x.shape[-1])
            rms = rows.pow(2).mean(-1).sqrt()
            ratio = (1.0 / h.rho.double().reshape(-1)) / rms
            ratios.append(ratio[torch.isfinite(ratio)])
            eps = h.eps.item()
            exact_r = (rms.pow(2) + eps).sqrt() if s.eps_in_root else rms + eps
            exact = rows / exact_r.unsqueeze(-1)
            if gain is not None:
                exact = exact * gain.double()
            exacts.append(exact)
            casts_hp.append(_dequantize(s.fmt, h.elems, h.scales, h.tensor_scale))
            base = norm_cast_reference(h.x, gain, fmt=s.fmt, norm="rmsnorm", p=s.p, scale_mode=s.scale_mode,
                                       eps=eps, correction=1.0, eps_in_root=s.eps_in_root)
            bases.append(_dequantize(s.fmt, base[0], base[1], base[3]))
        ratio, exact = torch.cat(ratios), torch.cat(exacts)
        metrics.append(SiteMetrics(name, ratio.mean().item(), ratio.std().item() if ratio.numel() > 1 else 0.0,
                                   ratio.min().item(), ratio.max().item(),
                                   tensor_metrics("act", exact, torch.cat(casts_hp)).rel_l2,
                                   tensor_metrics("act", exact, torch.cat(bases)).rel_l2))
    return tuple(metrics)


def _grad_metrics(model, opt, args, kwargs) -> tuple[TensorMetrics, ...]:
    """The gradients of each model's parameters, matched by name (the optimized model shares the tensors, except
    the weights ``fsdp_fp8_all_gather`` wraps in new parameters)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def grads(module):
        params = dict(module.named_parameters())
        loss = sum(t.float().pow(2).mean() for t in _float_leaves(module(*args, **kwargs)))
        return torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)

    ref, out = grads(model), grads(opt)
    return tuple(tensor_metrics(n, r, o) for n, r, o in zip(names, ref, out) if r is not None and o is not None)


def verify(model: torch.nn.Module, optimized: torch.nn.Module, example_inputs: Inputs, *,
           thresholds: Thresholds | None = None, grads: bool = False, baseline: bool = True) -> VerifyResult:
    """Compare ``optimized`` (from :func:`mxrewrite.optimize`) with ``model`` on ``example_inputs``.

    ``baseline`` also runs the model rewritten with ``norm="rmsnorm"`` (same
    format) when ``optimized`` uses MXNorm; ``grads`` compares the gradients of
    ``mean(output**2)`` with respect to every parameter.
    """
    if getattr(optimized, "mx_report", None) is None:
        raise MXRewriteError("verify expects the model returned by mxrewrite.optimize as its second argument "
                             "(called once, or optimized with example_inputs)")
    args, kwargs = split_inputs(example_inputs)
    with torch.no_grad():
        ref = model(*args, **kwargs)
        out = optimized(*args, **kwargs)
    config = optimized.mx_config
    thresholds = thresholds or Thresholds.for_format(config.format)
    baseline_outputs: tuple[TensorMetrics, ...] = ()
    if baseline and config.norm == "mxnorm":
        exact = optimize(model, example_inputs, config=config.replace(norm="rmsnorm"), progress=False)
        with torch.no_grad():
            baseline_outputs = _output_metrics(ref, exact(*args, **kwargs))
    return VerifyResult(
        thresholds=thresholds,
        outputs=_output_metrics(ref, out),
        sites=_site_metrics(optimized, args, kwargs),
        baseline_outputs=baseline_outputs,
        grads=_grad_metrics(model, optimized, args, kwargs) if grads else (),
    )
