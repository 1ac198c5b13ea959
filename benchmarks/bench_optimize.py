"""Wall time of ``mxrewrite.optimize`` on transformers Llamas of 2 and 32 layers.

Repeated blocks are analysed once (one layer per structure is captured), so a
32-layer model should cost about what a 2-layer one does. Each model is built
with random weights (not timed), then ``optimize`` is timed ``--repeat`` times
on it (median reported), on the device given.

    python benchmarks/bench_optimize.py                       # hidden 1024, 2 and 32 layers, CPU
    python benchmarks/bench_optimize.py --preset llama3-8b --layers 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time

import torch
import transformers

import mxrewrite

PRESETS = {
    "hidden1024": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                       vocab_size=2048),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=2048),  # vocab cut from 128256: the head is not analysed, only allocated
}


def build(preset: str, layers: int, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=256, **PRESETS[preset])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
        ids = torch.randint(0, config.vocab_size, (2, 64))
    return model, ids


def time_optimize(model: torch.nn.Module, ids: torch.Tensor, repeat: int) -> tuple[float, int]:
    times, rewritten = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        opt = mxrewrite.optimize(model, (ids,), progress=False)
        times.append(time.perf_counter() - start)
        rewritten = len(mxrewrite.get_report(opt).rewritten)
        del opt
    return statistics.median(times), rewritten


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="hidden1024")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    rows = []
    for layers in args.layers:
        model, ids = build(args.preset, layers, args.device)
        time_optimize(model, ids, 1)  # warm-up: imports, first export
        seconds, rewritten = time_optimize(model, ids, args.repeat)
        rows.append(dict(preset=args.preset, layers=layers, device=args.device, seconds=round(seconds, 3),
                         sites_rewritten=rewritten))
        print(json.dumps(rows[-1]), flush=True)
        del model
    if len(rows) >= 2:
        print(f"{rows[-1]['layers']} layers / {rows[0]['layers']} layers: {rows[-1]['seconds'] / rows[0]['seconds']:.2f}x")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
