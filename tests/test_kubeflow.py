"""components/, pipelines/ and vishwamai/kubeflow: the KFP pipeline, its CLI, and the pod launcher.

Real tools: the kfp compiler, kfp.local's SubprocessRunner, torchrun processes. The one stand-in is
the Kubeflow Pipelines API server (`upload`), which cannot run here: a recording fake client.
"""

# No `from __future__ import annotations`: a test defines a KFP pipeline, whose annotations KFP reads.

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import MetricsSink as Sink
from pipelines.cli import main as cli_main, parse_params, parse_toleration, upload
from pipelines.training_pipeline import STAGE_ORDER, PodSettings, compile_pipeline
from vishwamai.kubeflow import stages
from vishwamai.kubeflow.launch import pod_exit_code
from vishwamai.kubeflow.wait import wait_for

ROOT = Path(__file__).resolve().parents[1]


def load_compiled(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    pod = PodSettings(gpus=2, node_selector={"pool": "gpu"}, tolerations=[parse_toleration("nvidia.com/gpu:NoSchedule")])
    compile_pipeline(str(out), image="registry.example.com/vishwamai:1.2.3-cuda", pod=pod)
    return load_compiled(out)


# ------------------------------------------------------------------------------------ compile
TRAINING = ("pretrain", "distill", "prune")


def executors(spec: dict) -> dict[str, dict]:
    return {name: e["container"] for name, e in spec["deploymentSpec"]["executors"].items() if "container" in e}


def k8s_executors(platform: dict) -> dict[str, dict]:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def assert_requests_within_limits(spec: dict) -> None:
    """What the API server checks: no container's request above its limit."""
    from kubernetes.utils.quantity import parse_quantity

    for name, container in executors(spec).items():
        r = container["resources"]
        assert parse_quantity(r["cpuRequest"]) <= parse_quantity(r["cpuLimit"]), (name, r)
        assert parse_quantity(r["memoryRequest"]) <= parse_quantity(r["memoryLimit"]), (name, r)


def test_pipeline_stages_in_order(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STAGE_ORDER)
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert deps["prepare"] == set()
    assert deps["pretrain"] == {"prepare"}
    assert deps["distill"] == {"prepare", "pretrain"}
    assert deps["prune"] == {"prepare", "distill"}
    assert deps["quantize"] == {"prepare", "prune"}
    assert deps["evaluate"] == {"prepare", "pretrain", "distill", "prune", "quantize"}
    assert deps["export"] == {"prune", "quantize"}


def producer(task: dict, artifact: str) -> tuple[str, str]:
    ref = task["inputs"]["artifacts"][artifact]["taskOutputArtifact"]
    return ref["producerTask"], ref["outputArtifactKey"]


def test_artifacts_flow_between_stages(compiled):
    tasks = compiled[0]["root"]["dag"]["tasks"]
    assert producer(tasks["distill"], "teacher") == ("pretrain", "model")
    assert producer(tasks["prune"], "student") == ("distill", "student")
    assert producer(tasks["quantize"], "pruned") == ("prune", "pruned")
    for stage in ("pretrain", "distill", "prune", "quantize", "evaluate"):  # one tokenised corpus for all
        assert producer(tasks[stage], "dataset") == ("prepare", "dataset")
        assert "corpus" not in tasks[stage]["inputs"].get("artifacts", {})  # no corpus input in this shape
    assert {a: producer(tasks["evaluate"], a) for a in ("teacher", "student", "pruned", "quantized")} == {
        "teacher": ("pretrain", "model"), "student": ("distill", "student"),
        "pruned": ("prune", "pruned"), "quantized": ("quantize", "quantized")}
    outputs = compiled[0]["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert outputs["report_html"]["artifactType"]["schemaTitle"] == "system.HTML"
    # The seam for an export step: the quantized Model artifact is the pipeline's final model.
    quantized = compiled[0]["components"]["comp-quantize"]["outputDefinitions"]["artifacts"]["quantized"]
    assert quantized["artifactType"]["schemaTitle"] == "system.Model"
    # The last stage: the final model, exported in the Hugging Face layout, is a pipeline output.
    assert producer(tasks["export"], "quantized") == ("quantize", "quantized")
    assert producer(tasks["export"], "pruned") == ("prune", "pruned")
    pipeline_outputs = compiled[0]["root"]["outputDefinitions"]["artifacts"]
    assert pipeline_outputs["model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert compiled[0]["root"]["dag"]["outputs"]["artifacts"]["model"]["artifactSelectors"][0] == {
        "outputArtifactKey": "exported", "producerSubtask": "export"}


def test_parameters_image_resources_retries_and_scheduling(compiled):
    spec, platform = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"model_preset", "pretrain_steps", "target_sparsity", "quantization_mode", "overrides",
            "student_overrides"} <= set(params)
    assert not {"corpus_uri", "teacher_uri"} & set(params)
    for name, container in executors(spec).items():
        assert container["image"] == "registry.example.com/vishwamai:1.2.3-cuda", name
        assert "pip install" not in " ".join(container["command"])  # everything comes from the image
        gpus = container["resources"].get("accelerator", {}).get("resourceCount")
        assert (gpus == "2") == any(name == f"exec-{s}" for s in TRAINING), name
    assert_requests_within_limits(spec)
    tasks = spec["root"]["dag"]["tasks"]
    for name, task in tasks.items():
        # prepare's failures are user errors: no retries; the training stages retry transient failures
        assert task.get("retryPolicy", {}).get("maxRetryCount", 0) == (0 if name == "prepare" else 2), name
        assert task["cachingOptions"].get("enableCache") is True
    k8s = k8s_executors(platform)
    assert all(e["nodeSelector"]["labels"] == {"pool": "gpu"} for e in k8s.values())
    assert all(e["tolerations"][0]["key"] == "nvidia.com/gpu" for e in k8s.values())
    assert all(e["securityContext"]["runAsNonRoot"] is True and int(e["securityContext"]["runAsUser"]) >= 10000
               for e in k8s.values())


def test_tracking_credentials_come_from_an_optional_secret(compiled):
    for name, e in k8s_executors(compiled[1]).items():
        (secret,) = e["secretAsEnv"]
        assert secret["secretName"] == "vishwamai-secrets" and secret["optional"] is True, name
        assert {k["envVar"] for k in secret["keyToEnv"]} == {
            "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def test_cli_compile_writes_the_ir(tmp_path):
    out = tmp_path / "p.yaml"
    cli_main(["compile", "--output", str(out), "--image", "img:7", "--no-cache", "--retries", "0"])
    spec, platform = load_compiled(out)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STAGE_ORDER)
    assert all(set(e) == {"securityContext", "secretAsEnv"} for e in k8s_executors(platform).values())
    assert all("retryPolicy" not in t or t["retryPolicy"].get("maxRetryCount", 0) == 0 for t in tasks.values())
    assert not any(t["cachingOptions"].get("enableCache") for t in tasks.values())


def test_readme_gpu_compile_makes_valid_pods(tmp_path):
    """`--cpu 8 --memory 32G` used to keep the 4 CPU / 8G default limits: pods the API server rejects."""
    out = tmp_path / "p.yaml"
    cli_main(["compile", "--output", str(out), "--gpus", "1", "--cpu", "8", "--memory", "32G"])
    spec, _ = load_compiled(out)
    assert_requests_within_limits(spec)
    resources = executors(spec)["exec-pretrain"]["resources"]
    assert (float(resources["cpuLimit"]), resources["memoryLimit"]) == (8.0, resources["memoryRequest"])
    small = PodSettings(cpu_request="1", memory_request="1Gi")  # a small request keeps the default limits
    assert (small.cpu_limit, small.memory_limit) == (PodSettings.DEFAULT_CPU_LIMIT, PodSettings.DEFAULT_MEMORY_LIMIT)


@pytest.mark.parametrize("flags, culprits", [(["--cpu", "8", "--cpu-limit", "4"], ("--cpu-limit 4", "--cpu 8")),
                                             (["--memory", "32G", "--memory-limit", "16Gi"],
                                              ("--memory-limit 16Gi", "--memory 32G")),
                                             (["--cpu", "lots"], ("--cpu", "lots"))])
def test_a_limit_below_its_request_is_refused_naming_both_flags(tmp_path, capsys, flags, culprits):
    with pytest.raises(SystemExit) as e:
        cli_main(["compile", "--output", str(tmp_path / "p.yaml"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(c in err for c in culprits) and "Traceback" not in err
    assert not (tmp_path / "p.yaml").exists()


def test_security_context_can_be_left_out_for_older_kfp_backends(tmp_path):
    with_sc, without = tmp_path / "a.yaml", tmp_path / "b.yaml"
    cli_main(["compile", "--output", str(with_sc)])
    cli_main(["compile", "--output", str(without), "--no-security-context"])
    assert all("securityContext" in e for e in k8s_executors(load_compiled(with_sc)[1]).values())
    spec, platform = load_compiled(without)
    assert not any("securityContext" in e for e in k8s_executors(platform).values())
    assert set(spec["root"]["dag"]["tasks"]) == set(STAGE_ORDER)  # otherwise the same pipeline


def test_kfp_kubernetes_floor_knows_the_security_context():
    """pyproject's floor for kfp-kubernetes is the first release with set_security_context."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["kubeflow"]
    (floor,) = [r for r in extra if r.startswith("kfp-kubernetes")]
    assert ">=2.16" in floor
    from kfp import kubernetes

    assert hasattr(kubernetes, "set_security_context")


def test_corpus_and_teacher_inputs(tmp_path):
    """--corpus-input / --teacher-input: run parameters imported as artifacts; with a teacher, no pretraining."""
    out = tmp_path / "p.yaml"
    cli_main(["compile", "--output", str(out), "--corpus-input", "--teacher-input", "--data-pvc", "team-data"])
    spec, platform = load_compiled(out)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["corpus_uri"]["parameterType"] == params["teacher_uri"]["parameterType"] == "STRING"
    assert not params["corpus_uri"].get("isOptional") and not params["teacher_uri"].get("isOptional")
    tasks = spec["root"]["dag"]["tasks"]
    assert "pretrain" not in tasks
    importers = {t["inputs"]["parameters"]["uri"]["componentInputParameter"]: name
                 for name, t in tasks.items() if name.startswith("importer")}
    corpus_task, teacher_task = importers["corpus_uri"], importers["teacher_uri"]

    def imported_type(task: str) -> str:
        executor = spec["deploymentSpec"]["executors"][tasks[task]["componentRef"]["name"].replace("comp-", "exec-")]
        return executor["importer"]["typeSchema"]["schemaTitle"]

    assert (imported_type(corpus_task), imported_type(teacher_task)) == ("system.Dataset", "system.Model")
    assert producer(tasks["prepare"], "teacher") == (teacher_task, "artifact")
    assert producer(tasks["distill"], "teacher") == (teacher_task, "artifact")
    assert producer(tasks["evaluate"], "teacher") == (teacher_task, "artifact")
    for stage in ("prepare", "distill", "prune", "quantize", "evaluate"):
        assert producer(tasks[stage], "corpus") == (corpus_task, "artifact"), stage
    mounts = {name: e.get("pvcMount") for name, e in k8s_executors(platform).items()}
    assert all(m and m[0]["constant"] == "team-data" and m[0]["mountPath"] == "/data" for m in mounts.values())
    assert_requests_within_limits(spec)


def test_scheduling_options_become_pod_labels(tmp_path):
    out = tmp_path / "p.yaml"
    cli_main(["compile", "--output", str(out), "--kueue-queue", "team-gpus", "--priority-class", "batch-low"])
    for name, e in k8s_executors(load_compiled(out)[1]).items():
        assert e["podMetadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-gpus",
                                              "kueue.x-k8s.io/priority-class": "batch-low"}, name


def test_multi_node_pretraining_compiles_to_the_pytorchjob_launcher(tmp_path):
    out = tmp_path / "p.yaml"
    cli_main(["compile", "--output", str(out), "--pretrain-nodes", "3", "--gpus", "2", "--nproc-per-node", "2",
              "--data-pvc", "shared-rwx", "--kueue-queue", "q"])
    spec, _ = load_compiled(out)
    tasks = spec["root"]["dag"]["tasks"]
    assert "pretrain" not in tasks and producer(tasks["distill"], "teacher") == ("pretrain-job", "model")
    settings = tasks["pretrain-job"]["inputs"]["parameters"]["job_settings"]["runtimeValue"]["constant"]
    assert settings["nodes"] == 3 and settings["nproc_per_node"] == 2 and settings["pvc"] == "shared-rwx"
    assert settings["resources"]["limits"]["nvidia.com/gpu"] == "2" and settings["queue"] == "q"
    run_id = tasks["pretrain-job"]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
    assert run_id == "{{$.pipeline_job_uuid}}"
    # The launcher pod only watches: no GPU for it.
    assert "accelerator" not in executors(spec)["exec-pretrain-job"]["resources"]


@pytest.mark.parametrize("flags, culprit", [(["--pretrain-nodes", "2"], "--data-pvc"),
                                            (["--pretrain-nodes", "2", "--data-pvc", "d", "--teacher-input"],
                                             "--teacher-input"),
                                            (["--pretrain-nodes", "0"], "--pretrain-nodes")])
def test_bad_multi_node_settings_are_refused(tmp_path, capsys, flags, culprit):
    with pytest.raises(SystemExit) as e:
        cli_main(["compile", "--output", str(tmp_path / "p.yaml"), *flags])
    assert e.value.code == 2 and culprit in capsys.readouterr().err


def test_cli_parsing():
    assert parse_params(["steps=3", "overrides=[\"a=1\"]", "mode=dynamic", "x=0.5"]) == {
        "steps": 3, "overrides": ["a=1"], "mode": "dynamic", "x": 0.5}
    assert parse_toleration("gpu=yes:NoSchedule") == ("gpu", "Equal", "yes", "NoSchedule")
    assert parse_toleration("dedicated") == ("dedicated", "Exists", None, None)
    with pytest.raises(SystemExit, match="key=value"):
        parse_params(["nokey"])


class FakeKfpClient:
    """Stands in for the Kubeflow Pipelines API server (none can run here); records the calls.
    `existing` maps (namespace or None for shared, name) to a pipeline id."""

    def __init__(self, existing: dict[tuple, str]):
        self.existing, self.calls = existing, []

    def get_pipeline_id(self, name):  # kfp.Client's lookup: shared pipelines only
        return self.existing.get((None, name))

    def list_pipelines(self, filter, namespace):
        name = json.loads(filter)["predicates"][0]["stringValue"]
        found = self.existing.get((namespace, name))
        return type("L", (), {"pipelines": [type("P", (), {"pipeline_id": found})()] if found else None})()

    def upload_pipeline(self, path, pipeline_name, namespace=None):
        self.calls.append(("upload_pipeline", path, pipeline_name, namespace))
        return type("P", (), {"pipeline_id": "new-id"})()

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id):
        self.calls.append(("upload_pipeline_version", path, pipeline_version_name, pipeline_id))
        return type("V", (), {"pipeline_version_id": "v-id"})()


def test_upload_creates_the_pipeline_then_new_versions():
    fresh = FakeKfpClient({})
    assert upload(fresh, "p.yaml", "vishwamai", None) == ("new-id", None)
    assert fresh.calls == [("upload_pipeline", "p.yaml", "vishwamai", None)]
    known = FakeKfpClient({(None, "vishwamai"): "pid"})
    assert upload(known, "p.yaml", "vishwamai", "v2") == ("pid", "v-id")
    assert known.calls == [("upload_pipeline_version", "p.yaml", "v2", "pid")]


def test_upload_into_a_profile_namespace_is_namespaced():
    """A shared pipeline of the same name does not count: the profile gets its own pipeline, then versions."""
    client = FakeKfpClient({(None, "vishwamai"): "shared-id"})
    assert upload(client, "p.yaml", "vishwamai", None, namespace="team") == ("new-id", None)
    assert client.calls == [("upload_pipeline", "p.yaml", "vishwamai", "team")]
    client = FakeKfpClient({("team", "vishwamai"): "team-id"})
    assert upload(client, "p.yaml", "vishwamai", "v3", namespace="team") == ("team-id", "v-id")


# ---------------------------------------------------------------------------------- stage glue
def test_summary_becomes_metrics_with_perplexity():
    sink = Sink()
    stages.log_summary(sink, {"final_val_loss": 2.0, "steps": 10, "run_dir": "/x", "best_val_loss": float("nan")})
    assert sink.values["steps"] == 10.0 and sink.values["val_perplexity"] == pytest.approx(7.389, abs=1e-3)
    assert "best_val_loss" not in sink.values and "run_dir" not in sink.values


def test_evaluation_json_flattens_to_kfp_metrics():
    tree = {"student": {"val_loss": 2.5, "size_mb": 1, "ok": True, "name": "s"}, "rows": [{"p": 3}]}
    assert dict(stages.flatten_numbers(tree)) == {"student_val_loss": 2.5, "student_size_mb": 1.0, "rows_0_p": 3.0}


def test_html_report_embeds_the_plot(tmp_path):
    plot = tmp_path / "p.png"
    plot.write_bytes(b"\x89PNG fake")
    page = stages.html_report("| model | <loss> |", [plot, tmp_path / "missing.png"])
    assert page.count("data:image/png;base64,") == 1 and "&lt;loss&gt;" in page


@pytest.mark.slow  # ~20 s: subprocesses that import kfp, torch and train
def test_prepare_and_pretrain_components_run_in_kfp_local(tmp_path, tiny_overrides):
    """Two real stages through kfp.local: a lean Model, the Dataset and Metrics artifacts come out."""
    from kfp import dsl, local
    from kfp.dsl import Model

    from components import build_components

    c = build_components("unused:0")

    @dsl.pipeline(name="prepare-pretrain")
    def two(overrides: list) -> Model:
        prep = c["prepare"](overrides=overrides, model_preset="tiny", pretrain_steps=4, student_overrides=[],
                            distill_steps=4, target_sparsity=0.5, prune_steps=4)
        return c["pretrain"](overrides=overrides, model_preset="tiny", steps=4,
                             dataset=prep.outputs["dataset"]).outputs["model"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    model = Path(two(overrides=tiny_overrides).output.path)
    assert (model / "model_config.json").is_file() and not (model / "trainer_state.pt").exists()
    assert not (model / "checkpoints").exists()
    assert json.loads((model / "summary.json").read_text())["steps"] == 4


def missing_stage_modules() -> list[str]:
    """Stages other issues still owe; the end-to-end run is skipped (with their names) until they land."""
    import importlib.util

    return [m for m in ("vishwamai.compress.quantize", "vishwamai.evaluate", "vishwamai.report")
            if importlib.util.find_spec(m) is None]


@pytest.mark.slow
def test_whole_pipeline_runs_end_to_end_in_kfp_local(tmp_path, tiny_overrides):
    missing = missing_stage_modules()
    if missing:
        pytest.skip(f"stages not built yet: {', '.join(missing)}")
    from pipelines.cli import run_local

    task = run_local({"overrides": tiny_overrides, "pretrain_steps": 6, "distill_steps": 6, "prune_steps": 6,
                      "student_overrides": ["model.d_model=32", "model.n_layers=1", "model.n_heads=2"],
                      "target_sparsity": 0.5, "calibration_steps": 2}, str(tmp_path / "root"))
    check_pipeline_outputs(task)


def check_pipeline_outputs(task) -> None:
    report = Path(task.outputs["report"].path).read_text()
    for name in ("teacher", "student", "pruned", "quantized"):
        assert name in report
    assert Path(task.outputs["report_html"].path).read_text().count("data:image/png;base64,") == 4
    metrics = task.outputs["metrics"].metadata
    for name in ("teacher", "student", "pruned", "quantized"):
        assert metrics[f"{name}_val_loss"] > 0 and metrics[f"{name}_size_bytes"] > 0
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    assert metrics["pruned_nonzero_parameters"] < metrics["student_nonzero_parameters"]
    assert metrics["quantized_size_bytes"] < metrics["pruned_size_bytes"]
    check_exported_model(task.outputs["model"].path)


def check_exported_model(path: str) -> None:
    """The pipeline's model output loads with transformers and generates."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16  # export_dtype's default
    out = model.generate(torch.tensor([[100, 101, 102]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.slow
def test_compression_stages_chain_in_kfp_local_without_distillation(tmp_path, tiny_overrides):
    """pretrain -> prune -> quantize -> evaluate through kfp.local with the real components
    (runs even while distillation is not built: prune starts from the teacher here)."""
    from typing import NamedTuple

    from kfp import dsl, local
    from kfp.dsl import HTML, Markdown, Metrics

    from components import build_components

    c = build_components("unused:0")

    @dsl.pipeline(name="compression-chain")
    def chain(overrides: list) -> NamedTuple("Outputs", metrics=Metrics, report=Markdown, report_html=HTML):
        prep = c["prepare"](overrides=overrides, model_preset="tiny", pretrain_steps=6, student_overrides=[],
                            distill_steps=6, target_sparsity=0.5, prune_steps=6)
        data = prep.outputs["dataset"]
        pre = c["pretrain"](overrides=overrides, model_preset="tiny", steps=6, dataset=data)
        pru = c["prune"](student=pre.outputs["model"], dataset=data, overrides=overrides, target_sparsity=0.5, steps=6)
        qua = c["quantize"](pruned=pru.outputs["pruned"], dataset=data, mode="dynamic", calibration_steps=2)
        ev = c["evaluate"](teacher=pre.outputs["model"], student=pre.outputs["model"], pruned=pru.outputs["pruned"],
                           quantized=qua.outputs["quantized"], dataset=data)
        outputs = NamedTuple("Outputs", metrics=Metrics, report=Markdown, report_html=HTML)
        return outputs(ev.outputs["metrics"], ev.outputs["report"], ev.outputs["report_html"])

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = chain(overrides=tiny_overrides)
    metrics = task.outputs["metrics"].metadata
    # The pruned model has fewer non-zero weights than the teacher; int8 is smaller on disk.
    assert metrics["pruned_nonzero_parameters"] < 0.8 * metrics["teacher_nonzero_parameters"]
    assert metrics["quantized_size_bytes"] < 0.5 * metrics["pruned_size_bytes"]
    report = Path(task.outputs["report"].path).read_text()
    assert "| quantized |" in report and "## pruned: training" in report  # comparison + run reports
    # The comparison plot and the training curves of teacher, student (= teacher here) and pruned.
    assert Path(task.outputs["report_html"].path).read_text().count("data:image/png;base64,") == 4


@pytest.mark.slow
def test_pipeline_runs_on_the_users_corpus_with_an_existing_teacher(tmp_path, tiny_overrides, trained_teacher):
    """The shape --corpus-input --teacher-input through kfp.local: the corpus file and the teacher's run
    directory come in through dsl.importer, nothing is pretrained, and every stage reads the user's text."""
    from pipelines.cli import run_local
    from pipelines.training_pipeline import PipelineShape

    corpus = tmp_path / "my-corpus.txt"
    corpus.write_text("".join(f"Line {i}: the user's own text about rivers, boats and weather.\n" for i in range(3000)))
    root = tmp_path / "root"
    task = run_local({"overrides": tiny_overrides, "corpus_uri": str(corpus), "teacher_uri": trained_teacher,
                      "distill_steps": 6, "prune_steps": 6, "calibration_steps": 2,
                      "student_overrides": ["model.d_model=32", "model.n_layers=1", "model.n_heads=2"]},
                     str(root), shape=PipelineShape(corpus_uri=True, teacher_uri=True))
    metrics = task.outputs["metrics"].metadata
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    assert metrics["quantized_size_bytes"] < metrics["pruned_size_bytes"]
    ran = {p.name for p in root.glob("*/*") if p.is_dir()}
    assert not any(name.startswith("pretrain") for name in ran), ran  # a teacher was given: no pretraining
    student_config = yaml.safe_load(next(root.glob("*/distill*/student/config.yaml")).read_text())
    assert student_config["data"]["path"] == str(corpus)  # the user's corpus, not the embedded one
    assert student_config["distillation"]["teacher_model"]["path"].startswith(trained_teacher)
    assert "| teacher |" in Path(task.outputs["report"].path).read_text()
    check_exported_model(task.outputs["model"].path)


# ------------------------------------------------------------------------------- pod launcher
def test_pod_exit_codes_follow_the_training_operator_exit_code_policy():
    assert pod_exit_code([0, 0]) == 0
    assert pod_exit_code([2, -15]) == 2  # bad config / NaN on any rank: permanent (1-127)
    assert pod_exit_code([1]) == 129  # a crash or a lost peer: retryable (128-255)
    assert pod_exit_code([75]) == 203  # preempted after a checkpoint: retryable
    assert pod_exit_code([-9]) == 137  # killed by a signal: retryable, as the kubelet reports it


def launcher_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RANK", "WORLD_SIZE", "MASTER_"))}
    return {**env, "PET_NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", **extra}


def test_launcher_rejects_a_bad_config_before_starting_workers():
    from vishwamai.kubeflow.launch import main

    assert main(["training.max_stepz=3"]) == 2
    assert main(["training.max_steps=0"]) == 2


def test_launcher_keeps_a_workers_non_retryable_exit_code(tmp_path, run_module):
    """Through real torchrun: the worker fails at data loading (exit 2); torchrun alone would exit 1."""
    out = run_module("vishwamai.kubeflow.launch", "data.path=/nonexistent/corpus", f"hydra.run.dir={tmp_path}",
                     "monitoring.enabled=false", env=launcher_env())
    assert out.returncode == 2, out.stderr[-2000:]
    assert "data.path" in out.stderr and "permanent" in out.stderr


@pytest.mark.slow
def test_sigterm_to_the_pod_checkpoints_and_exits_retryable(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    args = [*tiny_overrides, "training.max_steps=100000", "training.eval_every_n_steps=0",
            f"hydra.run.dir={run_dir}", "training.log_every_n_steps=1"]
    proc = subprocess.Popen([sys.executable, "-m", "vishwamai.kubeflow.launch", *args], env=launcher_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().count("\n") >= 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    saved = [p.parent for p in (run_dir / "checkpoints").rglob("model_config.json")]
    assert saved, output[-3000:]


def test_wait_for_master(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert wait_for("127.0.0.1", server.getsockname()[1], timeout_s=5)
        free_port = server.getsockname()[1]
    start = time.monotonic()
    assert not wait_for("127.0.0.1", free_port, timeout_s=0.5, interval_s=0.1)
    assert not wait_for("master-0.invalid", 23456, timeout_s=0.3, interval_s=0.1)  # DNS not there (yet)
    assert time.monotonic() - start < 10


def test_run_compiles_and_submits_with_params_and_token_file(tmp_path, monkeypatch):
    """kfp.Client replaced by a recorder (no Kubeflow API server here): flags, env and token file reach it."""
    import kfp

    calls = {}

    class RecordingClient:
        def __init__(self, **kwargs):
            calls["client"] = kwargs

        def create_run_from_pipeline_package(self, path, **kwargs):
            calls["run"] = (path, kwargs)
            return type("R", (), {"run_id": "run-1"})()

        def wait_for_run_completion(self, run_id, timeout):
            calls["wait"] = (run_id, timeout)
            return type("R", (), {"state": calls.get("state", "SUCCEEDED")})()

    token = tmp_path / "token"
    token.write_text("secret-token\n")
    monkeypatch.setattr(kfp, "Client", RecordingClient)
    monkeypatch.setenv("KFP_HOST", "https://kfp.example.com")
    monkeypatch.setenv("KFP_TOKEN_FILE", str(token))
    cli_main(["run", "--namespace", "team", "--param", "pretrain_steps=5", "--param", "overrides=[\"a=1\"]"])
    # kfp.Client's namespace is where KFP is installed (its in-cluster service), not the profile
    assert calls["client"] == {"host": "https://kfp.example.com", "namespace": "kubeflow",
                               "existing_token": "secret-token"}
    path, kwargs = calls["run"]
    assert set(load_compiled(Path(path))[0]["root"]["dag"]["tasks"]) == set(STAGE_ORDER)
    assert kwargs["arguments"] == {"pretrain_steps": 5, "overrides": ["a=1"]} and kwargs["enable_caching"] is True
    assert kwargs["namespace"] == "team"  # the run goes into the profile namespace
    monkeypatch.setenv("KFP_INSTALL_NAMESPACE", "pipelines")
    monkeypatch.setenv("KFP_NAMESPACE", "other-team")
    cli_main(["run", "--package", path])
    assert calls["client"]["namespace"] == "pipelines" and calls["run"][1]["namespace"] == "other-team"
    assert "wait" not in calls
    cli_main(["run", "--package", path, "--wait", "60"])  # the kind walkthrough waits for its runs
    assert calls["wait"] == ("run-1", 60)
    calls["state"] = "FAILED"
    with pytest.raises(SystemExit) as e:
        cli_main(["run", "--package", path, "--wait", "60"])
    assert e.value.code == 1


def test_probing_the_masters_store_does_not_disturb_it():
    """The init container's TCP probe hits the master's rendezvous store; the store must keep working."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=20), wait_for_workers=False)
    assert wait_for("127.0.0.1", store.port, timeout_s=5) and wait_for("127.0.0.1", store.port, timeout_s=5)
    peer = dist.TCPStore("127.0.0.1", store.port, 2, False, timeout=datetime.timedelta(seconds=20))
    peer.set("rank1", "ready")
    assert store.get("rank1") == b"ready"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_pods_train_together_from_the_operators_environment(tmp_path, tiny_overrides):
    """What a PyTorchJob with Master + 1 Worker does, as two local processes: the environment the
    Training Operator sets (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT, ...) and the manifest's
    command; DDP over gloo, one run directory."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    args = [sys.executable, "-m", "vishwamai.kubeflow.launch", *tiny_overrides, "distributed.strategy=data_parallel",
            "training.device=cpu", "training.max_steps=4", f"hydra.run.dir={run_dir}"]
    pods = [subprocess.Popen(args, env=launcher_env(PET_NNODES="2", PET_NODE_RANK=str(rank), PET_MASTER_ADDR="127.0.0.1",
                                                    PET_MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in (1, 0)]  # the worker first: it must wait for the master, not fail
    outputs = [p.communicate(timeout=240)[0] for p in pods]
    assert [p.returncode for p in pods] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
