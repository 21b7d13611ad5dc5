# Device-side, third run: GPU tests after the fixes, per-call before (3d54144) vs after, profile.
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -p timeout --timeout 60 -rfE \
  -k 'not (gradcheck or test_against_reference)' tests/test_modules_gpu.py tests/test_ops.py \
  tests/test_functional.py tests/test_arrays.py tests/test_srupp.py tests/test_memory.py \
  tests/test_modules.py tests/test_bench.py > $OUT/gpu-tests-rerun2.log 2>&1
echo "tests: rc $?"; tail -4 $OUT/gpu-tests-rerun2.log
timeout 200 python3 benchmarks/per_call_trees.py .perf/base . --device cuda --processes 3 \
  --timeout 60 2>&1 | tee $OUT/per-call-trees.log
timeout 60 python3 .perf/percall_gpu.py "$PWD" profile > $OUT/profile-after.log 2>&1
grep -A20 '== profile step' $OUT/profile-after.log | cut -c1-150
