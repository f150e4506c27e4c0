#!/usr/bin/env bash
# The GPU check, for a CUDA machine that already has PyTorch (and Lightning, transformers): installs xmodal in
# place (plus wheels from .whl/ when present), then runs the sections named (default: tests perf):
#   tests       the CUDA tests: every tiny recipe, the BEV recipes, mixed precision, the cache   -> $OUT/pytest_cuda.log
#   perf        bench.perf on the GPU                                        -> $OUT/perf_gpu.{json,md,log}
#   lipreading  bench.lipreading_steps on runs/bench/lipreading_slice (carry it) -> $OUT/lipreading_steps.{json,md,log}
#   OUT=runs/device bash bench/device_check.sh tests lipreading
set -u
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1; fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import importlib, torch, lightning, bench.harness as h; importlib.import_module(h.XMODAL_MAIN); print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
for section in ${*:-tests perf}; do
  case $section in
    tests)
      timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_cache_topk.py \
          "tests/test_bev_models.py::test_recipe_configs_train_through_the_cli" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25 ;;
    perf)
      timeout "${PERF_TIMEOUT:-330}" $PY -m bench.perf --sections overhead cache loader latency --work /tmp/xmodal-perf \
          --out "$OUT/perf_gpu" > "$OUT/perf_gpu.log" 2>&1
      echo "perf rc=$?"; tail -70 "$OUT/perf_gpu.log" ;;
    lipreading)
      timeout "${LIP_TIMEOUT:-300}" $PY -m bench.lipreading_steps --slice runs/bench/lipreading_slice --device cuda \
          --out "$OUT/lipreading_steps" > "$OUT/lipreading_steps.log" 2>&1
      echo "lipreading steps rc=$?"; grep -v "━" "$OUT/lipreading_steps.log" | tail -30; cat "$OUT/lipreading_steps.md" ;;
    *) echo "unknown section: $section (tests, perf, lipreading)"; exit 2 ;;
  esac
done
