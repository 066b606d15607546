//! Internals, not part of the user API: the `#[repr(C)]` kernel ABI (and its layout checks) and
//! the NVRTC compilation of the kernels, public only for this crate's integration tests
//! (`tests/nvrtc.rs` compiles every kernel without a GPU; `tests/reduce_model.rs` replays the
//! reduce combine plan). They may change in any release.

pub mod abi;
pub mod kernels;
