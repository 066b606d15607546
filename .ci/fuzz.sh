#!/usr/bin/env bash
# Bounded fuzzing of every cargo-fuzz target in fuzz/ (called from .ci/run).
#
# - skips (exit 0) when no nightly toolchain is installed;
# - installs cargo-fuzz if missing;
# - builds all targets once (release, debug assertions on: overflow checks), then runs each for
#   FUZZ_SECONDS seconds (default 75: with a cold build of about 2.5 minutes the whole script
#   stays under 10 minutes on a 2-core machine), starting from the committed corpus;
#   new corpus entries go to a scratch directory, so the tree stays clean;
# - on a crash, prints the target's log tail and each new artifact (hex and base64), copies the
#   artifacts to fuzz/artifacts/<target>/ (git-ignored; `cargo test -p sam-fuzz-checks` replays
#   them) and exits non-zero after the remaining targets ran.
#
# Environment: FUZZ_SECONDS (per target), FUZZ_TARGETS (space-separated subset),
# FUZZ_TARGET_DIR (cargo target directory, default fuzz/target).
set -uo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-75}"
targets="${FUZZ_TARGETS:-config step ndarray_step case_json checkpoint interval looksam loss_scale}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain (cargo +nightly --version failed); fuzzing is skipped"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked || { echo "fuzz: could not install cargo-fuzz"; exit 1; }
fi

target_dir=()
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    target_dir=(--target-dir "$FUZZ_TARGET_DIR")
fi

start=$(date +%s)
echo "fuzz: building targets ($(cargo +nightly --version))"
if ! cargo +nightly fuzz build -a "${target_dir[@]}"; then
    echo "fuzz: build failed"
    exit 1
fi
echo "fuzz: build took $(( $(date +%s) - start )) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for t in $targets; do
    mkdir -p "$scratch/corpus/$t" "$scratch/artifacts/$t" "fuzz/corpus/$t"
    t0=$(date +%s)
    cargo +nightly fuzz run -a "${target_dir[@]}" "$t" "$scratch/corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
        -artifact_prefix="$scratch/artifacts/$t/" >"$scratch/$t.log" 2>&1
    rc=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$scratch/$t.log" | grep -o '[0-9]*$' | tail -1)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz: $t ok: ${runs:-?} executions in $(( $(date +%s) - t0 )) s"
        continue
    fi
    status=1
    echo "fuzz: $t FAILED (exit $rc) after ${runs:-?} executions:"
    grep -m 6 -E 'panicked at|contract violation|ERROR: libFuzzer|SUMMARY:' "$scratch/$t.log"
    echo "fuzz: log tail:"
    tail -n 40 "$scratch/$t.log"
    mkdir -p "fuzz/artifacts/$t"
    for a in "$scratch/artifacts/$t"/*; do
        [ -f "$a" ] || continue
        name=$(basename "$a")
        cp "$a" "fuzz/artifacts/$t/$name"
        echo "fuzz: artifact $t/$name ($(wc -c <"$a") bytes), copied to fuzz/artifacts/$t/$name"
        echo "hex:"
        od -An -v -tx1 "$a" | tr -d ' \n' | fold -w 128
        echo
        echo "base64:"
        base64 -w 76 "$a"
        echo "replay: cargo test -p sam-fuzz-checks --test corpora corpus_$t  (or: cargo +nightly fuzz run -a $t fuzz/artifacts/$t/$name)"
    done
done
echo "fuzz: total $(( $(date +%s) - start )) s"
exit $status
