"""Throughput: vishwamai's Trainer vs a good hand-written PyTorch loop vs Hugging Face Trainer.

Same architecture: HF Trainer trains transformers' `LlamaForCausalLM` built from the very config
vishwamai trains (4 layers, 256 wide, 4 heads, SwiGLU, RoPE, RMSNorm, tied embeddings, vocab 257;
the config.json `python -m vishwamai.export` would write, 3.28M parameters each). Same tokens (the
embedded corpus, byte level, sequence 256, batch 8), same optimizer (fused AdamW — HF Trainer's
default `adamw_torch_fused` — gradient clipping at 1.0), fp32, dropout 0, attention through SDPA, same threads. Interleaved rounds in one process; prints
tokens/s (whole measured span, so periodic saves count), step-time median, RSS and the ratios.
With --compile, vishwamai and the bare loop run under torch.compile and HF Trainer is measured both
eager and with its own `torch_compile=True`. With --amp all three run under bf16 autocast
(vishwamai `amp.enabled=true`, HF `bf16=True`); the default is fp32 for all.

With --vocab V all variants use a V-token vocabulary (model.vocab_size=V; the byte corpus's tokens
are a subset), e.g. 32000 as a Llama tokenizer's, where the logits dominate the step.

    python bench/throughput.py [--steps 30] [--rounds 5] [--compile] [--amp] [--vocab V] [--no-hf] [--ckpt-every 10]
                               [--only V ...]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record, throughput_table  # noqa: E402

from vishwamai.config import DataConfig, ModelConfig  # noqa: E402
from vishwamai.data import SequenceSampler, load_token_data  # noqa: E402
from vishwamai.model import Transformer  # noqa: E402
from vishwamai.train.events import Callback  # noqa: E402
from vishwamai.train.optim import build_optimizer  # noqa: E402
from vishwamai.training_v2 import compose_config, run  # noqa: E402

SEQ, BATCH = 256, 8
# Steps left out of every measurement (--warmup): allocator and kernel warm-up. One-time start-up
# work that runs beside the first steps (MLflow's imports and store in its child process, a few
# CPU-seconds) may still fall inside a short measured span; --warmup 60 shows the steady state.
WARMUP = 10
LOG_EVERY = 10  # training.log_every_n_steps default
MODEL = ModelConfig(vocab_size=257, d_model=256, n_layers=4, n_heads=4, max_seq_len=SEQ)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class StepClock(Callback):
    """Wall time between step ends: everything the loop does for a step, callbacks and saves included."""

    def __init__(self, stop_after: int):
        self.stop_after = stop_after
        self.marks: list[float] = []

    def on_step_end(self, trainer) -> None:
        self.marks.append(time.perf_counter())
        # Stop before max_steps so the end-of-run evaluation and final save stay outside the clock.
        trainer.should_stop = trainer.state.step >= self.stop_after


def measured_steps(marks: list[float]) -> list[float]:
    """Step times after the warm-up, from step-end timestamps (mark i = end of step i + 1)."""
    return [b - a for a, b in zip(marks[WARMUP - 1:], marks[WARMUP:])]


def vishwamai_trainer(steps: int, compile_model: bool, tmp: Path, extra: list[str] = (), model: str = "tiny",
                      amp: bool = False) -> dict:
    """The trainer as a user runs it; `model=tiny` is MODEL below (4 layers, 256 wide, 4 heads)."""
    overrides = [f"model={model}", f"data.seq_len={SEQ}",
                 f"training.batch_size={BATCH}", f"training.max_steps={steps + WARMUP + 1}",
                 "training.eval_every_n_steps=0", "training.eval_batches=1", "training.progress_bar=false",
                 "monitoring.enabled=false", f"training.compile={str(compile_model).lower()}",
                 f"amp.enabled={str(amp).lower()}", f"model.vocab_size={MODEL.vocab_size}", *extra]
    clock = StepClock(stop_after=steps + WARMUP)
    run(compose_config(overrides, run_dir=str(tmp / f"v{time.monotonic_ns()}")), extra_callbacks=[clock])
    return _figures(measured_steps(clock.marks))


def _figures(step_times: list[float]) -> dict:
    """Tokens/s over the whole measured span (so periodic costs such as saves count), step-time median."""
    tokens = SEQ * BATCH * len(step_times)
    return {"tokens_per_s": tokens / sum(step_times), "step_ms": 1000 * median(step_times),
            "rss_mb": rss_mb()}


def bare_loop(steps: int, compile_model: bool, amp: bool = False) -> dict:
    """A good baseline: fused AdamW (build_optimizer), SDPA attention (same model class), no extras."""
    torch.manual_seed(0)
    data = load_token_data(DataConfig(seq_len=SEQ))
    sampler = SequenceSampler(data.train, SEQ, seed=0)
    model = Transformer(MODEL)
    opt = build_optimizer(model, compose_config(run_dir="/tmp").training.optimizer)
    step_model = torch.compile(model) if compile_model else model
    times = []
    for _ in range(steps + WARMUP):
        start = time.perf_counter()
        x, y = sampler.next_batch(BATCH)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = step_model(x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return _figures(times[WARMUP:])


def hf_trainer(steps: int, compile_model: bool = False, amp: bool = False) -> dict:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from vishwamai.hf.config import from_model_config

    transformers.logging.set_verbosity_error()
    data = load_token_data(DataConfig(seq_len=SEQ))
    sampler = SequenceSampler(data.train, SEQ, seed=0)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return (steps + WARMUP) * BATCH

        def __getitem__(self, i):
            x, _ = sampler.gather(torch.tensor([i]))
            return {"input_ids": x[0], "labels": x[0]}

    marks: list[float] = []

    class Timer(TrainerCallback):  # step end to step end, as for vishwamai: data loading included
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    # The same architecture as MODEL, as the exporter describes it to transformers; attention through SDPA.
    config = from_model_config(MODEL, "float32", eos_id=256, bos_id=None)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    assert model.num_parameters() == Transformer(MODEL).num_parameters()
    args = TrainingArguments(output_dir="/tmp/hf_bench", per_device_train_batch_size=BATCH, max_steps=steps + WARMUP,
                             learning_rate=3e-4, weight_decay=0.1, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                             torch_compile=compile_model, bf16=amp, optim="adamw_torch_fused", max_grad_norm=1.0)
    Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Timer()]).train()
    return _figures(measured_steps(marks))


def main() -> None:
    global WARMUP
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile both vishwamai and the bare loop")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for all variants")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="steps before the measured span")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="run only these variants (e.g. vishwamai hf_trainer 'hf_trainer (torch_compile)')")
    parser.add_argument("--ckpt-every", type=int, default=10,
                        help="checkpoint interval of the monitoring+ckpt variant (the default config saves "
                             "only at the end, which would put no save inside the measured steps)")
    parser.add_argument("--vocab", type=int, default=MODEL.vocab_size, help="vocabulary size of every variant")
    parser.add_argument("--chunk-rows", type=int, default=1024,
                        help="training.loss_chunk_rows of the 'vishwamai (chunked loss)' variant")
    args = parser.parse_args()
    WARMUP = args.warmup
    MODEL.vocab_size = args.vocab
    tmp = Path("/tmp/vishwamai_bench")
    variants = {
        "bare_loop": lambda: bare_loop(args.steps, args.compile, args.amp),
        "vishwamai": lambda: vishwamai_trainer(args.steps, args.compile, tmp, amp=args.amp),
        "vishwamai (chunked loss)": lambda: vishwamai_trainer(
            args.steps, args.compile, tmp, [f"training.loss_chunk_rows={args.chunk_rows}"], amp=args.amp),
        "vishwamai+monitoring+ckpt": lambda: vishwamai_trainer(
            args.steps, args.compile, tmp, ["monitoring.enabled=true",  # defaults: TensorBoard + MLflow
                                            f"checkpointing.every_n_steps={args.ckpt_every}"], amp=args.amp),
    }
    if not args.no_hf:
        variants["hf_trainer"] = lambda: hf_trainer(args.steps, amp=args.amp)
        if args.compile:
            variants["hf_trainer (torch_compile)"] = lambda: hf_trainer(args.steps, compile_model=True, amp=args.amp)
    if args.only:
        variants = {name: fn for name, fn in variants.items() if name in args.only}
    results = interleave(variants, args.rounds)
    tps, lines = throughput_table(results, rss=True)
    if "bare_loop" in tps and "vishwamai" in tps:
        lines.append(f"- vishwamai / bare loop: **{tps['vishwamai'] / tps['bare_loop']:.3f}** (target >= 0.97)")
    if "bare_loop" in tps and "vishwamai+monitoring+ckpt" in tps:
        lines.append(f"- vishwamai with monitoring (TensorBoard + MLflow, every {LOG_EVERY} steps) and a "
                     f"checkpoint every {args.ckpt_every} steps / bare loop: "
                     f"**{tps['vishwamai+monitoring+ckpt'] / tps['bare_loop']:.3f}** (target >= 0.97)")
    for hf in (name for name in tps if name.startswith("hf_trainer") and "vishwamai" in tps):
        lines.append(f"- vishwamai / {hf} (both LlamaForCausalLM-shaped): **{tps['vishwamai'] / tps[hf]:.3f}** "
                     "(target >= 1.3)")
    mode = " + ".join(["torch.compile"] * args.compile + ["bf16 autocast"] * args.amp) or "eager fp32"
    record(f"throughput ({mode}, vocab {args.vocab}), {args.steps} steps after {WARMUP} warm-up x {args.rounds} "
           "rounds", lines)
    if not all(math.isfinite(v) for v in tps.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
