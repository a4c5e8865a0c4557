"""What a study leaves behind, whichever backend ran it.

RUN_DIR/best_overrides.yaml  the best trial's values, as a ready-to-use primary config:
                             python -m vishwamai.training_v2 --config-dir RUN_DIR --config-name best_overrides
RUN_DIR/best_overrides.txt   the same as CLI overrides, one per line:
                             python -m vishwamai.training_v2 $(cat RUN_DIR/best_overrides.txt)
RUN_DIR/tuning_summary.json  every trial: number, state, value, params, fail reason, run dir
                             (and, for population-based training, every exploit).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vishwamai.errors import VishwamaiError
from vishwamai.tune.space import overrides_as_cli, overrides_as_nested, to_builtin


class TuningError(VishwamaiError):
    """The study produced no usable trial."""


@dataclass
class TrialRecord:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: Optional[float]
    params: dict[str, Any]
    fail_reason: Optional[str] = None
    run_dir: Optional[str] = None


@dataclass
class StudyResult:
    framework: str
    study_name: str
    metric: str
    direction: str
    trials: list[TrialRecord] = field(default_factory=list)
    storage: Optional[str] = None
    # Population-based training only: {"step", "trial", "from_trial", "params"} per exploit.
    exploits: Optional[list[dict[str, Any]]] = None

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)

    def best(self) -> TrialRecord:
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        if not done:
            reasons = sorted({t.fail_reason for t in self.trials if t.fail_reason})
            raise TuningError(f"no trial of study '{self.study_name}' completed "
                              f"({len(self.trials)} trials; failures: {reasons[:3]})")
        pick = min if self.direction == "minimize" else max
        return pick(done, key=lambda t: t.value)


def _header(result: StudyResult, best: TrialRecord) -> str:
    return (f"# Best trial {best.number} of study '{result.study_name}' ({result.framework}): "
            f"{result.metric}={best.value:.6g} ({result.direction}).\n"
            f"# Train with it: python -m vishwamai.training_v2 --config-dir <this dir> --config-name best_overrides\n")


def write_results(result: StudyResult, run_dir: Path) -> dict[str, Any]:
    """Write the best overrides and the per-trial summary; returns the summary dict."""
    best = result.best()
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"defaults": ["default_config", "_self_"], **overrides_as_nested(best.params)}
    (run_dir / "best_overrides.yaml").write_text(_header(result, best) + yaml.safe_dump(body, sort_keys=False))
    cli = overrides_as_cli(best.params)
    (run_dir / "best_overrides.txt").write_text("\n".join(cli) + "\n")
    summary = {
        "framework": result.framework,
        "study_name": result.study_name,
        "storage": result.storage,
        "metric": result.metric,
        "direction": result.direction,
        "best_value": best.value,
        "best_trial": best.number,
        "best_params": {k: to_builtin(v) for k, v in best.params.items()},
        "best_overrides": cli,
        "trials_complete": result.count("COMPLETE"),
        "trials_pruned": result.count("PRUNED"),
        "trials_failed": result.count("FAIL"),
        "trials": [asdict(t) for t in result.trials],
        "study_dir": str(run_dir),
    }
    if result.exploits is not None:
        summary["exploits"] = result.exploits
    (run_dir / "tuning_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def print_results(summary: dict[str, Any]) -> None:
    print(f"\nstudy '{summary['study_name']}': {summary['trials_complete']} complete, "
          f"{summary['trials_pruned']} pruned, {summary['trials_failed']} failed")
    print(f"best trial {summary['best_trial']}: {summary['metric']}={summary['best_value']:.6g}")
    print("best overrides: " + " ".join(summary["best_overrides"]))
    print(f"  {summary['study_dir']}/best_overrides.yaml")
