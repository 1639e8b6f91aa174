#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): about 4 minutes on one H200, no torch.compile, each figure
# printed as it is measured and one JSON line at the end; logs and results under $OUT (default
# ./gpu_check_out). On a machine without torchao/jsonargparse, put their wheels in .whl/ first
# (../shared/device/wheels.sh, then carry .whl).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, lightning, torchao; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchao', torchao.__version__)"
exec python3 benchmarks/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
