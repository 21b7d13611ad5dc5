# Device-side: the GPU tests that failed, per-call old vs new (alternating fresh processes), and a
# profile of the new tree's op and training step on the GPU. Logs in $OUT.
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -p timeout --timeout 60 -rfE \
  -k 'not (gradcheck or test_against_reference)' tests/test_modules_gpu.py tests/test_ops.py \
  tests/test_functional.py tests/test_arrays.py tests/test_srupp.py tests/test_memory.py \
  tests/test_modules.py tests/test_bench.py > $OUT/tests.log 2>&1
echo "tests: rc $?"; tail -15 $OUT/tests.log
for r in 1 2 3; do
  for t in .perf/base "$PWD"; do
    echo "round $r $(basename $t): $(timeout 60 python3 .perf/percall_gpu.py $t 2>&1 | tail -1)"
  done
done 2>&1 | tee $OUT/percall.log
timeout 90 python3 .perf/percall_gpu.py "$PWD" profile > $OUT/profile.log 2>&1
timeout 60 python3 .perf/percall_gpu.py .perf/base profile > $OUT/profile-base.log 2>&1
grep -A28 '== profile' $OUT/profile.log | cut -c1-150
