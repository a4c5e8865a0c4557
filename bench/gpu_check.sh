#!/usr/bin/env bash
# The GPU path end to end, for any CUDA machine (the tests never need one). Under 5 minutes:
#   1. throughput + MFU of a ~350M model, bf16 autocast, fused AdamW, SDPA flash kernels;
#   2. the same with torch.compile;
#   3. DDP (NCCL) on all visible GPUs.
# Figures land in ${OUT:-gpu_check_out}/ (summary.json per run) and are printed.
# Usage: bash bench/gpu_check.sh   (after `make install TORCH_SPEC=...` with a CUDA torch, or any env with CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"

M350=(model=125M model.d_model=1024 model.n_layers=24 model.n_heads=16 model.ffn_hidden=2816
      model.vocab_size=32000 model.max_seq_len=1024 data.seq_len=1024)
COMMON=(training.device=cuda amp.enabled=true amp.dtype=bfloat16 training.batch_size=16 training.max_steps=60
        training.eval_every_n_steps=0 training.eval_batches=2 training.log_every_n_steps=10
        training.progress_bar=false monitoring.mlflow.enabled=false)

run() {  # name, extra overrides...
  local name=$1; shift
  echo "== $name"
  timeout 240 "$@" hydra.run.dir="$OUT/$name" || echo "!! $name failed (exit $?)"
  [ -f "$OUT/$name/summary.json" ] && "$PY" - "$OUT/$name" <<'PYEOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
last = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")][-1]
print({k: s.get(k) for k in ("num_parameters", "tokens_per_s", "final_val_loss", "world_size")},
      {k: last.get(k) for k in ("mfu", "cuda_max_allocated_mb", "cuda_peak_allocated_mb", "tokens_per_s")})
PYEOF
}

run eager-bf16 "$PY" -m vishwamai.training_v2 "${M350[@]}" "${COMMON[@]}"
run compiled-bf16 "$PY" -m vishwamai.training_v2 "${M350[@]}" "${COMMON[@]}" training.compile=true
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
run ddp-$NGPU "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m vishwamai.training_v2 \
  "${M350[@]}" "${COMMON[@]}" distributed.strategy=data_parallel
