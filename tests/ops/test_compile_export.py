"""The custom ops under torch.compile(fullgraph=True) and torch.export on CPU: a small module
(one norm_cast feeding two mx_linears, as a rewritten q/k site) gives the eager results,
forward and backward."""

from __future__ import annotations

import pytest
import torch

import mxrewrite.ops  # noqa: F401  (registers torch.ops.mxrewrite)
from mxrewrite.formats import get_format
from mxrewrite.ops import gaussian_correction, norm_constant

ops = torch.ops.mxrewrite
HIDDEN = 64


class NormCastLinears(torch.nn.Module):
    """MXNorm + cast of x, shared by two MX linears (one with a bias, one with alpha and MX gradients)."""

    def __init__(self, fmt: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fmt = fmt
        self.register_buffer("eps", norm_constant(1e-6))
        self.register_buffer("correction", norm_constant(gaussian_correction(2, get_format(fmt).block_size)))
        self.gamma = torch.nn.Parameter(0.1 * torch.randn(HIDDEN, generator=g))  # Gemma form: gain 1 + gamma
        self.w_q = torch.nn.Parameter(torch.randn(32, HIDDEN, generator=g) / 8)
        self.b_q = torch.nn.Parameter(torch.randn(32, generator=g))
        self.w_k = torch.nn.Parameter(torch.randn(48, HIDDEN, generator=g) / 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        data, scales, rho, tscale = ops.norm_cast(x, None, self.eps, self.correction, self.fmt, "mxnorm", 2, "rceil",
                                                  True)
        gain = 1.0 + self.gamma
        q = ops.mx_linear(x, rho, data, scales, tscale, self.w_q, gain, self.b_q, self.fmt, "rceil", False, 1.0,
                          torch.float32, "hp")
        k = ops.mx_linear(x, rho, data, scales, tscale, self.w_k, gain, None, self.fmt, "rceil", False, 0.125,
                          torch.float32, "mx")
        return q, k


def forward_backward(fn, module, x):
    """Outputs and the gradients of x and every parameter for a fixed output gradient."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    q, k = fn(x)
    g = torch.Generator().manual_seed(1)
    loss = (q * torch.randn(q.shape, generator=g)).sum() + (k * torch.randn(k.shape, generator=g)).sum()
    loss.backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return (q.detach(), k.detach()), grads


def inputs(tokens: int = 24) -> torch.Tensor:
    return torch.randn(2, tokens // 2, HIDDEN, generator=torch.Generator().manual_seed(tokens))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_compile_fullgraph_aot_eager_equals_eager(fmt):
    torch._dynamo.reset()
    module = NormCastLinears(fmt)
    x = inputs()
    eager_out, eager_grads = forward_backward(module, module, x)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out, grads = forward_backward(compiled, module, x)
    for a, b in zip(out + tuple(grads), eager_out + tuple(eager_grads)):
        assert torch.equal(a, b)
    # a second token count reuses or recompiles the graph without a graph break
    out, _ = forward_backward(compiled, module, inputs(40))
    ref, _ = forward_backward(module, module, inputs(40))
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


class NormCastLinear(NormCastLinears):
    """One MX linear (high-precision gradients): the smallest graph worth compiling with Inductor."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        data, scales, rho, tscale = ops.norm_cast(x, None, self.eps, self.correction, self.fmt, "mxnorm", 2, "rceil",
                                                  True)
        q = ops.mx_linear(x, rho, data, scales, tscale, self.w_q, 1.0 + self.gamma, self.b_q, self.fmt, "rceil", False,
                          1.0, torch.float32, "hp")
        return q, q[..., :1]


def test_compile_fullgraph_inductor():
    """Inductor on CPU (slow to compile: one small case). Results match eager to float32 rounding
    (Inductor may reorder the float32 reductions around the ops)."""
    torch._dynamo.reset()
    module = NormCastLinear("mxfp8")
    x = inputs(8)
    eager_out, eager_grads = forward_backward(module, module, x)
    compiled = torch.compile(module, backend="inductor", fullgraph=True)
    out, grads = forward_backward(compiled, module, x)
    for a, b in zip(out + tuple(grads), eager_out + tuple(eager_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_export_with_dynamic_tokens(fmt):
    module = NormCastLinears(fmt)
    x = inputs()
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    program = torch.export.export(module, (x,), dynamic_shapes={"x": {1: tokens}})
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert ops.norm_cast.default in targets and ops.mx_linear.default in targets

    exported = program.module()
    for tokens_now in (24, 40):
        x = inputs(tokens_now)
        ref_out, ref_grads = forward_backward(module, module, x)
        out, grads = forward_backward(exported, exported, x)
        for a, b in zip(out + tuple(grads), ref_out + tuple(ref_grads)):
            assert torch.equal(a, b)


def test_compiled_backward_keeps_the_mx_gemms_opaque():
    """AOTAutograd traces mx_linear, forward and backward: its MX GEMMs must appear as the opaque
    ``block_scaled_mm`` op, never as traced kernel launches (Triton kernels cannot take fake tensors),
    while the casts around them are plain torch ops for Inductor to fuse."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    eps, correction = norm_constant(1e-6), norm_constant(0.4185)

    def f(x, w):
        data, scales, rho, tscale = torch.ops.mxrewrite.norm_cast(x, None, eps, correction, "mxfp8", "mxnorm", 2,
                                                                  "rceil", True)
        return torch.ops.mxrewrite.mx_linear(x, rho, data, scales, tscale, w, None, None, "mxfp8", "rceil", False,
                                             1.0, torch.float32, "mx")

    torch.compile(f, backend=backend, fullgraph=True)(x, w).sum().backward()
    fw, bw = ([n.target for n in g.graph.nodes if n.op == "call_function"] for g in graphs)
    gemm = torch.ops.mxrewrite.block_scaled_mm.default
    assert fw.count(gemm) == 1 and torch.ops.mxrewrite.mx_linear.default not in fw
    assert torch.ops.aten.amax.default in fw  # the weight cast, traced
    assert bw.count(gemm) == 2  # grad_input and grad_weight
    assert x.grad is not None and w.grad is not None
