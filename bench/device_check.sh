#!/usr/bin/env bash
# The GPU check, for a CUDA machine that already has PyTorch (and Lightning, transformers): installs xmodal in
# place (plus wheels from .whl/ when present), runs the CUDA tests and the performance benchmark on the GPU.
#   OUT=runs/device bash bench/device_check.sh      -> $OUT/{gpu.txt, pytest_cuda.log, perf_gpu.json, perf_gpu.md}
set -u
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1; fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, lightning, xmodal.cli; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_cache_topk.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
timeout "${PERF_TIMEOUT:-330}" $PY -m bench.perf --sections overhead cache loader latency --work /tmp/xmodal-perf \
    --out "$OUT/perf_gpu" > "$OUT/perf_gpu.log" 2>&1
echo "perf rc=$?"; tail -70 "$OUT/perf_gpu.log"
