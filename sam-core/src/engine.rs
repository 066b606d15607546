//! Machinery shared by every variant: phase tracking, group checks, robust global reductions,
//! and the passes applied to all groups with rollback.

use core::fmt;

use crate::backend::{
    ParamBuffer, PerturbSpec, ReduceSpec, ReduceStage, Reduction, SlotSpec, UpdateSpec, kernel,
};
use crate::error::Error;
use crate::group::{Group, GroupOptions};
use crate::schedule::Schedule;

/// The phase of an optimizer between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Phase {
    /// Weights are the live weights; a step may start, state may be saved.
    Idle,
    /// Weights are perturbed (between the two gradient evaluations of a step).
    Perturbed,
    /// Weights are swapped with a running average (for evaluation).
    Swapped,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Idle => "idle",
            Phase::Perturbed => "perturbed (between the two gradients of a step)",
            Phase::Swapped => "swapped to averaged weights",
        })
    }
}

/// What an optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    /// The step was applied.
    Applied,
    /// The step was skipped; every buffer is exactly as before the step.
    Skipped(SkipReason),
}

impl StepStatus {
    /// Whether the step was skipped (its gradients held NaN/∞: under loss scaling, an
    /// overflow, see [`LossScaler::update`](crate::LossScaler::update)).
    pub fn is_skipped(&self) -> bool {
        matches!(self, StepStatus::Skipped(_))
    }
}

/// Why a step was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The clean gradient contained NaN or ±∞ (detected before any write).
    NonFiniteClean,
    /// The gradient at the perturbed weights contained NaN or ±∞ (weights restored exactly).
    NonFiniteSecond,
}

/// The result of a closure-driven step: the clean loss and what happened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport<L> {
    /// The loss the closure returned at the unperturbed weights.
    pub loss: L,
    /// Whether the step was applied.
    pub status: StepStatus,
}

/// Norms of a step's gradients, computed overflow- and underflow-safely and unscaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norms {
    /// `‖s_p·T⊙g‖`, the perturbation norm at scale `s_p` (see [`PerturbSpec`](crate::PerturbSpec)).
    pub perturb_scaled: f64,
    /// The scale `s_p`.
    pub perturb_scale: f64,
    pub perturb: f64,
    pub grad: f64,
    pub stash: f64,
    pub dot: f64,
    /// `‖s_g·g‖`, `‖s_s·stash‖`, `Σ(s_g·g)(s_s·stash)` and the scales `s_g`, `s_s`.
    pub grad_scaled: f64,
    pub stash_scaled: f64,
    pub dot_scaled: f64,
    pub grad_scale: f64,
    pub stash_scale: f64,
    pub finite: bool,
    /// The factor the stored gradients were multiplied by ([`ReduceSpec::unscale`]); the
    /// passes that follow read them with the same factor.
    pub unscale: f64,
}

/// When a variant reads its learning-rate schedule (and GSAM its ρ schedule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Timeline {
    /// Step `t` (0-based) uses `S(t)`: torch's behaviour with the scheduler stepped after the
    /// optimizer, and the official GSAM JAX code's. The default of every variant but GSAM.
    #[default]
    Synced,
    /// The PyTorch GSAM reference's timeline (`verification/SCHEMA.md` §7.4): the lr used at step `t ≥ 1` is
    /// `S_lr(t − 1)` (the groups' own lr at step 0), ρ at step `t` is `S_ρ(t)`, and a
    /// proportional ρ follows the lr one step ahead (`P(init_value)` at step 0).
    Upstream,
}

/// Host-side state shared by every variant (crate-internal).
#[derive(Debug, Clone, PartialEq)]
pub struct Engine {
    pub phase: Phase,
    pub steps: u64,
    /// The learning-rate schedule applied to every group, if any, and when it is read.
    pub lr_schedule: Option<Schedule>,
    pub timeline: Timeline,
    /// The loss scale `S` the stored gradients carry (`1`: none), and `1/S`.
    grad_scale: f64,
    unscale: f64,
    shape: Option<(usize, usize, u64)>,
}

impl Engine {
    pub const fn new() -> Self {
        Engine {
            phase: Phase::Idle,
            steps: 0,
            lr_schedule: None,
            timeline: Timeline::Synced,
            grad_scale: 1.0,
            unscale: 1.0,
            shape: None,
        }
    }

    /// The loss scale the stored gradients carry.
    pub fn grad_scale(&self) -> f64 {
        self.grad_scale
    }

    /// `1/S`, the factor every pass multiplies the stored gradients by.
    pub fn unscale(&self) -> f64 {
        self.unscale
    }

    /// Sets the loss scale (only when idle): `S` finite and positive, `1/S` a normal number.
    pub fn set_grad_scale(&mut self, scale: f64) -> Result<(), Error> {
        self.expect(Phase::Idle)?;
        let unscale = 1.0 / scale;
        if !(scale > 0.0 && scale.is_finite() && unscale.is_normal()) {
            return Err(Error::InvalidHyperparameter {
                name: "grad_scale",
                message: "the loss scale must be positive and finite, with a normal reciprocal",
            });
        }
        self.grad_scale = scale;
        self.unscale = unscale;
        Ok(())
    }

    /// The lr step `t` uses in a group whose own lr is `group_lr`.
    pub fn lr_at(&self, t: u64, group_lr: f64) -> f64 {
        match (&self.lr_schedule, self.timeline) {
            (None, _) => group_lr,
            (Some(s), Timeline::Synced) => s.value(t),
            (Some(_), Timeline::Upstream) if t == 0 => group_lr,
            (Some(s), Timeline::Upstream) => s.value(t - 1),
        }
    }

    /// Refuses a step whose scheduled lr is negative or not finite, before any write.
    pub fn check_lr<B>(&self, groups: &[Group<B>]) -> Result<(), Error<B::Error>>
    where
        B: ParamBuffer,
    {
        let t = self.steps;
        if groups.iter().any(|g| {
            let lr = self.lr_at(t, g.options.base().lr());
            !(lr >= 0.0 && lr.is_finite())
        }) {
            return Err(Error::InvalidHyperparameter {
                name: "lr",
                message: "the lr schedule gave a negative or non-finite value",
            });
        }
        Ok(())
    }

    /// The step count as a checkpoint (only when idle).
    pub fn state(&self) -> Result<OptimizerState, Error> {
        self.expect(Phase::Idle)?;
        Ok(OptimizerState { steps: self.steps })
    }

    /// Resumes the step count from a checkpoint (only when idle); the group shape is learnt
    /// again at the next step.
    pub fn load(&mut self, state: &OptimizerState) -> Result<(), Error> {
        self.expect(Phase::Idle)?;
        self.steps = state.steps;
        self.shape = None;
        Ok(())
    }

    pub fn expect<E>(&self, expected: Phase) -> Result<(), Error<E>> {
        if self.phase != expected {
            return Err(Error::WrongPhase {
                expected,
                found: self.phase,
            });
        }
        Ok(())
    }

    /// Checks the phase and the group shape, and prepares every buffer's slots.
    pub fn begin<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        slots: impl Fn(&GroupOptions) -> SlotSpec,
    ) -> Result<(), Error<B::Error>> {
        self.expect(Phase::Idle)?;
        let total = groups
            .iter()
            .fold(0usize, |acc, g| acc.saturating_add(g.buffer.len()));
        // A fingerprint of every group's slot layout: a change would make backends over
        // caller-provided memory reinterpret the slots.
        let layout = groups.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, g| {
            let s = slots(&g.options);
            let v = u64::from(s.backup)
                | u64::from(s.stash) << 1
                | u64::from(s.state) << 8
                | u64::from(s.averages) << 16;
            (h ^ v).wrapping_mul(0x0100_0000_01b3)
        });
        let shape = (groups.len(), total, layout);
        match self.shape {
            Some(s) if s != shape => {
                return Err(Error::InvalidGroups {
                    message: "the number of groups, of elements, or a group's slot layout (its \
                              base rule's state) differs from earlier steps (pass the same groups \
                              with the same kind of base rule to every step, or make a new optimizer)",
                });
            }
            _ => {}
        }
        for g in groups.iter_mut() {
            let spec = slots(&g.options);
            g.buffer.prepare(&spec).map_err(Error::Backend)?;
        }
        self.shape = Some(shape);
        Ok(())
    }

    /// One reduce pass over all groups (each combined across workers, then in group order),
    /// reading the gradients times `unscale`.
    fn reduce_once<B: ParamBuffer>(
        groups: &mut [Group<B>],
        unscale: f64,
        spec: &impl Fn(&GroupOptions, [f64; 3]) -> ReduceSpec,
        scales: [f64; 3],
        stage: ReduceStage,
    ) -> Result<Reduction, Error<B::Error>> {
        let mut total = Reduction::ZERO;
        for g in groups.iter_mut() {
            let s = ReduceSpec {
                unscale,
                ..spec(&g.options, scales)
            };
            let r = g.buffer.reduce(&s).map_err(Error::Backend)?;
            let r = g.buffer.across_workers(r, stage).map_err(Error::Backend)?;
            total = total.combine(r);
        }
        Ok(total)
    }

    /// Global norms of the gradients read times `unscale`, with the rescaling fallback of
    /// [`kernel::needs_rescale`]. `spec(options, [s_p, s_g, s_s])` builds each group's reduce
    /// spec with these scales.
    pub fn norms<B: ParamBuffer>(
        groups: &mut [Group<B>],
        unscale: f64,
        spec: impl Fn(&GroupOptions, [f64; 3]) -> ReduceSpec,
    ) -> Result<Norms, Error<B::Error>> {
        let mut r = Self::reduce_once(groups, unscale, &spec, [1.0; 3], ReduceStage::First)?;
        let mut scales = [1.0; 3];
        if r.finite
            && (kernel::needs_rescale(r.perturb_sq, r.perturb_max)
                || kernel::needs_rescale(r.grad_sq, r.grad_max)
                || kernel::needs_rescale(r.stash_sq, r.stash_max)
                || !r.dot.is_finite())
        {
            scales = [
                kernel::scale_for(r.perturb_max),
                kernel::scale_for(r.grad_max),
                kernel::scale_for(r.stash_max),
            ];
            r = Self::reduce_once(groups, unscale, &spec, scales, ReduceStage::Rescaled)?;
        }
        Ok(Norms {
            perturb_scaled: libm::sqrt(r.perturb_sq),
            perturb_scale: scales[0],
            perturb: libm::sqrt(r.perturb_sq) / scales[0],
            grad: libm::sqrt(r.grad_sq) / scales[1],
            stash: libm::sqrt(r.stash_sq) / scales[2],
            dot: {
                // One exact division by the product of the two powers of two when it is a
                // normal number (two divisions could overflow in between).
                let p = scales[1] * scales[2];
                if p.is_normal() {
                    r.dot / p
                } else {
                    r.dot / scales[1] / scales[2]
                }
            },
            grad_scaled: libm::sqrt(r.grad_sq),
            stash_scaled: libm::sqrt(r.stash_sq),
            dot_scaled: r.dot,
            grad_scale: scales[1],
            stash_scale: scales[2],
            finite: r.finite,
            unscale,
        })
    }

    /// Perturbs every group; if a backend fails, restores the groups already perturbed.
    pub fn perturb_all<B: ParamBuffer>(
        groups: &mut [Group<B>],
        spec: impl Fn(&GroupOptions) -> PerturbSpec,
    ) -> Result<(), Error<B::Error>> {
        for i in 0..groups.len() {
            let s = spec(&groups[i].options);
            if let Err(e) = groups[i].buffer.perturb(&s) {
                // A failed pass leaves its own buffer unchanged (the trait's contract; its backup
                // may be stale, so it must not be restored); undo the groups perturbed before it.
                let _ = Self::restore_all(&mut groups[..i]);
                return Err(Error::Backend(e));
            }
        }
        Ok(())
    }

    /// Restores every group from its backup; reports the first failure but tries them all.
    pub fn restore_all<B: ParamBuffer>(groups: &mut [Group<B>]) -> Result<(), Error<B::Error>> {
        let mut first = Ok(());
        for g in groups.iter_mut() {
            if let Err(e) = g.buffer.restore() {
                if first.is_ok() {
                    first = Err(Error::Backend(e));
                }
            }
        }
        first
    }

    /// Runs the restore-and-step pass on every group. If a backend fails on group `i` (leaving it
    /// unchanged, i.e. still perturbed), groups `i..` are restored from their backups when
    /// `restore_on_error` (the weights of groups already stepped stay stepped: their base state
    /// has moved on with them). The gradients are read times `unscale`.
    pub fn update_all<B: ParamBuffer>(
        groups: &mut [Group<B>],
        restore_on_error: bool,
        unscale: f64,
        spec: impl Fn(usize, &GroupOptions) -> UpdateSpec,
    ) -> Result<(), Error<B::Error>> {
        for i in 0..groups.len() {
            let s = UpdateSpec {
                unscale,
                ..spec(i, &groups[i].options)
            };
            if let Err(e) = groups[i].buffer.update(&s) {
                if restore_on_error {
                    let _ = Self::restore_all(&mut groups[i..]);
                }
                return Err(Error::Backend(e));
            }
        }
        Ok(())
    }

    /// Passes `r` through, restoring every group first if it is an error (for failures in the
    /// perturbed phase before any group was stepped).
    pub fn or_restore<B: ParamBuffer, R>(
        groups: &mut [Group<B>],
        r: Result<R, Error<B::Error>>,
    ) -> Result<R, Error<B::Error>> {
        if r.is_err() {
            let _ = Self::restore_all(groups);
        }
        r
    }
}

/// Checkpointable host-side state of an optimizer. Per-element state lives in the buffers;
/// together they are a complete checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct OptimizerState {
    /// Number of base steps applied so far.
    pub steps: u64,
}
