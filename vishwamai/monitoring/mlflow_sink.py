"""MLflow: params = the flattened resolved config, metrics per logged step, the config and
(at the end) the summary and report as artifacts, checkpoint paths as tags.

Store: monitoring.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///RUN_DIR/mlflow.db
(a real database; MLflow 3's file store is in maintenance mode).  Importing MLflow and creating that store take seconds of CPU, so the
sink runs in a ProcessSink (a low-priority child process): training starts while MLflow
sets up.  When an MLflow run is already active in the training process (a tuning study),
the run is nested under it (its id is read here, before the sink moves to the child).
When training ends the child is raised to normal priority and waited for at most
monitoring.mlflow.close_timeout_s; past that it is stopped and RUN_DIR/mlflow_pending.json plus a
warning say how to upload the run (`python -m vishwamai.monitoring.mlflow_upload RUN_DIR`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from vishwamai.monitoring.logger import SinkBase, logged_at, scalars
from vishwamai.run_files import CONFIG_FILE, METRICS_FILE, REPORT_MD, REPORT_PNG, SUMMARY_FILE

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000  # MLflow >= 2.12
BATCH_PARAMS = 100  # log_batch accepts at most 100 params per call
BATCH_METRICS = 1000  # ... and at most 1000 metrics
# Records are written at most this often (and at the end): one database commit costs tens of ms
# of CPU (much of it holding the GIL), too much to pay on every record of a fast run.
FLUSH_EVERY_S = 10.0
CHECKPOINT_KEYS = ("final_checkpoint", "best_checkpoint", "latest_checkpoint")


# Empty, fully migrated sqlite stores, one per MLflow version: a new run's store starts as a
# copy, which skips MLflow's schema migrations (about a CPU-second each time otherwise).
STORE_TEMPLATES = Path.home() / ".cache" / "vishwamai" / "mlflow"


# A tracking server set by the environment (a cluster's Secret); MLflow itself reads the credentials
# (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, AWS_* for S3 artifacts), the child inherits them.
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# Left in the run dir when the run ended before MLflow had everything (see left_behind / upload).
PENDING_FILE = "mlflow_pending.json"


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(mon: DictConfig, run_dir: Path) -> str:
    """monitoring.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the run dir's own sqlite store."""
    return mon.tracking_uri or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri(run_dir)


def sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a sqlite:/// tracking URI; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def store_template() -> Path:
    import mlflow

    return STORE_TEMPLATES / f"empty-store-{mlflow.__version__}.db"


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy (sqlite's backup API), written beside `target` and renamed into place."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")  # runs may race to write it
    try:
        with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(partial)) as dst:
            src.backup(dst)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def open_store(uri: str):
    """An MlflowClient whose store exists (a new local store is seeded from the template)."""
    from mlflow.tracking import MlflowClient

    db, template = sqlite_file(uri), store_template()
    new = db is not None and not db.exists()
    seeded = new and template.is_file()
    try:
        if seeded:
            copy_sqlite(template, db)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates (or checks) the store now
    except Exception:
        if not seeded:
            raise
        db.unlink(missing_ok=True)  # a template that is not a store MLflow accepts: forget it,
        template.unlink(missing_ok=True)  # build this store the long way (and a new template)
        return open_store(uri)
    if new and not seeded:
        with contextlib.suppress(OSError, sqlite3.Error):  # only an optimisation (read-only home, full disk)
            template.parent.mkdir(parents=True, exist_ok=True)
            copy_sqlite(db, template)  # still empty: the run is created after this
    return client


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: MLflow params are flat strings."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)[:MAX_PARAM_LENGTH]}


def active_parent_run() -> Optional[Any]:
    """The caller's active MLflow run (e.g. a tuning study's), without importing mlflow."""
    mlflow = sys.modules.get("mlflow")
    return mlflow.active_run() if mlflow is not None else None


class MlflowSink(SinkBase):
    def __init__(self, cfg: DictConfig, run_dir: Path):
        mon = cfg.monitoring.mlflow
        self.run_dir = Path(run_dir)
        self.uri = resolve_tracking_uri(mon, self.run_dir)
        self.experiment = mon.experiment
        self.params = flatten(OmegaConf.to_container(cfg, resolve=True))
        parent = active_parent_run()  # read here: MLflow's active run is per thread
        self.parent = (parent.info.run_id, parent.info.experiment_id) if parent else None
        self.client = None
        self.run_id: Optional[str] = None
        self._pending: list = []
        self._flushed_at = time.monotonic()

    # Runs in the ProcessSink's child process.
    def start(self, trainer) -> None:
        from mlflow.entities import Param

        self.client = client = open_store(self.uri)
        tags = {"vishwamai.run_dir": str(self.run_dir.resolve())}
        if self.parent:
            tags[PARENT_TAG], experiment_id = self.parent  # nested: in the parent's experiment
        else:
            experiment_id = self._experiment_id()
        run = client.create_run(experiment_id, run_name=self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in self.params.items()]
        for i in range(0, len(params), BATCH_PARAMS):
            client.log_batch(self.run_id, params=params[i:i + BATCH_PARAMS])
        config = self.run_dir / CONFIG_FILE
        if config.is_file():
            client.log_artifact(self.run_id, str(config))
        client.set_tag(self.run_id, "vishwamai.world_size", str(trainer.parallel.world_size))

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        # A local store keeps its artifacts beside it (not in ./mlruns of whatever the cwd is).
        location = (self.run_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite:") else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        at_ms = int(logged_at(metrics) * 1000)  # when trained, not when this child got to it
        self._pending += [Metric(k, v, at_ms, step) for k, v in scalars(metrics).items() if math.isfinite(v)]
        if time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self._flush()

    def _flush(self) -> None:
        for i in range(0, len(self._pending), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=self._pending[i:i + BATCH_METRICS])
        self._pending = []
        self._flushed_at = time.monotonic()

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None:
        if self.run_id is None:
            return
        self._flush()
        for key in CHECKPOINT_KEYS:
            if summary and summary.get(key):
                self.client.set_tag(self.run_id, f"vishwamai.{key}", str(summary[key]))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def summary(self) -> dict[str, Any]:
        if self.run_id is None:
            return {}
        return {"mlflow_run": f"run {self.run_id} in {self.uri} (UI: mlflow ui --backend-store-uri {self.uri})",
                "mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.uri}


    # In the training process, when the child did not finish within monitoring.mlflow.close_timeout_s.
    def left_behind(self, waited_s: float) -> dict[str, Any]:
        pending = self.run_dir / PENDING_FILE
        parent = {"parent_run_id": self.parent[0], "parent_experiment_id": self.parent[1]} if self.parent else {}
        pending.write_text(json.dumps({"tracking_uri": self.uri, "experiment": self.experiment, **parent}))
        command = f"python -m vishwamai.monitoring.mlflow_upload {self.run_dir}"
        message = (f"MLflow did not finish within monitoring.mlflow.close_timeout_s={waited_s:g}s (a slow or "
                   f"unreachable tracking server {self.uri}, or a busy machine); nothing is lost: the run's "
                   f"records are in {self.run_dir / 'metrics.jsonl'}. Upload them with: {command}")
        log.warning(message)
        return {"mlflow_pending": message}


def upload(run_dir: Path, tracking_uri: Optional[str] = None) -> str:
    """Send a finished run directory to MLflow (after left_behind): config as params, every record of
    metrics.jsonl, the summary and report.  A partial run the stopped child had created is deleted
    first.  Returns the new run id."""
    from types import SimpleNamespace

    run_dir = Path(run_dir).resolve()
    pending = json.loads((run_dir / PENDING_FILE).read_text()) if (run_dir / PENDING_FILE).is_file() else {}
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    cfg.monitoring.mlflow.tracking_uri = tracking_uri or pending.get("tracking_uri") or cfg.monitoring.mlflow.tracking_uri
    sink = MlflowSink(cfg, run_dir)
    if pending.get("parent_run_id"):
        sink.parent = (pending["parent_run_id"], pending["parent_experiment_id"])
    sink.start(SimpleNamespace(parallel=SimpleNamespace(world_size=1)))
    _delete_partial_runs(sink.client, sink.run_id, str(run_dir))
    with open(run_dir / METRICS_FILE) as fh:
        for line in fh:
            record = json.loads(line)
            sink.log(record.pop("step"), record)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    sink.close(summary)
    files = [run_dir / name for name in (REPORT_PNG, REPORT_MD) if (run_dir / name).is_file()]
    log_run_outputs(sink.uri, sink.run_id, summary, files)
    (run_dir / PENDING_FILE).unlink(missing_ok=True)
    return sink.run_id


def _delete_partial_runs(client, keep: str, run_dir: str) -> None:
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    for r in client.search_runs(experiments, f"tags.`vishwamai.run_dir` = '{run_dir}' and attributes.status = 'RUNNING'"):
        if r.info.run_id != keep:
            client.delete_run(r.info.run_id)


def log_run_outputs(tracking_uri: str, run_id: str, summary: dict[str, Any], files: list[Path]) -> None:
    """After the run: summary.json and the report into the (finished) MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_dict(run_id, summary, SUMMARY_FILE)
    for path in files:
        client.log_artifact(run_id, str(path))
