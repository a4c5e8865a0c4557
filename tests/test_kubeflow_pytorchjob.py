"""Multi-node pretraining from the pipeline (vishwamai.kubeflow.pytorchjob), `prepare`, and lean Model artifacts.

No Kubernetes API server can run here: the launcher is driven against FakeCustomObjects / FakeCoreV1, which
stand in for kubernetes.client.CustomObjectsApi / CoreV1Api (same method names and arguments, real
kubernetes.client ApiException for HTTP errors).  The PyTorchJob it writes is checked against the Training
Operator v1.9.3 CRD schema (tests/data/crds) and its pods with kubernetes-validate.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from conftest import MetricsSink as Sink
from crd_schemas import crd_errors, pytorchjob_webhook_errors
from vishwamai.kubeflow import pytorchjob as pj
from vishwamai.kubeflow import stages

K8S_VERSION = "1.30.0"
RESOURCES = {"requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"},
             "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}}


def job(name: str = "vishwamai-pretrain-abc", **kw) -> dict:
    settings = {"image": "registry.example.com/vishwamai:1.0-cuda", "nodes": 3, "nproc_per_node": 2, "pvc": "shared",
                "resources": RESOURCES, **kw}
    return pj.build_job(name, "team", overrides=[], **settings)


# ------------------------------------------------------------------------------------ the generated job
def test_generated_job_passes_the_pytorchjob_crd_schema_and_pod_validation():
    import kubernetes_validate

    doc = job(queue="team-gpus", priority_class="high")
    assert crd_errors(doc) == [] and pytorchjob_webhook_errors(doc) == []
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    for role, replica in replicas.items():
        assert replica["restartPolicy"] == "ExitCode"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role.lower(), "namespace": "team"},
               "spec": replica["template"]["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        assert pod["spec"]["priorityClassName"] == "high"
        args = pod["spec"]["containers"][0]["args"]
        assert "training.resume=auto" in args and f"hydra.run.dir={pj.run_dir(doc['metadata']['name'])}" in args
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "vishwamai-secrets"


def test_the_schema_check_catches_a_bad_job():
    bad = job()
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"  # the CRD says integer
    bad["spec"]["runPolicy"]["backofLimit"] = 3  # misspelt: the API server's strict validation refuses it
    errors = crd_errors(bad)
    assert any("Worker/replicas" in e for e in errors) and any("backofLimit" in e for e in errors), errors
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] = "Sometimes"  # the webhook's rule
    assert any("Sometimes" in e for e in pytorchjob_webhook_errors(bad))


def test_job_names_are_stable_per_run_and_fit_pod_names():
    assert pj.job_name("run-1") == pj.job_name("run-1") != pj.job_name("run-2")
    assert len(pj.job_name("0" * 36) + "-worker-10") <= 63
    with pytest.raises(ValueError, match="2 or more"):
        job(nodes=1)


# ------------------------------------------------------------------------------------- the launcher
class FakeCustomObjects:
    """Stands in for CustomObjectsApi (no API server here): the job moves through `statuses`, one per get."""

    def __init__(self, statuses: list[dict], exists: bool = False):
        self.statuses, self.calls, self.created = list(statuses), [], None
        self.exists = exists

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", namespace, body["metadata"]["name"]))
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created = copy.deepcopy(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        self.calls.append(("get", namespace, name))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"metadata": {"name": name}, "status": status}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", namespace, name))


class FakeCoreV1:
    """Stands in for CoreV1Api.read_namespaced_pod_log: the master pod is not up at first, then logs."""

    def __init__(self, lines: list[str]):
        self.lines, self.requests = lines, 0

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content):
        self.requests += 1
        if self.requests == 1:
            raise ApiException(status=400, reason="container is waiting to start")
        assert (container, follow, _preload_content) == ("pytorch", True, False)
        lines = self.lines
        return type("Stream", (), {"stream": lambda self: iter(line.encode() + b"\n" for line in lines)})()


RUNNING = {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}
SUCCEEDED = {"conditions": RUNNING["conditions"] + [{"type": "Succeeded", "status": "True", "message": "done"}]}
FAILED = {"conditions": RUNNING["conditions"] + [{"type": "Failed", "status": "True",
                                                   "message": "PyTorchJob master-0 exited with code 2"}]}


@pytest.fixture
def shared_volume(tmp_path, monkeypatch) -> Path:
    """The ReadWriteMany volume the launcher and the job's pods mount (a folder here)."""
    monkeypatch.setattr(pj, "MOUNT", str(tmp_path / "data"))
    return tmp_path / "data"


def test_launcher_creates_follows_and_collects_the_model(shared_volume, tmp_path, trained_teacher, tiny_overrides):
    name = "vishwamai-pretrain-ok"
    # What the job's pods leave on the shared volume (a run directory of the same trainer).
    shutil.copytree(trained_teacher, pj.run_dir(name))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 1000)
    custom, core = FakeCustomObjects([RUNNING, RUNNING, SUCCEEDED]), FakeCoreV1(["step 1 loss 5.0", "step 2 loss 4.0"])
    sink, out = Sink(), tmp_path / "model"
    summary = stages.pretrain_job(tiny_overrides, "tiny", 60, job(name), str(out), sink, corpus=str(corpus),
                                  timeout_s=60, apis=(custom, core), poll_s=0.01)
    assert custom.calls[0] == ("create", "team", name) and ("delete", "team", name) not in custom.calls
    args = custom.created["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    assert custom.created["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"] == args
    assert "model=tiny" in args and "training.max_steps=60" in args
    shared_corpus = Path(next(a for a in args if a.startswith("data.path=")).split("=", 1)[1])
    assert shared_corpus.read_text() == corpus.read_text() and shared_corpus.is_relative_to(shared_volume)
    assert crd_errors(custom.created) == []
    assert core.requests == 2  # waited for the master pod, then followed its log
    assert (out / "model.safetensors").is_file() and not (out / "trainer_state.pt").exists()
    assert summary["steps"] == 60 and sink.values["steps"] == 60.0


def test_launcher_streams_the_masters_log(shared_volume, capsys):
    pj.run_job(FakeCustomObjects([RUNNING, SUCCEEDED]), FakeCoreV1(["epoch 1", "val_loss=3.2"]), job(), 10, 0.01)
    assert "epoch 1\nval_loss=3.2" in capsys.readouterr().out


def test_a_failed_job_fails_the_step_with_the_operators_message(shared_volume):
    with pytest.raises(pj.JobFailed, match="exited with code 2"):
        pj.run_job(FakeCustomObjects([RUNNING, FAILED]), FakeCoreV1([]), job(), 10, 0.01)


def test_a_job_past_its_timeout_is_deleted(shared_volume):
    custom = FakeCustomObjects([RUNNING])
    with pytest.raises(TimeoutError, match="deleted"):
        pj.run_job(custom, FakeCoreV1([]), job("vishwamai-pretrain-slow"), timeout_s=0.05, poll_s=0.01)
    assert custom.calls[-1] == ("delete", "team", "vishwamai-pretrain-slow")


def test_a_retried_launcher_follows_the_job_it_created(shared_volume):
    custom = FakeCustomObjects([SUCCEEDED], exists=True)
    pj.run_job(custom, FakeCoreV1([]), job("vishwamai-pretrain-again"), 10, 0.01)
    assert [c[0] for c in custom.calls] == ["create", "get", "get"]  # create refused (409), then attached


def test_a_bad_override_fails_before_any_job_is_created(shared_volume, tmp_path, capsys):
    custom = FakeCustomObjects([SUCCEEDED])
    with pytest.raises(SystemExit) as e:
        stages.pretrain_job(["training.max_stepz=3"], "tiny", 5, job(), str(tmp_path / "m"), Sink(),
                            apis=(custom, FakeCoreV1([])), poll_s=0.01)
    assert e.value.code == 2 and custom.calls == []
    assert "max_stepz" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- prepare and artifacts
def test_prepare_refuses_a_bad_stage_config_once_with_exit_code_2(tmp_path, tiny_overrides, capsys):
    checks = stages.stage_checks(tiny_overrides, "tiny", 5, ["model.n_layerz=1"], 5, 0.5, 5)
    with pytest.raises(SystemExit) as e:
        stages.prepare(checks, str(tmp_path / "dataset"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "distill stage" in err and "n_layerz" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        stages.prepare(stages.stage_checks(tiny_overrides, "tiny", 5, [], 5, 0.5, 5), str(tmp_path / "d2"),
                       corpus=str(tmp_path / "missing.txt"))
    assert e.value.code == 2 and "data.path" in capsys.readouterr().err


def test_prepare_checks_a_given_teacher_and_tokenises_the_users_corpus(tmp_path, tiny_overrides, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    checks = stages.stage_checks(tiny_overrides, "tiny", 5, [], 5, 0.5, 5, skip_pretrain=True)
    assert "pretrain" not in checks
    info = stages.prepare(checks, str(tmp_path / "dataset"), corpus=str(corpus))
    assert info["tokens"] == len(corpus.read_bytes()) + 1 or info["tokens"] > 10000  # byte tokens (+ separators)
    assert list((tmp_path / "dataset").glob("*/tokens.bin"))
    with pytest.raises(SystemExit) as e:
        stages.prepare(checks, str(tmp_path / "dataset"), corpus=str(corpus), teacher=str(tmp_path))
    assert e.value.code == 2 and str(tmp_path) in capsys.readouterr().err


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_model_artifact_is_lean(trained_teacher, tmp_path):
    """Weights, model config, run config, metrics, summary: no optimizer state, no second copy."""
    from vishwamai.checkpoint.io import load_model
    from vishwamai.checkpoint.manifest import verify

    out = stages.lean_model(trained_teacher, str(tmp_path / "model"))
    names = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "model_config.json", "config.yaml", "metrics.jsonl", "summary.json",
            "manifest.json"} <= names
    assert not names & {"trainer_state.pt", "checkpoints", "tensorboard", "mlflow.db", "mlruns"}
    verify(out)  # a fresh manifest for what was copied
    assert stages.model_dir(str(out)) == str(out)
    load_model(out)
    # Beside the weights only small text files (configs, metrics, summary, manifest).
    assert du(out) - (out / "model.safetensors").stat().st_size < 64_000, sorted(names)
