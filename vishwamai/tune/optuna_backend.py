"""Optuna backend: a study in an RDB storage that survives crashes and is shared by workers.

* Storage: `tuning.storage` (any SQLAlchemy URL; default sqlite:///RUN_DIR/optuna.db).
  A rerun with the same storage and study name resumes the study: finished trials
  count toward `tuning.num_trials`.
* Parallel: every process pointed at the same storage and study name (other pods,
  or the n_jobs-1 worker processes started here) takes trials from the shared study.
* Crashes: a running trial sends heartbeats; one whose process died is marked
  failed by the next worker and retried once with the same parameters.  A study
  restarted on the same host (a pod restart, a rerun after kill -9) does not wait
  for the heartbeat's grace period: a RUNNING trial whose process is gone (pid and
  start time) is failed and retried at once.
* Pruning: the trial's metric is reported at every evaluation; a pruned trial stops
  cleanly (checkpoint and logs written) and is recorded as PRUNED.
* Failures: a trial that raises (bad value, out-of-memory, NaN loss) is recorded as
  FAIL with its reason in the `fail_reason` user attribute; the study continues.
  A feature that is not implemented stops the study at once: every trial would fail.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vishwamai.errors import ConfigError, NotImplementedYet
from vishwamai.tune.results import StudyResult, TrialRecord
from vishwamai.tune.space import Param, apply_overrides
from vishwamai.tune.tracking import StudyRun
from vishwamai.tune.trial import (WORKER_ID, WORKER_STARTED, Recipe, Reporter, failure_reason, objective_value,
                                  trial_config, worker_is_gone)

# A writer waits this long for sqlite's lock instead of failing at once (parallel workers).
SQLITE_TIMEOUT_S = 120
PARENT_RUN_ATTR = "mlflow_parent_run_id"
SPACE_ATTR = "search_space"


class TrialError(Exception):
    """A trial failed; the study records it and goes on."""


def storage_url(cfg: DictConfig, run_dir: Path) -> str:
    return cfg.tuning.storage or f"sqlite:///{(run_dir / 'optuna.db').resolve()}"


def build_storage(tu: DictConfig, url: str):
    import optuna
    from sqlalchemy.exc import OperationalError

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    heartbeat: dict[str, Any] = {}
    if tu.heartbeat_s:
        retry, name = _retry_callback()
        heartbeat = {"heartbeat_interval": tu.heartbeat_s, "grace_period": 3 * tu.heartbeat_s, name: retry(max_retry=1)}
    for attempt in range(5):  # workers starting together may race to create the tables
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except OperationalError:
            if attempt == 4:
                raise
            time.sleep(1 + attempt)


def _retry_callback() -> tuple[type, str]:
    """Optuna >= 4.9 renamed the stale-trial retry callback and its storage argument."""
    from optuna import storages

    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return storages.RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback"
    return storages.RetryFailedTrialCallback, "failed_trial_callback"


def build_sampler(tu: DictConfig, params: list[Param]):
    from optuna import samplers

    seed = tu.sampler_seed
    if tu.sampler == "random":
        return samplers.RandomSampler(seed=seed)
    if tu.sampler == "grid":
        return samplers.GridSampler({p.key: p.grid_values() for p in params}, seed=seed)
    if tu.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401 - optuna imports it lazily, fail before the study instead
        except ImportError:
            raise ConfigError("tuning.sampler", "cmaes needs the `cmaes` package: pip install 'vishwamai[tune]'")
        return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return samplers.TPESampler(seed=seed)


def build_pruner(cfg: DictConfig):
    from optuna import pruners

    tu, t = cfg.tuning, cfg.training
    # The fewest steps a trial runs before it may be cut: the warmup, else one evaluation.
    min_resource = max(1, tu.pruner_warmup_steps or t.eval_every_n_steps or t.max_steps)
    if tu.pruner == "median":
        return pruners.MedianPruner(n_startup_trials=tu.pruner_startup_trials, n_warmup_steps=tu.pruner_warmup_steps)
    if tu.pruner == "successive_halving":
        return pruners.SuccessiveHalvingPruner(min_resource=min_resource)
    if tu.pruner == "hyperband":
        return pruners.HyperbandPruner(min_resource=min_resource, max_resource=t.max_steps)
    return pruners.NopPruner()


def suggest(trial, p: Param) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(p.key, p.low, p.high, step=p.step or 1)
    return trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.type == "log_float")


def counted_trials(study) -> int:
    """Trials that use up the budget: finished or running, except failures that were retried."""
    from optuna.trial import TrialState

    retry, _ = _retry_callback()
    trials = study.get_trials(deepcopy=False)
    retried = {retry.retried_trial_number(t) for t in trials} - {None}
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return sum(t.state in live and t.number not in retried for t in trials)


def fail_orphaned_trials(study) -> list[int]:
    """Fail, and queue again (as the heartbeat would), the RUNNING trials whose process on this host
    is gone: the earlier incarnation of a restarted study.  Returns their numbers."""
    import copy

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, retry = study._storage, _retry_callback()[0](max_retry=1)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not worker_is_gone(t.user_attrs.get("worker", ""), t.user_attrs.get("worker_started")):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"its process ({t.user_attrs['worker']}) "
                                                                    "died; the restarted study retries it")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t)
        except UpdateFinishedTrialError:  # another worker failed it first
            continue
    for t in failed:
        retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
    return [t.number for t in failed]


def _space_signature(params: list[Param]) -> dict:
    return {p.key: [p.type, p.low, p.high, p.step, list(p.choices)] for p in params}


class OptunaStudy:
    def __init__(self, cfg: DictConfig, params: list[Param], run_dir: Path, recipe: Recipe):
        import optuna

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.cfg, self.params, self.run_dir, self.recipe = cfg, params, run_dir, recipe
        self.tu = cfg.tuning
        self.url = storage_url(cfg, run_dir)
        if self.url.startswith("sqlite:///"):
            run_dir.mkdir(parents=True, exist_ok=True)
        self.study = optuna.create_study(
            storage=build_storage(self.tu, self.url), study_name=self.tu.study_name,
            direction=self.tu.direction, sampler=build_sampler(self.tu, params), pruner=build_pruner(cfg),
            load_if_exists=True)
        self._check_matches_stored_study()
        self.tracking = StudyRun(cfg, run_dir)

    def _check_matches_stored_study(self) -> None:
        """A resumed study must search the same space in the same direction."""
        signature = _space_signature(self.params)
        stored = self.study.user_attrs.get(SPACE_ATTR)
        if stored is None:
            self.study.set_user_attr(SPACE_ATTR, signature)
        elif stored != signature:
            raise ConfigError("tuning.search_space", f"differs from the one stored with study "
                                                     f"'{self.tu.study_name}' in {self.url}; use a new "
                                                     "tuning.study_name (or storage) for a new space")
        if self.study.direction.name.lower() != self.tu.direction:
            raise ConfigError("tuning.direction", f"study '{self.tu.study_name}' was created with "
                                                  f"direction={self.study.direction.name.lower()}")

    def enqueue(self) -> None:
        keys = {p.key for p in self.params}
        for i, values in enumerate(OmegaConf.to_container(self.tu.enqueue_trials, resolve=True)):
            unknown = set(values) - keys
            if unknown:
                raise ConfigError(f"tuning.enqueue_trials[{i}]", f"keys {sorted(unknown)} are not in tuning.search_space")
            try:
                apply_overrides(self.cfg, values)
            except Exception as e:  # noqa: BLE001 - an OmegaConf type/validation error
                raise ConfigError(f"tuning.enqueue_trials[{i}]", str(e).splitlines()[0]) from None
            # skip_if_exists: a resumed study or a second worker does not queue it twice.
            self.study.enqueue_trial(values, skip_if_exists=True)

    # ------------------------------------------------------------------ trials
    def objective(self, trial) -> float:
        import optuna

        values = {p.key: suggest(trial, p) for p in self.params}
        trial_dir = self.run_dir / "trials" / f"trial-{trial.number}"
        trial.set_user_attr("worker", WORKER_ID)
        trial.set_user_attr("worker_started", WORKER_STARTED)
        trial.set_user_attr("run_dir", str(trial_dir))

        def report(step: int, value: float) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        reporter = Reporter(self.tu.metric, report)
        try:
            trial_cfg = trial_config(self.cfg, values, trial_dir, self.tracking.uri)
            resume_from = self._checkpoints_of_retried_trial(trial)
            if resume_from:
                trial_cfg.training.resume = resume_from
                trial.set_user_attr("resumed_from", resume_from)
            summary = self.recipe(trial_cfg, extra_callbacks=[reporter])
            if reporter.stopped_at is not None:
                trial.set_user_attr("pruned_at_step", reporter.stopped_at)
                raise optuna.TrialPruned(f"pruned at step {reporter.stopped_at}")
            return objective_value(summary, self.tu.metric)
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - any trial failure is recorded, the study goes on
            trial.set_user_attr("fail_reason", failure_reason(e))
            if isinstance(e, NotImplementedYet):
                raise  # not in `catch`: every trial would fail the same way, so the study stops
            raise TrialError(failure_reason(e)) from e
        finally:
            _release_accelerator_memory()

    def _checkpoints_of_retried_trial(self, trial) -> str | None:
        """A retry of a trial whose process died continues from that trial's last checkpoint
        (when it saved any: checkpointing.every_n_steps > 0) instead of from step 0."""
        retry, _ = _retry_callback()
        trials = self.study.get_trials(deepcopy=False)
        original = retry.retried_trial_number(next(t for t in trials if t.number == trial.number))
        if original is None:
            return None
        old_dir = next(t for t in trials if t.number == original).user_attrs.get("run_dir")
        if old_dir and (Path(old_dir) / "checkpoints").is_dir():
            return old_dir
        return None

    def _stop_when_budget_spent(self, study, _trial) -> None:
        if counted_trials(study) >= self.tu.num_trials:
            study.stop()

    def optimize(self) -> None:
        import optuna

        # Before counting: a trial whose process died is failed (and re-queued) now.
        fail_orphaned_trials(self.study)
        if self.tu.heartbeat_s:
            optuna.storages.fail_stale_trials(self.study)
        remaining = self.tu.num_trials - counted_trials(self.study)
        if remaining <= 0:
            return
        self.study.optimize(self.objective, n_trials=remaining, timeout=self.tu.timeout_s, catch=(TrialError,),
                            callbacks=[self._stop_when_budget_spent], gc_after_trial=True)

    # ------------------------------------------------------------------- study
    def run(self, role: str = "main") -> StudyResult:
        """Run trials until the shared budget is spent. The main role also starts the
        n_jobs-1 extra workers and the study-level MLflow run."""
        self.enqueue()
        parent = self.study.user_attrs.get(PARENT_RUN_ATTR)
        run_id = self.tracking.start(self.tu.study_name, parent, _tracking_params(self.cfg, self.params))
        if run_id and parent is None:
            self.study.set_user_attr(PARENT_RUN_ATTR, run_id)
        workers = start_workers(self.cfg, self.run_dir, self.url) if role == "main" else []
        failed = True
        try:
            self.optimize()
            wait_workers(workers)
            result = self.result()
            if role == "main" and result.count("COMPLETE"):
                best = result.best()
                self.tracking.log_best(best.value, best.params, len(result.trials))
            failed = False
            return result
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.terminate()
            self.tracking.end(failed)

    def result(self) -> StudyResult:
        out = StudyResult("optuna", self.tu.study_name, self.tu.metric, self.tu.direction, storage=self.url)
        for t in self.study.get_trials(deepcopy=False):
            out.trials.append(TrialRecord(t.number, t.state.name, t.value, dict(t.params),
                                          t.user_attrs.get("fail_reason"), t.user_attrs.get("run_dir")))
        return out


def _tracking_params(cfg: DictConfig, params: list[Param]) -> dict[str, Any]:
    tu = cfg.tuning
    out = {f"space.{p.key}": f"{p.type}:{list(p.choices) if p.choices else [p.low, p.high]}" for p in params}
    out.update(framework="optuna", sampler=tu.sampler, pruner=tu.pruner, metric=tu.metric,
               direction=tu.direction, num_trials=tu.num_trials)
    return out


def _release_accelerator_memory() -> None:
    """After a trial (an out-of-memory one in particular) the next starts with a clean cache."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------- workers
def worker_config_path(run_dir: Path) -> Path:
    return run_dir / "tuning_worker_config.yaml"


def start_workers(cfg: DictConfig, run_dir: Path, url: str) -> list[subprocess.Popen]:
    """n_jobs-1 extra processes on the same storage: real parallelism, each with its own RNG."""
    n = cfg.tuning.n_jobs - 1
    if n <= 0:
        return []
    worker_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    worker_cfg.tuning.n_jobs, worker_cfg.tuning.storage = 1, url
    path = worker_config_path(run_dir)
    OmegaConf.save(worker_cfg, path)
    return [subprocess.Popen([sys.executable, "-m", "vishwamai.tune", "--worker", str(path)]) for _ in range(n)]


def wait_workers(workers: list[subprocess.Popen]) -> None:
    for proc in workers:
        if proc.wait() != 0:
            print(f"warning: tuning worker pid {proc.pid} exited with code {proc.returncode}; "
                  "its unfinished trial is retried by heartbeat", file=sys.stderr)


def run_optuna(cfg: DictConfig, params: list[Param], run_dir: Path, recipe: Recipe,
               role: str = "main") -> StudyResult:
    return OptunaStudy(cfg, params, run_dir, recipe).run(role)


def load_study(storage: str, study_name: str):
    """The stored study (e.g. to inspect trials from a notebook)."""
    import optuna

    return optuna.load_study(study_name=study_name, storage=storage)


__all__ = ["OptunaStudy", "TrialError", "build_pruner", "build_sampler", "counted_trials", "load_study",
           "run_optuna", "storage_url", "suggest"]

