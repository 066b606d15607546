//! A `#![no_std]`, `#![no_main]` program (entry point `main` called by the C runtime) that
//! runs SAM through the no_std library and reports through its exit code.
#![no_std]
#![no_main]

use sam_nostd_check::sam_nostd_run;

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    let d = sam_nostd_run(200);
    // Success: both models converged to within 0.1 of the minimum in total.
    if (0.0..0.1).contains(&d) { 0 } else { 1 }
}

/// The precompiled `core` references this symbol even with `panic = "abort"`; it is never
/// called (nothing unwinds).
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
