#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build, run every test with CUDA, the sanitizers on
# the kernel tests, and every benchmark; results land in $OUT/<device>-<date>/ for committing under
# bench/results/. Usage (from the repo root on the GPU box):  OUT=/some/dir bash bench/gpu_validation.sh
set -uo pipefail
OUT="${OUT:?set OUT to a writable directory}"
DEV=$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))' 2>/dev/null || echo unknown)
DIR="$OUT/$DEV-$(date +%F)"
mkdir -p "$DIR"
{
  nvidia-smi; python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  git rev-parse HEAD 2>/dev/null || true
} > "$DIR/environment.txt" 2>&1
PVQ_CUDA_ARCHS="${PVQ_CUDA_ARCHS:-90a}" pip install --no-build-isolation --no-deps . > "$DIR/build.log" 2>&1 \
  || { echo "build failed"; tail -50 "$DIR/build.log"; exit 1; }
python -m pytest -q tests -rs > "$DIR/pytest.log" 2>&1; echo "pytest rc=$?" | tee -a "$DIR/pytest.log"
tail -3 "$DIR/pytest.log"
for tool in memcheck racecheck synccheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 python -m pytest -q -x tests/test_cuda.py \
    "tests/test_hadamard.py::test_cuda_matches_cpu" tests/test_matmul.py -k "cuda" > "$DIR/sanitizer-$tool.log" 2>&1
  echo "compute-sanitizer $tool rc=$?" | tee -a "$DIR/sanitizer-$tool.log"
done
python bench/bench_codec.py --device cuda --out "$DIR/codec.md" > /dev/null 2>&1; tail -12 "$DIR/codec.md"
python bench/bench_hadamard.py --device cuda --out "$DIR/hadamard.md" > /dev/null 2>&1; tail -12 "$DIR/hadamard.md"
python bench/bench_hessian.py --device cuda --out "$DIR/hessian.md" > /dev/null 2>&1; tail -8 "$DIR/hessian.md"
python bench/bench_matmul.py --device cuda --outdir "$DIR" > "$DIR/matmul.log" 2>&1; tail -45 "$DIR"/matmul-*.md
