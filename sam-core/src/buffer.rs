//! The storage abstraction: [`ParamBuffer`] and the specifications of its fused passes.
//!
//! A buffer is the storage of one parameter group: its weights `w`, its gradient `g` (written by
//! the framework's backward pass) and the optimizer's per-element slots, laid out as the backend
//! likes (one flat slice, many tensors, device memory …). The core never touches elements: each
//! optimizer step is a handful of passes, each one sweep over memory, described by a small
//! `Copy` specification of host scalars. A backend implements each pass as one loop (CPU) or one
//! kernel launch per group (GPU), calling the element functions of [`kernel`](crate::backend::kernel) so
//! that the math exists once.
//!
//! Slots ([`SlotSpec`]), in this order: the backup of `w` (exact copy taken by the perturb pass),
//! the stash (a copy of the clean gradient, for variants that combine two gradients), the base
//! rule's state (`buf` for SGD momentum; `m, v[, vmax]` for Adam), and the weight averages.
//! State and average slots must start at zero; backup and stash need no initial value.

use crate::base::BaseStep;

/// Most running weight averages one buffer can hold.
pub const MAX_AVERAGES: usize = 4;

/// Which per-element slots a group needs. Returned by the optimizers; a backend allocates (or,
/// for caller-provided memory, checks) them in [`ParamBuffer::prepare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SlotSpec {
    /// A backup of the weights (every SAM-family step).
    pub backup: bool,
    /// A stash of the clean gradient (GSAM, WSAM).
    pub stash: bool,
    /// Number of base-rule state slots (0–3; see [`BaseRule::state_slots`](crate::BaseRule::state_slots)).
    pub state: u8,
    /// Number of running weight averages (0–[`MAX_AVERAGES`]; WASAM).
    pub averages: u8,
}

/// The role of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Slot {
    /// The backup of the weights.
    Backup,
    /// The stashed clean gradient.
    Stash,
    /// Base-rule state number `k` (SGD: 0 = momentum buffer; Adam: 0 = m, 1 = v, 2 = vmax).
    State(u8),
    /// Running average number `k`.
    Average(u8),
}

impl Slot {
    /// Every slot a buffer can hold, in [`SlotSpec`] order (backup, stash, the three base-state
    /// slots, the [`MAX_AVERAGES`] averages).
    pub const ALL: [Slot; 5 + MAX_AVERAGES] = [
        Slot::Backup,
        Slot::Stash,
        Slot::State(0),
        Slot::State(1),
        Slot::State(2),
        Slot::Average(0),
        Slot::Average(1),
        Slot::Average(2),
        Slot::Average(3),
    ];
}

impl SlotSpec {
    /// Total number of slots, i.e. values stored per parameter element.
    pub fn count(&self) -> usize {
        usize::from(self.backup)
            + usize::from(self.stash)
            + usize::from(self.state)
            + usize::from(self.averages)
    }

    /// The position of a slot in the order backup, stash, states, averages, if the spec has it.
    pub fn index(&self, slot: Slot) -> Option<usize> {
        let b = usize::from(self.backup);
        let s = usize::from(self.stash);
        match slot {
            Slot::Backup => self.backup.then_some(0),
            Slot::Stash => self.stash.then_some(b),
            Slot::State(k) => (k < self.state).then(|| b + s + usize::from(k)),
            Slot::Average(k) => {
                (k < self.averages).then(|| b + s + usize::from(self.state) + usize::from(k))
            }
        }
    }
}

/// How the perturbation scales the gradient per element: `T = 1` or `T = |w| + η` (ASAM).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weighting {
    /// `T = 1` (SAM).
    Plain,
    /// `T = |w| + eta` (ASAM; `eta = 0` is davda54's form).
    Adaptive {
        /// The offset η ≥ 0.
        eta: f64,
    },
}

/// What a reduce pass computes. All quantities are accumulated in `f64` in the canonical order
/// of [`kernel::reduce_block`](crate::backend::kernel::reduce_block) / [`kernel::pairwise`](crate::backend::kernel::pairwise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReduceSpec {
    /// Compute `Σ (s_p·T⊙g)²` and `max |T⊙g|` with this weighting.
    pub perturb: Option<Weighting>,
    /// Compute `Σ (s_g·g)²` and `max |g|`.
    pub grad: bool,
    /// Compute `Σ (s_s·stash)²` and `max |stash|`.
    pub stash: bool,
    /// Compute `Σ (s_g·g)·(s_s·stash)`.
    pub dot: bool,
    /// Scale `s_p` (a power of two; `1` on the first try, see [`crate::backend::kernel`]).
    pub scale_perturb: f64,
    /// Scale `s_g`.
    pub scale_grad: f64,
    /// Scale `s_s`.
    pub scale_stash: f64,
    /// The factor every gradient value is multiplied by as it is read, before anything else
    /// (`1/S` under a loss scale `S`, see [`Optimizer::set_grad_scale`](crate::Optimizer::set_grad_scale);
    /// `1` otherwise). Set by the optimizer for every pass.
    pub unscale: f64,
}

impl ReduceSpec {
    /// A spec that computes nothing but still reads the gradient for the finiteness check.
    pub const FINITE_ONLY: ReduceSpec = ReduceSpec {
        perturb: None,
        grad: false,
        stash: false,
        dot: false,
        scale_perturb: 1.0,
        scale_grad: 1.0,
        scale_stash: 1.0,
        unscale: 1.0,
    };

    /// Whether the pass reads the stash slot.
    pub fn reads_stash(&self) -> bool {
        self.stash || self.dot
    }

    /// Whether the pass reads the weights.
    pub fn reads_weights(&self) -> bool {
        matches!(self.perturb, Some(Weighting::Adaptive { .. }))
    }
}

/// The result of a reduce pass (or the combination of several).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reduction {
    /// `Σ (s_p·T⊙g)²`.
    pub perturb_sq: f64,
    /// `Σ (s_g·g)²`.
    pub grad_sq: f64,
    /// `Σ (s_s·stash)²`.
    pub stash_sq: f64,
    /// `Σ (s_g·g)(s_s·stash)`.
    pub dot: f64,
    /// `max |T⊙g|` (unscaled).
    pub perturb_max: f64,
    /// `max |g|` (unscaled).
    pub grad_max: f64,
    /// `max |stash|` (unscaled).
    pub stash_max: f64,
    /// Whether every value read (the gradient; the stash when read; the weights when adaptive)
    /// was finite.
    pub finite: bool,
}

impl Reduction {
    /// The identity of [`combine`](Self::combine) (what an empty group returns).
    pub const ZERO: Reduction = Reduction {
        perturb_sq: 0.0,
        grad_sq: 0.0,
        stash_sq: 0.0,
        dot: 0.0,
        perturb_max: 0.0,
        grad_max: 0.0,
        stash_max: 0.0,
        finite: true,
    };

    /// Combines two partial results: `self` covers elements before `right`'s. Sums are added
    /// (left + right, the canonical order), maxima taken, finiteness and-ed.
    #[inline]
    pub fn combine(self, right: Reduction) -> Reduction {
        Reduction {
            perturb_sq: self.perturb_sq + right.perturb_sq,
            grad_sq: self.grad_sq + right.grad_sq,
            stash_sq: self.stash_sq + right.stash_sq,
            dot: self.dot + right.dot,
            perturb_max: max(self.perturb_max, right.perturb_max),
            grad_max: max(self.grad_max, right.grad_max),
            stash_max: max(self.stash_max, right.stash_max),
            finite: self.finite & right.finite,
        }
    }
}

#[inline(always)]
pub(crate) fn max(a: f64, b: f64) -> f64 {
    if b > a { b } else { a }
}

/// Which reduction of a norm computation a [`ParamBuffer::across_workers`] call combines: the
/// first one (unit scales), or the one repeated at power-of-two scales when the first
/// overflowed or underflowed (the repeat depends on the combined first result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceStage {
    /// The first reduction, at unit scales: every worker makes it.
    First,
    /// The repeat at the scales of [`kernel::scale_for`](crate::backend::kernel::scale_for): a
    /// worker makes it when its combined first result needs it.
    Rescaled,
}

/// The perturb pass: back up `w` exactly, optionally stash `g`, then
/// `w ← w + T·(((T·g)·s)·c)`, with `g` the stored gradient times [`unscale`](Self::unscale).
///
/// With the norm computed at scale `s` (a power of two, `1` except for extreme `f64` input),
/// `c = ρ/(‖s·T⊙g‖ + ε·s)`, so that `((T·g)·s)·c` never overflows even when `ρ/‖T⊙g‖` would.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerturbSpec {
    /// Copy `g` into the stash slot.
    pub stash: bool,
    /// The per-element weighting `T`.
    pub weighting: Weighting,
    /// The scale `s` the norm was computed at.
    pub scale: f64,
    /// The coefficient `c` (`0` for a zero gradient).
    pub coeff: f64,
    /// The factor the stored gradient is multiplied by as it is read (see
    /// [`ReduceSpec::unscale`]); the stash receives the product.
    pub unscale: f64,
}

/// The final gradient fed to the base rule: `d = g` or `d = a·g + b·stash`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradMix {
    /// `d = g` (the stash is not read).
    Current,
    /// `d = a·g + b·stash`.
    Mix {
        /// Coefficient of the current gradient.
        a: f64,
        /// Coefficient of the stashed clean gradient.
        b: f64,
    },
}

/// A linear combination `a·g + b·stash` of the current gradient and the stash: the correction
/// added after the base rule (decoupled WSAM, [`UpdateSpec::post`]) or the new stash
/// (LookSAM's stored direction, [`UpdateSpec::restash`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostMix {
    /// Coefficient of the current gradient.
    pub a: f64,
    /// Coefficient of the stashed clean gradient.
    pub b: f64,
}

/// Folding the new weights into running averages: `avg_k ← avg_k + (w − avg_k)·weight_k`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AverageFold {
    /// `Some(1/(n_k + 1))` for each average slot `k` that takes this step's weights.
    pub weights: [Option<f64>; MAX_AVERAGES],
}

impl AverageFold {
    /// No averaging.
    pub const NONE: AverageFold = AverageFold {
        weights: [None; MAX_AVERAGES],
    };

    /// Whether any average is folded.
    pub fn any(&self) -> bool {
        self.weights.iter().any(Option::is_some)
    }
}

/// The restore-and-step pass: restore `w` from the backup (copy), form the final gradient, apply
/// the base rule, apply the post-correction, fold into averages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateSpec {
    /// Start from the backup (`true` after a perturbation) instead of the current `w`.
    pub restore: bool,
    /// The final gradient.
    pub grad: GradMix,
    /// The base rule (or [`BaseStep::External`]: write the final gradient into `g`).
    pub base: BaseStep,
    /// Optional post-correction: `w ← w + (a·g + b·stash)`.
    pub post: Option<PostMix>,
    /// Optionally overwrite the stash with `a·g + b·stash`, formed from the pass's inputs (the
    /// stash before the pass, the gradient before an [`BaseStep::External`] write).
    pub restash: Option<PostMix>,
    /// Averages to fold the new weights into.
    pub average: AverageFold,
    /// The factor the stored gradient is multiplied by as it is read (see
    /// [`ReduceSpec::unscale`]).
    pub unscale: f64,
}

impl UpdateSpec {
    /// Whether the pass reads the stash slot.
    pub fn reads_stash(&self) -> bool {
        matches!(self.grad, GradMix::Mix { .. }) || self.post.is_some() || self.restash.is_some()
    }

    /// Whether the pass writes the stash slot.
    pub fn writes_stash(&self) -> bool {
        self.restash.is_some()
    }
}

/// The storage of one parameter group, with its fused passes.
///
/// Contract for implementors:
/// - every pass covers all [`len`](Self::len) elements and computes exactly what the matching
///   element function of [`kernel`](crate::backend::kernel) computes (same operations, same rounding
///   points); the element functions take the *stored* gradient and apply the spec's `unscale`
///   themselves, and the perturb pass writes [`kernel::stashed`](crate::backend::kernel::stashed)
///   to the stash; reductions follow the canonical order of [`kernel::pairwise`](crate::backend::kernel::pairwise)
///   over [`kernel::reduce_block`](crate::backend::kernel::reduce_block) if the backend promises bit
///   identity with the reference backend, or document their order and tolerance otherwise;
/// - [`prepare`](Self::prepare) is called before any other pass of a step; it may allocate
///   (only when the spec changes) but never changes weights, gradients or existing slot values;
/// - a pass that returns `Err` must leave its buffer unchanged (validate before writing); the
///   core then restores the other groups (those already perturbed, or not yet stepped) so that
///   no weight is left perturbed. `restore` itself should not fail once `perturb` succeeded.
///
/// See `examples/custom_buffer.rs` for a complete user-defined implementation.
pub trait ParamBuffer {
    /// The element type.
    type Scalar: crate::backend::Real;
    /// The backend's error type.
    type Error: core::fmt::Debug + core::fmt::Display;

    /// Number of parameter elements in the group.
    fn len(&self) -> usize;

    /// Whether the group has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes sure the slots of `spec` exist. Called at the start of every step; must be cheap
    /// when nothing changes. A backend that owns its slot memory allocates missing slots zeroed
    /// and keeps the values of existing slots by role when the spec changes; a backend over
    /// caller-provided memory ([`SliceBuffer`](crate::reference::SliceBuffer)) only checks that
    /// the memory is large enough and lays the slots out for `spec` (changing the spec between
    /// steps then reinterprets that memory).
    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), Self::Error>;

    /// Read-only reduction over the group (see [`ReduceSpec`]).
    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, Self::Error>;

    /// Backs up `w`, optionally stashes `g`, and perturbs `w` (see [`PerturbSpec`] and
    /// [`kernel::perturb`](crate::backend::kernel::perturb)).
    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), Self::Error>;

    /// Copies the backup back into `w` (bit-exact).
    fn restore(&mut self) -> Result<(), Self::Error>;

    /// The fused restore-and-step pass (see [`UpdateSpec`] and [`kernel::update`](crate::backend::kernel::update)).
    fn update(&mut self, spec: &UpdateSpec) -> Result<(), Self::Error>;

    /// Folds the current weights into averages (for a bring-your-own base optimizer, after it
    /// stepped): `avg_k ← avg_k + (w − avg_k)·weight_k`.
    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), Self::Error>;

    /// Exchanges the weights with average slot `k` (bit-exact; twice is the identity).
    fn swap_average(&mut self, k: u8) -> Result<(), Self::Error>;

    /// Combines `r`, this group's [`reduce`](Self::reduce) result, with the matching results of
    /// the other workers of a data-parallel run ([`Distributed`](crate::collective::Distributed));
    /// the core calls it right after every `reduce`, on every group, in group order. The
    /// default (one process holds the whole group) returns `r`.
    fn across_workers(
        &mut self,
        r: Reduction,
        stage: ReduceStage,
    ) -> Result<Reduction, Self::Error> {
        let _ = stage;
        Ok(r)
    }
}
