#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md; tables go to stdout and to OUT_DIR/*.md (default outputs/bench_gpu).
#   bash scripts/bench_gpu.sh [OUT_DIR] [GROUP ...]
# Groups, in this order by default (all about 13 minutes on an H100/H200, side_by_side about 7 of them):
#   side_by_side  B config, batch 16, bf16 weights, 100 steps: vqdiff and diffusers in one process, eager and compiled
#   sample_B      our B config at each dtype, and compiled
#   sample_sizes  the S preset and the shapes network at batch 1 / 8 / 32, CUDA graphs
#   transformer tokenizer ddpm   training step, tokenizer and Gaussian UNet speeds
# Uses $PYTHON (default python3) with this checkout on PYTHONPATH. A machine without diffusers (the lent GPU
# machines have no package registry) installs it from a wheel in .whl/ when one is there:
#   pip download diffusers==0.42.1 --no-deps -d .whl     # here, then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/bench_gpu}
shift || true
all="side_by_side sample_B sample_sizes transformer tokenizer ddpm"
groups=${*:-$all}
for group in $groups; do
    [[ " $all " == *" $group "* ]] || { echo "bench_gpu.sh: unknown group '$group' (one of: $all)" >&2; exit 2; }
done
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import diffusers" 2>/dev/null && compgen -G ".whl/diffusers-*.whl" >/dev/null; then
    deps=$(mktemp -d)
    "$py" -m pip install -q --no-deps --no-index --target "$deps" .whl/diffusers-*.whl \
        || echo "bench_gpu.sh: could not install .whl/diffusers-*.whl; side_by_side will say diffusers is missing" >&2
    export PYTHONPATH="$PYTHONPATH:$deps"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.md"
run() {
    local name=$1; shift
    echo "## $name: $*" | tee -a "$out/$name.md"
    timeout 900 "$py" "$@" 2>&1 | tee -a "$out/$name.md"
}
for group in $groups; do
    case $group in
    side_by_side)
        run side_by_side scripts/bench_sample.py --configs B --dtype bf16-weights --steps 100 --repeats 3 \
            --against diffusers
        run side_by_side scripts/bench_sample.py --configs B --dtype bf16-weights --compile --steps 100 --repeats 3 \
            --against diffusers ;;
    sample_B)
        run sample_B scripts/bench_sample.py --configs B --dtype bfloat16 --runs 25 100
        run sample_B scripts/bench_sample.py --configs B --dtype bf16-weights --runs 25 100
        run sample_B scripts/bench_sample.py --configs B --dtype float32 --runs 25 100
        run sample_B scripts/bench_sample.py --configs B --dtype bf16-weights --runs 25 100 --compile ;;
    sample_sizes)
        run sample_sizes scripts/bench_sample.py --configs S256 --batch 1 8 --dtype bf16-weights --runs 25 100 \
            --compile reduce-overhead
        run sample_sizes scripts/bench_sample.py --configs shapes S256 --batch 1 8 32 --dtype bf16-weights \
            --runs 25 50 100 ;;
    transformer) run transformer scripts/bench_transformer.py --presets S B --batch 1 16 --dtype bfloat16 ;;
    tokenizer) run tokenizer scripts/bench_tokenizer.py --device cuda ;;
    ddpm) run ddpm scripts/bench_ddpm.py --device cuda --batch-sizes 1 64 --dtype bfloat16 ;;
    esac
done
