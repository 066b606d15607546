// A no_std binary gets `-nodefaultlibs`: link the C library explicitly for the C runtime's
// `_start` → `main` and for `memcpy`/`memset`.
fn main() {
    println!("cargo:rustc-link-arg-bins=-lc");
}
