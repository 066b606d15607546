#!/usr/bin/env bash
# One SAM step's optimizer work (no forward/backward) on the CPU, in one run for each thread count:
# sam-ndarray's step_timing example, pytorch_optimizer.SAM around torch.optim.SGD(momentum=0.9),
# and davda54/sam's SAM written with torch._foreach_* ops around SGD(momentum=0.9, foreach=True),
# with the same run's STREAM triad as the bandwidth reference (see compare_torch.py).
# Not run in CI: it installs torch into a virtual environment.
#
#   verification/bench/compare_torch.sh [--sizes 1e7,resnet18] [--iters 20] [--threads 1,2]
#
# Sizes are element counts of one flat tensor (1e5, 1e7, ...) or resnet18 (its 62 tensors).
#
# Python side: the venv is $SAM_BENCH_VENV, else <repo>/.venv-bench (git-ignored); it is
# created, and torch and pytorch-optimizer installed from PyPI, when it cannot import them.
# PyPI's torch wheel for Linux x86-64 is the CUDA build: pip also pulls the nvidia-* and cuda-*
# runtime wheels (torch 2.15.0+cu132: about 5.4 GB installed, about a minute on a fast link).
# It runs on the CPU without a GPU, so the plain install is used; the CPU-only wheels are on
# PyTorch's own index, which this script does not use.
#
# Our side: step_timing is built twice, without rayon (used for 1 thread: the plain serial
# passes, no pool hand-off) and with --features rayon (used for every count > 1, run with
# RAYON_NUM_THREADS); torch runs with torch.set_num_threads of the same count. The builds copy
# the binaries to step_timing-serial and step_timing-rayon beside cargo's output.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${SAM_BENCH_VENV:-$root/.venv-bench}
target=${CARGO_TARGET_DIR:-$root/target}
py=$venv/bin/python

if ! { [ -x "$py" ] && "$py" -c 'import torch, pytorch_optimizer' 2>/dev/null; }; then
    [ -x "$py" ] || python3 -m venv "$venv"
    echo "installing torch and pytorch-optimizer from PyPI into $venv ..." >&2
    start=$SECONDS
    "$venv/bin/pip" install -q --disable-pip-version-check torch pytorch-optimizer
    echo "installed in $((SECONDS - start)) s; the venv takes $(du -sh "$venv" | cut -f1)" >&2
fi

examples=$target/release/examples
build() {
    (cd "$root" && CARGO_TARGET_DIR="$target" cargo build -q --release -p sam-ndarray --example step_timing "$@")
}
build
cp "$examples/step_timing" "$examples/step_timing-serial"
build --features rayon
cp "$examples/step_timing" "$examples/step_timing-rayon"

exec "$py" "$root/verification/bench/compare_torch.py" \
    --ours-serial "$examples/step_timing-serial" --ours-rayon "$examples/step_timing-rayon" "$@"
