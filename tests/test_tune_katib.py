"""Katib: the committed Experiment is what the search-space config generates, its trial Job
is a valid, locked-down Kubernetes Job whose overrides compose, and trials print the
objective in the form Katib's StdOut collector parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from vishwamai.config import validate
from vishwamai.training_v2 import compose_config, run
from vishwamai.tune import katib

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "manifests" / "katib" / "experiment.yaml"
# Katib's default StdOut metrics filter (metricsCollectorSpec.source.filter.metricsFormat).
KATIB_FILTER = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")


def test_committed_experiment_is_regenerated_from_the_search_space(tmp_path):
    out = tmp_path / "experiment.yaml"
    assert katib.main(["--output", str(out)]) == 0
    assert out.read_text() == COMMITTED.read_text(), \
        "manifests/katib/experiment.yaml is stale: run python -m vishwamai.tune.katib --output manifests/katib/experiment.yaml"
    exp = yaml.safe_load(out.read_text())
    cfg = compose_config([], run_dir="/tmp/unused")
    spec = exp["spec"]
    assert exp["metadata"]["namespace"] == "vishwamai"
    assert spec["objective"]["objectiveMetricName"] == cfg.tuning.metric
    assert spec["objective"]["type"] == cfg.tuning.direction
    assert spec["maxTrialCount"] == cfg.tuning.num_trials
    space = {k: v for k, v in cfg.tuning.search_space.items() if v is not None}
    assert [p["name"] for p in spec["parameters"]] == \
        [katib.parameter_name(k) for k in space]
    lr = spec["parameters"][0]["feasibleSpace"]
    assert (float(lr["min"]), float(lr["max"]), lr["distribution"]) == (1e-4, 3e-3, "logUniform")


def test_overrides_change_the_generated_experiment(tmp_path):
    out = tmp_path / "grid.yaml"
    overrides = ["tuning.sampler=grid", "tuning.pruner=none", "tuning.num_trials=6", "tuning.n_jobs=3",
                 "++tuning.search_space={model.dropout_rate: null, training.optimizer.weight_decay: null, "
                 "training.optimizer.lr: {type: float, low: 0.001, high: 0.003, step: 0.001}, "
                 "model.n_heads: {type: categorical, choices: [2, 4]}}"]
    katib.main(["--output", str(out), "--image", "registry.example/vishwamai:1.2", *overrides])
    spec = yaml.safe_load(out.read_text())["spec"]
    assert spec["algorithm"]["algorithmName"] == "grid" and "earlyStopping" not in spec
    assert (spec["parallelTrialCount"], spec["maxTrialCount"]) == (3, 6)
    params = {p["name"]: p for p in spec["parameters"]}
    assert params["training-optimizer-lr"]["feasibleSpace"] == {"min": "0.001", "max": "0.003", "step": "0.001"}
    assert params["model-n-heads"] == {"name": "model-n-heads", "parameterType": "categorical",
                                       "feasibleSpace": {"list": ["2", "4"]}}
    container = spec["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/vishwamai:1.2"
    assert "tuning.sampler=grid" in container["args"]  # base overrides reach every trial


def test_trial_job_is_valid_and_locked_down():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    exp = yaml.safe_load(COMMITTED.read_text())
    template = exp["spec"]["trialTemplate"]
    job = {**template["trialSpec"], "metadata": {"name": "trial", "namespace": "vishwamai"}}
    kubernetes_validate.validate(job, "1.30.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    assert container["name"] == template["primaryContainerName"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert {"WANDB_API_KEY", "MLFLOW_TRACKING_URI"} <= set(secret_refs)  # tracking credentials, optional
    assert all(ref["name"] == "vishwamai-secrets" and ref["optional"] for ref in secret_refs.values())
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])


def test_trial_args_with_katib_values_compose_into_a_valid_config():
    exp = yaml.safe_load(COMMITTED.read_text())
    spec = exp["spec"]
    container = spec["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "vishwamai.training_v2"]
    # What Katib does: replace ${trialParameters.<name>} by the suggested value (here: the max).
    values = {p["name"]: p["feasibleSpace"]["max"] for p in spec["parameters"]}
    refs = {t["name"]: t["reference"] for t in spec["trialTemplate"]["trialParameters"]}
    args = [re.sub(r"\$\{trialParameters\.([^}]+)\}", lambda m: values[refs[m.group(1)]], a)
            for a in container["args"]]
    assert not any("${" in a for a in args)
    cfg = compose_config([a for a in args if not a.startswith("hydra.")], run_dir="/tmp/unused")
    validate(cfg)
    assert cfg.tuning.katib_stdout and not cfg.tuning.enabled
    assert cfg.training.optimizer.lr == pytest.approx(3e-3) and cfg.model.dropout_rate == pytest.approx(0.2)


def test_trials_print_the_metric_in_katib_stdout_format(tmp_path, tiny_overrides, capsys):
    run(compose_config(tiny_overrides + ["tuning.katib_stdout=true"], run_dir=str(tmp_path)))
    lines = [line for line in capsys.readouterr().out.splitlines() if " validation_" in line]
    # As Katib's collector reads a line: its first word is the time if it parses as RFC 3339.
    stamps = [datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")) for line in lines]
    assert all(s.tzinfo is not None for s in stamps) and stamps == sorted(stamps), lines
    parsed = [KATIB_FILTER.fullmatch(line.split(" ", 1)[1]) for line in lines]
    assert all(parsed), lines
    got = [float(m.group(2)) for m in parsed if m.group(1) == "validation_loss"]
    records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(got) == len(expected) == 2
    assert got == pytest.approx(expected, rel=1e-5)
    assert {m.group(1) for m in parsed} == {"validation_loss", "validation_perplexity"}


def test_without_the_flag_nothing_is_printed(tmp_path, tiny_overrides, capsys):
    run(compose_config(tiny_overrides + ["training.max_steps=2"], run_dir=str(tmp_path)))
    assert "validation_loss=" not in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("kubectl") is None and not (REPO / ".venv/bin/kubectl").exists(),
                    reason="kubectl is not installed")
def test_kustomization_builds_in_the_vishwamai_namespace():
    kubectl = shutil.which("kubectl") or str(REPO / ".venv/bin/kubectl")
    out = subprocess.run([kubectl, "kustomize", str(REPO / "manifests" / "katib")], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [(d["kind"], d["metadata"]["namespace"]) for d in docs] == [("Experiment", "vishwamai")]
