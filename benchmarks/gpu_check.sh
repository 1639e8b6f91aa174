#!/usr/bin/env bash
# One prepared GPU check (no torch.compile), at most about 9 minutes: the real configs on synthetic
# data, the full benchmark and a shortened study. Writes its logs and results under $OUT (default
# ./gpu_check_out).
# On a machine without torchao/jsonargparse, put their wheels in .whl/ first (see ../shared/device).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/fit.log"
python3 -c "import torch, lightning, torchao; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchao', torchao.__version__)" | tee -a "$OUT/fit.log"
SYN="--data.synthetic=true --trainer.enable_progress_bar=false --trainer.logger.init_args.save_dir=/tmp/gpu_logs"
step() {  # step NAME TIMEOUT_S COMMAND...: run it, keep the end of its output, time it
  local name=$1 t0=$SECONDS; shift; echo "== $name" | tee -a "$OUT/fit.log"
  timeout "$@" 2>&1 | grep -vE "Warning|warn\(|^\s*$" | tail -25 >> "$OUT/fit.log"
  echo "== $name: rc=${PIPESTATUS[0]} $((SECONDS - t0)) s" | tee -a "$OUT/fit.log"
}
step "fit ptq (vgg11_cifar100's training for 2 epochs + sweep)" 110 python3 -m qlight fit --config configs/ptq.yaml $SYN --trainer.max_epochs=2
step "fit qat_int4 (2 epochs)" 70 python3 -m qlight fit --config configs/qat_int4.yaml $SYN --trainer.max_epochs=2
cp /tmp/gpu_logs/ptq/version_0/ptq/results.csv "$OUT/ptq_results.csv" 2>/dev/null
step "benchmark" 200 python3 benchmarks/bench.py
grep '^{' "$OUT/fit.log" | tail -1 > "$OUT/bench.json"
step "study (shortened)" 180 python3 -m qlight study --config configs/study.yaml --data.synthetic=true --study_dir=/tmp/gpu_study \
  --baseline.epochs=6 --qat.epochs=2 --qat.bits=[4] --qat.plans=[] --precision.epochs=3 --precision.sample_every_n_steps=20
cp /tmp/gpu_study/report.md "$OUT/study_report.md" 2>/dev/null
cp /tmp/gpu_study/results.json "$OUT/study_results.json" 2>/dev/null
cp /tmp/gpu_study/accuracy_vs_bits.png /tmp/gpu_study/precision_numerics.png "$OUT/" 2>/dev/null
exit 0
