#!/usr/bin/env bash
# The whole Kubeflow card on a laptop: a kind cluster, the project image, the Training Operator and the
# PyTorchJob; Kubeflow Pipelines (standalone, platform-agnostic manifests) running the compiled pipeline on
# the embedded corpus and on a corpus from a volume; Katib running the tuning experiment to a best trial.
# Needs Docker, kind (https://kind.sigs.k8s.io), kubectl and this project's Python environment (for
# vishwamai-pipeline).  Every step checks its tools first and is idempotent: run it again after a failure.
#
#   scripts/kind-demo.sh                  # all steps, in order
#   scripts/kind-demo.sh STEP [STEP...]   # some of them: cluster image training-operator pytorchjob kfp
#                                         #   pipeline pipeline-volume katib
#   scripts/kind-demo.sh delete           # remove the cluster
#   scripts/kind-demo.sh help
#
# Versions (override in the environment): TRAINING_OPERATOR_REF, KFP_VERSION (>= 2.16: the compiled
# pipeline sets a platform security context), KATIB_REF.
set -euo pipefail

CLUSTER=${CLUSTER:-vishwamai}
IMAGE=${IMAGE:-vishwamai:0.1.0-cpu}
TRAINING_OPERATOR_REF=${TRAINING_OPERATOR_REF:-v1.9.3}
KFP_VERSION=${KFP_VERSION:-2.17.0}
KATIB_REF=${KATIB_REF:-v0.19.0}
KFP_PORT=${KFP_PORT:-8888}
STEPS_TIMEOUT=${STEPS_TIMEOUT:-1800}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NS=vishwamai
JOB=vishwamai-pretrain
EXPERIMENT=vishwamai-tuning
PIPELINE_CLI=${PIPELINE_CLI:-vishwamai-pipeline}
ALL_STEPS=(cluster image training-operator pytorchjob kfp pipeline pipeline-volume katib)
# Small enough for a laptop: a few steps of the tiny model per stage, on 1 MB of the embedded corpus.
DEMO_PARAMS=(--param pretrain_steps=30 --param distill_steps=30 --param prune_steps=30 --param calibration_steps=2
             --param 'overrides=["data.seq_len=64", "training.batch_size=8", "data.embedded_max_bytes=1000000", "training.eval_every_n_steps=10"]')

step() { printf '\n== %s\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }

# The tools a step needs, all checked before it starts (and before anything else when running all steps).
need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
  ((${#missing[@]} == 0)) || die "not installed: ${missing[*]} (see the header of $0)"
}

tools_for() {
  case "$1" in
    cluster) echo kind kubectl ;;
    image) echo docker kind ;;
    training-operator | pytorchjob | kfp | katib) echo kubectl ;;
    pipeline | pipeline-volume) echo kubectl curl "$PIPELINE_CLI" ;;
  esac
}

is_step() {
  local s
  for s in "${ALL_STEPS[@]}"; do [[ "$s" == "$1" ]] && return 0; done
  return 1
}

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

cluster() {
  step "kind cluster '$CLUSTER'"
  kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
  kubectl config use-context "kind-$CLUSTER"
}

image() {
  step "build the CPU image $IMAGE and load it into the cluster's node"
  docker build --build-arg VARIANT=cpu -t "$IMAGE" "$ROOT"
  kind load docker-image "$IMAGE" --name "$CLUSTER"
}

training-operator() {
  step "Kubeflow Training Operator $TRAINING_OPERATOR_REF"
  kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_REF"
  kubectl -n kubeflow wait --for=condition=Available deployment/training-operator --timeout=300s
}

pytorchjob() {
  step "namespace, service accounts, RBAC, PVC and the PyTorchJob (manifests/overlays/local-kind)"
  kubectl delete pytorchjob "$JOB" -n "$NS" --ignore-not-found --wait=true  # a finished job is not re-run by apply
  kubectl apply -k "$ROOT/manifests/overlays/local-kind"
  step "wait for the master pod, then follow its log"
  local waited=0
  until kubectl -n "$NS" get pod "$JOB-master-0" >/dev/null 2>&1; do
    if ((waited >= 600)); then die "no pod $JOB-master-0 after 600 s: kubectl -n $NS describe pytorchjob $JOB"; fi
    sleep 2
    waited=$((waited + 2))
  done
  kubectl -n "$NS" wait --for=condition=Ready "pod/$JOB-master-0" --timeout=600s || true
  kubectl -n "$NS" logs -f "$JOB-master-0" -c pytorch || true
  kubectl -n "$NS" wait --for=condition=Succeeded "pytorchjob/$JOB" --timeout=600s
}

kfp() {
  step "Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic manifests)"
  kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
  kubectl wait --for=condition=Established --timeout=120s crd/applications.app.k8s.io
  kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"
  kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout="${STEPS_TIMEOUT}s"
}

# The KFP API on localhost for the rest of this script (a port-forward, stopped on exit).
KFP_FORWARD_PID=
kfp_api() {
  if [[ -z "$KFP_FORWARD_PID" ]]; then
    kubectl -n kubeflow port-forward svc/ml-pipeline "$KFP_PORT:8888" >/dev/null 2>&1 &
    KFP_FORWARD_PID=$!
    trap 'kill "$KFP_FORWARD_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 30); do
      curl -fsS "http://localhost:$KFP_PORT/apis/v2beta1/healthz" >/dev/null 2>&1 && break
      sleep 1
    done
  fi
  export KFP_HOST="http://localhost:$KFP_PORT"
}

pipeline() {
  step "compile, upload (a new version when it exists) and run the pipeline on the embedded corpus"
  kfp_api
  local package="$ROOT/outputs/kind-demo/vishwamai-pipeline.yaml"
  mkdir -p "$(dirname "$package")"
  "$PIPELINE_CLI" compile --output "$package" --image "$IMAGE" --cpu 1 --memory 2Gi --retries 1
  "$PIPELINE_CLI" upload --package "$package" --name vishwamai-kind-demo
  "$PIPELINE_CLI" run --package "$package" --experiment kind-demo --run-name embedded-corpus \
    --wait "$STEPS_TIMEOUT" "${DEMO_PARAMS[@]}"
}

pipeline-volume() {
  step "a corpus on a volume (manifests/kind-demo), then the pipeline reading it from /data"
  kfp_api
  kubectl apply -k "$ROOT/manifests/kind-demo"
  kubectl -n kubeflow wait --for=condition=Ready pod/vishwamai-corpus-loader --timeout=300s
  local corpus=${CORPUS:-$ROOT/README.md}  # any text file or folder of them; default: this project's README
  kubectl cp "$corpus" "kubeflow/vishwamai-corpus-loader:/data/corpus.txt" -c loader
  local package="$ROOT/outputs/kind-demo/vishwamai-pipeline-volume.yaml"
  mkdir -p "$(dirname "$package")"
  "$PIPELINE_CLI" compile --output "$package" --image "$IMAGE" --cpu 1 --memory 2Gi --retries 1 \
    --data-pvc vishwamai-corpus
  # The loader holds the ReadWriteOnce volume on the same (single) kind node, so the steps can mount it too.
  "$PIPELINE_CLI" run --package "$package" --experiment kind-demo --run-name volume-corpus \
    --wait "$STEPS_TIMEOUT" "${DEMO_PARAMS[@]:0:8}" \
    --param 'overrides=["data.path=/data/corpus.txt", "data.seq_len=64", "training.batch_size=8", "training.eval_every_n_steps=10"]'
}

katib() {
  step "Katib $KATIB_REF, then the tuning experiment (manifests/overlays/katib) to its best trial"
  kubectl apply --server-side -k "github.com/kubeflow/katib.git/manifests/v1beta1/installs/katib-standalone?ref=$KATIB_REF"
  kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout=600s
  kubectl apply -k "$ROOT/manifests/overlays/katib"
  kubectl -n "$NS" wait --for=condition=Succeeded "experiment/$EXPERIMENT" --timeout="${STEPS_TIMEOUT}s"
  echo "best trial:"
  kubectl -n "$NS" get experiment "$EXPERIMENT" -o jsonpath='{.status.currentOptimalTrial}{"\n"}'
}

main() {
  local steps=("$@")
  ((${#steps[@]})) || steps=("${ALL_STEPS[@]}")
  case "${steps[0]}" in
    help | -h | --help) usage; return 0 ;;
    delete) need kind; kind delete cluster --name "$CLUSTER"; return 0 ;;
  esac
  local tools=() more s
  for s in "${steps[@]}"; do
    is_step "$s" || die "unknown step '$s' (steps: ${ALL_STEPS[*]}, delete, help)"
    read -r -a more <<<"$(tools_for "$s")"
    tools+=("${more[@]}")
  done
  need "${tools[@]}"
  for s in "${steps[@]}"; do "$s"; done
}

main "$@"
