#!/usr/bin/env bash
# Every GPU benchmark of docs/benchmarks.md in one go (about 6 minutes on an H100/H200); tables go to stdout and to
# ${1:-outputs/bench_gpu}/*.md. Uses $PYTHON (default python3) with vqdiff importable.
#   bash scripts/bench_gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/bench_gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.md"
run() { local name=$1; shift; echo "## $name: $*" | tee -a "$out/$name.md"; timeout 900 "$py" "$@" 2>&1 | tee -a "$out/$name.md"; }
run sample_B scripts/bench_sample.py --configs B --dtype bfloat16 --runs 25 100
run sample_B scripts/bench_sample.py --configs B --dtype bf16-weights --runs 25 100
run sample_B scripts/bench_sample.py --configs B --dtype float32 --runs 25 100
run sample_B scripts/bench_sample.py --configs B --dtype bf16-weights --runs 25 100 --compile
run sample_sizes scripts/bench_sample.py --configs S256 --batch 1 8 --dtype bf16-weights --runs 25 100 --compile reduce-overhead
run sample_sizes scripts/bench_sample.py --configs shapes S256 --batch 1 8 32 --dtype bf16-weights --runs 25 50 100
run transformer scripts/bench_transformer.py --presets S B --batch 1 16 --dtype bfloat16
run tokenizer scripts/bench_tokenizer.py --device cuda
run ddpm scripts/bench_ddpm.py --device cuda --batch-sizes 1 64 --dtype bfloat16
