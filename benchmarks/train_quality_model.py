"""A Llama-3-style decoder, written the ordinary way, for the training-quality benchmark.

Pre-norm blocks ``h = h + Attn(RMSNorm(h)); h = h + SwiGLU(RMSNorm(h))`` with
``nn.RMSNorm``, grouped-query attention with rotary position embeddings (Llama 3's
``theta = 500000``, rotate-half form), no biases, an untied output head behind a
final ``nn.RMSNorm``. Nothing in it knows about mxrewrite: the benchmark passes it
through ``mxrewrite.optimize`` like any user model. The rewrite sites are each
block's ``attention_norm`` (feeding wq, wk, wv) and ``ffn_norm`` (feeding w1,
w3); the final norm feeds only the head and stays exact (``include_head=False``).

``width_config(d_model, n_layers)`` builds the member of this family the width
sweep uses (head dim 64, half as many KV heads, SwiGLU hidden 8/3 d rounded up to
a multiple of 256, as the 25M "small" preset has); ``train_flops_per_token``
counts what one training token costs, for planning the sweep's run times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train_quality_data import VOCAB_SIZE


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    vocab_size: int = VOCAB_SIZE
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def check(self) -> None:
        if self.dim % 32 or self.ffn_dim % 32:
            raise ValueError(f"dim={self.dim} and ffn_dim={self.ffn_dim} must be multiples of 32 "
                             "so that both MXFP8 (block 32) and NVFP4 (block 16) apply")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} do not divide")


PRESETS = {
    # CI smoke test: seconds on one CPU core.
    "toy": ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=192, max_seq_len=256),
    # The GPU run: about 25M parameters (ffn_dim = 8/3 * dim rounded up to a multiple of 256, as in Llama).
    "small": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, max_seq_len=1024),
}


HEAD_DIM = 64


def width_config(d_model: int, n_layers: int, max_seq_len: int = 1024) -> ModelConfig:
    """The family's model of hidden size ``d_model`` and depth ``n_layers``.

    Heads of 64 (one head below 128), grouped-query attention with half as many KV
    heads, SwiGLU hidden ``8/3 * d_model`` rounded up to a multiple of 256 (Llama's
    rule): ``width_config(512, 8)`` is the "small" preset, the 25M model of the last study.
    """
    n_heads = max(1, d_model // HEAD_DIM)
    ffn_dim = 256 * math.ceil(8 * d_model / 3 / 256)
    cfg = ModelConfig(dim=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=max(1, n_heads // 2),
                      ffn_dim=ffn_dim, max_seq_len=max_seq_len)
    cfg.check()
    return cfg


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of ``Decoder(cfg)``, counted from the config (no model is built)."""
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    attention = cfg.dim * cfg.dim * 2 + 2 * cfg.dim * kv_dim  # wq, wo; wk, wv
    block = attention + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim  # + two norm gains
    return cfg.n_layers * block + 2 * cfg.vocab_size * cfg.dim + cfg.dim  # + embedding, head, final norm


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs of one training token (forward + backward = 3x forward).

    Every matmul weight (the embedding lookup is free) costs 2 FLOPs per token
    forward; causal attention costs ``2 * seq_len * dim`` per token and layer forward
    (QK^T and AV over the half of the square a causal kernel computes).
    """
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    matmul_params = cfg.n_layers * (2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim + 3 * cfg.dim * cfg.ffn_dim)
    matmul_params += cfg.vocab_size * cfg.dim  # the head
    attention = cfg.n_layers * 2 * seq_len * cfg.dim
    return 3 * (2 * matmul_params + attention)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of shape ``(max_seq_len, head_dim)`` for the rotate-half convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(batch, heads, seq, head_dim)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        repeats = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Decoder(nn.Module):
    """Token ids ``(batch, seq)`` -> logits ``(batch, seq, vocab)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        for name, param in self.named_parameters():
            if param.ndim == 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(param, std=std)
            else:
                nn.init.ones_(param)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
