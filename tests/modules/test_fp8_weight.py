"""``fsdp_fp8_all_gather``: the weight parameters FSDP2 gathers as FP8 casts, on one process (the 2-rank FSDP2
run is tests/distributed/test_fsdp_tp.py's ``fsdp_torchtitan_llama_fp8_all_gather``).

* Outside FSDP2 an ``Fp8AllGatherWeight`` is its tensor: arithmetic, dtype moves, checkpoints, the optimizer.
* What FSDP2's hooks make of a weight (``fsdp_pre_all_gather`` on one rank, ``fsdp_post_all_gather``) is the
  linear's own cast: a model whose linears get the gathered ``Fp8Weight`` computes the same bits, forward and
  backward, as one whose linears cast their weights themselves.
"""

from __future__ import annotations

import copy
import io
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import mxrewrite
from mxrewrite.formats.fp8 import fp8_quantize
from mxrewrite.modules import MXLinear
from mxrewrite.modules.fp8_weight import Fp8AllGatherWeight, Fp8Weight
from tests import zoo

ONE_RANK = SimpleNamespace(ndim=0)  # a mesh with no dims to all-reduce over: fsdp_pre_all_gather on one rank


def optimized(**overrides) -> tuple[zoo.ZooModel, nn.Module]:
    z = zoo.build("torchtitan_llama", seed=0)
    with torch.no_grad():
        for name, p in z.model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.linspace(0.5, 1.5, p.numel()))
    opt = mxrewrite.optimize(z.model, z.args, format="fp8", linears="all", fsdp_fp8_all_gather=True,
                             progress=False, **overrides)
    return z, opt.train()


def converted(model: nn.Module) -> dict[str, MXLinear]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, MXLinear)}
    assert len(found) == 7 * zoo.LAYERS
    return found


def loss_and_grads(model: nn.Module, tokens: torch.Tensor, runner: nn.Module | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LM loss of ``model`` (called through ``runner``, a compiled wrapper, when given) and its gradients."""
    logits = (runner if runner is not None else model)(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads))


def test_the_converted_weights_gather_in_fp8_and_the_gains_move_into_the_casts():
    z, opt = optimized()
    for name, linear in converted(opt).items():
        assert isinstance(linear.weight, Fp8AllGatherWeight) and isinstance(linear.weight, nn.Parameter), name
        # a new parameter over the user's storage
        assert linear.weight._tensor.data_ptr() == z.model.get_submodule(name).weight.data_ptr()
    norms = [m for m in opt.modules() if isinstance(m, mxrewrite.modules.MXRMSNorm)]
    assert norms and all(m.settings.gain_in_cast for m in norms)
    assert "fsdp_fp8_all_gather" in str(mxrewrite.get_report(opt))


def test_outside_fsdp2_the_weight_is_its_tensor():
    inner = torch.randn(8, 4)
    w = nn.Parameter(Fp8AllGatherWeight(inner.clone()))
    assert type(w * 2) is torch.Tensor and torch.equal(w * 2, inner * 2)
    moved = w.to(torch.bfloat16)
    assert isinstance(moved, Fp8AllGatherWeight) and torch.equal(moved._tensor, inner.to(torch.bfloat16))
    # a checkpoint round trip (weights_only: the class is an allowed global), and loading into it
    buffer = io.BytesIO()
    torch.save({"w": w.detach()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["w"]
    assert isinstance(loaded, Fp8AllGatherWeight) and torch.equal(loaded._tensor, inner)
    with torch.no_grad():
        w.copy_(torch.ones(8, 4))
    assert torch.equal(w._tensor, torch.ones(8, 4))
    # the optimizer updates the storage
    w.grad = torch.ones(8, 4)
    torch.optim.AdamW([w], lr=0.5).step()
    assert (w._tensor < 1).all()


def test_pre_all_gather_casts_as_the_linear_would():
    weight = torch.randn(16, 64, dtype=torch.bfloat16) * 3
    (data,), (scale,) = Fp8AllGatherWeight(weight).fsdp_pre_all_gather(ONE_RANK)
    expected_data, expected_scale = fp8_quantize(weight)
    assert data.dtype == torch.float8_e4m3fn
    assert torch.equal(data.view(torch.uint8), expected_data.view(torch.uint8)) and torch.equal(scale, expected_scale)


def _gathered_as_fsdp2_would(model: nn.Module) -> None:
    """Give each converted linear the parameter FSDP2's hooks would: its weight cast on this one rank and
    wrapped after the (trivial) gather."""
    for linear in converted(model).values():
        weight = linear.weight
        inputs, metadata = weight.fsdp_pre_all_gather(ONE_RANK)
        unsharded, _ = weight.fsdp_post_all_gather(inputs, metadata, weight.dtype)
        linear._parameters["weight"] = nn.Parameter(unsharded)


@pytest.mark.parametrize("grad_cast", ["mx", "e4m3"])
def test_linears_given_the_gathered_cast_compute_the_same_bits(grad_cast):
    z, opt = optimized(grad_cast=grad_cast)
    tokens = z.args[0]
    loss, grads = loss_and_grads(opt, tokens)
    _gathered_as_fsdp2_would(opt)
    assert all(isinstance(m.weight, Fp8Weight) for m in converted(opt).values())
    gathered_loss, gathered_grads = loss_and_grads(opt, tokens)
    assert torch.equal(gathered_loss, loss)
    assert gathered_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert type(gathered_grads[name]) is torch.Tensor
        assert torch.equal(gathered_grads[name], grad), name


def test_the_gathered_cast_refuses_other_uses():
    weight = Fp8AllGatherWeight(torch.randn(4, 32))
    gathered, _ = weight.fsdp_post_all_gather(*weight.fsdp_pre_all_gather(ONE_RANK), torch.float32)
    with pytest.raises(NotImplementedError, match="fsdp_fp8_all_gather"):
        gathered + 1


def test_a_tied_weight_keeps_its_parameter():
    class TiedPair(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(64)
            self.a = nn.Linear(64, 64, bias=False)
            self.b = nn.Linear(64, 64, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            h = self.norm(x)
            return self.a(h) + self.b(h)

    model = TiedPair()
    opt = mxrewrite.optimize(model, (torch.randn(2, 8, 64),), format="fp8", fsdp_fp8_all_gather=True,
                             progress=False)
    assert isinstance(opt.a, MXLinear) and isinstance(opt.b, MXLinear)
    assert opt.a.weight is opt.b.weight is model.a.weight


def test_compiled_equals_eager():
    z, opt = optimized()
    tokens = z.args[0]
    loss, grads = loss_and_grads(opt, tokens)
    compiled = torch.compile(opt, fullgraph=True)
    compiled_loss, compiled_grads = loss_and_grads(opt, tokens, compiled)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_verify_compares_the_gradients_of_the_new_weight_parameters():
    z, opt = optimized()
    result = mxrewrite.verify(z.model, opt.eval(), z.args, grads=True, baseline=False)
    assert {g.name for g in result.grads} == {n for n, _ in z.model.named_parameters()}
    assert all(g.cosine > 0.9 for g in result.grads)


def test_a_precomputed_scale_is_used_only_while_the_weight_is_unchanged():
    """(``precompute_fp8_scales`` itself, on 2 FSDP2 ranks: tests/distributed/test_fsdp_tp.py.)"""
    weight = Fp8AllGatherWeight(torch.randn(16, 64))
    weight._precomputed = (weakref.ref(weight), weight._version, torch.tensor(0.25), torch.tensor(4.0))
    (data,), (scale,) = weight.fsdp_pre_all_gather(ONE_RANK)
    assert scale.item() == 4.0 and torch.equal(data.float(), (weight._tensor / 4).to(torch.float8_e4m3fn).float())
    with torch.no_grad():
        weight.mul_(1.5)  # an optimizer step, a checkpoint load...
    (_,), (scale,) = weight.fsdp_pre_all_gather(ONE_RANK)
    assert torch.equal(scale, fp8_quantize(weight._tensor)[1]) and scale.item() != 4.0


def test_precompute_covers_a_weight_this_rank_holds_no_rows_of():
    """``precompute_fp8_scales`` on a one-rank gloo group: each weight's scale is its whole tensor's, and an
    empty shard (a weight of fewer rows than ranks) gets the scale of an all-zero tensor, not an error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shards = [torch.randn(8, 32) * 3, torch.empty(0, 32)]
        params = nn.ParameterList(nn.Parameter(DTensor.from_local(Fp8AllGatherWeight(s), mesh, [Shard(0)]))
                                  for s in shards)
        assert mxrewrite.precompute_fp8_scales(params) == 2
        for param, amax in zip(params, [shards[0].abs().amax(), torch.tensor(0.0)]):
            *_, scale, dequant = param._local_tensor._precomputed
            assert torch.equal(dequant, fp8_quantize(torch.zeros(1), amax=amax)[1])
            assert torch.equal(scale * dequant, torch.tensor(1.0))
        # a weight on a 2-D mesh counts once a gather has told it which part of the mesh FSDP2 gathers over
        mesh_2d = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
        params.append(nn.Parameter(DTensor.from_local(Fp8AllGatherWeight(shards[0] * 2), mesh_2d,
                                                      [Shard(0), Shard(0)])))
        assert mxrewrite.precompute_fp8_scales(params) == 2 and params[2]._local_tensor._precomputed is None
        params[2]._local_tensor.fsdp_pre_all_gather(mesh_2d["shard"])
        assert mxrewrite.precompute_fp8_scales(params) == 3
        *_, dequant = params[2]._local_tensor._precomputed
        assert torch.equal(dequant, fp8_quantize(shards[0] * 2)[1])
        # a copy (a deep copy of the model, a pickle) drops the precomputed scale: it would check its original's
        # version, not its own
        assert copy.deepcopy(params[0])._local_tensor._precomputed is None
    finally:
        dist.destroy_process_group()
