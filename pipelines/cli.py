"""`vishwamai-pipeline`: compile, upload, run on a Kubeflow cluster, or run locally with kfp.local.

    vishwamai-pipeline compile --output vishwamai.yaml [--image IMG] [--gpus 1 --node-selector k=v ...]
    vishwamai-pipeline upload  --package vishwamai.yaml [--name NAME] [--version V]   (new version if NAME exists)
    vishwamai-pipeline run     --package vishwamai.yaml [--experiment E] [--param pretrain_steps=1000 ...]
    vishwamai-pipeline run-local [--param ...] [--pipeline-root DIR]

Cluster access: --host / $KFP_HOST, --namespace / $KFP_NAMESPACE, and a bearer token read from
--token-file / $KFP_TOKEN_FILE (a file, never a literal on the command line); with none,
kfp.Client's own credentials (in-cluster service account, kubeconfig) apply.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from pipelines.training_pipeline import PIPELINE_NAME, PodSettings


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
        caching=not args.no_cache)


def client(args: argparse.Namespace):
    import kfp

    token_file = args.token_file or os.environ.get("KFP_TOKEN_FILE")
    token = Path(token_file).read_text().strip() if token_file else None
    return kfp.Client(host=args.host or os.environ.get("KFP_HOST"),
                      namespace=args.namespace or os.environ.get("KFP_NAMESPACE", "kubeflow"),
                      existing_token=token)


def package(args: argparse.Namespace) -> str:
    """The compiled pipeline: --package if given, else compiled now from the flags."""
    if args.package:
        return args.package
    from pipelines.training_pipeline import compile_pipeline

    out = Path(tempfile.mkdtemp()) / "vishwamai-pipeline.yaml"
    return compile_pipeline(str(out), args.image, pod_settings(args))


def cmd_compile(args: argparse.Namespace) -> None:
    from pipelines.training_pipeline import compile_pipeline

    print(compile_pipeline(args.output, args.image, pod_settings(args)))


def upload(kfp_client, path: str, name: str, version: Optional[str]) -> tuple[str, Optional[str]]:
    """Upload as a new pipeline, or as a new version when `name` exists. Returns (pipeline id, version id)."""
    pipeline_id = kfp_client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline = kfp_client.upload_pipeline(path, pipeline_name=name)
        return pipeline.pipeline_id, None
    from datetime import datetime, timezone

    version = version or datetime.now(timezone.utc).strftime("v%Y%m%d-%H%M%S")
    result = kfp_client.upload_pipeline_version(path, pipeline_version_name=version, pipeline_id=pipeline_id)
    return pipeline_id, result.pipeline_version_id


def cmd_upload(args: argparse.Namespace) -> None:
    pipeline_id, version_id = upload(client(args), package(args), args.name, args.version)
    print(f"pipeline {args.name}: id {pipeline_id}" + (f", new version {version_id}" if version_id else ""))


def cmd_run(args: argparse.Namespace) -> None:
    run = client(args).create_run_from_pipeline_package(
        package(args), arguments=parse_params(args.param), run_name=args.run_name,
        experiment_name=args.experiment, namespace=args.namespace or os.environ.get("KFP_NAMESPACE"),
        enable_caching=not args.no_cache)
    print(f"run {run.run_id} started")


def run_local(params: dict[str, Any], pipeline_root: str, image: Optional[str] = None):
    """The whole pipeline through kfp.local's subprocess runner in this environment (no cluster)."""
    from kfp import local

    from pipelines.training_pipeline import build_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    kwargs = {"image": image} if image else {}
    return build_pipeline(**kwargs)(**params)


def cmd_run_local(args: argparse.Namespace) -> None:
    task = run_local(parse_params(args.param), args.pipeline_root)
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
    g.add_argument("--cpu-limit", default=d.cpu_limit, help="default %(default)s")
    g.add_argument("--memory", default=d.memory_request, help="memory request (default %(default)s)")
    g.add_argument("--memory-limit", default=d.memory_limit, help="default %(default)s")
    g.add_argument("--gpus", type=int, default=0, help="GPUs per training stage (pretrain, distill, prune)")
    g.add_argument("--gpu-resource", default="nvidia.com/gpu")
    g.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    g.add_argument("--retries", type=int, default=d.retries, help="retries per task (default %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="disable KFP caching")

    cluster = argparse.ArgumentParser(add_help=False)
    g = cluster.add_argument_group("cluster")
    g.add_argument("--host", help="KFP API endpoint (default $KFP_HOST)")
    g.add_argument("--namespace", help="Kubeflow profile namespace (default $KFP_NAMESPACE)")
    g.add_argument("--token-file", help="file holding a bearer token (default $KFP_TOKEN_FILE)")
    g.add_argument("--package", help="a compiled pipeline YAML (default: compile now)")

    c = sub.add_parser("compile", parents=[pods], help="compile the pipeline to its IR YAML")
    c.add_argument("--output", "-o", required=True)
    c.set_defaults(func=cmd_compile)

    u = sub.add_parser("upload", parents=[pods, cluster], help="upload (a new version if the name exists)")
    u.add_argument("--name", default=PIPELINE_NAME)
    u.add_argument("--version", help="version name (default: a UTC timestamp)")
    u.set_defaults(func=cmd_upload)

    r = sub.add_parser("run", parents=[pods, cluster], help="start a run on the cluster")
    r.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--experiment", default="vishwamai")
    r.add_argument("--run-name", default=None)
    r.set_defaults(func=cmd_run)

    lr = sub.add_parser("run-local", help="run every stage here through kfp.local (no cluster)")
    lr.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    lr.add_argument("--pipeline-root", default="outputs/kfp-local")
    lr.set_defaults(func=cmd_run_local)
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
