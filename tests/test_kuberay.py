"""manifests/kuberay: the RayJob that runs a Ray Tune study on its own KubeRay cluster renders, passes
the KubeRay CRD's OpenAPI schema (tests/crds/, vendored from KubeRay v1.7.0's
ray-operator/config/crd/bases/ray.io_rayjobs.yaml, Apache-2.0), and its pods and entrypoint are valid.

Unknown fields: an API server prunes them silently from a structural schema, so the check here is
stricter than the server (an unknown field is an error, as a typo would be lost on a cluster)."""

from __future__ import annotations

import gzip
import shlex
from pathlib import Path

import pytest
import yaml

from test_manifests import K8S_VERSION, as_pod, render

CRD = Path(__file__).parent / "crds" / "kuberay-v1.7.0-ray.io_rayjobs.yaml.gz"


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (doc,) = [d for d in render("kuberay") if d["kind"] == "RayJob"]
    return doc


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    """The v1 RayJob schema, made strict (1.4 MB of YAML: libyaml's loader where there is one)."""
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(served["schema"]["openAPIV3Schema"])


def strict(schema):
    """The schema with unknown fields refused wherever it lists the known ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def pods(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"]
    out = [("head", cluster["headGroupSpec"]["template"]["spec"]),
           ("submitter", spec["submitterPodTemplate"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return out


def test_rayjob_passes_the_kuberay_crd_schema(rayjob, rayjob_schema):
    import copy

    import jsonschema

    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["metadata"]["namespace"] == "vishwamai"
    validator = jsonschema.Draft7Validator(rayjob_schema)
    validator.validate(rayjob)
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}  # a typo: must not pass
    broken["spec"]["backoffLimit"] = "2"
    assert {e.message.split(" (")[0] for e in validator.iter_errors(broken)} >= {
        "Additional properties are not allowed", "'2' is not of type 'integer'"}


def test_rayjob_pods_validate_and_run_locked_down(rayjob):
    import kubernetes_validate

    for name, spec in pods(rayjob):
        kubernetes_validate.validate(as_pod(name, "vishwamai", spec), K8S_VERSION, strict=True)
        assert spec["securityContext"]["runAsNonRoot"] and not spec["automountServiceAccountToken"]
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] and c["image"] == "vishwamai:0.1.0-ray"
            assert c["resources"]["requests"] == c["resources"]["limits"]
            for env in c.get("env", []):  # credentials only from the optional Secret, never literals
                if env["name"] in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN"):
                    assert env["valueFrom"]["secretKeyRef"]["optional"] is True


def test_rayjob_entrypoint_is_a_valid_ray_study(rayjob, tmp_path):
    """The entrypoint's overrides compose and validate as a study (PBT on Ray, joining the cluster)."""
    from vishwamai.config import validate
    from vishwamai.training_v2 import compose_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "vishwamai.training_v2"]
    overrides = [a for a in argv[3:] if not a.startswith("hydra.")]
    cfg = compose_config(overrides, run_dir=str(tmp_path))
    validate(cfg)
    tu = cfg.tuning
    assert tu.enabled and tu.framework == "ray" and tu.ray_address == "auto" and tu.pruner == "pbt"
    assert tu.storage.startswith("/data/") and "hydra.run.dir=/data/runs/vishwamai-tune" in argv
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    cpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert tu.n_jobs * tu.ray_cpus_per_trial <= workers["maxReplicas"] * cpus  # every trial can be placed
    ray = pytest.importorskip("ray")
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__  # the version vishwamai[ray] pins
