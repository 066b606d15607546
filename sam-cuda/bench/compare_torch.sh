#!/usr/bin/env bash
# Times one SAM step of sam-cuda against pytorch_optimizer.SAM around torch.optim.SGD
# (momentum 0.9) and AdamW on the same GPU, same sizes. Not run in CI: it needs a CUDA GPU and
# downloads torch (several GB) into a virtual environment.
#
#   sam-cuda/bench/compare_torch.sh [--sizes 1e6,1e7,1e8,resnet50] [--iters 20]
#
# Environment: SAM_BENCH_VENV (default <repo>/.venv-bench), CARGO_TARGET_DIR (default
# <repo>/target), PIP_EXTRA (extra pip arguments, e.g. an --index-url for a CUDA 13 torch).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${SAM_BENCH_VENV:-$root/.venv-bench}
target=${CARGO_TARGET_DIR:-$root/target}

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC2086
"$venv/bin/pip" install -q ${PIP_EXTRA:-} torch pytorch-optimizer nvidia-cuda-nvrtc-cu12

# sam-cuda loads libnvrtc.so.12 at run time: use the wheel's copy.
nvrtc_lib=$("$venv/bin/python" - <<'PY'
import os, nvidia.cuda_nvrtc as m
print(os.path.join(list(m.__path__)[0], "lib"))
PY
)
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

(cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release -p sam-cuda --example bench)
exec "$venv/bin/python" "$here/compare_torch.py" --ours "$target/release/examples/bench" "$@"
