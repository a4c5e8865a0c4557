"""Monitoring: what a short run logs is read back from real TensorBoard event files and a real
MLflow sqlite store; the report PNG is decoded; backends are imported only when enabled."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from vishwamai.errors import ConfigError
from vishwamai.training_v2 import compose_config, run

MONITORING_ON = ["monitoring.enabled=true", "monitoring.tensorboard.enabled=true", "monitoring.mlflow.enabled=true"]


def overrides_on(tiny_overrides: list[str]) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("monitoring.")] + MONITORING_ON


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """One short run with every monitoring feature on (shared: creating an MLflow store takes seconds)."""
    from conftest import TINY_OVERRIDES

    run_dir = tmp_path_factory.mktemp("monitored") / "run"
    overrides = overrides_on(TINY_OVERRIDES) + [
        "training.log_every_n_steps=4", "checkpointing.every_n_steps=3", "checkpointing.save_best=false",
        "monitoring.histogram_every_n_steps=5",
        "monitoring.profile=true", "monitoring.profile_start=1", "monitoring.profile_steps=2",
        "monitoring.peak_flops_per_s=1e12"]
    summary = run(compose_config(overrides, run_dir=str(run_dir)))
    return run_dir, summary


def test_logged_steps_and_derived_figures(monitored_run):
    run_dir, _ = monitored_run
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [4, 5, 8, 10]  # every 4 steps, evaluations, the last step
    times = [r["time"] for r in recs]  # wall clock of each logged step
    assert times == sorted(times) and time.time() - 600 < times[0] and times[-1] <= time.time()
    for r in recs:
        groups = [v for k, v in r.items() if k.startswith("grad_norm/")]
        assert {k for k in r if k.startswith("grad_norm/")} == {f"grad_norm/{g}" for g in ("embed", "attn", "mlp", "norm")}
        # The groups partition the parameters: their norms combine to the global (pre-clip) norm.
        assert math.sqrt(sum(g * g for g in groups)) == pytest.approx(r["grad_norm"], rel=1e-4)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e12)
        assert r["samples_per_s"] == pytest.approx(r["tokens_per_s"] / 32)  # seq_len 32
        assert r["memory/cpu_rss_mb"] > 50
    # Checkpoints at steps 3, 6, 9 (unlogged steps): their save time reaches the next record.
    assert all("checkpoint_save_s" in r for r in recs if r["step"] in (4, 8, 10))
    assert "checkpoint_save_s" not in recs[1]  # step 5: nothing saved since step 4


def test_tensorboard_event_files_hold_scalars_and_histograms(monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary = monitored_run
    assert summary["tensorboard_dir"] == str(run_dir / "tensorboard")
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    recs = records(run_dir)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in recs]
    assert [e.wall_time for e in loss] == pytest.approx([r["time"] for r in recs], abs=1e-3)
    assert not any(t.endswith("time") and "step" not in t for t in acc.Tags()["scalars"])  # a timestamp, not a metric
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [5, 10]
    assert {"train/lr", "train/tokens_per_s", "grad_norm/attn", "memory/cpu_rss_mb", "train/mfu"} <= set(
        acc.Tags()["scalars"])
    hist = acc.Tags()["histograms"]
    assert "params/embed/weight" in hist and "grads/blocks/0/attn/q_proj/weight" in hist
    assert [e.step for e in acc.Histograms("grads/embed/weight")] == [5, 10]
    weights = acc.Histograms("params/embed/weight")[0].histogram_value
    assert weights.num == 257 * 64 and weights.min < 0 < weights.max


def test_profiler_trace_with_memory_events(monitored_run):
    run_dir, summary = monitored_run
    (trace,) = (run_dir / "tensorboard" / "profiler").glob("*.pt.trace.json*")
    assert summary["profile_dir"] == str(trace.parent)
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "[memory]" in names  # profile_memory=True
    assert any(str(n).startswith("aten::") for n in names)


def test_mlflow_store_holds_params_metrics_and_artifacts(monitored_run):
    from mlflow.tracking import MlflowClient

    run_dir, summary = monitored_run
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    assert summary["mlflow_tracking_uri"] == uri and summary["mlflow_run_id"] in summary["mlflow_run"]
    client = MlflowClient(tracking_uri=uri)
    stored = client.get_run(summary["mlflow_run_id"])
    assert stored.info.status == "FINISHED"
    assert client.get_experiment(stored.info.experiment_id).name == "vishwamai"
    params = stored.data.params
    assert params["model.d_model"] == "64" and params["training.max_steps"] == "10"
    assert params["monitoring.histogram_every_n_steps"] == "5"
    recs = records(run_dir)
    history = client.get_metric_history(stored.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in recs]
    # Timestamped when trained, not when the low-priority child wrote them.
    assert [m.timestamp for m in history] == [int(r["time"] * 1000) for r in recs]
    assert "time" not in stored.data.metrics
    assert [m.step for m in client.get_metric_history(stored.info.run_id, "val_loss")] == [5, 10]
    assert stored.data.tags["vishwamai.final_checkpoint"] == summary["final_checkpoint"]
    artifacts = {a.path for a in client.list_artifacts(stored.info.run_id)}
    assert {"config.yaml", "summary.json", "report.png", "report.md"} <= artifacts
    local = Path(client.download_artifacts(stored.info.run_id, "summary.json", str(run_dir / "dl")))
    assert json.loads(local.read_text())["report"] == summary["report"]


def test_report_png_and_markdown(monitored_run):
    import matplotlib.image

    run_dir, summary = monitored_run
    assert summary["report"] == str(run_dir / "report.md")
    assert json.loads((run_dir / "summary.json").read_text())["report"] == summary["report"]
    png = run_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 800
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    md = (run_dir / "report.md").read_text()
    assert "![curves](report.png)" in md and f"| steps | {summary['steps']} |" in md
    last = records(run_dir)[-1]
    logged = datetime.fromtimestamp(last["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert f"## Last logged step ({last['step']}, logged {logged})" in md and "| time |" not in md


def test_report_cli(tmp_path, capsys):
    from vishwamai.report import main

    lines = [{"step": s, "loss": 5 - s / 10, "lr": 1e-3, "tokens_per_s": 1000 + s, "batch_size": 4,
              "micro_batch_size": 4} for s in range(1, 21)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    main([str(tmp_path)])  # = python -m vishwamai.report RUN_DIR / vishwamai-report RUN_DIR
    assert str(tmp_path / "report.png") in capsys.readouterr().out
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert "| loss | 3 |" in (tmp_path / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nope")])
    assert exit_.value.code == 2 and "metrics.jsonl" in capsys.readouterr().err


def test_disabled_backends_are_never_imported(tmp_path, tiny_overrides):
    overrides = overrides_on(tiny_overrides) + ["monitoring.tensorboard.enabled=false",
                                                "monitoring.mlflow.enabled=false", "monitoring.report=false",
                                                "training.max_steps=1"]
    code = ("import sys, json; from vishwamai.training_v2 import compose_config, run; "
            f"s = run(compose_config({overrides!r}, run_dir={str(tmp_path)!r})); "
            "print(json.dumps([[m for m in ('mlflow', 'tensorboard', 'wandb') if m in sys.modules], "
            "'mlflow_run' in s, 'tensorboard_dir' in s]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    imported, has_mlflow, has_tensorboard = json.loads(out.stdout.strip().splitlines()[-1])
    assert imported == [] and not has_mlflow and not has_tensorboard
    assert "memory/cpu_rss_mb" in (tmp_path / "metrics.jsonl").read_text()  # monitoring itself was on


def test_wandb_enabled_but_not_installed_is_a_config_error(tmp_path, tiny_overrides):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: the missing-package error cannot be shown here")
    cfg = compose_config(overrides_on(tiny_overrides) + ["monitoring.wandb.enabled=true"], run_dir=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert err.value.key == "monitoring.wandb.enabled" and "pip install" in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before training


@pytest.mark.parametrize("overrides, key", [
    (["monitoring.tensorboard.enabled=false", "monitoring.histogram_every_n_steps=5"],
     "monitoring.histogram_every_n_steps"),
    (["monitoring.enabled=false", "monitoring.profile=true"], "monitoring.profile"),
    (["monitoring.profile_steps=0"], "monitoring.profile_steps"),
    (["monitoring.peak_flops_per_s=-1"], "monitoring.peak_flops_per_s"),
])
def test_bad_monitoring_config_names_the_key(overrides, key):
    from vishwamai.config import validate

    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides, run_dir="/tmp/x"))
    assert err.value.key == key


def test_every_parameter_has_a_group():
    from vishwamai.config import ModelConfig
    from vishwamai.model import Transformer
    from vishwamai.monitoring.stats import parameter_group

    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
    groups = {name: parameter_group(name) for name, _ in model.named_parameters()}
    assert groups["embed.weight"] == "embed" and groups["norm.weight"] == "norm"
    assert groups["blocks.1.attn_norm.weight"] == "norm" and groups["blocks.1.attn.o_proj.weight"] == "attn"
    assert groups["blocks.0.mlp.down.weight"] == "mlp"
    assert "other" not in groups.values()


def test_a_failing_background_backend_fails_the_run_loudly():
    from vishwamai.monitoring.logger import BackgroundSink, SinkBase

    class Broken(SinkBase):
        def log(self, step, metrics):
            raise OSError("disk full")

    sink = BackgroundSink(Broken())
    sink.start(trainer=None)
    sink.log(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="Broken failed: disk full"):
        sink.close()


def _mlflow_process_sink(tmp_path, tiny_overrides, uri: str):
    from vishwamai.monitoring import ProcessSink, build_sinks

    cfg = compose_config(overrides_on(tiny_overrides) + [f"monitoring.mlflow.tracking_uri={uri}"],
                         run_dir=str(tmp_path / "run"))
    sink = next(s for s in build_sinks(cfg, tmp_path / "run") if isinstance(s, ProcessSink))
    sink.start(trainer=None)
    return sink


def _wait_for_child(sink):
    deadline = time.time() + 30
    while sink.inner._child is None and time.time() < deadline:  # started by the sink's own thread
        time.sleep(0.05)
    return sink.inner._child


def test_mlflow_logs_from_a_low_priority_child_process(tmp_path, tiny_overrides):
    """MLflow's sink lives in `python -m vishwamai.monitoring.sink_process`, scheduled below the trainer
    (its imports and database work never hold the training process's GIL)."""
    import os

    sink = _mlflow_process_sink(tmp_path, tiny_overrides, f"sqlite:///{tmp_path}/m.db")
    child = _wait_for_child(sink)
    assert child.args[1:3] == ["-m", "vishwamai.monitoring.sink_process"] and child.pid != os.getpid()
    if hasattr(os, "getpriority"):
        assert os.getpriority(os.PRIO_PROCESS, child.pid) > os.getpriority(os.PRIO_PROCESS, 0)
    if hasattr(os, "SCHED_IDLE"):  # Linux: it runs only in time the trainer leaves idle
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
    sink.log(1, {"loss": 2.5})
    sink.close()
    from mlflow.tracking import MlflowClient

    run_id = sink.summary()["mlflow_run_id"]
    history = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db").get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5)]


def test_a_failing_mlflow_child_fails_the_run_naming_the_backend(tmp_path, tiny_overrides):
    (tmp_path / "file").write_text("not a directory")
    sink = _mlflow_process_sink(tmp_path, tiny_overrides, f"sqlite:///{tmp_path}/file/x.db")
    sink.log(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="monitoring backend MlflowSink failed: .*Error"):
        sink.close()


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_new_local_mlflow_store_is_copied_from_a_migrated_template(tmp_path, monkeypatch):
    from vishwamai.monitoring import mlflow_sink

    monkeypatch.setattr(mlflow_sink, "STORE_TEMPLATES", tmp_path / "templates")
    migrations = _Lines()
    logging.getLogger("mlflow.store.db.utils").addHandler(migrations)
    try:
        mlflow_sink.open_store(f"sqlite:///{tmp_path}/first.db")  # built the long way, kept as template
        template = mlflow_sink.store_template()
        assert template.is_file() and sum("Creating initial" in line for line in migrations.lines) == 1
        client = mlflow_sink.open_store(f"sqlite:///{tmp_path}/second.db")
        assert sum("Creating initial" in line for line in migrations.lines) == 1  # no migrations this time
        run = client.create_run(client.create_experiment("e"))
        client.log_metric(run.info.run_id, "loss", 1.5, step=3)
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 1.5)]
        assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))

        template.write_bytes(b"not a database")  # a broken template is replaced, the run still gets a store
        client = mlflow_sink.open_store(f"sqlite:///{tmp_path}/third.db")
        assert client.search_experiments() and sum("Creating initial" in line for line in migrations.lines) == 2
        assert template.read_bytes().startswith(b"SQLite format 3")
    finally:
        logging.getLogger("mlflow.store.db.utils").removeHandler(migrations)


def test_histograms_reach_only_the_sinks_that_take_them(tmp_path, tiny_overrides):
    """Parameter copies are a model's worth each time: never pickled to MLflow's child, which drops them."""
    import numpy as np

    from vishwamai.monitoring import MetricsLogger, SinkBase, build_sinks

    class Recorder(SinkBase):
        def __init__(self, takes: bool):
            self.takes_histograms, self.steps = takes, []

        def log_histograms(self, step, arrays):
            self.steps.append(step)

    taker, other = Recorder(True), Recorder(False)
    MetricsLogger([taker, other], 1).log_histograms(3, {"params/w": np.zeros(4)})
    assert taker.steps == [3] and other.steps == []
    cfg = compose_config(overrides_on(tiny_overrides) + ["monitoring.histogram_every_n_steps=5"],
                         run_dir=str(tmp_path / "run"))
    taking = {getattr(s, "name", type(s).__name__): s.takes_histograms for s in build_sinks(cfg, tmp_path / "run")}
    assert taking == {"JsonlSink": False, "TensorBoardSink": True, "MlflowSink": False}


def test_mlflow_params_are_the_flattened_config():
    from vishwamai.monitoring.mlflow_sink import flatten

    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


@pytest.mark.slow  # a second MLflow store
def test_run_nests_under_an_active_mlflow_run(tmp_path, tiny_overrides):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'study.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("study", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_tracking_uri(uri)  # exports $MLFLOW_TRACKING_URI: unset again below, or later tests' runs use it
    try:
        with mlflow.start_run(experiment_id=experiment) as parent:
            summary = run(compose_config(overrides_on(tiny_overrides) + [
                f"monitoring.mlflow.tracking_uri={uri}", "monitoring.tensorboard.enabled=false",
                "training.max_steps=2"], run_dir=str(tmp_path / "trial")))
    finally:
        mlflow.set_tracking_uri(None)
    child = client.get_run(summary["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.experiment_id == experiment and child.info.status == "FINISHED"


def test_a_run_stopped_between_log_steps_logs_its_last_step_and_final_evaluation(tmp_path, tiny_overrides):
    """A callback stops the run at step 3 of 10 (log every 10): the steps since the last log and the
    evaluation after the loop still reach metrics.jsonl, and the report is written from them."""
    from vishwamai.train.events import Callback

    class StopAtThree(Callback):
        def on_step_end(self, trainer):
            trainer.should_stop = trainer.state.step >= 3

    overrides = overrides_on(tiny_overrides) + ["monitoring.tensorboard.enabled=false",
                                                "monitoring.mlflow.enabled=false", "training.log_every_n_steps=10",
                                                "training.eval_every_n_steps=0"]
    summary = run(compose_config(overrides, run_dir=str(tmp_path)), extra_callbacks=[StopAtThree()])
    logged = records(tmp_path)
    assert [r["step"] for r in logged] == [3] and summary["steps"] == 3
    assert logged[0]["val_loss"] == pytest.approx(summary["final_val_loss"])
    assert logged[0]["tokens_per_s"] > 0 and (tmp_path / "report.png").is_file()
