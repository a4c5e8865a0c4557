"""Dynamic batch size under real DDP (2 gloo processes through torch's elastic launcher).

Training: every rank runs out of memory at the same step (the usual case: same shapes on every
rank); all ranks recover, agree on the new size and finish with identical losses. (A training OOM
on one rank only is the documented limitation: the other ranks wait in a collective the redone
step does not match.) Evaluation: an OOM on one rank only is recovered and both ranks report
the same validation loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = """
import json, os, sys
from conftest import TINY_OVERRIDES
from test_dynamic_batch import MemoryCap, dynamic
from vishwamai.training_v2 import compose_config, run

run_dir, case = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
if case == "train_oom_on_all_ranks":
    cap = MemoryCap(lambda step: 2 if step >= 3 else None)
else:  # eval_oom_on_rank_1
    cap = MemoryCap(lambda step: None, eval_cap=1 if rank == 1 else None)
cfg = compose_config(TINY_OVERRIDES + ["distributed.strategy=data_parallel", "training.max_steps=6"] + dynamic(
    initial_batch_size=4, target_batch_size=4, min_batch_size=1), run_dir=run_dir)
summary = run(cfg, extra_callbacks=[cap])
# One file per rank: lines the two ranks print to a shared stdout pipe can interleave.
with open(f"{run_dir}-result-{rank}.json", "w") as fh:
    json.dump({"rank": rank, "loss": summary["final_train_loss"], "val_loss": summary["final_val_loss"],
               "changes": summary["dynamic_batch_size"]["changes"]}, fh)
"""


def launch(tmp_path, case: str) -> list[dict]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent)])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(tmp_path / "run"), case],
        capture_output=True, text=True, env=env, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("run-result-*.json"))]
    assert [r["rank"] for r in results] == [0, 1], proc.stdout[-3000:]
    return results


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_all_ranks_recover_from_oom_together(tmp_path):
    results = launch(tmp_path, "train_oom_on_all_ranks")
    for r in results:
        assert [(c["step"], c["reason"], c["batch_size"]) for c in r["changes"]] == [(3, "oom", 2)]
    assert results[0]["loss"] == results[1]["loss"]  # the ranks stayed in step


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eval_oom_on_one_rank_is_recovered(tmp_path):
    rank0, rank1 = launch(tmp_path, "eval_oom_on_rank_1")
    assert rank0["changes"] == []
    assert [c["reason"] for c in rank1["changes"]] == ["eval_oom", "eval_oom"]
    assert rank0["val_loss"] == rank1["val_loss"] and rank0["loss"] == rank1["loss"]
