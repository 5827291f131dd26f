#!/usr/bin/env bash
# The test suite and the benchmark suite on a lent GPU machine (H100 / H200), in parts that each fit
# the device tool's 10-minute command limit. That machine is a copy of this working tree with the
# image's own python3 (PyTorch + Triton for CUDA), no internet, and $OUT for the files to bring back.
#
# Here (with internet), once:   make gpu-wheels          # .whl/: liger-kernel, cut-cross-entropy, trl
# There, one call per line (carry .whl), e.g.:
#   bash benchmarks/gpu.sh test                # install, build the C++ extension, pytest tests on CUDA
#   bash benchmarks/gpu.sh bench-logprobs      # token_logprobs
#   bash benchmarks/gpu.sh bench-linear        # linear_token_logprobs, choice_logprobs
#   bash benchmarks/gpu.sh bench-rest report   # preference-model, PPO and pipeline benches; the report
#   bash benchmarks/gpu.sh test bench-quick     # a short lease: the tests, then the headline cases only
#   bash benchmarks/gpu.sh linear-head         # the tensor-core fused LM head alone (benchmarks/linear_head_gpu.py):
#                                              # correctness, timings vs GEMMs / Liger / CCE, config sweep, < 2 min
#   bash benchmarks/gpu.sh token-logprobs      # token_logprobs' row split alone (benchmarks/token_logprobs_gpu.py):
#                                              # every pieces count checked and timed at 64-16384 rows vs
#                                              # torch.compile; bf16 at 4096 / 8192 rows first (the acceptance)
#   bash benchmarks/gpu.sh acceptance          # one call, <= 6 min: the CUDA tests of the host-path work (launch
#                                              # counts, no synchronization, CUDA graphs, data checks, torch.func,
#                                              # argument errors) and of the ops it changed, then the headline
#                                              # benchmarks (-m quick) and their ratio table (vs eager, vs
#                                              # torch.compile) in benchmarks/results/<device>-<date>-acceptance.md
# or `bash benchmarks/gpu.sh all` where one command may run longer.
# Each bench part writes benchmarks/results/<device>-<date>-<part>.json and copies it to $OUT at once
# (a machine given back between calls loses its files). `report` merges the parts it finds into
# benchmarks/results/<device>-<date>.json, writes the .md table and the plots, updates README.md and
# copies the JSON and the table to $OUT. Parts fetched from $OUT can also be merged here:
#   python -m benchmarks.report <stem>-logprobs.json <stem>-linear.json <stem>-rest.json \
#       --merge-into benchmarks/results/<stem>.json --readme README.md
#
# --dry-run: print what would run, run nothing (checks the script on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    test|bench-logprobs|bench-linear|bench-rest|bench-quick|report|all|setup|linear-head|token-logprobs|acceptance) PARTS+=("$arg") ;;
    *) echo "usage: $0 [setup|test|bench-logprobs|bench-linear|bench-rest|bench-quick|report|all|linear-head|token-logprobs|acceptance]... [--dry-run]" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -gt 0 ] || PARTS=(all)

PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-out}
SITE=/tmp/cai-site
TIME_LIMIT=${PART_TIMEOUT:-560}   # seconds per part: inside the 600 s command limit, with room to copy
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() {  # echo, then run unless --dry-run
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] || "$@"
}

name() {
  if [ "$DRY_RUN" = 1 ]; then echo "DEVICE-DATE"; else "$PY" -m benchmarks.report --name; fi
}

setup() {
  mkdir -p "$OUT"
  if compgen -G ".whl/*.whl" >/dev/null; then
    # --no-deps: the image already has torch, triton, transformers; the wheels add the peers only
    run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  else
    echo "no .whl/ carried: GPU peers that are not in the image are reported as skipped"
  fi
  # The C++ CPU kernels must be built against the image's torch (not this checkout's CPU one); kept
  # between calls while the machine stays warm.
  if [ "$DRY_RUN" = 1 ] || ! "$PY" -c "import cai_kernels, sys; from cai_kernels import _extension; sys.exit(0 if _extension.status().loaded else 1)" 2>/dev/null; then
    local caps=avx2
    grep -qw avx512f /proc/cpuinfo 2>/dev/null && caps=avx512,avx2
    caps=${CAI_KERNELS_CAPABILITIES:-$caps}  # e.g. avx512 alone: half the build time on a short lease
    run env MAX_JOBS="$(nproc)" CAI_KERNELS_CAPABILITIES="$caps" "$PY" setup.py -q build_ext --inplace
  fi
  run "$PY" -m cai_kernels info
  if [ "$DRY_RUN" = 0 ]; then nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv || true; fi
}

part_test() {
  echo "== tests on CUDA"
  set +e
  # not slow: the slow tests run the embedded CPU model, which is not carried (98 MB); GPU_TEST_ARGS overrides
  # shellcheck disable=SC2086
  # pytest-xdist (in the GPU image) spreads the files over the machine's cores; Triton's kernel cache
  # is shared between the workers. Modules a test needs that the image lacks are importorskip skips.
  local workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}" --dist loadfile)
  # shellcheck disable=SC2086
  run timeout -s INT -k 20 "${TEST_TIMEOUT:-$TIME_LIMIT}" "$PY" -m pytest tests -q -p no:cacheprovider -o addopts="-ra" "${workers[@]}" \
      --junitxml="$OUT/tests.xml" ${GPU_TEST_ARGS:--m not\ slow} 2>&1 | tee "$OUT/tests.log"
  local rc=${PIPESTATUS[0]}
  set -e
  # KEEP_GOING=1: a short lease still runs the benchmarks after a failing test (the log says which)
  [ "$DRY_RUN" = 1 ] || [ "$rc" = 0 ] || { echo "tests failed (exit $rc): see $OUT/tests.log";
                                          [ "${KEEP_GOING:-0}" = 1 ] || exit "$rc"; }
}

part_bench() {  # $1: part name, $2...: benchmark files
  local part=$1; shift
  local json="benchmarks/results/$(name)-$part.json"
  echo "== benchmarks $part -> $json"
  run timeout -s INT -k 20 "$TIME_LIMIT" "$PY" -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$json" 2>&1 | tee "$OUT/bench-$part.log"
  if [ "$DRY_RUN" = 0 ] && [ -f "$json" ]; then cp "$json" "$OUT/"; fi
}

part_report() {
  local stem="benchmarks/results/$(name)"
  echo "== report $stem"
  local parts=()
  for p in logprobs linear rest; do
    [ "$DRY_RUN" = 1 ] || [ -f "$stem-$p.json" ] && parts+=("$stem-$p.json")
  done
  run "$PY" -m benchmarks.report "${parts[@]}" --merge-into "$stem.json" --readme README.md
  if [ "$DRY_RUN" = 0 ]; then
    cp "$stem.json" "$stem.md" "$OUT/"
    echo "results in $OUT: $(ls "$OUT")"
  fi
}

# The acceptance call: stages with their own time limits so that the whole stays within 6 minutes (the C++
# build, avx512 alone, ~1 min on 16 cores; ACCEPT_TESTS / ACCEPT_TEST_TIMEOUT / ACCEPT_BENCH_TIMEOUT override).
ACCEPT_TESTS=${ACCEPT_TESTS:-tests/test_launches.py tests/test_cuda_graphs.py tests/test_data_checks.py \
tests/test_func_transforms.py tests/test_argument_errors.py tests/test_kl_penalty.py tests/test_ppo_policy_loss.py \
tests/test_ppo_value_loss.py tests/test_masked_whiten.py tests/test_ppo_advantages.py tests/test_pairwise_loss.py}

log_to() {  # tee into $1, except under --dry-run (which writes nothing)
  if [ "$DRY_RUN" = 1 ]; then cat; else tee "$1"; fi
}

part_acceptance() {
  local stem DRY_ARG=""
  [ "$DRY_RUN" = 1 ] && DRY_ARG="--dry-run"
  stem="benchmarks/results/$(name)-acceptance"
  echo "== acceptance: CUDA tests of the changed ops"
  set +e
  # shellcheck disable=SC2086
  run timeout -s INT -k 10 "${ACCEPT_TEST_TIMEOUT:-110}" "$PY" -m pytest $ACCEPT_TESTS -q -p no:cacheprovider \
      -o addopts="-ra" -m "not slow" --junitxml="$OUT/acceptance-tests.xml" 2>&1 | log_to "$OUT/acceptance-tests.log"
  local rc=${PIPESTATUS[0]}
  echo "== acceptance: headline benchmarks -> $stem.json"
  run timeout -s INT -k 10 "${ACCEPT_BENCH_TIMEOUT:-100}" "$PY" -m pytest benchmarks/test_bench_*.py -m quick \
      --benchmark-only --no-memory -q -p no:cacheprovider --benchmark-json="$stem.json" 2>&1 | log_to "$OUT/acceptance-bench.log"
  if [ "$DRY_RUN" = 1 ] || [ -f "$stem.json" ]; then
    # the ratio table (ours vs eager reference and torch.compile) is printed and written to $stem.md
    run "$PY" -m benchmarks.report "$stem.json" --no-plots
    [ "$DRY_RUN" = 1 ] || cp "$stem.json" "$stem.md" "$OUT/"
  fi
  # the fused LM head vs the bare GEMMs / Liger / CCE, and bf16 token_logprobs at 4096 / 8192 rows vs torch.compile
  # (each checks its kernels against the float64 reference first; no sweep, short budgets)
  echo "== acceptance: fused LM head (linear_token_logprobs) -> $OUT"
  run timeout -s INT -k 10 "${ACCEPT_LINEAR_TIMEOUT:-60}" "$PY" -m benchmarks.linear_head_gpu --out "$OUT" --no-sweep \
      --budget 45 $DRY_ARG 2>&1 | log_to "$OUT/acceptance-linear-head.log"
  echo "== acceptance: token_logprobs at 4096 / 8192 rows -> $OUT"
  run timeout -s INT -k 10 "${ACCEPT_TOKEN_TIMEOUT:-45}" "$PY" -m benchmarks.token_logprobs_gpu --out "$OUT" \
      --rows 4096 8192 --budget 35 $DRY_ARG 2>&1 | log_to "$OUT/acceptance-token-logprobs.log"
  set -e
  [ "$DRY_RUN" = 1 ] || [ "$rc" = 0 ] || { echo "acceptance tests failed (exit $rc): see $OUT/acceptance-tests.log"; exit "$rc"; }
}

LINEAR_BENCHES=()
for f in benchmarks/test_bench_linear_token_logprobs.py benchmarks/test_bench_choice_logprobs.py; do
  [ -f "$f" ] && LINEAR_BENCHES+=("$f")
done
REST_BENCHES=()
for f in benchmarks/test_bench_*.py; do
  case " benchmarks/test_bench_token_logprobs.py ${LINEAR_BENCHES[*]} " in *" $f "*) ;; *) REST_BENCHES+=("$f") ;; esac
done

for part in "${PARTS[@]}"; do
  case "$part" in
    setup) setup ;;
    test) setup; part_test ;;
    bench-logprobs) setup; part_bench logprobs benchmarks/test_bench_token_logprobs.py ;;
    bench-linear) setup; [ ${#LINEAR_BENCHES[@]} -eq 0 ] || part_bench linear "${LINEAR_BENCHES[@]}" ;;
    bench-rest) setup; [ ${#REST_BENCHES[@]} -eq 0 ] || part_bench rest "${REST_BENCHES[@]}" ;;
    bench-quick) setup; part_bench quick -m quick benchmarks/test_bench_*.py
                 run "$PY" -m benchmarks.report "benchmarks/results/$(name)-quick.json" --readme README.md || true
                 [ "$DRY_RUN" = 1 ] || cp benchmarks/results/"$(name)"-quick.* README.md "$OUT/" 2>/dev/null || true ;;
    report) part_report ;;
    acceptance) if [ "$DRY_RUN" = 1 ] || grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
                  export CAI_KERNELS_CAPABILITIES=${CAI_KERNELS_CAPABILITIES:-avx512}  # half the build time
                fi
                setup; part_acceptance ;;
    # no setup: needs neither the C++ extension nor the suite's peers beyond .whl/ (installed by the script)
    linear-head) if [ "$DRY_RUN" = 1 ]; then run "$PY" -m benchmarks.linear_head_gpu --out "$OUT"
                 else mkdir -p "$OUT"
                      timeout -s INT -k 20 "$TIME_LIMIT" "$PY" -m benchmarks.linear_head_gpu --out "$OUT" 2>&1 | tee "$OUT/linear-head.log"
                 fi ;;
    # no setup either: the Triton kernels and the reference only
    token-logprobs) if [ "$DRY_RUN" = 1 ]; then run "$PY" -m benchmarks.token_logprobs_gpu --out "$OUT"
                    else mkdir -p "$OUT"
                         timeout -s INT -k 20 "$TIME_LIMIT" "$PY" -m benchmarks.token_logprobs_gpu --out "$OUT" 2>&1 | tee "$OUT/token-logprobs.log"
                    fi ;;
    all) setup; part_test; part_bench logprobs benchmarks/test_bench_token_logprobs.py
         [ ${#LINEAR_BENCHES[@]} -eq 0 ] || part_bench linear "${LINEAR_BENCHES[@]}"
         [ ${#REST_BENCHES[@]} -eq 0 ] || part_bench rest "${REST_BENCHES[@]}"
         part_report ;;
  esac
done
