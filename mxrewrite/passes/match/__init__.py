"""Stage 2: find the RMSNorm computations of a captured aten graph, however they are written.

RMSNorm over the last dim of ``x`` (``D`` elements per row) is

    y = x * rho * (gamma + offset),   rho = 1 / sqrt(mean(x**2) + eps)      (eps in the root)
                                      rho = 1 / (sqrt(mean(x**2)) + eps)    (eps outside)

with ``offset`` 1 for Gemma's ``(1 + weight)`` and 0 otherwise, casts anywhere.

Matching is two steps. The *structural* step is loose: it starts from every
``aten.rms_norm`` / ``aten._fused_rms_norm`` and from every reduction that can
measure a row's size (mean or sum of ``x*x`` / ``x**2`` / ``x.square()``,
``linalg_vector_norm``), follows the per-row statistic through scalar
arithmetic, roots, casts and reshapes to the op that multiplies or divides the
same ``x`` by it (the gain may come first, ``(w * x) * rsqrt(...)``, or multiply
the statistic, ``x * (rsqrt(...) * w)``), and extends that result through casts
and one gain multiply. It reads ``eps`` (a literal or a 0-d buffer) and whether
it sits inside the root from the positions of the ops, tracking the statistic
as a constant times a power of ``mean(x**2)``, so eps is read right however
``1/D`` and ``1/sqrt(D)`` are folded in.

The *numerical* step confirms every structural candidate: the candidate's
subgraph is run on random rows whose mean square spans several decades,
including rows where ``mean(x**2) ~ eps`` (where eps inside and outside the root
differ by ~40%), with a random gain, and compared with the formula above. A
false positive silently changes a model, so anything that does not agree within
the tolerance of its dtype is rejected, with the reason; a constant factor
(``mean * D / (D - 1)``) is held to a tighter bound than per-row rounding.

A match is named by the module whose forward computes exactly the norm
(``NormMatch.module``), call by call: torch.export tells a module's calls apart,
so a norm module applied at two places gives two matches with its name, and a
module that only calls its child norm names the child. A match never reaches
into another module call's computation (the upcast at the start of the next
norm module) nor into an earlier match, so ``n2(n1(x))`` gives two matches.

Never matched (rejected with a reason when they look like a norm):
mean-subtracting norms (LayerNorm, ``x - mean`` before the root mean square),
L2 normalisation (``F.normalize``: unit L2 norm, no ``1/sqrt(D)``), reductions
over a dim other than the last, clamped statistics, gains that depend on
another activation. Higher-order-op subgraphs (``torch.cond``, ``no_grad``
regions) are not searched.

The package, one step a module: ``structure`` finds the candidates and drives
the stage, ``confirm`` runs the numerical check, ``candidates`` holds what the
two steps hand each other and return, ``evaluate`` runs part of the graph on
chosen values, and ``fx_utils`` has the op tables and node helpers they share.
"""

from mxrewrite.passes.match.candidates import NormMatch, RejectedCandidate
from mxrewrite.passes.match.structure import find_rms_norms

__all__ = ["NormMatch", "RejectedCandidate", "find_rms_norms"]
