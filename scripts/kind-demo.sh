#!/usr/bin/env bash
# Multi-node DDP on a laptop: a kind cluster, the Kubeflow Training Operator, vishwamai's PyTorchJob
# (manifests/overlays/local-kind: tiny model, CPU, gloo, 1 master + 1 worker), then its logs.
# Needs Docker, kind (https://kind.sigs.k8s.io) and kubectl on PATH.  Each step is idempotent.
#
#   scripts/kind-demo.sh            # everything
#   scripts/kind-demo.sh delete     # remove the cluster
set -euo pipefail

CLUSTER=${CLUSTER:-vishwamai}
IMAGE=${IMAGE:-vishwamai:0.1.0-cpu}
TRAINING_OPERATOR_REF=${TRAINING_OPERATOR_REF:-v1.9.3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NS=vishwamai
JOB=vishwamai-pretrain

step() { printf '\n== %s\n' "$*"; }

if [[ "${1:-}" == "delete" ]]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done

step "1. kind cluster '$CLUSTER'"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
kubectl config use-context "kind-$CLUSTER"

step "2. build the CPU image $IMAGE and load it into the cluster's node"
docker build --build-arg VARIANT=cpu -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "3. Kubeflow Training Operator $TRAINING_OPERATOR_REF"
kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_REF"
kubectl -n kubeflow wait --for=condition=Available deployment/training-operator --timeout=300s

step "4. namespace, service accounts, RBAC, PVC and the PyTorchJob (manifests/overlays/local-kind)"
kubectl delete pytorchjob "$JOB" -n "$NS" --ignore-not-found
kubectl apply -k "$ROOT/manifests/overlays/local-kind"

step "5. wait for the master pod, then follow its log"
until kubectl -n "$NS" get pod "$JOB-master-0" >/dev/null 2>&1; do sleep 2; done
kubectl -n "$NS" wait --for=condition=Ready "pod/$JOB-master-0" --timeout=600s || true
kubectl -n "$NS" logs -f "$JOB-master-0" -c pytorch

step "6. result"
kubectl -n "$NS" get pytorchjob "$JOB"
kubectl -n "$NS" wait --for=condition=Succeeded "pytorchjob/$JOB" --timeout=120s
