"""Dynamic batch size under real DDP (2 gloo processes through torch's elastic launcher).

Every rank runs out of memory at the same step (the usual case: same shapes on every rank);
all ranks recover, agree on the new size and finish with identical losses. (An OOM on one rank
only is the documented limitation: DDP's buffer broadcast / gradient all-reduce leave the
other ranks in a collective the redone step does not match.)
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

run_dir = sys.argv[1]
cap = MemoryCap(lambda step: 2 if step >= 3 else None)
cfg = compose_config(TINY_OVERRIDES + ["distributed.strategy=data_parallel", "training.max_steps=6"] + dynamic(
    initial_batch_size=4, target_batch_size=4, min_batch_size=1), run_dir=run_dir)
summary = run(cfg, extra_callbacks=[cap])
print("RESULT", json.dumps({"rank": int(os.environ["RANK"]), "loss": summary["final_train_loss"],
                            "changes": summary["dynamic_batch_size"]["changes"]}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_all_ranks_recover_from_oom_together(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent)])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert [(c["step"], c["reason"], c["batch_size"]) for c in r["changes"]] == [(3, "oom", 2)]
    assert results[0]["loss"] == results[1]["loss"]  # the ranks stayed in step
