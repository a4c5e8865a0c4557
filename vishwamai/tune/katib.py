"""The same search as a Katib v1beta1 Experiment, rendered from the same config.

    python -m vishwamai.tune.katib --output manifests/katib/experiment.yaml [key=value ...]

Parameters, objective, algorithm, early stopping and trial budget all come from the
`tuning` group (after the given overrides), so the Optuna study and the Katib
Experiment cannot drift apart; a test regenerates the committed manifest and
compares.  Each Katib trial is a batch Job running `python -m vishwamai.training_v2`
with the trial's values as overrides and `tuning.katib_stdout=true`, which prints
`validation_loss=<value>` at every evaluation for Katib's StdOut metrics collector.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from vishwamai.errors import ConfigError
from vishwamai.kubeflow.pytorchjob import secret_env
from vishwamai.tune.space import Param, cli_value, parse_space
from vishwamai.tune.trial import METRICS

NAMESPACE = "vishwamai"
DEFAULT_IMAGE = "vishwamai:0.1.0"
# Katib's default StdOut filter: what the metrics collector parses out of each line.
KATIB_METRICS_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
ALGORITHMS = {"tpe": "tpe", "random": "random", "cmaes": "cmaes", "grid": "grid"}
# Writable paths of the read-only container: all under the /tmp emptyDir.
TRIAL_BASE_OVERRIDES = [
    "hydra.run.dir=/tmp/vishwamai/run",
    "data.cache_dir=/tmp/vishwamai/cache",
    "training.progress_bar=false",
    "tuning.katib_stdout=true",
]
UID = 10001


def parameter_name(key: str) -> str:
    """'training.optimizer.lr' -> 'training-optimizer-lr' (a Katib/DNS-friendly name)."""
    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def katib_parameter(p: Param) -> dict[str, Any]:
    if p.type == "categorical":
        return {"name": parameter_name(p.key), "parameterType": "categorical",
                "feasibleSpace": {"list": [cli_value(c) for c in p.choices]}}
    space: dict[str, Any] = {"min": cli_value(p.low), "max": cli_value(p.high)}
    if p.step is not None:
        space["step"] = cli_value(p.step)
    if p.type == "log_float":
        space["distribution"] = "logUniform"
    return {"name": parameter_name(p.key), "parameterType": "int" if p.type == "int" else "double",
            "feasibleSpace": space}


def _algorithm(tu: DictConfig) -> dict[str, Any]:
    if tu.sampler not in ALGORITHMS:
        raise ConfigError("tuning.sampler", f"{tu.sampler!r} has no Katib algorithm; use one of {list(ALGORITHMS)}")
    algorithm: dict[str, Any] = {"algorithmName": ALGORITHMS[tu.sampler]}
    if tu.sampler_seed is not None and tu.sampler != "grid":
        algorithm["algorithmSettings"] = [{"name": "random_state", "value": str(tu.sampler_seed)}]
    return algorithm


def _early_stopping(cfg: DictConfig) -> dict[str, Any] | None:
    """Katib's only early-stopping algorithm is the median rule; the other pruners have none."""
    tu = cfg.tuning
    if tu.pruner != "median":
        return None
    return {"algorithmName": "medianstop", "algorithmSettings": [
        {"name": "min_trials_required", "value": str(max(1, tu.pruner_startup_trials))},
        {"name": "start_step", "value": str(max(1, tu.pruner_warmup_steps // max(1, cfg.training.eval_every_n_steps)))},
    ]}


def _security_context() -> tuple[dict, dict]:
    pod = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                 "runAsUser": UID, "privileged": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def trial_job(params: list[Param], image: str, base_overrides: list[str]) -> dict[str, Any]:
    pod_sc, container_sc = _security_context()
    args = TRIAL_BASE_OVERRIDES + list(base_overrides) + [
        f"{p.key}=${{trialParameters.{parameter_name(p.key)}}}" for p in params]
    container = {
        "name": "training",
        "image": image,
        "imagePullPolicy": "IfNotPresent",  # a `kind load`-ed image needs no registry
        "command": ["python", "-m", "vishwamai.training_v2"],
        "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
                {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
                *secret_env()],  # tracking credentials, as every other pod of ours: optional keys
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}},
        "securityContext": container_sc,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            # A failed trial is a data point, not something to retry (exit 2 = bad config/NaN).
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": pod_sc,
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}}],
                },
            },
        },
    }


def experiment(cfg: DictConfig, image: str = DEFAULT_IMAGE, base_overrides: list[str] = (),
               name: str | None = None) -> dict[str, Any]:
    """The Katib Experiment for `cfg.tuning` (same space, metric, direction, budget)."""
    tu = cfg.tuning
    params = parse_space(cfg)
    spec: dict[str, Any] = {
        "objective": {
            "type": tu.direction,
            "objectiveMetricName": tu.metric,
            "additionalMetricNames": [m for m in METRICS if m != tu.metric],
            # The trial's value is its last evaluation, as in the Optuna study.
            "metricStrategies": [{"name": m, "value": "latest"} for m in METRICS],
        },
        "algorithm": _algorithm(tu),
        "parallelTrialCount": tu.n_jobs,
        "maxTrialCount": tu.num_trials,
        # Like the Optuna study, failed trials are recorded and the search goes on.
        "maxFailedTrialCount": tu.num_trials,
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"},
                                 "source": {"filter": {"metricsFormat": [KATIB_METRICS_FILTER]}}},
        "parameters": [katib_parameter(p) for p in params],
        "trialTemplate": {
            "primaryContainerName": "training",
            "trialParameters": [{"name": parameter_name(p.key), "description": p.key,
                                 "reference": parameter_name(p.key)} for p in params],
            "trialSpec": trial_job(params, image, list(base_overrides)),
        },
    }
    stopping = _early_stopping(cfg)
    if stopping:
        spec["earlyStopping"] = stopping
    return {
        "apiVersion": "kubeflow.org/v1beta1",
        "kind": "Experiment",
        "metadata": {"name": name or f"{parameter_name(tu.study_name)}-tuning", "namespace": NAMESPACE,
                     "labels": {"app.kubernetes.io/name": "vishwamai", "app.kubernetes.io/component": "tuning"}},
        "spec": spec,
    }


def render(cfg: DictConfig, overrides: list[str], image: str = DEFAULT_IMAGE) -> str:
    flags = ([] if image == DEFAULT_IMAGE else [f"--image {image}"]) + list(overrides)
    header = ("# Generated by `python -m vishwamai.tune.katib --output <this file>"
              + "".join(f" {o}" for o in flags) + "`\n"
              "# from tuning.search_space in vishwamai/configs/default_config.yaml. Do not edit: regenerate.\n")
    return header + yaml.safe_dump(experiment(cfg, image, overrides), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vishwamai.tune.katib", description=__doc__.splitlines()[0])
    parser.add_argument("--output", "-o", help="file to write (default: stdout)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="trial container image")
    parser.add_argument("overrides", nargs="*", help="config overrides (also passed to every trial)")
    args = parser.parse_args(argv)
    from vishwamai.config import compose_config

    cfg = compose_config(args.overrides, run_dir="/tmp/vishwamai/run")
    text = render(cfg, args.overrides, args.image)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
