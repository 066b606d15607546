//! `sam-cuda`: the CUDA backend of [`sam_core`] — a [`ParamBuffer`](sam_core::backend::ParamBuffer)
//! over device memory, with the optimizer passes as CUDA kernels compiled at run time by NVRTC.
//!
//! A [`CudaGroup`] holds one parameter group (any number of tensors) as one flat device
//! allocation each for the weights, the gradient and the optimizer's slots; every pass of every
//! SAM variant is one kernel launch per group. A [`Context`] opens a GPU, compiles the kernels
//! (`kernels/*.cu`, embedded in the crate) with NVRTC once and loads them.
//!
//! ```no_run
//! use sam_core::{BaseRule, Group, Optimizer, Perturbation, Sam, SgdConfig};
//! use sam_cuda::{Context, CudaGroup};
//!
//! let ctx = Context::new(0)?; // Err(LibraryMissing / NoDevice) on a machine without a GPU
//! let w0 = vec![1.0_f32; 1000];
//! let b0 = vec![0.0_f32; 10];
//! let group = CudaGroup::from_slices(&ctx, &[&w0, &b0])?; // two tensors, one group
//! let base = BaseRule::sgd(SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() })?;
//! let mut groups = [Group::new(group, base)];
//! let mut sam = Sam::new(Perturbation::sam(0.05).into())?;
//! sam.step(&mut groups, |gs| {
//!     // A framework writes ∇L(w) into gs[0].buffer.grad_mut() on the context's stream;
//!     // here: L = ½‖w‖², ∇L = w.
//!     let w = gs[0].buffer.download_weights()?;
//!     gs[0].buffer.upload_grad(&w)?;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Numerics: agreement with the reference backend
//!
//! - Elementwise passes (perturb, restore, update, fold, swap) compute each element with the
//!   same `f64` operations, in the same order and with the same rounding points, as
//!   `sam_core::backend::kernel` / `sam_core::base`; the kernels are compiled with `--fmad=false` so that
//!   NVRTC does not fuse `a*b + c` (see [`internals::kernels::compile_options`]). They are bit-identical to
//!   `sam_core::reference::SliceBuffer` (for NaN *values* only the payload may differ).
//! - The reduce pass follows sam-core's canonical reduction order exactly (blocks of
//!   [`sam_core::backend::kernel::BLOCK`] elements, 8 sequential lanes, the fixed lane tree, the pairwise
//!   block tree) in two stages with no floating-point atomics, so its result is also
//!   bit-identical to the reference, and the same on every run, grid size and GPU.
//!
//! These are the design's claims; the GPU tests (`tests/gpu.rs`) check them on a device.
//!
//! # Requirements and features
//!
//! At run time: the NVIDIA driver (`libcuda.so.1`) and NVRTC (`libnvrtc.so.12`, from a CUDA
//! 12 toolkit or `pip install nvidia-cuda-nvrtc-cu12`, on `LD_LIBRARY_PATH`). Nothing CUDA is
//! needed to build. Without the libraries every entry point returns
//! [`CudaError::LibraryMissing`]; nothing panics.
//!
//! | feature | default | meaning |
//! |---|---|---|
//! | `cuda-12` | yes | cudarc's CUDA 12.9 bindings; loads `libnvrtc.so.12`. Drives CUDA 12.x and 13.x drivers. |
//! | `cuda-13` | no | cudarc's CUDA 13.0 bindings; loads `libnvrtc.so.13` (`pip install "nvidia-cuda-nvrtc==13.0.*"`). Build with `--no-default-features --features cuda-13` (the two are exclusive). |
//!
//! NVRTC must not be newer than the driver: the driver JIT-compiles the PTX and rejects a PTX
//! ISA version it does not know.
//!
//! # References
//!
//! Foret et al., *Sharpness-Aware Minimization*, <https://arxiv.org/abs/2010.01412>; the other
//! variants are listed in [`sam_core`].

#![deny(missing_docs)]

mod context;
mod error;
mod group;
pub mod internals;

use internals::{abi, kernels};

pub use context::Context;
pub use error::{CudaError, Library};
pub use group::{CudaGroup, CudaReal, HostTensor, TensorInfo, TensorTable};

#[cfg(all(feature = "cuda-12", feature = "cuda-13"))]
compile_error!(
    "features `cuda-12` and `cuda-13` are exclusive: use --no-default-features --features cuda-13"
);
