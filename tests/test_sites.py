"""Sites the module rewrite must get right: MLA's norms between linears, a norm module called twice,
a norm of a norm, and a model with one block that cannot be captured."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mxrewrite.api import get_report, optimize
from mxrewrite.modules import MXLinear, MXRMSNorm
from tests import zoo
from tests.helpers import MXCallCounter

D = 64


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def deepseek_mla():
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        vocab_size=zoo.VOCAB, hidden_size=D, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, max_position_embeddings=zoo.MAX_POSITIONS, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(config).eval()


def test_multi_head_latent_attention_chains_norms_between_linears():
    """q_a_proj -> q_a_layernorm -> q_b_proj: a rewritten linear feeds another rewritten norm."""
    model, ids = deepseek_mla(), zoo.example_tokens()
    opt = optimize(model, (ids,), progress=False)
    sites = {s.norm: s.consumers for s in get_report(opt).rewritten}
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        assert sites[f"model.layers.{i}.input_layernorm"] == (f"{attn}.q_a_proj", f"{attn}.kv_a_proj_with_mqa")
        assert sites[f"{attn}.q_a_layernorm"] == (f"{attn}.q_b_proj",)
        assert sites[f"{attn}.kv_a_layernorm"] == (f"{attn}.kv_b_proj",)
        assert sites[f"model.layers.{i}.post_attention_layernorm"] == (f"model.layers.{i}.mlp.gate_proj",
                                                                       f"model.layers.{i}.mlp.up_proj")
    counter = MXCallCounter(opt)
    with torch.no_grad():  # (with a KV cache, kv_b_proj reads the cached latent: the exact norm, in high precision)
        assert rel_err(opt(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < 0.2
    assert set(counter.linears) == {c for consumers in sites.values() for c in consumers}


class TwiceNorm(nn.Module):
    """One norm module applied before the block's linear and again before the head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(zoo.VOCAB, D)
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.up = nn.Linear(D, D)
        self.head = nn.Linear(D, zoo.VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.up(self.norm(h))
        return self.head(self.norm(h))


def test_norm_module_called_twice_is_named_by_its_module():
    torch.manual_seed(0)
    model, ids = TwiceNorm(), zoo.example_tokens()
    opt = optimize(model, (ids,), progress=False)
    report = get_report(opt)
    assert [s.norm for s in report.sites] == ["norm"]
    (site,) = report.rewritten
    assert site.consumers == ("up",) and any("head" in k for k in site.kept_consumers)
    counter = MXCallCounter(opt)
    with torch.no_grad():
        out = opt(ids)
    # the head reads the exact norm: the norm runs twice, the head stays nn.Linear
    assert counter.norms == {"norm": 2} and counter.linears == {"up": 1} and type(opt.head) is nn.Linear
    assert rel_err(out, model(ids)) < 0.1


class NormOfNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.outer, self.inner = nn.RMSNorm(D, eps=1e-6), nn.RMSNorm(D, eps=1e-6)
        self.proj = nn.Linear(D, D)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        return self.out(x + self.proj(self.inner(self.outer(x))))


def test_norm_of_a_norm_output_is_found():
    torch.manual_seed(0)
    model, x = NormOfNorm(), torch.randn(2, 8, D)
    opt = optimize(model, (x,), progress=False)
    report = get_report(opt)
    assert {s.norm for s in report.sites} == {"outer", "inner"}
    assert {s.norm: s.consumers for s in report.rewritten} == {"inner": ("proj",)}
    assert isinstance(opt.inner, MXRMSNorm) and type(opt.outer) is nn.RMSNorm
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 0.1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(F.silu(self.up(self.norm(x))))


class BranchingBlock(Block):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def forward(self, x):
        if x.mean() > 0:
            return x + self.down(F.silu(self.up(self.norm(x))))
        return x - self.down(F.silu(self.up(self.norm(x))))


class PartlyCapturable(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(zoo.VOCAB, D)
        self.layers = nn.ModuleList([Block(), BranchingBlock(), Block()])
        self.final_norm, self.head = nn.RMSNorm(D), nn.Linear(D, zoo.VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.final_norm(h))


def test_an_uncapturable_block_is_skipped_and_the_others_are_rewritten():
    torch.manual_seed(0)
    model, ids = PartlyCapturable(), zoo.example_tokens()
    opt = optimize(model, (ids,), progress=False)
    report = get_report(opt)
    assert {s.norm: s.consumers for s in report.rewritten} == {"layers.0.norm": ("layers.0.up",),
                                                                "layers.2.norm": ("layers.2.up",)}
    failed = {s.norm: s.reason for s in report.skipped}
    assert "layers.1" in failed and "could not be captured" in failed["layers.1"]
    assert isinstance(opt.layers[0].up, MXLinear) and type(opt.layers[1].up) is nn.Linear
    with torch.no_grad():
        assert rel_err(opt(ids), model(ids)) < 0.1


def test_torchao_float8_linears_stay_torchaos_and_the_norm_fed_ones_become_mx():
    """torchao converts the o/down projections first (a module filter); mxrewrite rewrites the norm-fed ones."""
    float8 = pytest.importorskip("torchao.float8")
    z = zoo.build("torchtitan_llama")
    float8.convert_to_float8_training(z.model, module_filter_fn=lambda mod, fqn: fqn.endswith(("wo", "w2")))
    opt = optimize(z.model, z.args, progress=False)
    assert {s.norm: s.consumers for s in get_report(opt).rewritten} == {
        f"layers.{i}.{norm}": tuple(f"layers.{i}.{c}" for c in consumers) for i in range(zoo.LAYERS)
        for norm, consumers in (("attention_norm", ("attention.wq", "attention.wk", "attention.wv")),
                                ("ffn_norm", ("feed_forward.w1", "feed_forward.w3")))}
    torchao_calls = []
    for name, module in opt.named_modules():
        if name.endswith(("wo", "w2")):
            assert type(module).__name__ == "Float8Linear"
            module.register_forward_pre_hook(lambda *_, name=name: torchao_calls.append(name))
    counter = MXCallCounter(opt)
    out = opt(*z.args)
    assert len(torchao_calls) == 2 * zoo.LAYERS and len(counter.linears) == 5 * zoo.LAYERS
    out.float().pow(2).mean().backward()
    assert opt.layers["0"].attention.wo.weight.grad is not None and opt.layers["0"].attention.wq.weight.grad is not None
    with torch.no_grad():
        assert rel_err(opt(*z.args), z.model(*z.args)) < 0.1


def test_unit_scaling_keeps_forward_multipliers_and_backward_scales():
    """unit_scaling's linears scale the output by 1/sqrt(fan_in) and the input and weight gradients by their own
    constants (custom autograd.Functions): the rewritten ones keep both, so every parameter's gradient equals
    the original's up to the cast error (losing a backward scale would be off by sqrt(tokens) or more)."""
    pytest.importorskip("unit_scaling")
    z = zoo.build("unit_scaling")
    opt = optimize(z.model, z.args, norm="rmsnorm", grad_cast="hp", progress=False)
    assert type(opt.layers[0].mhsa.linear_qkv).__name__ == "UnitScaledMXLinear"
    params = list(z.model.parameters())

    def grads(module):
        return torch.autograd.grad(module(*z.args).float().pow(2).mean(), params)

    for (name, _), ours, theirs in zip(z.model.named_parameters(), grads(opt), grads(z.model)):
        assert rel_err(ours, theirs) < 0.15, name
