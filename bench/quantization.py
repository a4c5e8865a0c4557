"""fp32 vs int8 on CPU, side by side in one run, interleaved.

    python bench/quantization.py [--model tiny] [--rounds 5] [--threads 2] [--no-compile]

Variants: fp32 eager (the baseline of every ratio), fp32 under torch.compile (how much of the compiled
int8 gain is compile alone), int8 dynamic (torch.ao, eager), int8 dynamic compiled (torchao under
torch.compile, vishwamai/compress/compiled.py) and int8 weight_only. The int8 variants load one saved
file (vishwamai's int8 format), as a user would.

Two workloads per variant: a forward of 8 x 256 tokens (prefill / evaluation) and greedy
generation at batch 1 (ms per generated token, no KV cache: each token re-reads the prefix).
The weights are randomly initialised: speed does not depend on their values; the loss column
(validation windows of the embedded corpus) shows that int8 leaves the fp32 loss unchanged.
Ratios use the best (minimum) round, the least disturbed by other processes on a shared machine;
medians are shown too, and the load average at the start and end of the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record  # noqa: E402


def compiled(model):
    model.compile(dynamic=True)  # as compiled.py does for int8: one graph for every length
    return model


def build(model_name: str, compile: bool):
    from vishwamai.checkpoint.io import as_model_config
    from vishwamai.compress.measure import size_on_disk
    from vishwamai.compress.quantize import fp32_size_bytes, quantize_state
    from vishwamai.compress.storage import load_quantized, save_quantized
    from vishwamai.model import build_model
    from vishwamai.training_v2 import compose_config

    cfg = as_model_config(compose_config([f"model={model_name}"], run_dir="/tmp/unused").model)
    torch.manual_seed(0)
    fp32 = build_model(cfg).eval()
    tensors, meta = quantize_state(fp32)
    out = Path(tempfile.mkdtemp(prefix="vishwamai_bench_q_"))
    save_quantized(out, tensors, {**meta, "mode": "dynamic"}, cfg)
    models = {"fp32": fp32}
    if compile:
        models["fp32 compiled"] = compiled(build_model(cfg).eval())
        models["fp32 compiled"].load_state_dict(fp32.state_dict())
    models["int8 dynamic"] = load_quantized(out, "dynamic")
    if compile:
        start = time.perf_counter()
        models["int8 dynamic compiled"] = load_quantized(out, compile=True)
        print(f"compiled int8 load: {time.perf_counter() - start:.1f} s, "
              f"kernels: {models['int8 dynamic compiled'].int8_kernels}", flush=True)
    models["int8 weight_only"] = load_quantized(out, "weight_only")
    sizes = {name: fp32_size_bytes(fp32, cfg) if name.startswith("fp32") else size_on_disk(out) for name in models}
    return cfg, models, sizes


@torch.no_grad()
def measure(model, batch: torch.Tensor, prompt: torch.Tensor, new_tokens: int) -> dict:
    start = time.perf_counter()
    model(batch)
    prefill_ms = (time.perf_counter() - start) * 1000
    idx = prompt
    start = time.perf_counter()
    for _ in range(new_tokens):
        idx = torch.cat([idx, model(idx).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return {"prefill_ms": prefill_ms, "ms_per_token": (time.perf_counter() - start) * 1000 / new_tokens}


def losses(models: dict, cfg, seq: int) -> dict[str, float]:
    from vishwamai.compress.measure import validation_loss
    from vishwamai.compress.quantize import load_validation
    from vishwamai.config import DataConfig

    val, seq_len = load_validation(DataConfig(seq_len=seq), cfg)
    return {name: validation_loss(m, val, seq_len, batch_size=8, max_batches=2) for name, m in models.items()}


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="leave out the two compiled variants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load()
    cfg, models, sizes = build(args.model, not args.no_compile)
    gen = torch.Generator().manual_seed(0)
    seq = min(256, cfg.max_seq_len)
    batch = torch.randint(0, cfg.vocab_size, (8, seq), generator=gen)
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=gen)
    for m in models.values():  # warm-up: weight packing, kernel selection, compiling for both shapes
        measure(m, batch, prompt, 2)
    loss = losses(models, cfg, seq)
    variants = {name: (lambda m=m: measure(m, batch, prompt, args.new_tokens)) for name, m in models.items()}
    results = interleave(variants, args.rounds)
    base = {k: min(r[k] for r in results["fp32"]) for k in ("prefill_ms", "ms_per_token")}
    lines = [f"model={args.model} ({sum(p.numel() for p in models['fp32'].parameters()) / 1e6:.1f}M parameters), "
             f"{args.rounds} interleaved rounds, best (median); load average (1/5/15 min) {load_start} at the "
             f"start, {load()} at the end",
             "| variant | size on disk | val loss (random init) | forward 8x%d ms | ratio | "
             "generate ms/token (batch 1) | ratio |" % seq,
             "|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        pre, tok = [r["prefill_ms"] for r in rs], [r["ms_per_token"] for r in rs]
        kernels = getattr(models[name], "int8_kernels", None)
        label = name if kernels is None or name.endswith(kernels) else f"{name} (fell back to {kernels})"
        lines.append(f"| {label} | {sizes[name] / 2**20:.2f} MiB ({sizes[name] / sizes['fp32']:.0%}) | "
                     f"{loss[name]:.4f} | {min(pre):.1f} ({median(pre):.1f}) | {min(pre) / base['prefill_ms']:.2f} | "
                     f"{min(tok):.2f} ({median(tok):.2f}) | {min(tok) / base['ms_per_token']:.2f} |")
    record("Quantization: fp32 vs int8 on CPU (bench/quantization.py)", lines)


if __name__ == "__main__":
    main()
