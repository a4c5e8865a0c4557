"""Ray Tune backend on a real local Ray instance (one per module, 2 CPUs): search algorithms,
schedulers (ASHA, median stopping, population-based training), concurrency, a failing trial,
restore of an interrupted study and a head started with `ray start`.

Ray's start-up and each trial's worker process (torch imports) take seconds, so the default
suite keeps two studies (ASHA + a failing trial; PBT); the rest are marked slow."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'vishwamai[ray]'")

from vishwamai.errors import ConfigError  # noqa: E402
from vishwamai.training_v2 import compose_config, study  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY_CPUS = 2


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module, bounded to RAY_CPUS (run_ray keeps a caller's instance)."""
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_overrides(tiny_overrides: list[str], *extra: str) -> list[str]:
    return tiny_overrides + [
        "training.max_steps=12", "training.eval_every_n_steps=3", "tuning.enabled=true", "tuning.framework=ray",
        "tuning.sampler=random", "tuning.sampler_seed=0", "tuning.n_jobs=1", "tuning.enqueue_trials=[]",
        "++tuning.search_space={model.dropout_rate: null, training.optimizer.weight_decay: null}", *extra]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "tuning_summary.json").read_text())


def lrs(trial_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (trial_dir / "metrics.jsonl").read_text().splitlines())}


# --------------------------------------------------------------------- default suite
def test_ray_study_asha_stops_a_bad_trial_and_records_a_failing_one(tmp_path, tiny_overrides, ray_instance):
    """Trials in order: good, bad (ASHA stops it at its first rung), failing (3 heads do not divide 64)."""
    run_dir = tmp_path / "study"
    summary = study(compose_config(ray_overrides(
        tiny_overrides, "tuning.pruner=successive_halving", "tuning.num_trials=3",
        "++tuning.search_space={model.dropout_rate: null, training.optimizer.weight_decay: null, "
        "model.n_heads: {type: categorical, choices: [2, 3]}}",
        "tuning.enqueue_trials=[{training.optimizer.lr: 3e-3, model.n_heads: 2}, "
        "{training.optimizer.lr: 1e-4, model.n_heads: 2}, {training.optimizer.lr: 1e-3, model.n_heads: 3}]"),
        run_dir=str(run_dir)))
    trials = summary["trials"]
    assert summary["framework"] == "ray" and [t["number"] for t in trials] == [0, 1, 2]
    assert [t["state"] for t in trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert "n_heads" in trials[2]["fail_reason"]
    steps = [json.loads(r)["step"] for r in (Path(trials[1]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] < 12  # stopped before the end
    good = json.loads((Path(trials[0]["run_dir"]) / "summary.json").read_text())
    assert summary["best_trial"] == 0 and summary["best_value"] == pytest.approx(good["final_val_loss"])
    assert (run_dir / "best_overrides.yaml").is_file() and summary_of(run_dir)["trials_failed"] == 1


def test_population_based_training_exploits_with_the_new_learning_rate(tmp_path, tiny_overrides, ray_instance):
    run_dir = tmp_path / "study"
    # Synchronous PBT, a population of 2 running together: at step 8 both have a score, so the slow
    # trial is exploited whatever the timing of the trials' start-up (asynchronous PBT compares only
    # the trials that have reported by then).
    summary = study(compose_config(ray_overrides(
        tiny_overrides, "tuning.pruner=pbt", "tuning.num_trials=2", f"tuning.n_jobs={RAY_CPUS}",
        "training.max_steps=12", "training.eval_every_n_steps=4", "tuning.pbt.perturbation_interval=8",
        "tuning.pbt.quantile_fraction=0.5", "tuning.pbt.synch=true", "training.scheduler.warmup_steps=2",
        "tuning.enqueue_trials=[{training.optimizer.lr: 3e-3}, {training.optimizer.lr: 1e-5}]",
        "++tuning.search_space={model.dropout_rate: {type: float, low: 0.0, high: 0.1}, "
        "training.optimizer.weight_decay: null}"), run_dir=str(run_dir)))
    exploits = summary_of(run_dir)["exploits"]
    assert exploits, "a slow trial (lr 1e-5) should have continued from a fast one's checkpoint"
    assert summary["trials_complete"] == 2 and [(e["trial"], e["from_trial"]) for e in exploits] == [(1, 0)]
    for e in exploits:
        assert set(e) == {"step", "trial", "from_trial", "params"} and e["step"] % 8 == 0
        assert e["trial"] != e["from_trial"] and set(e["params"]) == {"training.optimizer.lr", "model.dropout_rate"}
    # The new lr is in force after the restore, on the same schedule: lr / peak lr at each later
    # step equals that of a trial never exploited.
    exploited = {e["trial"] for e in exploits}
    plain = next(t for t in summary["trials"] if t["number"] not in exploited)
    reference = {s: lr / plain["params"]["training.optimizer.lr"] for s, lr in lrs(Path(plain["run_dir"])).items()}
    last = {}
    for e in exploits:
        last[e["trial"]] = e  # the trial's latest exploit decides its lr from then on
    for number, e in last.items():
        after = {s: lr for s, lr in lrs(Path(summary["trials"][number]["run_dir"])).items() if s > e["step"]}
        assert after and all(lr / e["params"]["training.optimizer.lr"] == pytest.approx(reference[s])
                             for s, lr in after.items())


def test_pbt_with_optuna_or_without_perturbable_keys_is_a_config_error(tmp_path, tiny_overrides):
    with pytest.raises(ConfigError) as err:
        study(compose_config(tiny_overrides + ["tuning.enabled=true", "tuning.pruner=pbt"], run_dir=str(tmp_path)))
    assert err.value.key == "tuning.pruner" and "ray" in str(err.value)
    only_heads = ray_overrides(tiny_overrides, "tuning.pruner=pbt", "training.eval_every_n_steps=4",
                               "++tuning.search_space={training.optimizer.lr: null, "
                               "model.n_heads: {type: categorical, choices: [2, 4]}}")
    with pytest.raises(ConfigError) as err:
        study(compose_config(only_heads, run_dir=str(tmp_path)))
    assert err.value.key == "tuning.search_space" and "perturbs only" in str(err.value)
    with pytest.raises(ConfigError) as err:
        study(compose_config(ray_overrides(tiny_overrides, "tuning.pruner=pbt", "tuning.pbt.perturbation_interval=5"),
                             run_dir=str(tmp_path)))
    assert err.value.key == "tuning.pbt.perturbation_interval"
    assert not (tmp_path / "trials").exists()


# ---------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("sampler, pruner, trials", [("tpe", "median", 3), ("random", "none", 3),
                                                     ("bohb", "none", 9)])  # BOHB's first bracket: 9 trials
def test_ray_search_algorithms_and_schedulers(tmp_path, tiny_overrides, ray_instance, sampler, pruner, trials):
    summary = study(compose_config(ray_overrides(
        tiny_overrides, f"tuning.sampler={sampler}", f"tuning.pruner={pruner}", f"tuning.num_trials={trials}",
        f"tuning.n_jobs={RAY_CPUS}", "tuning.pruner_startup_trials=1"), run_dir=str(tmp_path)))
    done = summary["trials"]
    assert len(done) == trials and summary["trials_complete"] >= 1 and summary["trials_failed"] == 0
    assert all(1e-4 <= t["params"]["training.optimizer.lr"] <= 3e-3 for t in done)
    assert len({t["params"]["training.optimizer.lr"] for t in done}) == trials


@pytest.mark.slow
def test_n_jobs_trials_run_concurrently(tmp_path, tiny_overrides, ray_instance):
    study(compose_config(ray_overrides(tiny_overrides, "tuning.pruner=none", "tuning.num_trials=2",
                                       f"tuning.n_jobs={RAY_CPUS}", "training.max_steps=40"), run_dir=str(tmp_path)))
    spans = []
    for trial in sorted((tmp_path / "trials").iterdir()):
        times = [json.loads(r)["time"] for r in (trial / "metrics.jsonl").read_text().splitlines()]
        spans.append((times[0], times[-1]))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, f"trials did not overlap: {spans}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _study_cmd(run_dir: Path, tiny_overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "vishwamai.training_v2", *ray_overrides(tiny_overrides, *extra),
            f"hydra.run.dir={run_dir}"]


@pytest.mark.slow
def test_study_on_a_head_started_with_ray_start(tmp_path, tiny_overrides):
    """tuning.ray_address: the study joins a head started like a cluster's (`ray start --head`, loopback).
    The head runs in the foreground (--block) in its own process group, stopped by that group's id."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={RAY_CPUS}",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:  # the head's GCS accepts connections
            assert time.time() < deadline and head.poll() is None
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        out = subprocess.run(_study_cmd(tmp_path, tiny_overrides, "tuning.num_trials=2", "tuning.pruner=none",
                                        f"tuning.ray_address=127.0.0.1:{port}"),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert summary_of(tmp_path)["trials_complete"] == 2
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)


@pytest.mark.slow
def test_an_interrupted_ray_study_is_restored(tmp_path, tiny_overrides):
    """Killed (SIGINT, as Ctrl-C or a pod's stop) after its first trial: the rerun restores the
    experiment (Ray's own restore) and runs only the trials left."""
    cmd = _study_cmd(tmp_path, tiny_overrides, "tuning.num_trials=3", "tuning.pruner=none",
                     "training.max_steps=200", "training.eval_every_n_steps=100")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob("trials/trial-*/summary.json")):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    done_before = {p.parent.name for p in tmp_path.glob("trials/trial-*/summary.json")}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = summary_of(tmp_path)
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2] and summary["trials_complete"] == 3
    for name in done_before:  # a finished trial was not run again
        records = (tmp_path / "trials" / name / "metrics.jsonl").read_text().splitlines()
        assert len([r for r in records if json.loads(r)["step"] == 200]) == 1
