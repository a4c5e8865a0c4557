"""Validate custom resources offline against the OpenAPI schemas of the operator releases we install.

tests/data/crds/*.schema.yaml hold each CRD's `openAPIV3Schema` (descriptions removed), with the
release and commit they come from in the file's header:
  PyTorchJob  kubeflow.org/v1        Training Operator v1.9.3
  TrainJob    trainer.kubeflow.org/v1alpha1  Kubeflow Trainer v2.3.0
  Experiment  kubeflow.org/v1beta1   Katib v0.19.0 (its CRD preserves unknown fields: Katib checks an
              Experiment in its admission webhook instead; katib_webhook_errors has the simple rules)

The API server's structural-schema rules become JSON Schema: an object with `properties` admits no
other field (kubectl's strict field validation, on by default since Kubernetes 1.27, rejects unknown
fields) unless it says x-kubernetes-preserve-unknown-fields; int-or-string is either; `nullable`
admits null.  CEL rules (x-kubernetes-validations) are not evaluated, except the TrainJob's name rules,
written out in crd_errors.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).parent / "data" / "crds"
FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs-training-operator-v1.9.3.schema.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs-trainer-v2.3.0.schema.yaml",
    ("kubeflow.org/v1beta1", "Experiment"): "kubeflow.org_experiments-katib-v0.19.0.schema.yaml",
}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in node:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    doc = yaml.safe_load((CRD_DIR / FILES[(api_version, kind)]).read_text())
    schema = to_json_schema(doc["openAPIV3Schema"])
    # The API server checks metadata itself; the CRD schema only says `type: object`.
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of a PyTorchJob / TrainJob / Experiment, as `path: message`."""
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)]
    name = doc.get("metadata", {}).get("name", "")
    if doc["kind"] == "TrainJob" and (not DNS_1035.match(name) or len(name) > 63):  # the CRD's CEL rules
        errors.append(f"metadata/name: {name!r} must be a DNS-1035 label of at most 63 characters")
    return errors


def katib_webhook_errors(exp: dict[str, Any]) -> list[str]:
    """The simple checks of Katib's Experiment validator (pkg/webhook/v1beta1/experiment/validator)."""
    spec, errors = exp["spec"], []
    objective = spec.get("objective") or {}
    if objective.get("type") not in ("minimize", "maximize"):
        errors.append("spec.objective.type must be minimize or maximize")
    if not objective.get("objectiveMetricName"):
        errors.append("spec.objective.objectiveMetricName is required")
    if objective.get("objectiveMetricName") in (objective.get("additionalMetricNames") or []):
        errors.append("spec.objective.additionalMetricNames must not contain the objective metric")
    if not (spec.get("algorithm") or {}).get("algorithmName"):
        errors.append("spec.algorithm.algorithmName is required")
    for key in ("parallelTrialCount", "maxTrialCount", "maxFailedTrialCount"):
        if key in spec and spec[key] <= 0:
            errors.append(f"spec.{key} must be > 0")
    if spec.get("maxTrialCount", 1) < spec.get("parallelTrialCount", 1):
        errors.append("spec.parallelTrialCount must not exceed spec.maxTrialCount")
    names = [p["name"] for p in spec.get("parameters", [])]
    if not names or len(names) != len(set(names)):
        errors.append("spec.parameters must be non-empty with unique names")
    template = spec.get("trialTemplate") or {}
    references = {t["reference"] for t in template.get("trialParameters", [])}
    if not references <= set(names):
        errors.append(f"spec.trialTemplate.trialParameters reference unknown parameters {references - set(names)}")
    if not template.get("primaryContainerName"):
        errors.append("spec.trialTemplate.primaryContainerName is required")
    collector = ((spec.get("metricsCollectorSpec") or {}).get("collector") or {}).get("kind", "StdOut")
    if collector not in ("StdOut", "File", "TensorFlowEvent", "PrometheusMetric", "Custom", "None", "Push"):
        errors.append(f"unknown metrics collector {collector}")
    return errors


def pytorchjob_webhook_errors(job: dict[str, Any]) -> list[str]:
    """The simple checks of the Training Operator's PyTorchJob webhook (pkg/webhooks/pytorch, v1.9)."""
    errors = []
    name = job["metadata"].get("name", "")
    if not DNS_1035.match(name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} must be a DNS-1035 label")
    replicas = job["spec"].get("pytorchReplicaSpecs") or {}
    for role, spec in replicas.items():
        if role not in ("Master", "Worker"):
            errors.append(f"pytorchReplicaSpecs: unknown replica type {role}")
        if role == "Master" and spec.get("replicas", 1) != 1:
            errors.append("pytorchReplicaSpecs.Master.replicas must be 1")
        if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never", "ExitCode"):
            errors.append(f"pytorchReplicaSpecs.{role}.restartPolicy {spec['restartPolicy']!r} is not a restart policy")
        containers = spec["template"]["spec"].get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(f"pytorchReplicaSpecs.{role}: no container named pytorch")
        if any(not c.get("image") for c in containers):
            errors.append(f"pytorchReplicaSpecs.{role}: a container without an image")
    if "elasticPolicy" in job["spec"] and "nProcPerNode" in job["spec"]["elasticPolicy"] and "nprocPerNode" in job["spec"]:
        errors.append("spec.elasticPolicy.nProcPerNode and spec.nprocPerNode are mutually exclusive")
    return errors
