"""fp32 vs int8 (dynamic, weight-only) on CPU, side by side in one run, interleaved.

    python bench/quantization.py [--model tiny] [--rounds 5] [--threads 2]

Two workloads per variant: a forward of 8 x 256 tokens (prefill / evaluation) and greedy
generation at batch 1 (ms per generated token, no KV cache: each token re-reads the prefix).
The weights are randomly initialised: speed does not depend on their values. Ratios use the best
(minimum) round, the least disturbed by other processes on a shared machine; medians are shown too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record  # noqa: E402


def build(model_name: str):
    from vishwamai.compress.measure import size_on_disk
    from vishwamai.compress.quantize import fp32_size_bytes, load_quantized, quantize_state, save_quantized
    from vishwamai.training_v2 import compose_config
    from vishwamai.checkpoint.io import as_model_config
    from vishwamai.model import build_model

    cfg = as_model_config(compose_config([f"model={model_name}"], run_dir="/tmp/unused").model)
    torch.manual_seed(0)
    fp32 = build_model(cfg).eval()
    tensors, meta = quantize_state(fp32)
    out = Path(tempfile.mkdtemp(prefix="vishwamai_bench_q_"))
    save_quantized(out, tensors, {**meta, "mode": "dynamic"}, cfg)
    models = {"fp32": fp32, "int8 dynamic": load_quantized(out, "dynamic"),
              "int8 weight_only": load_quantized(out, "weight_only")}
    sizes = {"fp32": fp32_size_bytes(fp32, cfg), "int8 dynamic": size_on_disk(out),
             "int8 weight_only": size_on_disk(out)}
    return cfg, models, sizes


@torch.no_grad()
def measure(model, cfg, batch: torch.Tensor, prompt: torch.Tensor, new_tokens: int) -> dict:
    start = time.perf_counter()
    model(batch)
    prefill_ms = (time.perf_counter() - start) * 1000
    idx = prompt
    start = time.perf_counter()
    for _ in range(new_tokens):
        idx = torch.cat([idx, model(idx).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return {"prefill_ms": prefill_ms, "ms_per_token": (time.perf_counter() - start) * 1000 / new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, models, sizes = build(args.model)
    gen = torch.Generator().manual_seed(0)
    seq = min(256, cfg.max_seq_len)
    batch = torch.randint(0, cfg.vocab_size, (8, seq), generator=gen)
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=gen)
    for m in models.values():  # warm-up: weight packing, kernel selection
        measure(m, cfg, batch, prompt, 2)
    variants = {name: (lambda m=m: measure(m, cfg, batch, prompt, args.new_tokens)) for name, m in models.items()}
    results = interleave(variants, args.rounds)
    base = {k: min(r[k] for r in results["fp32"]) for k in ("prefill_ms", "ms_per_token")}
    lines = [f"model={args.model} ({sum(p.numel() for p in models['fp32'].parameters()) / 1e6:.1f}M parameters), "
             f"{args.rounds} interleaved rounds, best (median)",
             "| variant | size on disk | forward 8x%d ms | ratio | generate ms/token (batch 1) | ratio |" % seq,
             "|---|---|---|---|---|---|"]
    for name, rs in results.items():
        pre, tok = [r["prefill_ms"] for r in rs], [r["ms_per_token"] for r in rs]
        lines.append(f"| {name} | {sizes[name] / 2**20:.2f} MiB ({sizes[name] / sizes['fp32']:.0%}) | "
                     f"{min(pre):.1f} ({median(pre):.1f}) | {min(pre) / base['prefill_ms']:.2f} | "
                     f"{min(tok):.2f} ({median(tok):.2f}) | {min(tok) / base['ms_per_token']:.2f} |")
    record("Quantization: fp32 vs int8 on CPU (bench/quantization.py)", lines)


if __name__ == "__main__":
    main()
