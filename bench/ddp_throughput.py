"""2-process DDP throughput: vishwamai's Trainer against a bare DDP loop, side by side.

Both run the same model (model=tiny), the same per-rank batch and sequence, fused AdamW with
clipping at 1.0, over Gloo on CPU (torchrun, 2 processes, 1 thread each).  The bare loop is what
a hand-written DDP script does: forward, backward (DDP's gradient all-reduce), clip, step; no
collective of its own.  The trainer adds its per-step agreement (loss, stop, SIGTERM...).  Rounds
are interleaved; each prints rank 0's tokens/s over the measured steps (step end to step end,
all ranks' tokens) and the ratio trainer / bare loop.  `--code DIR` runs the trainer from another
checkout (e.g. the code before a change) in the same rounds, for a before/after figure.

`--save-every N` measures checkpointing instead: the trainer saving every N steps against the same
trainer without saves (with `--strategy model_parallel`: FSDP, sharded saves), and the time the
training thread blocks per save (rank 0's checkpoint_save_s); with `--code DIR` the saving trainer of
that checkout too (e.g. the synchronous sharded saves before issue 20).  Choose --steps so that the
last save's background write ends inside the measured steps.

    python bench/ddp_throughput.py [--steps 20] [--warmup 5] [--rounds 3] [--seq 128] [--batch 4] [--code DIR]
    python bench/ddp_throughput.py --strategy model_parallel --model small --save-every 10 --steps 30 [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, record, throughput_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")

CHILD = r"""
import json, os, sys, time
import torch
import torch.distributed as dist
import torch.nn.functional as F

mode, steps, warmup, seq, batch, out, model, strategy, save_every = (
    sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6], sys.argv[7], sys.argv[8], int(sys.argv[9]))
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
from vishwamai.training_v2 import compose_config
overrides = [f"model={model}", f"data.seq_len={seq}", f"training.batch_size={batch}",
             f"training.max_steps={steps + warmup + 1}", "training.eval_every_n_steps=0", "training.eval_batches=1",
             "training.progress_bar=false", "training.device=cpu", "monitoring.enabled=false",
             f"distributed.strategy={strategy}", f"checkpointing.every_n_steps={save_every}"]
marks, blocked = [], []
if mode == "trainer":
    from vishwamai.train.events import Callback
    from vishwamai.training_v2 import run

    class Clock(Callback):  # after the checkpoint callback (ORDER_DEFAULT): sees its checkpoint_save_s
        def on_step_end(self, trainer):
            marks.append(time.perf_counter())
            if "checkpoint_save_s" in trainer.metrics and warmup < trainer.state.step <= steps + warmup:
                blocked.append(trainer.metrics["checkpoint_save_s"])
            # Stop before max_steps: the end-of-run evaluation and final save stay outside the clock.
            trainer.should_stop = trainer.state.step >= steps + warmup

    run(compose_config(overrides, run_dir=out + "-run"), extra_callbacks=[Clock()])
else:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from vishwamai.data import SequenceSampler, load_token_data
    from vishwamai.model import Transformer
    from vishwamai.train.optim import build_optimizer

    cfg = compose_config(overrides, run_dir=out + "-run")
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    data = load_token_data(cfg.data)
    sampler = SequenceSampler(data.train, seq, seed=0, rank=rank, world_size=world)
    model = DDP(Transformer(cfg.model))
    opt = build_optimizer(model.parameters(), cfg.training.optimizer)
    for _ in range(steps + warmup):
        x, y = sampler.next_batch(batch)
        loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
    dist.barrier()
    dist.destroy_process_group()
if rank == 0:
    spans = [b - a for a, b in zip(marks[warmup - 1:], marks[warmup:])][:steps]
    json.dump({"tokens_per_s": seq * batch * world * len(spans) / sum(spans),
               "step_ms": 1000 * sorted(spans)[len(spans) // 2], "save_block_s": blocked}, open(out, "w"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, args, code: Path, save_every: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(code))
        subprocess.run([TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "--no-python",
                        sys.executable, "-c", CHILD, mode, str(args.steps), str(args.warmup), str(args.seq),
                        str(args.batch), out, args.model, args.strategy, str(save_every)], env=env, cwd=tmp,
                       check=True, capture_output=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--code", type=Path, help="also run the trainer from this checkout (before/after)")
    parser.add_argument("--model", default="tiny", help="model preset (small: 25.8M parameters)")
    parser.add_argument("--strategy", default="data_parallel", help="model_parallel: FSDP (with --save-every)")
    parser.add_argument("--save-every", type=int, default=0, help="measure saves every N steps against none")
    args = parser.parse_args()
    if args.save_every:
        return checkpoint_cost(args)
    variants = {"bare DDP loop": lambda: launch("bare", args, REPO),
                "vishwamai Trainer": lambda: launch("trainer", args, REPO)}
    if args.code:
        variants[f"vishwamai Trainer ({args.code})"] = lambda: launch("trainer", args, args.code.resolve())
    results = interleave(variants, args.rounds)
    tps, lines = throughput_table(results, "variant (2 ranks, gloo)")
    bare = tps["bare DDP loop"]
    for name in tps:
        if name != "bare DDP loop":
            lines.append(f"- {name} / bare DDP loop: **{tps[name] / bare:.3f}**")
    record(f"DDP throughput, 2 processes (gloo, 1 thread each), model=tiny, {args.batch} x {args.seq} per rank, "
           f"{args.steps} steps after {args.warmup} x {args.rounds} rounds", lines)


def checkpoint_cost(args) -> None:
    """The trainer saving every N steps against no saves, interleaved; blocking seconds per save."""
    saving = f"save every {args.save_every}"
    variants = {"no saves": lambda: launch("trainer", args, REPO),
                saving: lambda: launch("trainer", args, REPO, args.save_every)}
    if args.code:
        variants[f"{saving} ({args.code})"] = lambda: launch("trainer", args, args.code.resolve(), args.save_every)
    results = interleave(variants, args.rounds)
    tps, lines = throughput_table(results, f"trainer, 2 ranks, {args.strategy}")
    for name in list(tps)[1:]:
        block = sorted(s for r in results[name] for s in r["save_block_s"])
        lines.append(f"- {name} / no saves: **{tps[name] / tps['no saves']:.3f}**; the training thread blocks "
                     f"{block[len(block) // 2]:.3f} s per save (median of {len(block)}, max {block[-1]:.3f} s)")
    record(f"Checkpoint cost, 2 processes (gloo, 1 thread each), {args.strategy}, model={args.model}, "
           f"{args.batch} x {args.seq} per rank, {args.steps} steps after {args.warmup} x {args.rounds} rounds", lines)


if __name__ == "__main__":
    main()
