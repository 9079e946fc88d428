#!/usr/bin/env bash
# One call on a lent H100/H200 (the device tool): build pvq_cuda for sm_90a against the machine's
# own torch, gate on its CUDA build, benchmark the kernels at the shapes that matter, time model
# quantization, run the CUDA tests and compute-sanitizer, all within 8 minutes by its own clock,
# and leave at most 8 files, one folder down, in $OUT/<device>-<date>/.
#
# THE CALL (device tool `run`, from the session's checkout, which must hold this script and the
# code to measure, committed; build/ and other ignored paths do not travel, nothing needs carry):
#     command:   PVQ_COMMIT=<git rev-parse --short HEAD, written out, e.g. a720ddb> bash bench/gpu_validation.sh
#     timeout_s: 540
# The script ends itself by 480 s (PVQ_GPU_BUDGET_S); 540 leaves a minute for a hung step's kill.
# With the machine's start (1-2 min) and 30 s warm, one call costs about 10 of the session's
# 15 device minutes. Rerun only at once, within the 30 s the machine stays warm (build/ is still
# there, so the build is incremental), only the steps that need it, and within status's
# budget_left_s less 30 s, e.g.
#     command:   PVQ_COMMIT=<hash> PVQ_GPU_BUDGET_S=180 PVQ_GPU_STEPS="tests sanitizer-memcheck" bash bench/gpu_validation.sh
#     timeout_s: 210
# else call give_back. The files come back under files_at/<device>-<date>/ (e.g.
# NVIDIA_H200-2026-12-01/); commit them as bench/results/<device>-<date>/, saying which commit
# they measured.
#
# Rehearsal on any machine without a GPU (tests/test_gpu_validation.py runs it):
#     OUT=$(mktemp -d) PVQ_GPU_REHEARSAL=1 bash bench/gpu_validation.sh
# puts bench/rehearsal/ (stub nvidia-smi and compute-sanitizer) first on PATH, runs the build as
# `pip install --dry-run`, lets the gate accept the CPU and runs every bench on the CPU at tiny
# shapes; every other line is the real path.
#
# Steps, in order of value (the numbers first, so that a slow build or a sanitizer cannot cost
# them), with the seconds predicted on an H200 machine (16 cores) and each step's time limit; a
# step gets min(limit, time left before the 480 s deadline less 15 s for the summary), and one
# with under 20 s left is skipped. Predictions are estimates, made before any run on a GPU:
#   step                predicted  limit  why
#   environment              5       60   nvidia-smi, versions, one torch import
#   build                  120      330   25 compile units on 16 cores at sm_90a only; the longest
#                                         (torch glue, gemv.cu) take 40-80 s each on the 2-core dev
#                                         machine, so the critical path plus configure and the LTO link
#   gate                     8       60   import, cuda_built(), one decode on the GPU against the CPU
#   bench-matmul            30      120   3 shapes x 3 batches x (pvq, cuBLAS), CUDA-graph bursts over
#                                         copies of > 4x L2, a 1 GiB copy, a CPU check per point
#   bench-hadamard          10       60   n = 4096, 14336 x 3 dtypes, 128 MB tensors
#   bench-hessian           10       60   n = 4096, 16k bf16 tokens, against addmm_ and an fp64 reference
#   bench-codec             25       90   6 (D, K), 2^25 groups each (1 GB of CPU randn per config)
#   quantize-8b-block       25       90   2 Llama-3-8B-sized blocks, 32 x 512 random tokens, fp targets
#   quantize-smollm2        45      120   a SmolLM2-135M-sized model (30 blocks, 210 linears), the same
#   tests                   75      180   pytest -x -m cuda: ~1050 CUDA cases (433 requires_cuda, and the
#                                         [cuda] case of each of the 614 device-fixture cases)
#   sanitizer-memcheck      45      120   memcheck on a 25-test kernel subset, allocator caching off
#   sanitizer-racecheck     30       90   racecheck on 8 small shared-memory kernel tests
#   summary                  1        -
#   total                  ~440 of 480 (the build, the least certain, is budgeted high)
# Measured on an H200 (2026-12-04, bench/results/NVIDIA_H200-2026-12-04/): environment 7 s, build
# 55, gate 11, bench-matmul 14, bench-hadamard 13, bench-hessian 8, quantize 23 + 23; the codec
# bench, tests and memcheck crashed early (a libstdc++ link bug, since fixed) and racecheck used
# its whole 90 s, so their times are still predictions.
#
# Results (at most 8 files; names of letters, digits, '.', '_', '-'): environment.txt, build.log,
# tests.log, sanitizer.log, bench.md (every bench step's output), quantize.md, results.json (one
# JSON line per bench, read by gpu_summary.py) and summary.txt (what is printed last).
# Exit status: 0 when every step passed (gpu_summary.py says which may fail without failing the
# run), 1 otherwise, at once after the summary when the build or the gate fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the folder whose files come back}"

PY=${PVQ_PYTHON:-python3}
BUDGET_S=${PVQ_GPU_BUDGET_S:-480}
REHEARSAL=${PVQ_GPU_REHEARSAL:-0}
SELECTED=${PVQ_GPU_STEPS:-all}
RESERVE_S=15
MIN_STEP_S=20
START_MS=$(date +%s%3N)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [[ $REHEARSAL == 1 ]]; then  # stub nvidia-smi and compute-sanitizer
  export PATH="$PWD/bench/rehearsal:$PATH"
elif [[ -d /usr/local/cuda/bin ]]; then  # nvcc and compute-sanitizer, if not on PATH already
  export PATH="$PATH:/usr/local/cuda/bin"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pvq-gpuval.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
DEVICE_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> "$WORK/name.err" | head -n 1)
DEV=$(printf '%s' "${DEVICE_NAME:-unknown-gpu}" | tr -c 'A-Za-z0-9._-' '_' | sed 's/_*$//')
DIR="$OUT/$DEV-$(date -u +%F)"
mkdir -p "$DIR" || exit 1
cat "$WORK/name.err" >> "$DIR/environment.txt"
STEPS_TSV="$WORK/steps.tsv"
RESULTS="$DIR/results.json"
: > "$STEPS_TSV"

now_ms() { date +%s%3N; }
elapsed_s() { echo $((($(now_ms) - START_MS) / 1000)); }
wanted() {  # the environment, the build and the gate always run
  [[ $SELECTED == all || $1 == environment || $1 == build || $1 == gate || " $SELECTED " == *" $1 "* ]]
}
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$STEPS_TSV"; }

# A compute-sanitizer run: REFUSED when the tool turned the device down (as seen on gVisor: "Device
# not supported", then error 999 at the first allocation), else by its exit status (9: it found
# errors; 124/137: the time limit).
sanitizer_status() {  # sanitizer_status RC SECTION_FILE
  local rc=$1 section=$2 errors
  errors=$(grep -oE 'ERROR SUMMARY: [0-9]+ error' "$section" | tail -n 1 | grep -oE '[0-9]+')
  if ((rc != 0)) && grep -qiE '^=+ .*not supported|device not supported' "$section"; then
    echo "REFUSED"
  elif ((rc == 124 || rc == 137)); then
    echo "TIMEOUT"
  elif ((rc == 9)); then
    echo "FAIL(${errors:-?} errors)"
  elif ((rc != 0)); then
    echo "FAIL(rc=$rc)"
  else
    echo "ok"
  fi
}

# run_step NAME LIMIT_S LOG KIND CMD...: CMD's output goes to $DIR/LOG, under a time limit of
# min(LIMIT_S, time left); NAME, status, seconds, LOG and a note go to the steps table. KIND
# "sanitizer" reads the status from the tool's output. Returns 0 when the step passed.
run_step() {
  local name=$1 limit=$2 log=$3 kind=$4
  shift 4
  wanted "$name" || return 0
  local left=$((BUDGET_S - $(elapsed_s) - RESERVE_S))
  if ((left < MIN_STEP_S)); then
    record "$name" SKIP 0 "$log" "${left} s left"
    printf '[+%3s s] %-20s SKIP (%s s left)\n' "$(elapsed_s)" "$name" "$left"
    return 1
  fi
  ((limit > left)) && limit=$left
  # A rehearsal runs tiny shapes on a CPU that may be shared: the step limits are sized for an H200
  # and would only measure the CPU's load there, so each step gets the time left before the deadline.
  [[ $REHEARSAL == 1 ]] && limit=$left
  local before t0 rc status secs
  before=0
  [[ -f $DIR/$log ]] && before=$(wc -l < "$DIR/$log")
  printf '\n## %s (limit %s s, at +%s s): %s\n\n' "$name" "$limit" "$(elapsed_s)" "$*" >> "$DIR/$log"
  t0=$(now_ms)
  timeout -k 10 "$limit" "$@" >> "$DIR/$log" 2>&1
  rc=$?
  secs=$(awk -v ms=$(($(now_ms) - t0)) 'BEGIN { printf "%.1f", ms / 1000 }')
  tail -n +"$((before + 1))" "$DIR/$log" > "$WORK/section"
  if [[ $kind == sanitizer ]]; then
    status=$(sanitizer_status "$rc" "$WORK/section")
  elif ((rc == 124 || rc == 137)); then
    status=TIMEOUT
  elif ((rc != 0)); then
    status="FAIL(rc=$rc)"
  else
    status=ok
  fi
  local note  # pytest's closing counts and compute-sanitizer's error count, where the step has them
  note=$(grep -hoE '[0-9]+ (passed|failed|skipped|errors?)[^=]* in [0-9.]+s|ERROR SUMMARY: [0-9]+ errors?' \
    "$WORK/section" | tail -n 2 | paste -sd ';' -)
  record "$name" "$status" "$secs" "$log" "$note"
  printf '[+%3s s] %-20s %-16s %6s s  (%s) %s\n' "$(elapsed_s)" "$name" "$status" "$secs" "$log" "$note"
  if [[ $status != ok ]]; then
    tail -n 12 "$WORK/section" | sed 's/^/    | /'
  fi
  [[ $status == ok || $status == REFUSED ]]
}

summary() {
  local rc flags=()
  [[ $REHEARSAL == 1 ]] && flags=(--rehearsal)
  "$PY" bench/gpu_summary.py --steps "$STEPS_TSV" --results "$RESULTS" --budget "$BUDGET_S" \
    --elapsed "$(elapsed_s)" --title "${DEVICE_NAME:-unknown}, commit ${PVQ_COMMIT:-unknown}, $(date -u +%F)" \
    "${flags[@]}" > "$WORK/summary" 2>&1
  rc=$?
  if ! grep -q '^verdict:' "$WORK/summary"; then  # the summary script itself broke: the raw table
    { cat "$WORK/summary"; echo "gpu_summary.py failed (rc=$rc); raw steps:"; cat "$STEPS_TSV"; } > "$WORK/s2"
    mv "$WORK/s2" "$WORK/summary"
    rc=1
  fi
  cp "$WORK/summary" "$DIR/summary.txt"
  local files
  files=$(find "$OUT" -type f | wc -l)
  if ((files > 8)); then
    echo "WARNING: $files files under \$OUT, only 8 come back" | tee -a "$DIR/summary.txt"
  fi
  echo
  cat "$WORK/summary"
  return "$rc"
}

# --- the steps --------------------------------------------------------------------------------

environment_report() {
  echo "commit: ${PVQ_COMMIT:-unknown (pass PVQ_COMMIT)}; date: $(date -u); budget ${BUDGET_S} s; rehearsal=$REHEARSAL; steps=$SELECTED"
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit,temperature.gpu,ecc.mode.current --format=csv
  uname -a
  echo "nproc: $(nproc)"
  free -g
  df -h .
  command -v nvcc && nvcc --version
  command -v compute-sanitizer && compute-sanitizer --version
  command -v cuobjdump
  "$PY" bench/gpu_env.py
  "$PY" -m pip list 2>&1 | grep -iE '^(torch|transformers|scikit-build-core|pybind11|cmake|ninja|pytest|hypothesis|safetensors|numpy|pvq)'
}
export -f environment_report
export PY BUDGET_S REHEARSAL SELECTED

echo "pvq_cuda GPU validation on ${DEVICE_NAME:-unknown}: results in $DIR (budget ${BUDGET_S} s)"
run_step environment 60 environment.txt plain bash -c environment_report

# Build against this machine's torch, sm_90a only (Hopper), on every core. -lineinfo gives the
# sanitizers source lines; -Xptxas=-v writes each kernel's registers, spills and shared memory to
# build.log. Neither changes the generated code.
BUILD=(env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" PVQ_WITH_CUDA=ON PVQ_CUDA_ARCHS=90a CUDAFLAGS="-lineinfo -Xptxas=-v"
  "$PY" -m pip install -v --no-index --no-build-isolation --no-deps .)
if [[ $REHEARSAL == 1 ]]; then
  BUILD=("${BUILD[@]:0:$((${#BUILD[@]} - 1))}" --dry-run .)  # the same command, without building
fi
GATE=("$PY" bench/gpu_env.py --gate)
[[ $REHEARSAL == 1 ]] && GATE+=(--rehearsal)
if ! run_step build 330 build.log plain "${BUILD[@]}" || ! run_step gate 60 build.log plain "${GATE[@]}"; then
  grep -q $'^gate\t' "$STEPS_TSV" || record gate SKIP 0 build.log "build failed"
  echo "build or gate failed: stopping here"
  summary
  exit 1
fi

if [[ $REHEARSAL == 1 ]]; then  # tiny shapes on the CPU
  MATMUL=(--device cpu --shapes 256x512 --batches 1 16 --repeats 3)
  HADAMARD=(--device cpu --sizes 4096 14336 --cpu-mb 1 --repeats 3)
  HESSIAN=(--device cpu --n 256 --tokens 1024 --repeats 3)
  CODEC=(--device cpu --cpu-groups 4096 --repeats 3 --act-hidden 256 --act-tokens 8 --act-out-features 64)
  QUANTIZE_8B=(--device cpu --models tiny --nsamples 2 --seqlen 16)
  QUANTIZE_SMOL=(--device cpu --models tiny --nsamples 4 --seqlen 32)
else
  MATMUL=(--device cuda --shapes 4096x4096 8192x8192 4096x14336 --batches 1 16 128 --repeats 15)
  HADAMARD=(--device cuda --sizes 4096 14336 --repeats 9)
  HESSIAN=(--device cuda --n 4096 --tokens 16384 --dtype bfloat16 --repeats 7)
  CODEC=(--device cuda --repeats 9)
  QUANTIZE_8B=(--device cuda --models llama3-8b-block --blocks 2 --nsamples 32 --seqlen 512)
  QUANTIZE_SMOL=(--device cuda --models smollm2-135m --nsamples 32 --seqlen 512)
fi
run_step bench-matmul 120 bench.md plain "$PY" bench/bench_matmul.py "${MATMUL[@]}" --json "$RESULTS"
run_step bench-hadamard 60 bench.md plain "$PY" bench/bench_hadamard.py "${HADAMARD[@]}" --json "$RESULTS"
run_step bench-hessian 60 bench.md plain "$PY" bench/bench_hessian.py "${HESSIAN[@]}" --json "$RESULTS"
run_step bench-codec 90 bench.md plain "$PY" bench/bench_codec.py "${CODEC[@]}" --json "$RESULTS"
run_step quantize-8b-block 90 quantize.md plain "$PY" bench/bench_quantize_time.py "${QUANTIZE_8B[@]}" --json "$RESULTS"
run_step quantize-smollm2 120 quantize.md plain "$PY" bench/bench_quantize_time.py "${QUANTIZE_SMOL[@]}" --json "$RESULTS"

# Every test that runs a CUDA kernel: conftest marks each requires_cuda test and each [cuda] case
# of the device fixture `cuda` (tests/test_gpu_validation.py checks that the marker covers every
# test with "cuda" in its name).
run_step tests 180 tests.log plain "$PY" -m pytest -x -q -p no:cacheprovider -m cuda --durations=15 tests

# compute-sanitizer on a small set of kernel tests: every kernel family (search, decode, encode,
# Hadamard, GEMV and tile dequantization with cuBLAS, the input gradient fused and tiled, Hessian,
# quantize_weight on CUDA), graph
# capture and the bad-data sentinels; the slowest under the tool (16k x 4096 Hessian and its fp64
# cuBLAS reference) last. With the caching allocator off, an access past a tensor's end leaves
# its cudaMalloc block instead of landing in a neighbour.
KERNEL_TESTS=(
  "tests/test_cuda.py::test_decode_and_encode_match_cpu[8-16]"
  "tests/test_cuda.py::test_decode_and_encode_match_cpu[16-30]"
  "tests/test_cuda.py::test_decode_and_encode_match_cpu[16-56]"
  "tests/test_cuda.py::test_decode_and_encode_match_cpu[32-21]"
  "tests/test_cuda.py::test_search_matches_cpu[dtype0-8-16]"
  "tests/test_cuda.py::test_search_matches_cpu[dtype2-16-30]"
  "tests/test_cuda.py::test_search_matches_cpu[dtype1-32-21]"
  tests/test_cuda.py::test_decode_every_leaf_size_path
  tests/test_cuda.py::test_bad_data_errors_match_cpu
  tests/test_cuda.py::test_cuda_graph_capture_and_sentinels
  "tests/test_hadamard.py::test_cuda_matches_cpu[12-dtype0]"
  "tests/test_hadamard.py::test_cuda_matches_cpu[576-dtype2]"
  "tests/test_hadamard.py::test_cuda_matches_cpu[1536-dtype1]"
  "tests/test_hadamard.py::test_cuda_matches_cpu[4096-dtype0]"
  tests/test_hadamard.py::test_cuda_many_rows_and_odd_layouts
  tests/test_hadamard.py::test_cuda_graph_capture
  "tests/test_matmul.py::test_cuda_matmul_matches_cpu[1]"
  "tests/test_matmul.py::test_cuda_matmul_matches_cpu[7]"
  "tests/test_matmul.py::test_cuda_matmul_matches_cpu[16]"
  "tests/test_matmul.py::test_cuda_matmul_matches_cpu[33]"
  "tests/test_matmul.py::test_pvq_linear_cuda_graph[dtype0]"
  "tests/test_autograd.py::test_cuda_input_grad_matches_cpu[lead0-dtype0-pvq-3.25]"
  "tests/test_autograd.py::test_cuda_input_grad_matches_cpu[lead4-dtype1-pvq8-3.25]"
  tests/test_weight.py::test_quantize_on_cuda_matches_cpu
  tests/test_hessian.py::test_cuda_accumulate_large_bf16_against_fp64
)
# racecheck (shared-memory hazards) on the kernels that share memory: decode's prefix tables, the
# Hadamard tiles, the GEMV, the fused input gradient and the Hessian's tensor-core tiles, on small
# Hessians with partial tiles (the 16k x 4096 one ran past the whole 90 s on the H200, 2026-12-04;
# the device fixture's [cuda-...] cases exist only where torch sees a GPU).
RACE_TESTS=(
  "tests/test_cuda.py::test_decode_and_encode_match_cpu[8-16]"
  "tests/test_cuda.py::test_search_matches_cpu[dtype0-8-16]"
  "tests/test_hadamard.py::test_cuda_matches_cpu[1536-dtype1]"
  "tests/test_matmul.py::test_cuda_matmul_matches_cpu[1]"
  "tests/test_matmul.py::test_cuda_matmul_matches_cpu[33]"
  "tests/test_autograd.py::test_cuda_input_grad_matches_cpu[lead2-dtype1-pvq-3.25]"
  "tests/test_hessian.py::test_accumulate_against_fp64[cuda-576-2000-dtype2]"
  "tests/test_hessian.py::test_accumulate_against_fp64[cuda-130-333-dtype1]"
)
SANITIZER=$(command -v compute-sanitizer || true)
PYTEST=("$PY" -m pytest -x -q -p no:cacheprovider)
if [[ -z $SANITIZER ]]; then
  wanted sanitizer-memcheck && record sanitizer-memcheck not-found 0 sanitizer.log "no compute-sanitizer"
  wanted sanitizer-racecheck && record sanitizer-racecheck not-found 0 sanitizer.log "no compute-sanitizer"
  echo "compute-sanitizer not found: sanitizer steps passed over" | tee -a "$DIR/sanitizer.log"
else
  run_step sanitizer-memcheck 120 sanitizer.log sanitizer env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
    --tool memcheck --error-exitcode 9 --print-limit 50 "${PYTEST[@]}" "${KERNEL_TESTS[@]}"
  if grep -q $'^sanitizer-memcheck\tREFUSED' "$STEPS_TSV"; then  # gVisor: it refuses every tool
    wanted sanitizer-racecheck && record sanitizer-racecheck REFUSED 0 sanitizer.log "as memcheck was"
  else
    run_step sanitizer-racecheck 90 sanitizer.log sanitizer "$SANITIZER" \
      --tool racecheck --error-exitcode 9 --print-limit 50 "${PYTEST[@]}" "${RACE_TESTS[@]}"
  fi
fi

summary
