//! `sam-candle`: the SAM family of optimizers of [`sam_core`] for candle models.
//!
//! A [`VarBuffer`] is a param group of candle `Var`s (a `VarMap`'s or a list) as a sam-core
//! [`ParamBuffer`](sam_core::backend::ParamBuffer); [`SamCandle`] drives any sam-core
//! [`Optimizer`](sam_core::Optimizer) over such groups with candle's `backward()` and
//! `GradStore`.
//!
//! **In place.** The passes run on the `Var`s' own storage: candle's in-place custom ops
//! (`Tensor::inplace_op1`) hand a closure the CPU storage under candle's write lock, and the
//! gradient's storage is taken the same way inside it, so a pass reads and writes the weights
//! and the gradient where they are, with no copy in or out. Each pass is sam-ndarray's fused
//! CPU pass ([`sam_ndarray::slices`]), run per parameter; the norm is reduced in the canonical
//! order over the group's parameters laid end to end, so a group gives the bits of the
//! reference backend over the same values.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use sam_core::{BaseRule, Group, Perturbation, Sam, SgdConfig, StepStatus};
//! use sam_candle::{SamCandle, VarBuffer};
//!
//! // Minimise ‖w − 3‖² with SAM around SGD.
//! let w = Var::zeros(4, DType::F32, &Device::Cpu)?;
//! let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
//! let groups = vec![Group::new(VarBuffer::<f32>::new(vec![w.clone()])?, base)];
//! let mut sam = SamCandle::new(Sam::new(Perturbation::sam(0.05).into())?, groups);
//! for _ in 0..100 {
//!     // The two-call form; `sam.step(|| loss)` does the same with a closure.
//!     let loss = (w.as_tensor() - 3.0)?.sqr()?.sum_all()?;
//!     let perturbed = sam.first_step(&loss.backward()?)?;
//!     let loss = (w.as_tensor() - 3.0)?.sqr()?.sum_all()?; // at the perturbed weights
//!     assert_eq!(perturbed.second_step(&loss.backward()?)?, StepStatus::Applied);
//! }
//! let w: Vec<f32> = w.as_tensor().to_vec1()?;
//! assert!(w.iter().all(|x| (x - 3.0).abs() < 0.1), "{w:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod buffer;
mod driver;
mod element;
mod error;
mod storage;

pub use buffer::VarBuffer;
pub use driver::{CandlePerturbed, Error, SamCandle, load_grads};
pub use element::Element;
pub use error::{CandleError, Role};

/// The workspace README's examples, compiled and run as doctests. They live in this crate, the
/// one that depends on both sam-core and candle, because the README shows both.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
