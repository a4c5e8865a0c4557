"""`import vishwamai` time and the CLI's time to first step (target: under 5 s after install).

    python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import median, record  # noqa: E402

FIRST_STEP = r"""
import time, sys
t0 = float(sys.argv[1])
from vishwamai.train.events import Callback
from vishwamai.training_v2 import compose_config, run

class FirstStep(Callback):
    def on_step_end(self, trainer):
        print(f"FIRST_STEP {time.time() - t0:.3f}", flush=True)
        trainer.should_stop = True

run(compose_config(["+experiment=demo", "training.progress_bar=false"], run_dir=sys.argv[2]),
    extra_callbacks=[FirstStep()])
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def first_step(tmp: str) -> float:
    out = subprocess.run([sys.executable, "-c", FIRST_STEP, str(time.time()), tmp], capture_output=True,
                         text=True, check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("FIRST_STEP")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    imports = [timed([sys.executable, "-c", "import vishwamai"]) for _ in range(args.repeats)]
    bare_python = [timed([sys.executable, "-c", "pass"]) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        first_step(tmp)  # builds the embedded corpus cache once, as `make demo` would have
        steps = [first_step(f"{tmp}/{i}") for i in range(args.repeats)]
    record("startup", [
        f"- `python -c 'import vishwamai'`: {median(imports):.3f} s (bare interpreter {median(bare_python):.3f} s)",
        f"- demo config, process start to end of first training step (data cached, monitoring on): "
        f"**{median(steps):.2f} s** (target < 5 s)",
    ])


if __name__ == "__main__":
    main()
