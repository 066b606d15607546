//! `sam-core`: the Sharpness-Aware Minimization family of optimizers, `#![no_std]`.
//!
//! This crate defines the math of every variant once, over an abstract storage trait,
//! [`backend::ParamBuffer`], whose methods are fused passes over memory (reduce, perturb,
//! restore-and-step). Backends supply the storage: [`reference::SliceBuffer`] here (plain
//! slices, caller-provided memory, the executable specification), `sam-ndarray` (CPU) and
//! `sam-cuda` (GPU) in their own crates, or your framework's tensors through the trait alone
//! (see `examples/custom_buffer.rs`).
//!
//! Every optimizer implements one trait, [`Optimizer`] (a step with a closure that computes
//! the gradients, checkpoint state, learning-rate schedule, recovery); the two-gradient
//! variants also implement [`SamOptimizer`] (the two-call form: `first_step` returns a
//! [`Perturbed`] guard). Training code written against `O: Optimizer` runs every variant.
//! The crate root holds what users of the optimizers need; what a backend implements lives
//! in [`backend`].
//!
//! ```
//! use sam_core::{AdamConfig, BaseRule, Group, Optimizer, Perturbation, Sam, StepStatus};
//! use sam_core::reference::SliceBuffer;
//!
//! // Minimise L(w) = Σ (w_i − i)² with ASAM around Adam.
//! let mut w = [0.0_f32; 4];
//! let mut g = [0.0_f32; 4];
//! let mut slots = [0.0_f32; 3 * 4]; // backup, m, v
//! let base = BaseRule::adam(AdamConfig { lr: 0.1, ..Default::default() })?;
//! let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
//! let mut asam = Sam::new(Perturbation::asam(0.5, 0.01).into())?;
//! for _ in 0..300 {
//!     let report = asam.step(&mut groups, |gs| {
//!         let (w, g) = gs[0].buffer.weights_and_grad();
//!         let mut loss = 0.0;
//!         for (i, (wi, gi)) in w.iter().zip(g.iter_mut()).enumerate() {
//!             *gi = 2.0 * (wi - i as f32);
//!             loss += (wi - i as f32).powi(2);
//!         }
//!         Ok::<_, sam_core::Error<_>>(loss)
//!     })?;
//!     assert_eq!(report.status, StepStatus::Applied);
//! }
//! let w = groups[0].buffer.weights();
//! assert!(w.iter().enumerate().all(|(i, wi)| (wi - i as f32).abs() < 0.05), "{w:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `alloc` | no | `reference::VecBuffer` and `checkpoint` (host state plus slots, bit-exact resume) |
//! | `serde` | no | `Serialize`/`Deserialize` for configurations, optimizer state and checkpoints |
//! | `half` | no | `half::bf16` and `half::f16` as storage types ([`backend::Real`]), rounded once from `f64` |
//!
//! # Variants
//!
//! | type | paper |
//! |---|---|
//! | [`Sam`] (SAM, and ASAM with `adaptive`) | Foret et al. 2021, <https://arxiv.org/abs/2010.01412>; Kwon et al. 2021, <https://arxiv.org/abs/2102.11600> |
//! | [`Gsam`] | Zhuang et al. 2022, <https://arxiv.org/abs/2203.08065> |
//! | [`Wsam`] | Yue et al. 2023, <https://arxiv.org/abs/2305.15817> |
//! | [`Wasam`] | Kaddour et al. 2022, <https://arxiv.org/abs/2202.00661> |
//! | [`LookSam`] (SAM every `k` steps, its direction reused in between) | Liu et al. 2022, <https://arxiv.org/abs/2203.02714> |
//! | [`Interval`] (SAM every `k` steps, plain steps in between) | MosaicML Composer's `SAMOptimizer(interval=k)` |
//! | [`BaseOptimizer`] | plain SGD / Adam / AdamW with torch semantics (the baseline) |
//!
//! # Guarantees
//!
//! - **Exact restore**: weights are restored from a copy, bit for bit; a step with `lr = 0` is
//!   the identity.
//! - **Safe norms**: accumulated in `f64` (with exact power-of-two rescaling for `f64` storage),
//!   so per-element gradients from 1e-30 to 1e30 give an accurate norm, never 0 or ∞.
//! - **Deterministic**: a fixed reduction order (see [`backend::kernel`]), the same bits whatever the
//!   thread count of a backend that follows it.
//! - **Nothing half-done**: a NaN/∞ in the clean gradient is detected before any write
//!   ([`Error::NonFiniteGradient`]); a NaN/∞ in the second gradient restores the weights and
//!   skips the step ([`StepStatus::Skipped`]); every `Err` leaves every buffer as it was.
//! - **Phases**: the perturbed phase is a guard ([`Perturbed`]) that borrows the optimizer and
//!   the groups; dropping it restores the weights.
//!
//! # Gradient accumulation
//!
//! Each gradient of a step may be accumulated over any number of micro-batches. The optimizers
//! read the gradient storage only inside their passes and never zero it or write it (except
//! [`Perturbed::restore_with_gradient`], which leaves the final gradient there by request), so
//! the storage holds whatever the framework summed into it:
//!
//! - two-call form ([`SamOptimizer`]): zero the storage, add every micro-batch's gradient at
//!   `w`, call `first_step`; zero it again, add every micro-batch's gradient at the perturbed
//!   weights, call `second_step`. The clean gradient the final pass needs (GSAM's, WSAM's and
//!   LookSAM's at a refresh) is stashed by `first_step`, so zeroing the storage in between
//!   loses nothing. On a step that takes one gradient (LookSAM between refreshes)
//!   `first_step` reads the accumulated gradient and `second_step` uses the storage as it
//!   then is: accumulate once and leave it;
//! - closure form ([`Optimizer::step`]): the closure zeroes the storage and adds the
//!   micro-batches itself, each time it is called.
//!
//! Semantics: the step is the whole-batch step on the accumulated gradients. The perturbation
//! norm (SAM, ASAM, GSAM, WSAM, WASAM) is the global norm of the accumulated first gradient,
//! so the climb is the same as for the whole batch (not one climb per micro-batch, which is
//! the m-sharpness of the SAM paper). Sum or mean is the caller's choice: for the mean over a
//! batch of `k` equal micro-batches, scale each micro-batch's loss (or gradient) by `1/k`. The
//! climb does not depend on a positive scale of the first gradient (except through `ε`), but
//! the base step uses the second gradient as given, and GSAM and WSAM combine the two
//! gradients linearly: accumulate both with the same convention. With the same summation order
//! (adding per-sample gradients one by one) the result is the whole-batch step bit for bit;
//! with per-micro-batch partial sums it differs by the rounding of the sums only
//! (`tests/tests/accumulation.rs` checks both for every variant).

#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod backend;
mod base;
mod buffer;
#[cfg(feature = "alloc")]
pub mod checkpoint;
pub mod collective;
mod engine;
mod error;
mod group;
mod gsam;
mod guard;
mod interval;
mod looksam;
mod loss_scale;
mod optimizer;
mod perturbation;
mod phases;
mod plain;
mod real;
pub mod reference;
mod sam;
mod schedule;
mod wasam;
mod wsam;

pub use base::{AdamConfig, BaseRule, SgdConfig};
pub use engine::{OptimizerState, Phase, SkipReason, StepReport, StepStatus, Timeline};
pub use error::Error;
pub use group::{Group, GroupOptions};
pub use gsam::{Gsam, GsamConfig, RhoSchedule};
pub use guard::Perturbed;
pub use interval::Interval;
pub use looksam::{LookSam, LookSamConfig};
pub use loss_scale::{LossScaler, LossScalerConfig, LossScalerState};
pub use optimizer::{Optimizer, SamOptimizer};
pub use perturbation::Perturbation;
pub use plain::BaseOptimizer;
pub use sam::{Sam, SamConfig};
pub use schedule::{MAX_STEP, MAX_VALUE, Proportional, Schedule, ScheduleConfig, ScheduleShape};
pub use wasam::{Swapped, Wasam, WasamState};
pub use wsam::{Wsam, WsamConfig};
