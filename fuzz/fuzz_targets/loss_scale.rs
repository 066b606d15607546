//! Fuzz target `loss_scale`: a thin wrapper around `sam_fuzz_checks::check_loss_scale` (see that crate for
//! what it checks; `cargo test -p sam-fuzz-checks` replays this target's corpus on stable).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sam_fuzz_checks::check_loss_scale(data));
