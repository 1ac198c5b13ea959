"""What the matching steps hand each other and return, and how a candidate is turned down.

The structural step builds a :class:`_Candidate`; the numerical step confirms it
into a :class:`NormMatch`. Either step ends a candidate by raising
:class:`_Reject` (reported as a :class:`RejectedCandidate`, with the reason) or
:class:`_Skip` (not norm-like at all, not reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

__all__ = ["NormMatch", "RejectedCandidate"]


@dataclass(frozen=True)
class NormMatch:
    """One confirmed RMSNorm computation.

    ``nodes`` are the tensor-valued nodes computing the norm from ``input`` to
    ``output`` (inclusive of ``output``), plus the ``aten._assert_tensor_metadata``
    checks hanging off them; it excludes ``input``, get_attr nodes and nodes
    computed only from parameters/constants (such as ``1 + weight``). Intermediate
    nodes may have users outside the norm (e.g. an ``rsqrt`` reused elsewhere):
    replace the uses of ``output``, then erase the nodes left without users.
    ``input`` is the value before any cast the norm applies; a same-dtype no-op
    cast between it and the norm that other code also reads is skipped, not
    included. ``eps`` from a buffer is that buffer's value (float32-rounded).

    ``module`` is the qualified name of the module whose forward computes exactly
    this norm, judged per call of the module: every tensor op of that call (in its
    forward and in the calls it makes; asserts, parameter-only ops and skipped
    no-op casts of ``input`` aside) is in ``nodes``, and every node of ``nodes``
    is computed in that call. A norm module called at two places gives two
    matches with the same ``module``. Where several nested calls qualify, the one
    covering the most of the norm wins (a wrapper that applies the gain to its
    gainless child norm), the innermost on a tie (a module whose forward only
    calls its child norm: the child). A cast or gain that the caller applies to
    the norm module's output is not in ``nodes``: it follows ``output``. None
    when the norm is written inline in a bigger module's forward (which also
    computes other things) or when the norm is the root module itself.
    """

    name: str                  # ``module`` when there is one, else output.name
    input: fx.Node             # x, the activation being normalised (before any cast the norm applies)
    output: fx.Node            # node whose value is the norm's final output (after gain and final cast)
    nodes: tuple[fx.Node, ...]
    eps: float
    eps_in_root: bool          # sqrt(mean + eps) (True) vs sqrt(mean) + eps (False)
    gamma: fx.Node | None      # the gain tensor: a get_attr of the parameter, or a node computed only from parameters
    gamma_offset: float        # 1.0 for Gemma-style (1 + weight), else 0.0
    hidden_size: int
    spelling: str              # short description of the form found, e.g. "aten.rms_norm", "pow-mean-rsqrt-mul"
    module: str | None = None  # the module whose forward is exactly this norm (see above), or None


@dataclass(frozen=True)
class RejectedCandidate:
    """Something that looked like a norm but is not an RMSNorm over the last dim (or could not be confirmed)."""

    name: str
    node: fx.Node
    reason: str


class _Reject(Exception):
    """A structural candidate that is not an RMSNorm; the message is the reason for the report."""


class _Skip(Exception):
    """Not a candidate at all (e.g. a mean of squares used for something else)."""


@dataclass
class _Candidate:
    """A structural match, before its output is extended and it is checked numerically."""

    core: fx.Node              # the node computing x * rho (before gain/casts outside it)
    x: fx.Node                 # the value normalised, where its statistic and the core op's operand meet
    eps: float
    eps_in_root: bool
    gamma: fx.Node | None = None   # a gain met before the core op's output (rms_norm's weight, (w * x) * rho)
    gamma_offset: float = 0.0
    spelling: str = ""
    clamped: bool = False      # the statistic goes through max(., c): never an RMSNorm, but say why precisely
