"""The study-level MLflow run: each trial's run (started by the monitoring MLflow sink
while this one is active) is nested under it.

Workers sharing one study (other processes or pods) reuse the same parent run: its
id is kept with the study, so the study shows as one tree in the MLflow UI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig


def tracking_uri(cfg: DictConfig, run_dir: Path) -> Optional[str]:
    """The MLflow store of the study and all its trials, or None when MLflow is off."""
    mon = cfg.monitoring
    if not (mon.enabled and mon.mlflow.enabled):
        return None
    from vishwamai.monitoring.mlflow_sink import resolve_tracking_uri

    return resolve_tracking_uri(mon.mlflow, run_dir)


class StudyRun:
    """Start (or rejoin) the parent run; a no-op when MLflow is off."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.uri = tracking_uri(cfg, run_dir)
        self.experiment = cfg.monitoring.mlflow.experiment
        self.run_id: Optional[str] = None
        self._env_before: Optional[str] = None

    def start(self, study_name: str, run_id: Optional[str], params: dict[str, Any]) -> Optional[str]:
        if self.uri is None:
            return None
        import mlflow

        from vishwamai.monitoring.mlflow_sink import TRACKING_URI_ENV

        # set_tracking_uri also exports $MLFLOW_TRACKING_URI (for MLflow's subprocesses); end() puts the
        # caller's value back, or a later study in this process would write into this one's store.
        self._env_before = os.environ.get(TRACKING_URI_ENV)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"study-{study_name}",
                               tags={"vishwamai.study": study_name})
        if run_id is None:
            mlflow.log_params(params)
        self.run_id = run.info.run_id
        return self.run_id

    def log_best(self, value: float, params: dict[str, Any], finished: int) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.log_metric("best_value", value)
        mlflow.log_metric("trials_finished", finished)
        mlflow.set_tags({f"best.{key}": str(v) for key, v in params.items()})

    def end(self, failed: bool = False) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.end_run(status="FAILED" if failed else "FINISHED")
        self.run_id = None
        mlflow.set_tracking_uri(self._env_before)  # None unsets $MLFLOW_TRACKING_URI again
