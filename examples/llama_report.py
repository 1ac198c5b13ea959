"""Main job: a Llama-3-style model from transformers, rewritten by mxrewrite, compiled, trained, reported.

    python examples/llama_report.py                 # MXFP8 MXNorm (p=2), CPU or GPU
    python examples/llama_report.py --format nvfp4 --grads --no-compile
    python examples/llama_report.py --format fp8 --linears all        # on a Hopper GPU

The flow a user follows: ``optimize`` the model, ``torch.compile`` it, train a few
steps with the transformers loss (``labels=``), print the report and the
numerics against the original (``verify``), then ``generate()`` a few tokens.

The model is built from ``transformers.LlamaConfig`` with Llama 3's structure
(GQA with 4x fewer KV heads, SwiGLU with ffn = 3.5 d, RoPE theta 500k, untied
head) at a small size, randomly initialised - no download. ``build`` is also
the factory the command line takes:
``python -m mxrewrite report examples/llama_report.py:build``.
"""

from __future__ import annotations

import argparse
import logging

import torch

# transformers imports torchao when it is installed; torchao 0.18 on torch >= 2.12 logs two
# deprecation warnings about its pytree enums at import time, and on CPU-only or non-Blackwell machines that
# its CUDA extensions could not be loaded. They are not ours to fix, nor the user's.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("torchao").setLevel(logging.ERROR)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import mxrewrite


def build(hidden: int = 512, layers: int = 4, batch: int = 2, seq: int = 128, seed: int = 0):
    """A small Llama-3-shaped causal LM and a batch of token ids."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=2048,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (input_ids,)


def train(model, input_ids: torch.Tensor, steps: int, compile_model: bool) -> None:
    """A few AdamW steps on the transformers causal-LM loss, through torch.compile unless told otherwise."""
    model.train()
    step_fn = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        loss = step_fn(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}")
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="mxfp8", choices=["mxfp8", "nvfp4", "fp8"],
                        help="fp8 on Hopper GPUs (the MX formats need Blackwell's tensor cores)")
    parser.add_argument("--linears", default="norm-fed", choices=["norm-fed", "all"])
    parser.add_argument("--norm", default="mxnorm", choices=["mxnorm", "rmsnorm"])
    parser.add_argument("--p", type=int, default=2, choices=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="training steps")
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    parser.add_argument("--grads", action="store_true", help="also compare parameter gradients")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # the float32 model's high-precision GEMMs on TF32
    model, (input_ids,) = build()
    model, input_ids = model.to(args.device), input_ids.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Llama-3-style model: {n_params / 1e6:.1f}M parameters, input {tuple(input_ids.shape)}, {args.device}")

    optimized = mxrewrite.optimize(model, (input_ids,), format=args.format, norm=args.norm, p=args.p,
                                   linears=args.linears, progress=True)
    print(f"optimized: {type(optimized).__name__} (the same class), parameters shared with the original model\n")
    train(optimized, input_ids, args.steps, compile_model=not args.no_compile)
    print()
    print(mxrewrite.get_report(optimized))
    print()
    print(mxrewrite.verify(model, optimized, (input_ids,), grads=args.grads))
    prompt = input_ids[:1, :8]
    tokens = optimized.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"\ngenerate(): prompt {prompt.tolist()[0]} -> new tokens {tokens[0, prompt.shape[1]:].tolist()}")


if __name__ == "__main__":
    main()
