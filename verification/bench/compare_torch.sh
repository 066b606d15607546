#!/usr/bin/env bash
# One SAM step's optimizer work (no forward/backward), sam-ndarray vs pytorch_optimizer.SAM
# around torch.optim.SGD(momentum=0.9), on the CPU with the same sizes and thread count.
# Not run in CI: it downloads torch into a virtual environment.
#
#   verification/bench/compare_torch.sh [--threads 1|2] [--sizes 1e5,1e6,1e7,resnet18] [--iters 20]
#
# With --threads > 1 our side is built with rayon and runs RAYON_NUM_THREADS threads.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${SAM_BENCH_VENV:-$root/.venv-bench}
target=${CARGO_TARGET_DIR:-$root/target}
threads=1
for ((i = 1; i <= $#; i++)); do
    if [ "${!i}" = "--threads" ]; then j=$((i + 1)); threads=${!j}; fi
done
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check torch pytorch-optimizer
features=()
[ "$threads" -gt 1 ] && features=(--features rayon)
(cd "$root" && CARGO_TARGET_DIR="$target" cargo build -q --release -p sam-ndarray "${features[@]}" --example step_timing)
exec "$venv/bin/python" "$root/verification/bench/compare_torch.py" --ours "$target/release/examples/step_timing" "$@"
