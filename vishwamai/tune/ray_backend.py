"""Ray Tune backend (optional: `pip install 'vishwamai[ray]'`).

Same search space, metric and trial runs as the Optuna backend; the schedulers
play the pruner's part:
  tuning.pruner  median -> MedianStoppingRule, successive_halving -> ASHA,
                 hyperband -> HyperBand, none -> FIFO, pbt -> PopulationBasedTraining (pbt.py)
  tuning.sampler random -> Ray's random search, tpe / cmaes -> OptunaSearch with that
                 sampler, grid -> grid_search over the grid, bohb -> TuneBOHB with
                 HyperBandForBOHB (needs `hpbandster` and `ConfigSpace`)
Results live in <tuning.storage or RUN_DIR/ray>/<study_name>; a rerun restores the
unfinished experiment.  tuning.enqueue_trials are evaluated first (points_to_evaluate).
Trials run in Ray worker processes, `tuning.n_jobs` at a time.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vishwamai.errors import ConfigError
from vishwamai.tune.results import StudyResult, TrialRecord
from vishwamai.tune.space import Param
from vishwamai.tune.trial import Recipe, Reporter, TrialFailed, failure_reason, objective_value, trial_config

INSTALL_HINT = "pip install 'vishwamai[ray]'"


def require_ray():
    """Ray Tune, or a ConfigError naming tuning.framework when it is not installed."""
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise ConfigError("tuning.framework", f"'ray' needs Ray Tune, which is not installed ({e.name} is "
                                              f"missing): {INSTALL_HINT}, or use tuning.framework=optuna") from None
    return ray, tune


def require_bohb() -> None:
    """TuneBOHB's own packages, checked before the study (Ray's error would come from a worker)."""
    import importlib.util

    missing = [m for m in ("hpbandster", "ConfigSpace") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError("tuning.sampler", f"bohb needs the packages {missing} (pip install hpbandster "
                                            f"ConfigSpace, or {INSTALL_HINT}), or use another tuning.sampler")


def check_ray_study(cfg: DictConfig, params: list[Param]) -> None:
    """What a Ray study would refuse, checked before the first trial (preflight)."""
    require_ray()
    tu = cfg.tuning
    if tu.sampler == "bohb":
        require_bohb()
    if tu.pruner == "pbt":
        from vishwamai.tune import pbt

        pbt.check_sampler(tu)
        pbt.perturbed(params)


def ray_domain(tune, p: Param, grid: bool):
    if grid:
        return tune.grid_search(p.grid_values())
    if p.type == "categorical":
        return tune.choice(list(p.choices))
    if p.type == "int":
        return tune.qrandint(p.low, p.high, p.step or 1)  # high is inclusive
    if p.type == "log_float":
        return tune.loguniform(p.low, p.high)
    return tune.quniform(p.low, p.high, p.step) if p.step else tune.uniform(p.low, p.high)


def _report_fn(ray, tune):
    """ray.tune.report (Ray >= 2.43), else ray.train.report (older 2.x)."""
    return getattr(tune, "report", None) or ray.train.report


def trial_dirname(trial) -> str:
    """Ray's folder of a trial, named like the trial's run dir under RUN_DIR/trials: trial-<Ray's id>.
    (Ids are unique; a counter kept here would not be: Ray calls copies of this function.)"""
    return f"trial-{trial.trial_id}"


def _trial_id(ray, tune) -> str:
    get_context = getattr(tune, "get_context", None) or ray.train.get_context
    return get_context().get_trial_id()


def _trainable(values: dict[str, Any], *, base: dict, run_dir: str, tracking_uri: str | None,
               recipe: Recipe) -> None:
    """One Ray trial (runs in a Ray worker process).  Started again by Ray with a checkpoint (PBT's
    exploit, or a restored study) it resumes from that checkpoint; otherwise from its own run dir's."""
    from vishwamai.config import VishwamaiConfig
    from vishwamai.tune import pbt

    ray, tune = require_ray()
    cfg = OmegaConf.merge(OmegaConf.structured(VishwamaiConfig), base)
    tu, metric = cfg.tuning, cfg.tuning.metric
    report = _report_fn(ray, tune)
    trial_id = _trial_id(ray, tune)
    trial_cfg = trial_config(cfg, values, Path(run_dir) / "trials" / f"trial-{trial_id}", tracking_uri)
    trial_cfg.training.resume = "auto"  # a restarted trial continues from what it saved, if anything
    if pauses_trials(tu):  # a paused trial resumes from the checkpoint it reported
        interval = tu.pbt.perturbation_interval if tu.pruner == "pbt" else cfg.training.eval_every_n_steps
        trial_cfg.checkpointing.every_n_steps = interval

        def send_checkpoint(step: int, value: float, checkpoint: Path | None) -> None:
            report({metric: value, "step": step},
                   checkpoint=tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)

        callbacks = [pbt.PbtReporter(metric, trial_id, interval, send_checkpoint), pbt.ApplyHyperparameters()]
    else:
        def send(step: int, value: float) -> bool:
            report({metric: value, "step": step})  # the scheduler stops the trial inside this call
            return False

        callbacks = [Reporter(metric, send)]
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored:
        if restored:
            pbt.restore_from(Path(restored), trial_cfg, trial_id, values, Path(run_dir))
        try:
            summary = recipe(trial_cfg, extra_callbacks=callbacks)
            objective_value(summary, metric)  # raises on a non-finite result
        except Exception as e:  # noqa: BLE001 - Ray records the trial as errored; its reason as a plain
            raise TrialFailed(failure_reason(e)) from None  # exception (Ray copies it; ours need arguments)


def pauses_trials(tu: DictConfig) -> bool:
    """Schedulers that pause trials and resume them later (or, PBT, from another trial's state):
    their trials report a checkpoint with the metric."""
    return tu.pruner in ("pbt", "hyperband") or tu.sampler == "bohb"


def _scheduler(cfg: DictConfig, params: list[Param], tune):
    from ray.tune import schedulers

    tu, t = cfg.tuning, cfg.training
    grace = max(1, tu.pruner_warmup_steps or t.eval_every_n_steps or t.max_steps)
    # Ray stops (kills) a trial whose time reaches max_t: one step past the end lets a trial that
    # gets there write its final checkpoint and summary.
    max_t = t.max_steps + 1
    if tu.pruner == "pbt":
        from vishwamai.tune import pbt

        return pbt.scheduler(cfg, params, lambda p: ray_domain(tune, p, grid=False))
    # HyperBand's brackets count in reports (training_iteration: one per evaluation): its rung
    # budgets then fall on evaluations instead of between them.
    evaluations = -(-t.max_steps // (t.eval_every_n_steps or t.max_steps))
    if tu.sampler == "bohb":
        return schedulers.HyperBandForBOHB(time_attr="training_iteration", max_t=evaluations)
    if tu.pruner == "median":
        return schedulers.MedianStoppingRule(time_attr="step", grace_period=grace,
                                             min_samples_required=max(1, tu.pruner_startup_trials))
    if tu.pruner == "successive_halving":
        return schedulers.ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace)
    if tu.pruner == "hyperband":
        return schedulers.HyperBandScheduler(time_attr="training_iteration", max_t=evaluations)
    return schedulers.FIFOScheduler()


def _search(tu: DictConfig):
    """The search algorithm; tuning.enqueue_trials become its points_to_evaluate (tried first)."""
    points = OmegaConf.to_container(tu.enqueue_trials, resolve=True) or None
    if tu.sampler == "grid":
        if points:
            raise ConfigError("tuning.enqueue_trials", "a grid search already tries every point; leave it empty")
        return None
    if tu.sampler == "random":
        from ray.tune.search import BasicVariantGenerator

        # Tune applies max_concurrent_trials only to searchers it wraps: this one takes it itself.
        return BasicVariantGenerator(points_to_evaluate=points, random_state=tu.sampler_seed, max_concurrent=tu.n_jobs)
    if tu.sampler == "bohb":
        require_bohb()
        from ray.tune.search.bohb import TuneBOHB

        return TuneBOHB(points_to_evaluate=points, seed=tu.sampler_seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = (optuna.samplers.CmaEsSampler(seed=tu.sampler_seed) if tu.sampler == "cmaes"
               else optuna.samplers.TPESampler(seed=tu.sampler_seed))
    return OptunaSearch(sampler=sampler, points_to_evaluate=points)


def run_ray(cfg: DictConfig, params: list[Param], run_dir: Path, recipe: Recipe) -> StudyResult:
    ray, tune = require_ray()
    tu = cfg.tuning
    # A caller's own ray.init (e.g. with num_cpus) is kept; an instance started here is shut down at the end,
    # so the process is left as it was found (a notebook, the next study, a test).
    started = not ray.is_initialized()
    if started:
        # A new local instance needs no dashboard; joining a cluster (an address, or RAY_ADDRESS as
        # `ray job submit` sets it) takes no start-up options.
        # "local": always a new instance, never one a stale /tmp/ray/ray_current_cluster points to.
        local = not (tu.ray_address or os.environ.get("RAY_ADDRESS"))
        ray.init(address="local" if local else tu.ray_address, ignore_reinit_error=True, log_to_driver=True,
                 **({"include_dashboard": False} if local else {}))
    try:
        return _fit(cfg, params, run_dir, recipe, ray, tune)
    finally:
        if started:
            ray.shutdown()


def _fit(cfg: DictConfig, params: list[Param], run_dir: Path, recipe: Recipe, ray, tune) -> StudyResult:
    """The study on the running Ray instance: a new Tuner, or the interrupted one restored from its storage."""
    from vishwamai.tune.tracking import tracking_uri

    tu = cfg.tuning
    grid = tu.sampler == "grid"
    run_config = getattr(tune, "RunConfig", None) or ray.train.RunConfig  # moved to ray.tune in 2.43
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=OmegaConf.to_container(cfg, resolve=True), run_dir=str(run_dir),
                             tracking_uri=tracking_uri(cfg, run_dir), recipe=recipe),  # pickled by name
        {"cpu": tu.ray_cpus_per_trial, "gpu": tu.ray_gpus_per_trial})
    # tuning.storage: Ray's storage_path (a folder or an s3:// / gs:// URI); default RUN_DIR/ray.
    storage = tu.storage or str(run_dir / "ray")
    path = f"{storage.rstrip('/')}/{tu.study_name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable)
    else:
        search = _search(tu)
        tuner = tune.Tuner(
            trainable,
            param_space={p.key: ray_domain(tune, p, grid) for p in params},
            tune_config=tune.TuneConfig(
                metric=tu.metric, mode="min" if tu.direction == "minimize" else "max",
                num_samples=1 if grid else tu.num_trials, scheduler=_scheduler(cfg, params, tune),
                search_alg=search, time_budget_s=tu.timeout_s,
                # BasicVariantGenerator limits itself (_search); Tune wraps the other searchers.
                max_concurrent_trials=None if type(search).__name__ == "BasicVariantGenerator" else tu.n_jobs,
                trial_dirname_creator=trial_dirname),
            run_config=run_config(name=tu.study_name, storage_path=str(storage)),
        )
    return _result(cfg, tuner.fit(), path, run_dir)


def _result(cfg: DictConfig, grid_result, storage: str, run_dir: Path) -> StudyResult:
    """Trials numbered in the order Ray created them (the result grid's order)."""
    from vishwamai.tune.pbt import read_exploits

    tu = cfg.tuning
    out = StudyResult("ray", tu.study_name, tu.metric, tu.direction, storage=storage)
    numbers: dict[str, int] = {}
    for number, r in enumerate(grid_result):
        trial_id = Path(r.path).name.removeprefix("trial-")
        numbers[trial_id] = number
        metrics = r.metrics or {}
        if r.error is not None:
            state, value = "FAIL", None
        else:
            value = metrics.get(tu.metric)
            # A trial the scheduler stopped never reached the last step.
            state = "COMPLETE" if metrics.get("step") == cfg.training.max_steps else "PRUNED"
        params = {k: v for k, v in (r.config or {}).items()}
        out.trials.append(TrialRecord(number, state, value, params, None if r.error is None else _reason(r.error),
                                      str(run_dir / "trials" / f"trial-{trial_id}")))
    if tu.pruner == "pbt":
        out.exploits = [{**e, "trial": numbers.get(e["trial"], e["trial"]),
                         "from_trial": numbers.get(e["from_trial"], e["from_trial"])} for e in read_exploits(run_dir)]
    return out


def _reason(error: BaseException) -> str:
    """The trial's own failure reason, out of Ray's wrapper (its message ends with our TrialFailed line)."""
    text = str(error).strip().splitlines()
    ours = [line for line in text if line.startswith(f"{TrialFailed.__module__}.TrialFailed: ")
            or line.startswith("TrialFailed: ")]
    return (ours[-1].split(": ", 1)[1] if ours else f"{type(error).__name__}: {text[-1] if text else ''}")[:1000]
