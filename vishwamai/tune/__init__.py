"""Hyperparameter tuning: `tuning.enabled=true` turns a training run into a study.

    python -m vishwamai.training_v2 tuning.enabled=true [tuning.framework=optuna|ray] [key=value ...]

The command line chooses: with `tuning.enabled=true` it calls `run_tuning(cfg, run)`, else `run(cfg)`.
Each trial is an ordinary training run (the recipe handed in: training_v2.run) in
RUN_DIR/trials/trial-<n>, with the values sampled from `tuning.search_space` applied as overrides.  The best
values are written to RUN_DIR/best_overrides.yaml (see results.py).  Backends:
optuna_backend.py (default) and ray_backend.py; katib.py renders the same search as
a Katib Experiment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vishwamai.errors import ConfigError
from vishwamai.tune.space import Param, parse_space
from vishwamai.tune.trial import KatibStdout, Recipe

__all__ = ["build_tuning_callbacks", "preflight", "run_tuning"]


def build_tuning_callbacks(cfg: DictConfig) -> list:
    """Callbacks every run gets from the tuning group (trials or plain runs under Katib)."""
    return [KatibStdout()] if cfg.tuning.katib_stdout else []


def preflight(cfg: DictConfig) -> list[Param]:
    """Everything a trial would refuse, checked once before the first trial (which would otherwise fail
    one by one): the space, the config it is applied to, the backends (Ray, W&B, MLflow), the data."""
    from vishwamai.config import validate
    from vishwamai.data import load_token_data
    from vishwamai.monitoring import check_backends
    from vishwamai.tune.trial import trial_config

    validate(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("tuning.enabled", "run a study from one process (not under torchrun); "
                                            "parallelise with tuning.n_jobs or workers sharing tuning.storage")
    params = parse_space(cfg)
    if cfg.tuning.framework == "ray":
        from vishwamai.tune.ray_backend import check_ray_study

        check_ray_study(cfg, params)
    base = trial_config(cfg, {}, Path(cfg.run_dir))
    check_backends(base)
    if not any(p.key.startswith("data.") for p in params):
        load_token_data(base.data)  # a missing corpus or tokenizer; the token cache then serves every trial
    return params


def run_tuning(cfg: DictConfig, recipe: Recipe, role: str = "main") -> dict[str, Any]:
    """Run (or resume, or join) the study `cfg.tuning` describes, each trial a `recipe(trial_cfg,
    extra_callbacks=...)` call (training_v2.run); returns the tuning summary."""
    from vishwamai.tune.results import print_results, write_results

    params = preflight(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    if cfg.tuning.framework == "ray":
        from vishwamai.tune.ray_backend import run_ray

        result = run_ray(cfg, params, run_dir, recipe)
    else:
        from vishwamai.tune.optuna_backend import run_optuna

        result = run_optuna(cfg, params, run_dir, recipe, role)
    if role != "main":
        return {"trials": len(result.trials)}
    summary = write_results(result, run_dir)
    print_results(summary)
    return summary
