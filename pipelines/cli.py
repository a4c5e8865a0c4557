"""`vishwamai-pipeline`: compile, upload, run on a Kubeflow cluster, or run locally with kfp.local.

    vishwamai-pipeline compile --output vishwamai.yaml [--image IMG] [--gpus 1 --node-selector k=v ...]
                               [--corpus-input] [--teacher-input] [--data-pvc PVC] [--pretrain-nodes N]
    vishwamai-pipeline upload  --package vishwamai.yaml [--name NAME] [--version V]   (new version if NAME exists)
    vishwamai-pipeline run     --package vishwamai.yaml [--experiment E] [--param pretrain_steps=1000 ...]
    vishwamai-pipeline run-local [--param ...] [--param corpus_uri=FILE] [--param teacher_uri=DIR]

Cluster access: --host / $KFP_HOST, and a bearer token read from --token-file / $KFP_TOKEN_FILE (a file,
never a literal on the command line); with none, kfp.Client's own credentials (in-cluster service account,
kubeconfig) apply.  Two namespaces, not one: --namespace / $KFP_NAMESPACE is your Kubeflow profile
namespace (where runs go, and pipelines uploaded for that profile only); --kfp-namespace /
$KFP_INSTALL_NAMESPACE is where Kubeflow Pipelines itself is installed (default kubeflow), which
kfp.Client uses to find its service from inside a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from pipelines.training_pipeline import PIPELINE_NAME, PipelineShape, PodSettings, SettingsError

EXIT_USAGE = 2


def parse_params(items: list[str]) -> dict[str, Any]:
    """--param key=value (value parsed as JSON when it is: numbers, lists, booleans)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --param expects key=value, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def parse_toleration(text: str) -> tuple[str, str, Optional[str], Optional[str]]:
    """key[=value][:effect] -> (key, Equal|Exists, value, effect)."""
    spec, _, effect = text.partition(":")
    key, sep, value = spec.partition("=")
    return key, "Equal" if sep else "Exists", value if sep else None, effect or None


def pod_settings(args: argparse.Namespace) -> PodSettings:
    return PodSettings(
        cpu_request=args.cpu, cpu_limit=args.cpu_limit, memory_request=args.memory,
        memory_limit=args.memory_limit, gpus=args.gpus, gpu_resource=args.gpu_resource,
        node_selector=dict(s.split("=", 1) for s in args.node_selector),
        tolerations=[parse_toleration(t) for t in args.toleration], retries=args.retries,
        caching=not args.no_cache, security_context=not args.no_security_context, data_pvc=args.data_pvc,
        kueue_queue=args.kueue_queue, priority_class=args.priority_class)


def pipeline_shape(args: argparse.Namespace) -> PipelineShape:
    return PipelineShape(corpus_uri=args.corpus_input, teacher_uri=args.teacher_input,
                         pretrain_nodes=args.pretrain_nodes, nproc_per_node=args.nproc_per_node,
                         pretrain_namespace=args.pretrain_namespace, pretrain_timeout_s=args.pretrain_timeout)


def profile_namespace(args: argparse.Namespace) -> Optional[str]:
    return args.namespace or os.environ.get("KFP_NAMESPACE") or None


def client(args: argparse.Namespace):
    """kfp.Client for the KFP install in --kfp-namespace (not the profile namespace: that is per call)."""
    import kfp

    token_file = args.token_file or os.environ.get("KFP_TOKEN_FILE")
    token = Path(token_file).read_text().strip() if token_file else None
    return kfp.Client(host=args.host or os.environ.get("KFP_HOST"),
                      namespace=args.kfp_namespace or os.environ.get("KFP_INSTALL_NAMESPACE", "kubeflow"),
                      existing_token=token)


def package(args: argparse.Namespace) -> str:
    """The compiled pipeline: --package if given, else compiled now from the flags."""
    if args.package:
        return args.package
    from pipelines.training_pipeline import compile_pipeline

    out = Path(tempfile.mkdtemp()) / "vishwamai-pipeline.yaml"
    return compile_pipeline(str(out), args.image, pod_settings(args), pipeline_shape(args))


def cmd_compile(args: argparse.Namespace) -> None:
    from pipelines.training_pipeline import compile_pipeline

    print(compile_pipeline(args.output, args.image, pod_settings(args), pipeline_shape(args)))


def find_pipeline(kfp_client, name: str, namespace: Optional[str]) -> Optional[str]:
    """The id of the pipeline called `name`: shared, or (with a namespace) that profile's own."""
    if namespace is None:
        return kfp_client.get_pipeline_id(name)
    name_filter = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = kfp_client.list_pipelines(filter=name_filter, namespace=namespace).pipelines or []
    return found[0].pipeline_id if found else None


def upload(kfp_client, path: str, name: str, version: Optional[str], namespace: Optional[str] = None
           ) -> tuple[str, Optional[str]]:
    """Upload as a new pipeline, or as a new version when `name` exists. Returns (pipeline id, version id).

    With `namespace` (a profile) the pipeline is that profile's own; without, a shared pipeline."""
    pipeline_id = find_pipeline(kfp_client, name, namespace)
    if pipeline_id is None:
        pipeline = kfp_client.upload_pipeline(path, pipeline_name=name, namespace=namespace)
        return pipeline.pipeline_id, None
    from datetime import datetime, timezone

    version = version or datetime.now(timezone.utc).strftime("v%Y%m%d-%H%M%S")
    result = kfp_client.upload_pipeline_version(path, pipeline_version_name=version, pipeline_id=pipeline_id)
    return pipeline_id, result.pipeline_version_id


def cmd_upload(args: argparse.Namespace) -> None:
    namespace = None if args.shared else profile_namespace(args)
    pipeline_id, version_id = upload(client(args), package(args), args.name, args.version, namespace)
    print(f"pipeline {args.name}: id {pipeline_id}" + (f", new version {version_id}" if version_id else ""))


def cmd_run(args: argparse.Namespace) -> None:
    kfp_client = client(args)
    run = kfp_client.create_run_from_pipeline_package(
        package(args), arguments=parse_params(args.param), run_name=args.run_name,
        experiment_name=args.experiment, namespace=profile_namespace(args),
        enable_caching=not args.no_cache)
    print(f"run {run.run_id} started")
    if args.wait:
        state = kfp_client.wait_for_run_completion(run.run_id, timeout=args.wait).state
        print(f"run {run.run_id}: {state}")
        if state != "SUCCEEDED":
            raise SystemExit(1)


def run_local(params: dict[str, Any], pipeline_root: str, image: Optional[str] = None,
              shape: Optional[PipelineShape] = None):
    """The whole pipeline through kfp.local's subprocess runner in this environment (no cluster).

    corpus_uri / teacher_uri (with the shape that has them) may be local paths here."""
    from kfp import local

    from pipelines.training_pipeline import build_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    kwargs = {"image": image} if image else {}
    return build_pipeline(**kwargs, shape=shape)(**params)


def cmd_run_local(args: argparse.Namespace) -> None:
    params = parse_params(args.param)
    shape = PipelineShape(corpus_uri="corpus_uri" in params, teacher_uri="teacher_uri" in params)
    task = run_local(params, args.pipeline_root, shape=shape)
    for name, artifact in task.outputs.items():
        print(f"{name}: {getattr(artifact, 'path', artifact)}")


def build_parser() -> argparse.ArgumentParser:
    from components import DEFAULT_IMAGE

    p = argparse.ArgumentParser(prog="vishwamai-pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    pods = argparse.ArgumentParser(add_help=False)
    g = pods.add_argument_group("pods (fixed at compile time)")
    g.add_argument("--image", default=DEFAULT_IMAGE, help="the project image (Dockerfile); default %(default)s")
    d = PodSettings()
    g.add_argument("--cpu", default=d.cpu_request, help="CPU request per stage (default %(default)s)")
    g.add_argument("--cpu-limit", help=f"at least --cpu (default: the larger of --cpu and {d.DEFAULT_CPU_LIMIT})")
    g.add_argument("--memory", default=d.memory_request, help="memory request (default %(default)s)")
    g.add_argument("--memory-limit",
                   help=f"at least --memory (default: the larger of --memory and {d.DEFAULT_MEMORY_LIMIT})")
    g.add_argument("--gpus", type=int, default=0, help="GPUs per training stage (pretrain, distill, prune)")
    g.add_argument("--gpu-resource", default="nvidia.com/gpu")
    g.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    g.add_argument("--retries", type=int, default=d.retries, help="retries per task (default %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="disable KFP caching")
    g.add_argument("--no-security-context", action="store_true",
                   help="leave out the platform security context (for KFP backends older than 2.16; the "
                        "image still runs as its non-root user)")
    g.add_argument("--data-pvc", metavar="PVC", help="a PersistentVolumeClaim mounted at /data in every stage")
    g.add_argument("--kueue-queue", metavar="QUEUE", help="Kueue LocalQueue for every pod (and the PyTorchJob)")
    g.add_argument("--priority-class", metavar="NAME", help="Kueue WorkloadPriorityClass for every pod")
    g = pods.add_argument_group("inputs and multi-node pretraining (fixed at compile time)")
    g.add_argument("--corpus-input", action="store_true",
                   help="add the run parameter corpus_uri: your text (a file or folder in object storage), "
                        "imported as a Dataset")
    g.add_argument("--teacher-input", action="store_true",
                   help="add the run parameter teacher_uri: an existing model directory; pretraining is skipped")
    g.add_argument("--pretrain-nodes", type=int, default=1,
                   help="> 1: pretrain as a PyTorchJob of that many pods (needs --data-pvc, ReadWriteMany)")
    g.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per PyTorchJob pod")
    g.add_argument("--pretrain-namespace", default="", help="the PyTorchJob's namespace (default: the run's)")
    g.add_argument("--pretrain-timeout", type=int, default=172800, help="seconds (default %(default)s)")

    cluster = argparse.ArgumentParser(add_help=False)
    g = cluster.add_argument_group("cluster")
    g.add_argument("--host", help="KFP API endpoint (default $KFP_HOST)")
    g.add_argument("--namespace", help="your Kubeflow profile namespace: runs, namespaced pipelines "
                                       "(default $KFP_NAMESPACE)")
    g.add_argument("--kfp-namespace", help="where Kubeflow Pipelines is installed "
                                           "(default $KFP_INSTALL_NAMESPACE, else kubeflow)")
    g.add_argument("--token-file", help="file holding a bearer token (default $KFP_TOKEN_FILE)")
    g.add_argument("--package", help="a compiled pipeline YAML (default: compile now)")

    c = sub.add_parser("compile", parents=[pods], help="compile the pipeline to its IR YAML")
    c.add_argument("--output", "-o", required=True)
    c.set_defaults(func=cmd_compile)

    u = sub.add_parser("upload", parents=[pods, cluster], help="upload (a new version if the name exists)")
    u.add_argument("--name", default=PIPELINE_NAME)
    u.add_argument("--version", help="version name (default: a UTC timestamp)")
    u.add_argument("--shared", action="store_true", help="a shared pipeline instead of one in --namespace")
    u.set_defaults(func=cmd_upload)

    r = sub.add_parser("run", parents=[pods, cluster], help="start a run on the cluster")
    r.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--experiment", default="vishwamai")
    r.add_argument("--run-name", default=None)
    r.add_argument("--wait", type=int, default=0, metavar="SECONDS",
                   help="wait for the run to finish (exit 1 unless it succeeded)")
    r.set_defaults(func=cmd_run)

    lr = sub.add_parser("run-local", help="run every stage here through kfp.local (no cluster)")
    lr.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    lr.add_argument("--pipeline-root", default="outputs/kfp-local")
    lr.set_defaults(func=cmd_run_local)
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


if __name__ == "__main__":
    main(sys.argv[1:])
