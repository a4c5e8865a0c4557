"""Hyperparameter tuning: search-space validation, a real Optuna study (sqlite storage)
with pruning, a failing trial, resume and parallel workers in new processes, the checks a
study makes before its first trial, and the Ray backend's missing-install error (the Ray
backend itself: test_tune_ray.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from omegaconf import OmegaConf

from vishwamai.errors import ConfigError, NotImplementedYet
from vishwamai.training_v2 import compose_config, study
from vishwamai.tune.space import overrides_as_cli, overrides_as_nested, parse_space

REPO = Path(__file__).resolve().parents[1]

# A space where some configs are clearly worse (lr 1e-4 barely moves in 3 steps) and
# one value makes a trial raise (d_model=64 is not divisible by 3 heads).
SPACE = ("++tuning.search_space={model.dropout_rate: null, training.optimizer.weight_decay: null, "
         "model.n_heads: {type: categorical, choices: [2, 3]}}")
# Trials 0-2 are fixed (run first, in this order): good, bad (pruned), failing.
ENQUEUED = ("tuning.enqueue_trials=[{training.optimizer.lr: 3e-3, model.n_heads: 2}, "
            "{training.optimizer.lr: 1e-4, model.n_heads: 2}, {training.optimizer.lr: 1e-3, model.n_heads: 3}]")


def study_overrides(tiny_overrides: list[str]) -> list[str]:
    return tiny_overrides + [
        "training.max_steps=12", "training.eval_every_n_steps=3", "training.log_every_n_steps=1",
        "tuning.enabled=true", "tuning.pruner=median", "tuning.pruner_startup_trials=1",
        "tuning.sampler=random", "tuning.sampler_seed=0", SPACE, ENQUEUED,
    ]


def stored_trials(run_dir: Path):
    return optuna.load_study(study_name="vishwamai", storage=f"sqlite:///{run_dir / 'optuna.db'}").get_trials()


# ----------------------------------------------------------------- search space
@pytest.mark.parametrize("space, key, message", [
    ("{training.optimizer.lrr: {type: float, low: 0.1, high: 1.0}}", "tuning.search_space.training.optimizer.lrr",
     "not a config key"),
    ("{training.optimizer: {type: float, low: 0.1, high: 1.0}}", "tuning.search_space.training.optimizer",
     "config group"),
    ("{training.batch_size: {type: float, low: 0.5, high: 2.0}}", "tuning.search_space.training.batch_size",
     "does not fit"),
    ("{training.optimizer.lr: {type: normal, low: 0.1, high: 1.0}}", "tuning.search_space.training.optimizer.lr",
     "`type`"),
    ("{training.optimizer.lr: {type: float, low: 1.0, high: 0.1}}", "tuning.search_space.training.optimizer.lr",
     "below"),
    ("{training.optimizer.lr: {type: log_float, low: 0.0, high: 0.1}}", "tuning.search_space.training.optimizer.lr",
     "> 0"),
    ("{model.n_heads: {type: categorical, choices: []}}", "tuning.search_space.model.n_heads", "choices"),
    ("{tuning.num_trials: {type: int, low: 1, high: 3}}", "tuning.search_space.tuning.num_trials", "cannot be tuned"),
    ("{training.optimizer.lr: null, training.optimizer.weight_decay: null, model.dropout_rate: null}",
     "tuning.search_space", "empty"),
])
def test_search_space_errors_name_the_key(space, key, message):
    cfg = compose_config([f"++tuning.search_space={space}"], run_dir="/tmp/unused")
    with pytest.raises(ConfigError, match=message) as info:
        parse_space(cfg)
    assert info.value.key == key


def test_default_space_and_override_formats_round_trip():
    cfg = compose_config([], run_dir="/tmp/unused")
    params = {p.key: p for p in parse_space(cfg)}
    assert params["training.optimizer.lr"].type == "log_float"
    assert {"training.optimizer.weight_decay", "model.dropout_rate"} <= set(params)
    best = {"training.optimizer.lr": 0.00123, "model.n_heads": 2, "training.compile": False}
    from_cli = compose_config(overrides_as_cli(best), run_dir="/tmp/unused")
    merged = OmegaConf.merge(cfg, overrides_as_nested(best))
    for c in (from_cli, merged):
        assert (c.training.optimizer.lr, c.model.n_heads, c.training.compile) == (0.00123, 2, False)


def test_ray_selected_but_not_installed_is_a_clear_error(tmp_path, tiny_overrides):
    pytest.importorskip("optuna")
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed: the missing-install error cannot be shown")
    except ImportError:
        pass
    cfg = compose_config(tiny_overrides + ["tuning.enabled=true", "tuning.framework=ray"], run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"pip install 'vishwamai\[ray\]'") as info:
        study(cfg)
    assert info.value.key == "tuning.framework"
    assert not (tmp_path / "trials").exists()


# ------------------------------------------------------------- study or run
def test_the_command_line_chooses_a_study_and_run_trains_one_model(tmp_path, tiny_overrides, run_module):
    """`python -m vishwamai.training_v2 tuning.enabled=true` runs a study (trials are ordinary runs);
    run(cfg) is one run and refuses a study's config rather than training one model in its place."""
    from vishwamai.training_v2 import run

    overrides = study_overrides(tiny_overrides) + [
        "tuning.num_trials=1", "tuning.enqueue_trials=[]", "tuning.pruner=none", "training.max_steps=2",
        "++tuning.search_space={model.n_heads: null}"]
    proc = run_module("vishwamai.training_v2", *overrides, f"hydra.run.dir={tmp_path / 'study'}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [t.state.name for t in stored_trials(tmp_path / "study")] == ["COMPLETE"]
    assert json.loads((tmp_path / "study/trials/trial-0/summary.json").read_text())["steps"] == 2
    assert json.loads((tmp_path / "study/tuning_summary.json").read_text())["trials_complete"] == 1

    with pytest.raises(ConfigError) as info:
        run(compose_config(overrides, run_dir=str(tmp_path / "one")))
    assert info.value.key == "tuning.enabled"
    assert not (tmp_path / "one").exists()


# ------------------------------------------------------------------ optuna study
def test_optuna_study_prunes_survives_failure_and_resumes_in_parallel_processes(tmp_path, tiny_overrides):
    run_dir = tmp_path / "study"
    overrides = study_overrides(tiny_overrides)
    summary = study(compose_config(overrides + ["tuning.num_trials=4"], run_dir=str(run_dir)))

    trials = stored_trials(run_dir)
    states = [t.state.name for t in trials]
    assert len(trials) == 4 and states[:3] == ["COMPLETE", "PRUNED", "FAIL"]
    good, bad, failed = trials[:3]
    # The slow trial was cut at an evaluation before the end, after doing worse than the good one.
    pruned_at = bad.user_attrs["pruned_at_step"]
    assert pruned_at < 12 and bad.intermediate_values[pruned_at] > good.intermediate_values[pruned_at]
    bad_records = (run_dir / "trials" / "trial-1" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(bad_records[-1])["step"] == pruned_at
    assert "model.n_heads" in failed.user_attrs["fail_reason"]
    assert good.value == pytest.approx(json.loads((run_dir / "trials/trial-0/summary.json").read_text())["final_val_loss"])

    # The best trial's values, ready to use as a YAML primary config or CLI overrides.
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert summary["best_value"] == pytest.approx(best.value)
    body = yaml.safe_load((run_dir / "best_overrides.yaml").read_text())
    assert body["training"]["optimizer"]["lr"] == pytest.approx(best.params["training.optimizer.lr"])
    cli = (run_dir / "best_overrides.txt").read_text().split()
    assert compose_config(cli, run_dir="/tmp/unused").model.n_heads == best.params["model.n_heads"]
    assert summary["trials_failed"] == 1 and summary["trials_pruned"] >= 1

    # Resume from storage in two new processes at once: they share the study and add 4 trials.
    cmd = [sys.executable, "-m", "vishwamai.training_v2", *overrides, "tuning.num_trials=8",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = stored_trials(run_dir)
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))) and 8 <= len(trials) <= 9  # at most one extra from the race
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in trials)
    assert trials[4].state.name != "WAITING" and trials[0].params == good.params  # old trials untouched
    workers = {t.user_attrs["worker"] for t in trials[4:]}
    assert len(workers) == 2, "both processes should have run trials"
    dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(dirs) == len(trials)
    assert all(Path(t.user_attrs["run_dir"], "config.yaml").is_file() for t in trials if t.state.name != "FAIL")
    assert "best trial" in outputs[0] and "best_overrides.yaml" in outputs[0]

    # Budget spent: a rerun adds nothing and reports the same best trial.
    again = study(compose_config(overrides + ["tuning.num_trials=8"], run_dir=str(run_dir)))
    assert len(stored_trials(run_dir)) == len(trials) and again["best_value"] <= summary["best_value"]


def test_resumed_study_must_keep_its_search_space(tmp_path, tiny_overrides):
    run_dir = tmp_path / "study"
    overrides = study_overrides(tiny_overrides) + ["tuning.num_trials=1", "tuning.enqueue_trials=[]"]
    study(compose_config(overrides, run_dir=str(run_dir)))
    changed = overrides + ["++tuning.search_space={training.optimizer.lr: {type: float, low: 0.001, high: 0.01}}"]
    with pytest.raises(ConfigError) as info:
        study(compose_config(changed, run_dir=str(run_dir)))
    assert info.value.key == "tuning.search_space"


def test_unimplemented_feature_stops_the_study_instead_of_failing_every_trial(tmp_path, tiny_overrides):
    cfg = compose_config(study_overrides(tiny_overrides) + [
        "tuning.num_trials=3", "tuning.enqueue_trials=[]", "amp.enabled=true", "amp.opt_level=O2",
        "distillation.pruning.enabled=true"],
        run_dir=str(tmp_path))
    # Found by the study's preflight (validate): no trial starts at all.
    with pytest.raises(NotImplementedYet, match="amp.opt_level=O2 with distillation.pruning"):
        study(cfg)
    db = tmp_path / "optuna.db"
    assert not db.exists() or not any(s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{db}"))


def test_all_trials_failing_is_an_error_with_the_reasons(tmp_path, tiny_overrides):
    """A diverging trial (NaN -> NonFiniteLossError) and an invalid one are both recorded as failed."""
    from vishwamai.tune.results import TuningError

    overrides = study_overrides(tiny_overrides) + [
        "tuning.num_trials=2", "training.max_consecutive_bad_steps=2", "training.grad_clip=0",
        "training.scheduler.warmup_steps=0",
        "++tuning.search_space={training.optimizer.lr: {type: categorical, choices: [1.0e6, 1.0e7]}}",
        "tuning.enqueue_trials=[{training.optimizer.lr: 1.0e6, model.n_heads: 2}, "
        "{training.optimizer.lr: 1.0e7, model.n_heads: 3}]"]
    with pytest.raises(TuningError, match="no trial"):
        study(compose_config(overrides, run_dir=str(tmp_path)))
    trials = stored_trials(tmp_path)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert trials[0].user_attrs["fail_reason"].startswith("NonFiniteLossError")
    assert "n_heads" in trials[1].user_attrs["fail_reason"]


@pytest.mark.slow
def test_n_jobs_runs_trials_in_worker_processes(tmp_path, tiny_overrides):
    overrides = study_overrides(tiny_overrides) + [
        "training.max_steps=60", "training.eval_every_n_steps=20", "tuning.num_trials=6", "tuning.n_jobs=2",
        "tuning.pruner=none", "tuning.enqueue_trials=[]",
        "++tuning.search_space={model.n_heads: null, training.optimizer.lr: {type: log_float, low: 1e-4, high: 3e-3}}"]
    study(compose_config(overrides, run_dir=str(tmp_path)))
    trials = stored_trials(tmp_path)
    assert 6 <= len(trials) <= 7 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2


@pytest.mark.slow
def test_a_trial_whose_process_died_is_retried_from_its_last_checkpoint(tmp_path, tiny_overrides):
    """Kill a study mid-trial; the next process fails the stale trial (heartbeat) and reruns its
    values, continuing from the dead trial's last periodic checkpoint."""
    import signal
    import time

    run_dir = tmp_path / "study"
    overrides = study_overrides(tiny_overrides) + [
        "training.max_steps=3000", "training.eval_every_n_steps=1000", "checkpointing.every_n_steps=5",
        "tuning.heartbeat_s=1", "tuning.num_trials=1", "tuning.pruner=none", "tuning.enqueue_trials=[]",
        "++tuning.search_space={model.n_heads: null}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "vishwamai.training_v2", *overrides], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoints = run_dir / "trials" / "trial-0" / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoints.glob("step-*")):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [t.state.name for t in stored_trials(run_dir)] == ["RUNNING"]
    last = max(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    time.sleep(4)  # > 3 heartbeats: the trial is stale
    again = [o for o in overrides if not o.startswith(("training.max_steps", "hydra."))]
    study(compose_config(again + [f"training.max_steps={last + 4}"], run_dir=str(run_dir)))
    trials = stored_trials(run_dir)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params
    assert trials[1].user_attrs["resumed_from"] == str(run_dir / "trials" / "trial-0")
    steps = [json.loads(r)["step"] for r in (run_dir / "trials/trial-1/metrics.jsonl").read_text().splitlines()]
    assert steps[0] > 1 and steps[-1] == last + 4


@pytest.mark.slow  # creating an MLflow sqlite store takes seconds
def test_trial_runs_nest_under_the_study_mlflow_run(tmp_path, tiny_overrides):
    from mlflow.tracking import MlflowClient

    overrides = study_overrides(tiny_overrides) + [
        "monitoring.enabled=true", "monitoring.tensorboard.enabled=false", "monitoring.mlflow.enabled=true",
        "tuning.num_trials=2", "tuning.enqueue_trials=[]", "++tuning.search_space={model.n_heads: null}"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        study(compose_config(overrides, run_dir=str(tmp_path)))
    except NotImplementedYet as e:
        assert "mlflow" in str(e)
        (study_run,) = client.search_runs([client.get_experiment_by_name("vishwamai").experiment_id])
        assert study_run.info.status == "FAILED" and study_run.data.tags["vishwamai.study"] == "vishwamai"
        pytest.skip("the monitoring MLflow sink is not built yet: trial-run nesting untested")
    experiment = client.get_experiment_by_name("vishwamai")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "vishwamai.study" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert "best_value" in parent.data.metrics


def test_a_study_leaves_the_callers_tracking_uri_as_it_found_it(tmp_path, tiny_overrides, monkeypatch):
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI: a study that left it set sent the next study
    in the same process (which honours that variable) into its own store."""
    from vishwamai.tune.tracking import StudyRun

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_config(study_overrides(tiny_overrides) + ["monitoring.enabled=true", "monitoring.mlflow.enabled=true"],
                         run_dir=str(tmp_path))
    parent = StudyRun(cfg, tmp_path)
    parent.start("s", None, {"x": 1})
    assert os.environ.get("MLFLOW_TRACKING_URI") == parent.uri  # MLflow's export, for its subprocesses
    parent.end()
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.slow
@pytest.mark.parametrize("sampler, pruner", [("tpe", "hyperband"), ("cmaes", "successive_halving"),
                                             ("grid", "none"), ("random", "median")])
def test_every_sampler_and_pruner_runs_a_study(tmp_path, tiny_overrides, sampler, pruner):
    overrides = study_overrides(tiny_overrides) + [
        f"tuning.sampler={sampler}", f"tuning.pruner={pruner}", "tuning.num_trials=3", "tuning.enqueue_trials=[]",
        "training.max_steps=6",
        "++tuning.search_space={model.n_heads: null, training.optimizer.lr: {type: float, low: 0.001, high: 0.003, "
        "step: 0.001}, training.batch_size: {type: int, low: 2, high: 4, step: 2}}"]
    summary = study(compose_config(overrides, run_dir=str(tmp_path)))
    trials = stored_trials(tmp_path)
    assert len(trials) == 3 and summary["trials_complete"] >= 1
    for t in trials:
        assert any(t.params["training.optimizer.lr"] == pytest.approx(v) for v in (0.001, 0.002, 0.003))
        assert t.params["training.batch_size"] in (2, 4)
    if sampler == "grid":
        assert len({tuple(t.params.values()) for t in trials}) == 3  # no grid point twice


# --------------------------------------------------------------- restart and preflight
def _dead_process() -> tuple[str, float]:
    """The WORKER_ID and start time of a process of this host that has exited."""
    import socket

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return f"{socket.gethostname()}-{proc.pid}", started


def test_restarted_study_fails_and_retries_its_dead_trials_at_once(tmp_path, tiny_overrides):
    """Re-run within the heartbeat grace period (the pod-restart case): the earlier incarnation's RUNNING
    trial is failed and retried at once, so the study still finishes num_trials trials."""
    from vishwamai.tune.trial import WORKER_ID, WORKER_STARTED

    overrides = study_overrides(tiny_overrides) + [
        "tuning.num_trials=2", "tuning.enqueue_trials=[]", "tuning.heartbeat_s=60", "tuning.pruner=none",
        "training.max_steps=3", "++tuning.search_space={model.n_heads: null}"]
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=60)
    stored = optuna.create_study(storage=storage, study_name="vishwamai")
    worker, started = _dead_process()
    dead = stored.ask({"training.optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)})
    dead.set_user_attr("worker", worker)
    dead.set_user_attr("worker_started", started)
    alive = stored.ask()  # a live worker's trial (this process) is left alone
    alive.set_user_attr("worker", WORKER_ID)
    alive.set_user_attr("worker_started", WORKER_STARTED)
    storage.record_heartbeat(dead._trial_id)  # fresh: the heartbeat alone would wait 180 s

    summary = study(compose_config(overrides, run_dir=str(tmp_path)))
    trials = stored_trials(tmp_path)
    assert trials[0].state.name == "FAIL" and "died" in trials[0].user_attrs["fail_reason"]
    assert trials[1].state.name == "RUNNING"
    retry = trials[2]
    assert retry.state.name == "COMPLETE" and retry.params == trials[0].params
    assert summary["trials_complete"] == 1 and len(trials) == 3  # 2 counted: the live one and the retry


def test_a_study_whose_wandb_cannot_be_used_fails_before_the_first_trial(tmp_path, tiny_overrides, monkeypatch):
    """The design document's search line with W&B on but no key: one clear error, no trial started."""
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_config(study_overrides(tiny_overrides) + ["monitoring.enabled=true", "monitoring.wandb.enabled=true",
                                                            "tuning.num_trials=3"], run_dir=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        study(cfg)
    assert err.value.key == "monitoring.wandb.enabled"
    assert "WANDB_API_KEY" in str(err.value) and "WANDB_MODE=offline" in str(err.value)
    assert not (tmp_path / "trials").exists() and not (tmp_path / "optuna.db").exists()


def test_a_study_on_a_missing_corpus_fails_before_the_first_trial(tmp_path, tiny_overrides):
    cfg = compose_config(study_overrides(tiny_overrides) + [f"data.path={tmp_path / 'nope.txt'}"],
                         run_dir=str(tmp_path))
    with pytest.raises(Exception) as err:
        study(cfg)
    assert "nope.txt" in str(err.value)
    assert not (tmp_path / "trials").exists() and not (tmp_path / "optuna.db").exists()
