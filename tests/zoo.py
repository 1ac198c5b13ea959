"""Tiny transformer models for the tests: random weights, CPU, no downloads, seeded.

Each builder returns a :class:`ZooModel`: the model, example inputs, and the
ground truth the pass tests check against. ``rms_norms`` is the exact set of
RMSNorm computations the matcher must find, by the qualified name of the norm
module. That set is "every RMSNorm", not "every norm the rewrite should touch":
Qwen3's ``q_norm``/``k_norm`` (over ``head_dim``), OLMo2's post-norms and q/k
norms and Gemma2's post-norms are RMSNorms too; it is the planner's job to keep
them exact because they do not feed linears. ``other_norms`` lists norm modules
that are not RMSNorm (Cohere's mean-subtracting LayerNorm) and must never match.

Sizes are tiny (hidden 64, 2 layers, vocab 128, 8 tokens) so that capturing
every model fits in a CPU test run. The transformers models come from their
config classes only (no hub access), with the cache left at its default
(``use_cache=True``): capture must cope with models as users pass them.

Use: ``from tests import zoo; z = zoo.build("llama", dtype=torch.bfloat16)``;
``zoo.BUILDERS`` names them all (``OPTIONAL_PACKAGES``: skip when not installed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
VOCAB = 128
INTERMEDIATE = 128
BATCH = 2
SEQ = 8
MAX_POSITIONS = 64


@dataclass(frozen=True)
class ZooModel:
    name: str
    model: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    rms_norms: frozenset[str]          # qualified names of every RMSNorm module
    eps: float                         # the models' RMSNorm eps
    gamma_offset: float = 0.0          # 1.0 where the gain is (1 + weight)
    final_norm: str | None = None      # the norm feeding the output head
    other_norms: frozenset[str] = field(default_factory=frozenset)  # non-RMS norms: never matched
    notes: str = ""


def per_layer(prefix: str, *names: str, layers: int = LAYERS) -> frozenset[str]:
    """``{prefix}.{i}.{name}`` for every layer ``i`` and name."""
    return frozenset(f"{prefix}.{i}.{name}" for i in range(layers) for name in names)


def example_tokens(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# transformers models, from their config classes

def _hf_common(**overrides: Any) -> dict[str, Any]:
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    common.update(overrides)
    return common


def _hf_model(config_name: str, model_name: str, dtype: torch.dtype, seed: int, **config: Any) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_name)(**_hf_common(**config))
    model = getattr(transformers, model_name)(cfg)
    return model.to(dtype).eval()


def _hf_zoo(name: str, model: nn.Module, rms_norms: frozenset[str], *, final_norm: str | None = "model.norm",
            **extra: Any) -> ZooModel:
    eps = getattr(model.config, "rms_norm_eps", None) or getattr(model.config, "layer_norm_eps")
    return ZooModel(name=name, model=model, args=(example_tokens(),), kwargs={}, rms_norms=rms_norms, eps=eps,
                    final_norm=final_norm, **extra)


LLAMA_NORMS = per_layer("model.layers", "input_layernorm", "post_attention_layernorm") | {"model.norm"}


def llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("LlamaConfig", "LlamaForCausalLM", dtype, seed, rms_norm_eps=1e-6)
    return _hf_zoo("llama", model, LLAMA_NORMS)


def mistral(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("MistralConfig", "MistralForCausalLM", dtype, seed, rms_norm_eps=1e-5, sliding_window=None)
    return _hf_zoo("mistral", model, LLAMA_NORMS)


def qwen2(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("Qwen2Config", "Qwen2ForCausalLM", dtype, seed, rms_norm_eps=1e-6)
    return _hf_zoo("qwen2", model, LLAMA_NORMS)


def qwen3(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("Qwen3Config", "Qwen3ForCausalLM", dtype, seed, rms_norm_eps=1e-6, head_dim=16)
    norms = LLAMA_NORMS | per_layer("model.layers", "self_attn.q_norm", "self_attn.k_norm")
    return _hf_zoo("qwen3", model, norms, notes="q_norm/k_norm are RMSNorms over head_dim (16) on 4D q/k")


def gemma(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("GemmaConfig", "GemmaForCausalLM", dtype, seed, rms_norm_eps=1e-6, head_dim=16)
    return _hf_zoo("gemma", model, LLAMA_NORMS, gamma_offset=1.0,
                   notes="gain is (1 + weight), weight initialised to zeros; cast after the gain")


def gemma2(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("Gemma2Config", "Gemma2ForCausalLM", dtype, seed, rms_norm_eps=1e-6, head_dim=16,
                      query_pre_attn_scalar=16, sliding_window=4)
    norms = LLAMA_NORMS | per_layer("model.layers", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return _hf_zoo("gemma2", model, norms, gamma_offset=1.0,
                   notes="post_attention_layernorm and post_feedforward_layernorm are post-norms "
                         "(applied to the sublayer output, feeding the residual add)")


def phi3(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("Phi3Config", "Phi3ForCausalLM", dtype, seed, rms_norm_eps=1e-5)
    return _hf_zoo("phi3", model, LLAMA_NORMS, notes="fused qkv_proj and gate_up_proj")


def olmo2(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("Olmo2Config", "Olmo2ForCausalLM", dtype, seed, rms_norm_eps=1e-6)
    norms = per_layer("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
                      "self_attn.q_norm", "self_attn.k_norm") | {"model.norm"}
    return _hf_zoo("olmo2", model, norms,
                   notes="post-norms only (no pre-norm); q_norm/k_norm over the whole q/k projection; "
                         "gain applied before the final cast")


def cohere(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    model = _hf_model("CohereConfig", "CohereForCausalLM", dtype, seed, layer_norm_eps=1e-5)
    layer_norms = per_layer("model.layers", "input_layernorm") | {"model.norm"}
    return _hf_zoo("cohere", model, frozenset(), final_norm=None, other_norms=layer_norms,
                   notes="CohereLayerNorm is mean-subtracting: no RMSNorm anywhere")


# ---------------------------------------------------------------------------
# nanoGPT-style model with nn.RMSNorm

class NanoAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class NanoMLP(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, eps: float):
        super().__init__()
        self.ln_1 = nn.RMSNorm(dim, eps=eps)
        self.attn = NanoAttention(dim, heads, dropout)
        self.ln_2 = nn.RMSNorm(dim, eps=eps)
        self.mlp = NanoMLP(dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT with nn.RMSNorm in place of LayerNorm; tied embeddings, learned positions."""

    def __init__(self, vocab: int = VOCAB, block_size: int = MAX_POSITIONS, dim: int = HIDDEN, layers: int = LAYERS,
                 heads: int = HEADS, dropout: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, dim),
            wpe=nn.Embedding(block_size, dim),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList(NanoBlock(dim, heads, dropout, eps) for _ in range(layers)),
            ln_f=nn.RMSNorm(dim, eps=eps),
        ))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nanogpt(dtype: torch.dtype = torch.float32, seed: int = 0, dropout: float = 0.0) -> ZooModel:
    torch.manual_seed(seed)
    model = NanoGPT(dropout=dropout).to(dtype).eval()
    norms = per_layer("transformer.h", "ln_1", "ln_2") | {"transformer.ln_f"}
    return ZooModel("nanogpt", model, (example_tokens(),), {}, norms, eps=1e-6, final_norm="transformer.ln_f",
                    notes="nn.RMSNorm -> aten.rms_norm; lm_head tied to wte")


# ---------------------------------------------------------------------------
# torchtitan-style Llama

@dataclass(frozen=True)
class TitanArgs:
    dim: int = HIDDEN
    n_layers: int = LAYERS
    n_heads: int = HEADS
    n_kv_heads: int = KV_HEADS
    vocab_size: int = VOCAB
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = MAX_POSITIONS
    fused_qkv: bool = False
    functional_norm: bool = False   # RMSNorm modules calling F.rms_norm instead of nn.RMSNorm


class TitanRMSNorm(nn.Module):
    """An RMSNorm module written on F.rms_norm (torchtitan's older ``build_norm("rmsnorm")``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _build_norm(args: TitanArgs) -> nn.Module:
    return TitanRMSNorm(args.dim, args.norm_eps) if args.functional_norm else nn.RMSNorm(args.dim, eps=args.norm_eps)


def precompute_freqs_cis(dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, dim // 2), torch.outer(t, freqs))


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class TitanAttention(nn.Module):
    def __init__(self, args: TitanArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.fused_qkv = args.fused_qkv
        q_dim, kv_dim = args.n_heads * self.head_dim, args.n_kv_heads * self.head_dim
        if args.fused_qkv:
            self.wqkv = nn.Linear(args.dim, q_dim + 2 * kv_dim, bias=False)
        else:
            self.wq = nn.Linear(args.dim, q_dim, bias=False)
            self.wk = nn.Linear(args.dim, kv_dim, bias=False)
            self.wv = nn.Linear(args.dim, kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        if self.fused_qkv:
            kv_dim = self.n_kv_heads * self.head_dim
            xq, xk, xv = self.wqkv(x).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        else:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bs, seqlen, -1, self.head_dim)
        xk = xk.view(bs, seqlen, -1, self.head_dim)
        xv = xv.view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        rep = self.n_heads // self.n_kv_heads
        xk = xk.repeat_interleave(rep, dim=2)
        xv = xv.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seqlen, -1))


class TitanFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TitanBlock(nn.Module):
    def __init__(self, layer_id: int, args: TitanArgs):
        super().__init__()
        self.attention = TitanAttention(args)
        self.feed_forward = TitanFeedForward(args.dim, 4 * args.dim, args.multiple_of)
        self.attention_norm = _build_norm(args)
        self.ffn_norm = _build_norm(args)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class TitanLlama(nn.Module):
    """torchtitan's Llama 3 ``Transformer``: ModuleDict of layers, complex ``freqs_cis`` buffer."""

    def __init__(self, args: TitanArgs = TitanArgs()):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.register_buffer("freqs_cis", precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len * 2,
                                                                 args.rope_theta), persistent=True)
        self.layers = nn.ModuleDict({str(i): TitanBlock(i, args) for i in range(args.n_layers)})
        self.norm = _build_norm(args)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        return self.output(self.norm(h))


def torchtitan_llama(dtype: torch.dtype = torch.float32, seed: int = 0, fused_qkv: bool = False,
                     functional_norm: bool = False) -> ZooModel:
    torch.manual_seed(seed)
    model = TitanLlama(TitanArgs(fused_qkv=fused_qkv, functional_norm=functional_norm))
    # the complex rotary buffer stays complex64 whatever the model dtype
    for name, p in model.named_parameters():
        p.data = p.data.to(dtype)
    model.eval()
    norms = per_layer("layers", "attention_norm", "ffn_norm") | {"norm"}
    name = "torchtitan_llama" + ("_fused" if fused_qkv or functional_norm else "")
    return ZooModel(name, model, (example_tokens(),), {}, norms, eps=1e-5, final_norm="norm",
                    notes=("wqkv fused, " if fused_qkv else "wq/wk/wv, ")
                    + ("F.rms_norm modules" if functional_norm else "nn.RMSNorm"))


def torchtitan_llama_fused(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    return torchtitan_llama(dtype, seed, fused_qkv=True, functional_norm=True)


# ---------------------------------------------------------------------------
# unit_scaling (PyPI: unit-scaling)

def unit_scaling_decoder(dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    """unit_scaling's TransformerDecoder: RMSNorm without a gain, as ``x / rms(x)``, rms cast to x's dtype.

    unit_scaling scales gradients with a custom ``autograd.Function``; torch.export
    inlines its forward and drops its backward, so the captured graph computes the
    same forward but unscaled gradients (capture warns). Its attention multiplier
    depends on the sequence length, so export fixes that dim to the example's.
    """
    import unit_scaling as uu

    torch.manual_seed(seed)
    model = uu.TransformerDecoder(hidden_size=HIDDEN, vocab_size=VOCAB, layers=LAYERS, heads=HEADS).to(dtype).eval()
    norms = per_layer("layers", "mhsa_norm", "mlp_norm") | {"final_norm"}
    return ZooModel("unit_scaling", model, (example_tokens(),), {}, norms, eps=1e-5, final_norm="final_norm",
                    notes="custom autograd.Function scaling (backward lost by export); sequence dim specialised")


BUILDERS: dict[str, Callable[..., ZooModel]] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma": gemma,
    "gemma2": gemma2,
    "phi3": phi3,
    "olmo2": olmo2,
    "cohere": cohere,
    "nanogpt": nanogpt,
    "torchtitan_llama": torchtitan_llama,
    "torchtitan_llama_fused": torchtitan_llama_fused,
    "unit_scaling": unit_scaling_decoder,
}

# Names whose builders need an optional package; tests skip them when it is missing.
OPTIONAL_PACKAGES = {"unit_scaling": "unit_scaling"}


def build(name: str, **kwargs: Any) -> ZooModel:
    return BUILDERS[name](**kwargs)


def seq_dim_is_dynamic(name: str) -> bool:
    """Whether the captured graph of this zoo model serves other sequence lengths."""
    return name != "unit_scaling"


__all__ = ["ZooModel", "BUILDERS", "build", "per_layer", "example_tokens", "OPTIONAL_PACKAGES", "seq_dim_is_dynamic",
           "NanoGPT", "TitanLlama", "TitanArgs"]
