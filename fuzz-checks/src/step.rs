//! The `step` check (reference backend) and the `ndarray_step` check (`sam-ndarray` in lockstep
//! with the reference backend).
//!
//! An input decodes into a [`Setup`]: element type, variant and hyperparameters, 0–4 groups of
//! 0–16 elements (sometimes a few hundred, sometimes just over a reduction block of 4096),
//! values from [`palette`], and up to 16 operations: closure steps, `first_step` finished by
//! `second_step` / `restore_with_gradient` / `cancel` / drop / `mem::forget` (then `recover`),
//! WASAM swaps (back, dropped, leaked), external optimizer updates, checkpoint save/load with
//! hostile states, group sets that change between steps, and option changes. Every call is
//! checked against an exact prediction of its outcome (see [`World::predict_first`],
//! [`World::predict_begin`], [`gsam_second`]) and the contract:
//!
//! - nothing panics;
//! - after every `Err` or skip, the weights and the base-state and average slots are bit for bit
//!   what they were before the call (backup and stash are scratch); a WASAM fold owed after
//!   `restore_with_gradient` is applied exactly when a call passes its checks (`first_step`,
//!   `update_averages`, `swap`), and its result is predicted bit for bit;
//! - restore (drop, cancel, recover, skip) is bit-exact; swap twice is the identity, and
//!   `recover` swaps a leaked swap back;
//! - after a first step, the backup is the clean weights, the stash the clean gradient, and the
//!   perturbation norm of each group is `ρ_g·‖T_g⊙g_g‖/(n+ε)` (see [`check_perturbation`]);
//! - after every applied step whose inputs are in the finiteness class (crate docs), every
//!   weight and slot is finite, and a step whose lr is 0 everywhere leaves the weights unchanged.

use std::mem;

use ndarray::{ArrayD, IxDyn};
use sam_core::backend::{
    MAX_AVERAGES, ParamBuffer, Real, ReduceSpec, Reduction, Slot, SlotSpec, kernel,
};
use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{Error, Group, Optimizer, Phase, SamOptimizer, SkipReason, StepStatus};
use sam_ndarray::NdGroup;

use crate::config::{GroupRaw, Opt, VariantRaw};
use crate::inspect::{GroupSnap, Inspect, ROLES, first_diff, kept, same, same_modulo_nan};
use crate::palette;
use crate::src::Src;
use crate::variant::{PerturbParams, base_raw};
use crate::{Finding, Policy, Violation};

/// Weights and gradients of the finiteness class lie in `[-BOUND_VALUE, BOUND_VALUE]`.
pub const BOUND_VALUE: f64 = 1e10;
/// Base-state and average slots of the finiteness class lie in `[-BOUND_SLOT, BOUND_SLOT]`.
pub const BOUND_SLOT: f64 = 1e25;
/// The lr a step of the finiteness class uses lies in `[-BOUND_LR, BOUND_LR]` (or is NaN, which
/// must then be refused, not used).
pub const BOUND_LR: f64 = 10.0;
/// Relative bound of the perturbation-norm check, on top of the rounding allowance.
pub const NORM_RTOL: f64 = 1e-10;

/// How gradient values are filled in.
#[derive(Debug, Clone, PartialEq)]
pub enum Fill {
    /// One value everywhere.
    Const(f64),
    /// These values, cycled (offset by the group index).
    Cycle(Vec<f64>),
    /// `a + b·k` for a small integer `k` that varies with the element.
    Ramp(f64, f64),
}

impl Fill {
    fn at(&self, gi: usize, i: usize) -> f64 {
        match self {
            Fill::Const(v) => *v,
            Fill::Cycle(vs) if vs.is_empty() => 0.0,
            Fill::Cycle(vs) => vs[(i + gi) % vs.len()],
            Fill::Ramp(a, b) => a + b * (((i * 7 + gi * 3) % 17) as f64 - 8.0),
        }
    }

    fn generate(s: &mut Src<'_>, tame: bool) -> Self {
        let v = |s: &mut Src<'_>| {
            if tame {
                palette::tame(s)
            } else {
                palette::element(s)
            }
        };
        match s.int(0, 3) {
            0 => Fill::Const(v(s)),
            1 => Fill::Ramp(v(s), if tame { s.uniform(-2.0, 2.0) } else { v(s) }),
            _ => {
                let n = s.usize(1, 8);
                Fill::Cycle((0..n).map(|_| v(s)).collect())
            }
        }
    }
}

/// A gradient (or weight) recipe: evaluated per group against the current weights.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// Leave the gradient as it is.
    Keep,
    /// Fill, then override single elements `(group, index mod len, value)`.
    Fill(Fill, Vec<(usize, usize, f64)>),
    /// `g = c·w + shift` (the gradient of a quadratic at the current weights), then overrides.
    Linear(f64, f64, Vec<(usize, usize, f64)>),
}

impl Recipe {
    fn generate(s: &mut Src<'_>, tame: bool) -> Self {
        let n_over = if s.chance(1, 4) { s.usize(1, 3) } else { 0 };
        let over = (0..n_over)
            .map(|_| (s.usize(0, 4), s.usize(0, 5000), palette::element(s)))
            .collect();
        match s.int(0, 9) {
            0 => Recipe::Keep,
            1..=2 => {
                let c = if tame {
                    s.uniform(-2.0, 2.0)
                } else {
                    palette::element(s)
                };
                let shift = if tame {
                    palette::tame(s)
                } else {
                    palette::element(s)
                };
                Recipe::Linear(c, shift, over)
            }
            _ => Recipe::Fill(Fill::generate(s, tame), over),
        }
    }

    /// The values for group `gi` with weights `w`, or `None` to keep the current ones.
    pub fn values(&self, gi: usize, w: &[f64]) -> Option<Vec<f64>> {
        let n = w.len();
        let (mut g, over): (Vec<f64>, _) = match self {
            Recipe::Keep => return None,
            Recipe::Fill(f, over) => ((0..n).map(|i| f.at(gi, i)).collect(), over),
            Recipe::Linear(c, shift, over) => (w.iter().map(|x| c * x + shift).collect(), over),
        };
        for &(og, idx, v) in over {
            if og == gi && n > 0 {
                g[idx % n] = v;
            }
        }
        Some(g)
    }
}

/// How a perturbed phase ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `second_step`.
    Second,
    /// `restore_with_gradient`.
    External,
    /// `cancel`.
    Cancel,
    /// The guard is dropped.
    Drop,
    /// The guard is leaked with `mem::forget`.
    Forget,
}

/// How a WASAM swap ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapEnd {
    /// `swap_back`.
    Back,
    /// The guard is dropped.
    Drop,
    /// The guard is leaked with `mem::forget`.
    Forget,
}

/// One operation of a sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Write `g1`, `first_step`, write `g2` through the guard, finish.
    Step {
        /// The clean gradient.
        g1: Recipe,
        /// The gradient at the perturbed weights.
        g2: Recipe,
        /// How the phase ends.
        finish: Finish,
    },
    /// `step` with a closure that writes `g1`, then `g2`, and fails on call `fail` (1 or 2).
    Closure {
        /// The clean gradient.
        g1: Recipe,
        /// The second gradient.
        g2: Recipe,
        /// The closure call that returns an error (0: none).
        fail: u8,
    },
    /// `recover`.
    Recover,
    /// Overwrite the gradient.
    SetGrads(Recipe),
    /// WASAM `swap(k)`, optionally write the live (averaged) weights, then end.
    Swap {
        /// The average.
        k: u8,
        /// Weights written while swapped.
        touch: Option<Recipe>,
        /// How the swap ends.
        end: SwapEnd,
    },
    /// WASAM `update_averages`.
    UpdateAverages,
    /// An external optimizer step `w −= lr·g` on the active groups.
    External {
        /// Its learning rate.
        lr: f64,
    },
    /// Save the host state and load it back, edited.
    Checkpoint {
        /// New step count.
        steps: Option<u64>,
        /// New WASAM snapshot counts.
        counts: Option<u64>,
        /// Flip WASAM's pending fold.
        flip_pending: bool,
    },
    /// Pass only the first `n` groups from now on.
    Active(usize),
    /// Exchange two groups.
    Permute(usize, usize),
    /// Replace a group's options.
    Options {
        /// The group.
        group: usize,
        /// The new options.
        raw: GroupRaw,
    },
}

/// One group of a [`Setup`].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSetup {
    /// Options.
    pub raw: GroupRaw,
    /// Initial weights.
    pub w: Vec<f64>,
    /// Initial gradient.
    pub g: Vec<f64>,
    /// Slot memory of the reference backend, in values.
    pub slot_values: usize,
    /// Hand the reference backend a gradient one element short first (must be refused).
    pub short_grad: bool,
    /// Tensor shapes of the ndarray backend (their sizes add up to the group length).
    pub shapes: Vec<Vec<usize>>,
}

/// A decoded input.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    /// `f64` storage (else `f32`).
    pub f64: bool,
    /// The run is drawn mostly from the finiteness class.
    pub tame: bool,
    /// The optimizer.
    pub variant: VariantRaw,
    /// The groups.
    pub groups: Vec<GroupSetup>,
    /// The operations.
    pub ops: Vec<Op>,
}

fn shapes_for(s: &mut Src<'_>, n: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut left = n;
    let pieces = s.usize(1, 3);
    for p in 0..pieces {
        if s.chance(1, 8) {
            out.push([vec![0], vec![2, 0], vec![0, 3, 1]][s.index(3)].clone());
        }
        let take = if p + 1 == pieces {
            left
        } else {
            s.usize(0, left)
        };
        left -= take;
        let shape = match take {
            1 if s.bool() => vec![],
            t if t % 2 == 0 && t > 0 && s.bool() => vec![2, t / 2],
            t if t % 3 == 0 && t > 0 && s.bool() => vec![t / 3, 1, 3],
            t => vec![t],
        };
        out.push(shape);
    }
    out
}

impl Setup {
    /// Decodes an input; `lockstep` restricts it to what both backends must agree on.
    pub fn decode(data: &[u8], lockstep: bool) -> Self {
        let mut s = Src::new(data);
        let f64 = s.bool();
        let tame = !s.chance(1, 4);
        let wild_variant = !tame && s.bool();
        let variant = VariantRaw::generate(&mut s, wild_variant);
        let overrides = if matches!(variant, VariantRaw::Gsam(_)) {
            if s.chance(1, 8) { 4 } else { 0 }
        } else {
            3
        };
        let n_groups = s.pick(&[1, 1, 1, 2, 2, 3, 4, 0]);
        let mut groups = Vec::new();
        for _ in 0..n_groups {
            let wild_group = !tame && s.chance(1, 3);
            let raw = GroupRaw::generate(&mut s, wild_group, overrides);
            let len = match s.int(0, 31) {
                0 => 0,
                1 => s.usize(4090, 4200),
                2..=4 => s.usize(17, 300),
                _ => s.usize(1, 16),
            };
            let zeros = vec![0.0; len];
            let w = Recipe::Fill(Fill::generate(&mut s, tame), vec![])
                .values(0, &zeros)
                .unwrap_or_default();
            let g = Recipe::Fill(Fill::generate(&mut s, tame), vec![])
                .values(0, &zeros)
                .unwrap_or_default();
            let slot_values = if !lockstep && s.chance(1, 10) {
                s.usize(0, 9 * len)
            } else {
                9 * len
            };
            let short_grad = !lockstep && len > 0 && s.chance(1, 16);
            let shapes = shapes_for(&mut s, len);
            groups.push(GroupSetup {
                raw,
                w,
                g,
                slot_values,
                short_grad,
                shapes,
            });
        }
        let mut ops = Vec::new();
        let n_ops = s.usize(1, 16);
        while ops.len() < n_ops && !s.is_empty() {
            let op = match s.int(0, 31) {
                0..=9 => Op::Step {
                    g1: Recipe::generate(&mut s, tame),
                    g2: Recipe::generate(&mut s, tame),
                    finish: s.pick(&[
                        Finish::Second,
                        Finish::Second,
                        Finish::Second,
                        Finish::External,
                        Finish::Cancel,
                        Finish::Drop,
                        Finish::Forget,
                    ]),
                },
                10..=17 => Op::Closure {
                    g1: Recipe::generate(&mut s, tame),
                    g2: Recipe::generate(&mut s, tame),
                    fail: if s.chance(1, 8) { s.pick(&[1, 2]) } else { 0 },
                },
                18..=19 => Op::Recover,
                20 => Op::SetGrads(Recipe::generate(&mut s, tame)),
                21..=23 => Op::Swap {
                    k: s.pick(&[0, 0, 1, 2, 3, 4, 200]),
                    touch: s
                        .chance(1, 4)
                        .then(|| Recipe::Fill(Fill::generate(&mut s, tame), vec![])),
                    end: s.pick(&[SwapEnd::Back, SwapEnd::Back, SwapEnd::Drop, SwapEnd::Forget]),
                },
                24 => Op::UpdateAverages,
                25 => Op::External {
                    lr: if tame {
                        s.uniform(0.0, 1.0)
                    } else {
                        palette::hyper(&mut s, 0.0, 1.0)
                    },
                },
                26 => Op::Checkpoint {
                    steps: s.chance(1, 2).then(|| palette::count(&mut s)),
                    counts: s.chance(1, 3).then(|| palette::count(&mut s)),
                    flip_pending: s.chance(1, 4),
                },
                27 => Op::Active(s.usize(0, n_groups)),
                28 => Op::Permute(s.index(n_groups.max(1)), s.index(n_groups.max(1))),
                29 => Op::Options {
                    group: s.index(n_groups.max(1)),
                    raw: GroupRaw::generate(&mut s, !tame, overrides),
                },
                _ => Op::Step {
                    g1: Recipe::generate(&mut s, tame),
                    g2: Recipe::Keep,
                    finish: Finish::Second,
                },
            };
            ops.push(op);
        }
        Setup {
            f64,
            tame,
            variant,
            groups,
            ops,
        }
    }
}

/// What `Engine::begin` records of the groups and compares on every later call: their number,
/// their total number of elements, and the slot layout of each group in order.
pub type Shape = (usize, usize, Vec<SlotSpec>);

/// The checks' model of what the optimizer must do, shared by the backends of a lockstep run.
#[derive(Debug, Clone)]
pub struct Model {
    /// The record of the last call that got past the group checks (`None` before the first one
    /// and after a checkpoint is loaded).
    pub shape: Option<Shape>,
    /// A leaked guard: its phase and the groups exactly as `recover` must leave them.
    pub leaked: Option<(Phase, Vec<GroupSnap>)>,
    /// Every applied step so far was in the finiteness class.
    pub in_class: bool,
    /// No call has prepared a buffer for another slot layout than the one it held (possible only
    /// once a checkpoint load has reset the record; the reference backend then reinterprets its
    /// slot memory, as `ParamBuffer::prepare` documents).
    pub coherent: bool,
    /// The variant's hyperparameters are in the normal ranges.
    pub normal: bool,
}

/// A backend's view of a run.
pub struct World<B> {
    /// All groups (the first `active` are passed to the optimizer).
    pub groups: Vec<Group<B>>,
    /// Slot memory of each group, in values (`usize::MAX` for allocating backends).
    pub caps: Vec<usize>,
    /// The slot layout each group's buffer was last prepared for (`None`: never prepared).
    pub prepared: Vec<Option<SlotSpec>>,
    /// Number of groups passed.
    pub active: usize,
    /// The optimizer.
    pub opt: Opt,
    /// Values are `f64` (else `f32`).
    pub f64: bool,
}

/// What a call is predicted to return (first half of a step, `swap`, `update_averages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pred {
    /// `Error::WrongPhase`.
    WrongPhase,
    /// `Error::InvalidGroups`.
    InvalidGroups,
    /// `Error::InvalidHyperparameter`.
    InvalidHyper,
    /// `Error::Backend`.
    Backend,
    /// `Error::NonFiniteGradient` (or a skip for the closure step and the base optimizer).
    NonFinite,
    /// `Error::NormOverflow`.
    NormOverflow,
    /// Success.
    Ok,
    /// Any other error (never predicted).
    Other,
}

/// The predicted start of a call that runs `Engine::begin` (a step's first half, `swap`,
/// `update_averages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct First {
    /// The outcome.
    pub pred: Pred,
    /// How many of the active groups (in order) the call prepares before it returns.
    pub prepares: usize,
    /// Whether one of them is prepared for another slot layout than the one it held.
    pub reinterpret: bool,
}

impl First {
    /// A refusal before `Engine::begin`.
    fn refused(pred: Pred) -> Self {
        First {
            pred,
            prepares: 0,
            reinterpret: false,
        }
    }

    /// Whether the call gets past `Engine::begin`, which then records the groups.
    fn begun(&self) -> bool {
        matches!(self.pred, Pred::Ok | Pred::NonFinite | Pred::NormOverflow)
    }
}

fn kind<E>(e: &Error<E>) -> Pred {
    match e {
        Error::WrongPhase { .. } => Pred::WrongPhase,
        Error::InvalidGroups { .. } => Pred::InvalidGroups,
        Error::InvalidHyperparameter { .. } => Pred::InvalidHyper,
        Error::Backend(_) => Pred::Backend,
        Error::NonFiniteGradient => Pred::NonFinite,
        Error::NormOverflow => Pred::NormOverflow,
        _ => Pred::Other,
    }
}

fn err_name<E>(e: &Error<E>) -> &'static str {
    match e {
        Error::WrongPhase { .. } => "WrongPhase",
        Error::InvalidGroups { .. } => "InvalidGroups",
        Error::InvalidHyperparameter { .. } => "InvalidHyperparameter",
        Error::Backend(_) => "Backend",
        Error::NonFiniteGradient => "NonFiniteGradient",
        Error::NormOverflow => "NormOverflow",
        Error::InvalidState { .. } => "InvalidState",
        _ => "other",
    }
}

fn snaps<B: Inspect>(groups: &[Group<B>]) -> Vec<GroupSnap> {
    groups.iter().map(|g| GroupSnap::of(&g.buffer)).collect()
}

/// A snapshot without its slots (when a call prepares a buffer for another slot layout, the
/// roles before and after cannot be compared).
fn strip(mut v: Vec<GroupSnap>, yes: bool) -> Vec<GroupSnap> {
    if yes {
        for s in &mut v {
            s.slots = Default::default();
        }
    }
    v
}

/// The position of a role in [`ROLES`] (and in [`GroupSnap::slots`]).
fn role_index(role: Slot) -> Option<usize> {
    ROLES.iter().position(|r| *r == role)
}

fn round_to(x: f64, is_f64: bool) -> f64 {
    if is_f64 { x } else { f64::from(x as f32) }
}

/// The fold a WASAM optimizer owes after `restore_with_gradient` (weights `1/(n_k + 1)` of the
/// averages started at step `steps − 1`), if any; `None` when not idle.
pub fn owed_fold(v: &sam_core::Wasam) -> Option<[Option<f64>; MAX_AVERAGES]> {
    let st = v.state().ok()?;
    if !st.pending_fold || st.steps == 0 {
        return None;
    }
    let t = st.steps - 1;
    let mut fold = [None; MAX_AVERAGES];
    for (k, &start) in v.swa_starts().iter().enumerate() {
        if t >= start {
            fold[k] = Some(1.0 / (st.counts[k] as f64 + 1.0));
        }
    }
    Some(fold)
}

/// The groups after a fold: `avg_k ← avg_k + (w − avg_k)·weight_k` (`ParamBuffer::fold_averages`),
/// rounded to the element type.
fn apply_fold(
    snaps: &[GroupSnap],
    fold: Option<&[Option<f64>; MAX_AVERAGES]>,
    is_f64: bool,
) -> Vec<GroupSnap> {
    let mut out = snaps.to_vec();
    let Some(fold) = fold else {
        return out;
    };
    for s in &mut out {
        for (k, weight) in fold.iter().enumerate() {
            let (Some(weight), Some(at)) = (weight, role_index(Slot::Average(k as u8))) else {
                continue;
            };
            if let Some(avg) = &mut s.slots[at] {
                for (a, w) in avg.iter_mut().zip(&s.w) {
                    *a = round_to(*a + (*w - *a) * weight, is_f64);
                }
            }
        }
    }
    out
}

/// Independent Euclidean norm, scaled by the largest magnitude (no overflow or underflow).
pub fn norm(v: &[f64]) -> f64 {
    let m = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    if m == 0.0 || !m.is_finite() {
        return m;
    }
    m * v.iter().map(|x| (x / m) * (x / m)).sum::<f64>().sqrt()
}

fn ulp(x: f64, is_f64: bool) -> f64 {
    if !x.is_finite() {
        return f64::INFINITY;
    }
    if is_f64 {
        let v = x.abs();
        f64::from_bits(v.to_bits() + 1) - v
    } else {
        let v = (x as f32).abs();
        f64::from(f32::from_bits(v.to_bits() + 1)) - f64::from(v)
    }
}

/// `x = f·2^e` with `f` in `[1, 2)` for a finite non-zero `x` (`(x, 0)` otherwise); exact.
fn split(x: f64) -> (f64, i32) {
    if x == 0.0 || !x.is_finite() {
        return (x, 0);
    }
    let (x, bias) = if x.abs() < f64::MIN_POSITIVE {
        (x * 2f64.powi(64), -64)
    } else {
        (x, 0)
    };
    let e = ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let f = f64::from_bits((x.to_bits() & !(0x7ff << 52)) | (1023 << 52));
    (f, e + bias)
}

/// `m·2^e`, exact unless the result overflows or is subnormal (one rounding at the end).
fn ldexp(m: f64, e: i32) -> f64 {
    let mut x = m;
    let mut e = e;
    while e > 0 {
        let k = e.min(1000);
        x *= 2f64.powi(k);
        e -= k;
    }
    while e < 0 {
        let k = (-e).min(1000);
        // Only the last multiplication can leave the normal range (|m| ≥ 2^-1 here), so the
        // result is rounded once, unless it is 0 anyway.
        x *= 2f64.powi(-k);
        e += k;
    }
    x
}

/// `a/(t·ρ·2^unit)` from the parts of each factor: no intermediate overflows or underflows.
fn in_units(a: f64, t: f64, rho: f64, unit: i32) -> f64 {
    if a == 0.0 || !a.is_finite() {
        return if a == 0.0 { 0.0 } else { a };
    }
    let (fa, ea) = split(a);
    let (ft, et) = split(t);
    let (fr, er) = split(rho);
    ldexp(fa / (ft * fr), ea - et - er - unit)
}

fn t_of(p: &Option<PerturbParams>, w: f64) -> f64 {
    match p.and_then(|p| p.eta) {
        Some(eta) => w.abs() + eta,
        None => 1.0,
    }
}

impl<B: Inspect> World<B> {
    fn act(&self) -> &[Group<B>] {
        &self.groups[..self.active]
    }

    /// The slot layout group `i` needs now.
    fn spec(&self, i: usize) -> SlotSpec {
        self.opt.slot_spec(&self.groups[i].options)
    }

    /// What `Engine::begin` would record for the active groups now.
    pub fn shape(&self) -> Shape {
        (
            self.active,
            self.act()
                .iter()
                .fold(0usize, |a, g| a.saturating_add(g.buffer.len())),
            (0..self.active).map(|i| self.spec(i)).collect(),
        )
    }

    fn write(&mut self, r: &Recipe) {
        let n = self.active;
        write_recipe(&mut self.groups[..n], r);
    }

    fn params(&self) -> Vec<Option<PerturbParams>> {
        self.act()
            .iter()
            .map(|g| self.opt.perturb_params(&g.options))
            .collect()
    }

    /// Whether the next call starts inside the finiteness class (gradients are judged after).
    fn class_pre(&self, m: &Model) -> bool {
        let opts_ok = self
            .act()
            .iter()
            .all(|g| base_raw(&g.options).is_some_and(|b| b.normal()));
        let lr_ok = self
            .act()
            .iter()
            .all(|g| self.opt.lr_used(&g.options).abs() <= BOUND_LR);
        let values_ok = self.act().iter().all(|g| {
            let b = &g.buffer;
            b.weights_f64().iter().all(|x| x.abs() <= BOUND_VALUE)
                && ROLES.iter().filter(|r| kept(**r)).all(|r| {
                    b.slot_f64(*r)
                        .is_none_or(|v| v.iter().all(|x| x.abs() <= BOUND_SLOT))
                })
        });
        m.in_class && m.coherent && m.normal && opts_ok && lr_ok && values_ok
    }

    /// The prediction of `Engine::begin`: the phase must be idle; the groups' number, total
    /// length and slot layouts (in order) must equal the record of the last call that got past
    /// this point, if any (else `InvalidGroups`); then each active group is prepared in order,
    /// and the reference backend refuses slot memory that is too small (`Backend`, with the
    /// groups before it prepared). `pred` is `Ok` when it passes.
    pub fn predict_begin(&self, m: &Model) -> First {
        if self.opt.phase() != Phase::Idle {
            return First::refused(Pred::WrongPhase);
        }
        if m.shape.as_ref().is_some_and(|s| *s != self.shape()) {
            return First::refused(Pred::InvalidGroups);
        }
        let too_small = (0..self.active).find(|&i| {
            self.spec(i)
                .count()
                .saturating_mul(self.groups[i].buffer.len())
                > self.caps[i]
        });
        let (pred, prepares) = match too_small {
            Some(i) => (Pred::Backend, i),
            None => (Pred::Ok, self.active),
        };
        let reinterpret =
            (0..prepares).any(|i| self.prepared[i].is_some_and(|p| p != self.spec(i)));
        First {
            pred,
            prepares,
            reinterpret,
        }
    }

    /// Updates the model after a call predicted by `f` behaved as predicted.
    fn note(&mut self, m: &mut Model, f: &First) {
        for i in 0..f.prepares {
            self.prepared[i] = Some(self.spec(i));
        }
        if f.reinterpret {
            m.coherent = false;
        }
        if f.begun() {
            m.shape = Some(self.shape());
        }
    }

    /// The exact prediction of the first half of a step with clean gradients `g1`: GSAM's
    /// global checks (no per-group ρ/adaptive override, a ρ and every group's lr ≥ 0 and finite
    /// at this step), then [`predict_begin`](Self::predict_begin), then `NonFinite` if a
    /// gradient (or an adaptive group's weight) is NaN/±∞, `NormOverflow` if an adaptive
    /// group's `(|w|+η)·g` overflows for finite operands, else `Ok`.
    pub fn predict_first(&self, m: &Model, g1: &[Vec<f64>]) -> First {
        if let Opt::Gsam(v) = &self.opt {
            if self
                .act()
                .iter()
                .any(|g| g.options.rho().is_some() || g.options.adaptive().is_some())
            {
                return First::refused(Pred::InvalidGroups);
            }
            let t = v.steps();
            let rho = v.rho_at(t);
            if !(rho >= 0.0 && rho.is_finite()) {
                return First::refused(Pred::InvalidHyper);
            }
            if self.act().iter().any(|g| {
                let lr = v.lr_at(t, g.options.base().lr());
                !(lr >= 0.0 && lr.is_finite())
            }) {
                return First::refused(Pred::InvalidHyper);
            }
        }
        let mut f = self.predict_begin(m);
        if f.pred != Pred::Ok {
            return f;
        }
        let (mut nonfinite, mut overflow) = (false, false);
        for ((g, p), grad) in self.act().iter().zip(self.params()).zip(g1) {
            let eta = p.and_then(|p| p.eta);
            for (wi, gi) in g.buffer.weights_f64().iter().zip(grad) {
                nonfinite |= !gi.is_finite();
                if let Some(eta) = eta {
                    nonfinite |= !wi.is_finite();
                    overflow |= !((wi.abs() + eta) * gi).is_finite();
                }
            }
        }
        f.pred = if nonfinite {
            Pred::NonFinite
        } else if overflow {
            Pred::NormOverflow
        } else {
            Pred::Ok
        };
        f
    }
}

fn write_recipe<B: Inspect>(groups: &mut [Group<B>], r: &Recipe) {
    for (gi, g) in groups.iter_mut().enumerate() {
        let w = g.buffer.weights_f64();
        if let Some(v) = r.values(gi, &w) {
            g.buffer.set_grads(&v);
        }
    }
}

fn grads_of<B: Inspect>(groups: &[Group<B>]) -> Vec<Vec<f64>> {
    groups.iter().map(|g| g.buffer.grads_f64()).collect()
}

fn all_within(v: &[Vec<f64>], bound: f64) -> bool {
    v.iter().flatten().all(|x| x.abs() <= bound)
}

fn any_nonfinite(v: &[Vec<f64>]) -> bool {
    v.iter().flatten().any(|x| !x.is_finite())
}

/// Weights and base-state/average slots of `now` equal `before` bit for bit (roles present in
/// both).
fn check_unchanged(before: &[GroupSnap], now: &[GroupSnap], what: &str) -> Result<(), Violation> {
    check_same(before, now, what, true, None)
}

/// Like [`check_unchanged`]; `weights: false` leaves the weights out, `except` one slot role.
fn check_same(
    before: &[GroupSnap],
    now: &[GroupSnap],
    what: &str,
    weights: bool,
    except: Option<Slot>,
) -> Result<(), Violation> {
    if before.len() != now.len() {
        return Err(Violation::new(
            None,
            format!(
                "{what}: {} groups before, {} after",
                before.len(),
                now.len()
            ),
        ));
    }
    for (i, (b, n)) in before.iter().zip(now).enumerate() {
        if weights && !same(&b.w, &n.w) {
            return Err(Violation::new(
                None,
                format!(
                    "{what}: weights of group {i} changed ({})",
                    first_diff(&b.w, &n.w)
                ),
            ));
        }
        for (k, role) in ROLES.iter().enumerate() {
            if !kept(*role) || except == Some(*role) {
                continue;
            }
            if let (Some(x), Some(y)) = (&b.slots[k], &n.slots[k]) {
                if !same(x, y) {
                    return Err(Violation::new(
                        None,
                        format!(
                            "{what}: slot {role:?} of group {i} changed ({})",
                            first_diff(x, y)
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_finite(now: &[GroupSnap], grads_too: bool, what: &str) -> Result<(), Violation> {
    for (i, n) in now.iter().enumerate() {
        if let Some(j) = n.w.iter().position(|x| !x.is_finite()) {
            return Err(Violation::new(
                None,
                format!(
                    "{what}: finite-class input gave weight {j} of group {i} = {}",
                    n.w[j]
                ),
            ));
        }
        if grads_too {
            if let Some(j) = n.g.iter().position(|x| !x.is_finite()) {
                return Err(Violation::new(
                    None,
                    format!(
                        "{what}: finite-class input gave gradient {j} of group {i} = {}",
                        n.g[j]
                    ),
                ));
            }
        }
        for (k, s) in n.slots.iter().enumerate() {
            if let Some(j) = s
                .as_ref()
                .and_then(|s| s.iter().position(|x| !x.is_finite()))
            {
                return Err(Violation::new(
                    None,
                    format!(
                        "{what}: finite-class input gave slot {:?}[{j}] of group {i} non-finite",
                        ROLES[k]
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks the state right after a successful first step: backup = clean weights, stash = clean
/// gradient, kept slots unchanged, and the perturbation norm of every group.
///
/// The bound, per group, in units of `ρ·2^k` with `k` chosen so that `expected` is of order 1
/// (exact power-of-two bookkeeping, so that subnormal perturbations and radii near `f64::MAX`
/// compare without an intermediate rounding): `|measured − expected| ≤
/// NORM_RTOL·expected + allowance`, where
/// `measured = ‖(w_p − w)/T‖` over elements with `T ≠ 0`, `expected = ρ_g·‖T_g⊙g_g‖/(n+ε)`
/// (`0` if `n = 0`) with the global `n` computed independently, and `allowance` is the norm of
/// `(ulp(w_p)/2 + ulp₆₄(w_p − w)/2)/T` (the rounding of `w + e` to the storage type and of the
/// subtraction). Groups where some `w_p` is not finite are not measurable and skipped.
pub fn check_perturbation(
    before: &[GroupSnap],
    now: &[GroupSnap],
    params: &[Option<PerturbParams>],
    stashes: bool,
    is_f64: bool,
) -> Result<(), Violation> {
    let mut all_tg = Vec::new();
    for ((b, p), _) in before.iter().zip(params).zip(now) {
        all_tg.extend(b.w.iter().zip(&b.g).map(|(w, g)| t_of(p, *w) * g));
    }
    if all_tg.iter().any(|x| !x.is_finite()) {
        return Ok(());
    }
    // Everything relative to the largest |T⊙g|, so that norms beyond f64::MAX still compare.
    let big = all_tg.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    let n_rel = if big > 0.0 {
        norm(&all_tg.iter().map(|x| x / big).collect::<Vec<_>>())
    } else {
        0.0
    };
    for (i, ((b, a), p)) in before.iter().zip(now).zip(params).enumerate() {
        if let Some(bk) = a.slot(Slot::Backup) {
            if !same(bk, &b.w) {
                return Err(Violation::new(
                    None,
                    format!(
                        "first step: backup of group {i} is not the clean weights ({})",
                        first_diff(bk, &b.w)
                    ),
                ));
            }
        }
        if stashes {
            if let Some(st) = a.slot(Slot::Stash) {
                if !same(st, &b.g) {
                    return Err(Violation::new(
                        None,
                        format!(
                            "first step: stash of group {i} is not the clean gradient ({})",
                            first_diff(st, &b.g)
                        ),
                    ));
                }
            }
        }
        let Some(p) = p else { continue };
        if a.w.iter().any(|x| !x.is_finite()) || b.w.iter().any(|x| !x.is_finite()) {
            continue;
        }
        // Everything below is in units of `ρ·2^unit`, with `unit` chosen so that the expected
        // norm is of order 1: `ρ·‖T_g⊙g_g‖/(n+ε)` and every element's displacement are then
        // compared without an overflow or a subnormal intermediate (a group whose gradient is
        // tiny next to the global norm has a subnormal perturbation, and a radius near
        // f64::MAX must not overflow). Mantissas and exponents are carried separately.
        let tg: Vec<f64> =
            b.w.iter()
                .zip(&b.g)
                .map(|(w, g)| t_of(&Some(*p), *w) * g)
                .collect();
        let m_g = tg.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let n = n_rel * big;
        if p.rho == 0.0 {
            if !same(&a.w, &b.w) {
                return Err(Violation::new(
                    None,
                    format!(
                        "first step: rho = 0 moved weights of group {i} ({})",
                        first_diff(&a.w, &b.w)
                    ),
                ));
            }
            continue;
        }
        // expected/ρ = ‖T_g⊙g_g‖/(n + ε) = a_g·m_g/(big·(n_rel + ε/big)), or a_g·m_g/ε once
        // ε/big overflows (then ε ≫ n).
        let (expected, unit) = if m_g == 0.0 {
            (0.0, 0)
        } else {
            let a_g = norm(&tg.iter().map(|x| x / m_g).collect::<Vec<_>>());
            let (fm, em) = split(m_g);
            let inv = n_rel + p.eps / big;
            let (den, eden) = if inv.is_finite() {
                let (fb, eb) = split(big);
                let (fi, ei) = split(inv);
                (fb * fi, eb + ei)
            } else {
                split(p.eps)
            };
            (a_g * fm / den, em - eden)
        };
        let mut scaled = Vec::with_capacity(tg.len());
        let mut allow = Vec::with_capacity(tg.len());
        let mut measurable = true;
        for (wp, w) in a.w.iter().zip(&b.w) {
            let t = t_of(&Some(*p), *w);
            if t == 0.0 {
                if wp.to_bits() != w.to_bits() {
                    return Err(Violation::new(
                        None,
                        format!(
                            "first step: group {i} moved a weight whose T is 0 ({w:e} -> {wp:e})"
                        ),
                    ));
                }
                continue;
            }
            let d = wp - w;
            let x = in_units(d, t, p.rho, unit);
            let tol = (in_units(ulp(*wp, is_f64), t, p.rho, unit)
                + in_units(ulp(d, true), t, p.rho, unit))
                * 0.5;
            measurable &= x.is_finite() && !tol.is_nan();
            scaled.push(x);
            allow.push(tol);
        }
        if !measurable {
            continue;
        }
        let measured = norm(&scaled);
        let bound = NORM_RTOL * expected + norm(&allow);
        let within = (measured - expected).abs() <= bound;
        if !within || (!expected.is_finite() && expected != measured) {
            // The core computes the coefficient at a power-of-two scale s ≤ 2^997 of the norm; a
            // zero perturbation where ε·s overflows is a regression of the fixed HugeEpsFlush.
            let flushed = measured == 0.0 && big < 1e-140 && (p.eps * 2f64.powi(997)).is_infinite();
            // A zero perturbation where ρ/n is below the smallest normal f64 is a regression of
            // the fixed TinyRhoFlush.
            let tiny = measured == 0.0 && !flushed && p.rho / n < f64::MIN_POSITIVE;
            let finding = if flushed {
                Some(Finding::HugeEpsFlush)
            } else {
                tiny.then_some(Finding::TinyRhoFlush)
            };
            return Err(Violation::new(
                finding,
                format!(
                    "first step: group {i} perturbation norm {measured:e}·u, expected {expected:e}·u with u = rho·2^{unit} (rho {}, eps {}, n {n:e}, bound {bound:e}·u)",
                    p.rho, p.eps
                ),
            ));
        }
    }
    Ok(())
}

/// What a call did, in words both backends must agree on.
pub type Outcome = String;

#[derive(Debug)]
enum Fail<E> {
    Core(Error<E>),
    Closure,
}

impl<E> From<Error<E>> for Fail<E> {
    fn from(e: Error<E>) -> Self {
        Fail::Core(e)
    }
}

/// What happened between a successful first step and the end of its phase.
struct FirstOut {
    perturbed: Vec<GroupSnap>,
    g2: Vec<Vec<f64>>,
    result: Option<Result<StepStatus, &'static str>>,
}

/// `first_step`, write `g2`, finish; the guard's borrows end when this returns.
fn run_first<V: SamOptimizer, B: Inspect>(
    opt: &mut V,
    groups: &mut [Group<B>],
    g2r: &Recipe,
    finish: Finish,
) -> Result<FirstOut, (Pred, &'static str)> {
    let mut guard = match opt.first_step(groups) {
        Ok(g) => g,
        Err(e) => return Err((kind(&e), err_name(&e))),
    };
    let perturbed = snaps(guard.groups());
    write_recipe(guard.groups_mut(), g2r);
    let g2 = grads_of(guard.groups());
    let result = match finish {
        Finish::Second => Some(guard.second_step().map_err(|e| err_name(&e))),
        Finish::External => Some(guard.restore_with_gradient().map_err(|e| err_name(&e))),
        Finish::Cancel => Some(
            guard
                .cancel()
                .map(|()| StepStatus::Applied)
                .map_err(|e| err_name(&e)),
        ),
        Finish::Drop => {
            drop(guard);
            None
        }
        Finish::Forget => {
            mem::forget(guard);
            None
        }
    };
    Ok(FirstOut {
        perturbed,
        g2,
        result,
    })
}

fn recover_opt<B: ParamBuffer>(
    opt: &mut Opt,
    groups: &mut [Group<B>],
) -> Option<Result<(), Error<B::Error>>> {
    Some(match opt {
        Opt::Sam(o) => o.recover(groups),
        Opt::Gsam(o) => o.recover(groups),
        Opt::Wsam(o) => o.recover(groups),
        Opt::Wasam(o) => o.recover(groups),
        Opt::Base(_) => return None,
    })
}

/// What a successful swap did.
struct SwapOut {
    swapped: Vec<GroupSnap>,
    touched: Vec<Vec<f64>>,
    back: Option<Result<(), &'static str>>,
}

fn run_swap<B: Inspect>(
    v: &mut sam_core::Wasam,
    groups: &mut [Group<B>],
    k: u8,
    touch: Option<&Recipe>,
    end: SwapEnd,
) -> Result<SwapOut, (Pred, &'static str)> {
    let mut guard = match v.swap(groups, k) {
        Ok(g) => g,
        Err(e) => return Err((kind(&e), err_name(&e))),
    };
    let swapped = snaps(guard.groups());
    if let Some(t) = touch {
        for (gi, g) in guard.groups_mut().iter_mut().enumerate() {
            let cur = g.buffer.weights_f64();
            if let Some(vals) = t.values(gi, &cur) {
                g.buffer.set_weights(&vals);
            }
        }
    }
    let touched = guard
        .groups()
        .iter()
        .map(|g| g.buffer.weights_f64())
        .collect();
    let back = match end {
        SwapEnd::Back => Some(guard.swap_back().map_err(|e| err_name(&e))),
        SwapEnd::Drop => {
            drop(guard);
            Some(Ok(()))
        }
        SwapEnd::Forget => {
            mem::forget(guard);
            None
        }
    };
    Ok(SwapOut {
        swapped,
        touched,
        back,
    })
}

fn check_inactive(before: &[GroupSnap], now: &[GroupSnap]) -> Result<(), Violation> {
    let bitwise = |a: &GroupSnap, b: &GroupSnap| {
        same(&a.w, &b.w)
            && same(&a.g, &b.g)
            && a.slots.iter().zip(&b.slots).all(|(x, y)| match (x, y) {
                (Some(x), Some(y)) => same(x, y),
                (None, None) => true,
                _ => false,
            })
    };
    if before.len() != now.len() || !before.iter().zip(now).all(|(a, b)| bitwise(a, b)) {
        return Err(Violation::new(
            None,
            "a group not passed to the call changed".into(),
        ));
    }
    Ok(())
}

/// Everything a step-like call needs to be judged.
struct Judge {
    /// The predicted first half.
    first: First,
    /// The WASAM fold owed, applied once the first half passes its checks.
    fold: Option<[Option<f64>; MAX_AVERAGES]>,
    /// GSAM's `(α, ε)`.
    gsam: Option<(f64, f64)>,
    class: bool,
    lr_zero: bool,
    checks_second: bool,
    stashes: bool,
    wsam_decoupled: bool,
    is_sam_like: bool,
    is_f64: bool,
}

impl Judge {
    fn pred(&self) -> Pred {
        self.first.pred
    }
}

fn judge<B: Inspect>(w: &World<B>, m: &Model, g1: &[Vec<f64>]) -> Judge {
    let first = w.predict_first(m, g1);
    Judge {
        first,
        fold: match &w.opt {
            Opt::Wasam(v) => owed_fold(v),
            _ => None,
        },
        gsam: match &w.opt {
            Opt::Gsam(v) => Some((v.config().alpha, v.config().perturbation.eps)),
            _ => None,
        },
        // A call that reinterprets slot memory leaves the class (its base state is garbage).
        class: w.class_pre(m) && !first.reinterpret,
        lr_zero: w.act().iter().all(|g| w.opt.lr_used(&g.options) == 0.0),
        checks_second: w.opt.checks_second(),
        stashes: w.opt.stashes(),
        wsam_decoupled: matches!(&w.opt, Opt::Wsam(v) if v.config().decouple),
        is_sam_like: matches!(w.opt, Opt::Sam(_) | Opt::Wasam(_)),
        is_f64: w.f64,
    }
}

/// The predicted second half: `Ok(None)` applied, `Ok(Some(skip))`, or an error's name; with
/// the open finding a different outcome would be an instance of, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecondPred {
    /// The outcome.
    pub outcome: Result<Option<SkipReason>, &'static str>,
    /// The known finding a different outcome is an instance of.
    pub finding: Option<Finding>,
}

impl SecondPred {
    fn of(outcome: Result<Option<SkipReason>, &'static str>) -> Self {
        SecondPred {
            outcome,
            finding: None,
        }
    }
}

/// The second-half prediction (`g1` the clean gradient as stored, `g2` the second one).
fn predict_second(
    j: &Judge,
    finish: Finish,
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
) -> Result<SecondPred, Violation> {
    if finish == Finish::External && j.wsam_decoupled {
        return Ok(SecondPred::of(Err("InvalidGroups")));
    }
    if let Some((alpha, eps)) = j.gsam {
        return gsam_second(alpha, eps, g1, g2);
    }
    if j.checks_second && any_nonfinite(g2) {
        return Ok(SecondPred::of(Ok(Some(SkipReason::NonFiniteSecond))));
    }
    Ok(SecondPred::of(Ok(None)))
}

/// The exact prediction of GSAM's second half (`gsam.rs`, `second`) for clean gradient `g1`
/// (the stash) and second gradient `g2`, per group.
///
/// The norms are those of `Engine::norms`: the canonical reduction of `sam_core::backend::kernel`
/// (which every backend reproduces bit for bit), repeated at power-of-two scales `s₂`, `s₁`
/// when a sum overflows or the values are tiny. Then, as documented: a skip if `g₂` (or the
/// stash) is not finite; `NormOverflow` unless `‖g₂‖` and `‖g₁‖` are finite; the cosine
/// `⟨g₁,g₂⟩/(‖g₂‖‖g₁‖ + ε)` evaluated at the reduction's scales, `dot_s/(n₂ₛ·n₁ₛ + ε·s₂·s₁)`
/// (`0` when that denominator is 0 or infinite); `a = 1` when `cos = 0`, else
/// `1 + α·cos·‖g₁‖/(‖g₂‖ + ε)`; `NormOverflow` if `a` is not finite; else applied. The norms and
/// the cosine are cross-checked against independent ones ([`norm`], a scaled dot product).
///
/// `ε·s₂·s₁` is `ε` times the (exact) product of the scales whenever that product is
/// representable, else `(ε·s₂)·s₁` (past finding [`Finding::GsamScaledEps`]: the core used to
/// multiply in turn always, overflowing or underflowing in between).
pub fn gsam_second(
    alpha: f64,
    eps: f64,
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
) -> Result<SecondPred, Violation> {
    let reduce = |scales: [f64; 3]| {
        let spec = ReduceSpec {
            grad: true,
            stash: true,
            dot: true,
            scale_grad: scales[1],
            scale_stash: scales[2],
            ..ReduceSpec::FINITE_ONLY
        };
        g2.iter().zip(g1).fold(Reduction::ZERO, |acc, (g, s)| {
            acc.combine(kernel::reduce_flat(g.len(), &spec, |i| (0.0, g[i], s[i])))
        })
    };
    let mut r = reduce([1.0; 3]);
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
        r = reduce(scales);
    }
    if !r.finite {
        return Ok(SecondPred::of(Ok(Some(SkipReason::NonFiniteSecond))));
    }
    let (grad_s, stash_s) = (r.grad_sq.sqrt(), r.stash_sq.sqrt());
    let (grad, stash) = (grad_s / scales[1], stash_s / scales[2]);
    if !(grad.is_finite() && stash.is_finite()) {
        return Ok(SecondPred::of(Err("NormOverflow")));
    }
    // Both scales are powers of two: ε times their product is one rounding whenever the product
    // is representable (a product of 0 or ∞ means scales on the same side of 1, and then the
    // two steps lose nothing a single one would keep). The two steps differ from it only when
    // they overflow, or underflow below the normal range (where a subnormal ε·s₂·s₁ next to
    // n₂ₛ·n₁ₛ ≥ 4e-47 does not change the cosine).
    let p = scales[1] * scales[2];
    let eps_s = if eps == 0.0 {
        0.0
    } else if p != 0.0 && p.is_finite() {
        eps * p
    } else {
        (eps * scales[1]) * scales[2]
    };
    let finding = None;
    let pred = |outcome| Ok(SecondPred { outcome, finding });
    let den = grad_s * stash_s + eps_s;
    let cos = if den > 0.0 && den.is_finite() {
        r.dot / den
    } else {
        0.0
    };
    // Products of the dot product below the subnormal range are lost (at most 2^-1074 each at
    // the reduction's scales). An infinite denominator is documented to mean that ε dwarfs the
    // norms: the cosine is then 0 by definition (it matters only through `a`, where
    // α·cos·‖g₁‖/(‖g₂‖+ε) is then below the rounding of 1 unless α is astronomical).
    let lost = if !den.is_finite() {
        f64::INFINITY
    } else if den > 0.0 {
        (g1.iter().map(Vec::len).sum::<usize>() as f64 + 1.0) * f64::from_bits(1) / den
    } else {
        0.0
    };
    cross_check(grad, stash, cos, lost, eps, g1, g2)?;
    let a = if cos == 0.0 {
        1.0
    } else {
        1.0 + alpha * cos * stash / (grad + eps)
    };
    if !a.is_finite() {
        return pred(Err("NormOverflow"));
    }
    pred(Ok(None))
}

/// GSAM's norms and cosine (as the core computes them) against independent ones: a coarse bound
/// (`1e-6` relative, an absolute `1e-300`, and `lost` for the cosine: the products lost below
/// the subnormal range) that catches a wrong reduction, scaling or formula, not rounding.
fn cross_check(
    grad: f64,
    stash: f64,
    cos: f64,
    lost: f64,
    eps: f64,
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
) -> Result<(), Violation> {
    const RTOL: f64 = 1e-6;
    const ATOL: f64 = 1e-300;
    let (a, b) = (g1.concat(), g2.concat());
    let close = |x: f64, y: f64, scale: f64| {
        !(x.is_finite() && y.is_finite() && scale.is_finite())
            || (x - y).abs() <= RTOL * scale + ATOL
    };
    let (n1, n2) = (norm(&a), norm(&b));
    let ma = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mb = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    // cos = ⟨a,b⟩/(‖a‖‖b‖ + ε), everything relative to the largest magnitudes (‖·‖ ≥ 1 there).
    let (cos_i, scale) = if ma > 0.0 && mb > 0.0 {
        let (d, s) = a.iter().zip(&b).fold((0.0, 0.0), |(d, s), (x, y)| {
            let p = (x / ma) * (y / mb);
            (d + p, s + p.abs())
        });
        let ra: Vec<f64> = a.iter().map(|x| x / ma).collect();
        let rb: Vec<f64> = b.iter().map(|y| y / mb).collect();
        // ε/(max|a|·max|b|) in logarithms (the product of the maxima may leave the range).
        let e = if eps == 0.0 {
            0.0
        } else {
            (eps.ln() - ma.ln() - mb.ln()).exp()
        };
        let den = norm(&ra) * norm(&rb) + e;
        (d / den, s / den)
    } else {
        (0.0, 0.0)
    };
    if close(grad, n2, n2) && close(stash, n1, n1) && close(cos, cos_i, scale + lost / RTOL) {
        return Ok(());
    }
    Err(Violation::new(
        None,
        format!(
            "GSAM second half: the reduction gives ‖g₂‖ = {grad:e}, ‖g₁‖ = {stash:e}, cos = {cos:e}; independently {n2:e}, {n1:e}, {cos_i:e} (Σ|g₁g₂|/(‖g₁‖‖g₂‖+ε) = {scale:e})"
        ),
    ))
}

/// Judges an applied step: in the finiteness class, every weight and slot (and, for an
/// external finish, the written gradient) is finite, and lr = 0 everywhere is the identity.
/// Returns whether the step was in the class.
fn judge_applied(
    j: &Judge,
    before: &[GroupSnap],
    now: &[GroupSnap],
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
    external: bool,
    what: &str,
) -> Result<bool, Violation> {
    let class = j.class && all_within(g1, BOUND_VALUE) && all_within(g2, BOUND_VALUE);
    if class {
        check_finite(now, external, what)?;
        if j.lr_zero && !external {
            for (i, (b, n)) in before.iter().zip(now).enumerate() {
                if !same(&b.w, &n.w) {
                    return Err(Violation::new(
                        None,
                        format!(
                            "{what} with lr = 0 changed weights of group {i} ({})",
                            first_diff(&b.w, &n.w)
                        ),
                    ));
                }
            }
        }
    }
    Ok(class)
}

/// Judges the error (or clean skip) of a first half (first step, closure step, base step)
/// against the prediction: the predicted kind, and nothing changed (the averages included).
fn judge_first_error(
    j: &Judge,
    got: Pred,
    name: &str,
    before: &[GroupSnap],
    now: &[GroupSnap],
    what: &str,
) -> Result<(), Violation> {
    if got != j.pred() {
        return Err(Violation::new(
            None,
            format!("{what} returned {name}, predicted {:?}", j.pred()),
        ));
    }
    check_unchanged(before, now, &format!("{what} ({name})"))
}

/// Runs one guarded step (`first_step` … finish) on variant `V`.
fn guarded<V: SamOptimizer, B: Inspect>(
    opt: &mut V,
    groups: &mut [Group<B>],
    j: &Judge,
    params: &[Option<PerturbParams>],
    g2r: &Recipe,
    finish: Finish,
    m: &mut Model,
) -> Result<Outcome, Violation> {
    let before = strip(snaps(groups), j.first.reinterpret);
    let g1: Vec<Vec<f64>> = before.iter().map(|s| s.g.clone()).collect();
    let out = match run_first(opt, groups, g2r, finish) {
        Err((got, name)) => {
            let now = snaps(groups);
            judge_first_error(j, got, name, &before, &now, "first_step")?;
            return Ok(format!("first_step: {name}"));
        }
        Ok(out) => out,
    };
    if j.pred() != Pred::Ok {
        return Err(Violation::new(
            None,
            format!("first_step succeeded, predicted {:?}", j.pred()),
        ));
    }
    // What the step starts from once its first half passed the checks: a WASAM fold owed is
    // applied then.
    let base = apply_fold(&before, j.fold.as_ref(), j.is_f64);
    check_perturbation(&before, &out.perturbed, params, j.stashes, j.is_f64)?;
    check_same(&base, &out.perturbed, "first_step", false, None)?;
    let g2 = out.g2;
    let now = snaps(groups);
    let phase = opt.phase();
    let label = match finish {
        Finish::Second => "second_step",
        Finish::External => "restore_with_gradient",
        Finish::Cancel => "cancel",
        Finish::Drop => "drop",
        Finish::Forget => "forget",
    };
    if finish == Finish::Forget {
        if phase != Phase::Perturbed {
            return Err(Violation::new(
                None,
                "a leaked guard left the optimizer out of the perturbed phase".into(),
            ));
        }
        if !now
            .iter()
            .zip(&out.perturbed)
            .all(|(a, b)| same(&a.w, &b.w))
        {
            return Err(Violation::new(
                None,
                "a leaked guard changed the perturbed weights".into(),
            ));
        }
        // Recover must bring back the clean weights; the slots are as the first step left
        // them (a fold owed happened there).
        let snap = out
            .perturbed
            .iter()
            .zip(&before)
            .map(|(p, b)| GroupSnap {
                w: b.w.clone(),
                ..p.clone()
            })
            .collect();
        m.leaked = Some((Phase::Perturbed, snap));
        return Ok("forget".into());
    }
    if phase != Phase::Idle {
        return Err(Violation::new(
            None,
            format!("{label}: optimizer not idle afterwards"),
        ));
    }
    let result = match (out.result, finish) {
        (None, _) | (Some(Ok(_)), Finish::Cancel) => {
            check_unchanged(&base, &now, label)?;
            return Ok(label.into());
        }
        (Some(Err(e)), Finish::Cancel) => {
            return Err(Violation::new(None, format!("cancel failed: {e}")));
        }
        (Some(r), _) => r,
    };
    let expect = predict_second(j, finish, &g1, &g2)?;
    let external = finish == Finish::External;
    match (result, expect.outcome) {
        (Ok(StepStatus::Applied), Ok(None)) => {
            if external {
                check_unchanged(&base, &now, "restore_with_gradient")?;
                if j.is_sam_like {
                    for (i, (n, g)) in now.iter().zip(&g2).enumerate() {
                        if !same(&n.g, g) {
                            return Err(Violation::new(
                                None,
                                format!(
                                    "restore_with_gradient: group {i} gradient is not g2 ({})",
                                    first_diff(&n.g, g)
                                ),
                            ));
                        }
                    }
                }
            }
            let class = judge_applied(j, &before, &now, &g1, &g2, external, label)?;
            m.in_class &= class;
            Ok(format!("{label}: applied"))
        }
        (Ok(StepStatus::Skipped(r)), Ok(Some(p))) if r == p => {
            check_unchanged(&base, &now, label)?;
            Ok(format!("{label}: skipped {r:?}"))
        }
        (Err(e), Err(name)) if e == name => {
            check_unchanged(&base, &now, label)?;
            Ok(format!("{label}: {e}"))
        }
        (r, p) => Err(Violation::new(
            expect.finding,
            format!("{label} returned {r:?}, predicted {p:?}"),
        )),
    }
}

/// Runs one closure-driven step on variant `V`; `j` was computed with the clean gradient the
/// closure writes on its first call.
fn closure<V: SamOptimizer, B: Inspect>(
    opt: &mut V,
    groups: &mut [Group<B>],
    j: &Judge,
    g1r: &Recipe,
    g2r: &Recipe,
    fail: u8,
    m: &mut Model,
) -> Result<Outcome, Violation> {
    let before = strip(snaps(groups), j.first.reinterpret);
    let phase_before = opt.phase();
    let mut seen: Vec<Vec<Vec<f64>>> = Vec::new();
    let r = opt.step(groups, |gs: &mut [Group<B>]| {
        let call = seen.len() + 1;
        write_recipe(gs, if call == 1 { g1r } else { g2r });
        seen.push(grads_of(gs));
        if usize::from(fail) == call {
            Err(Fail::Closure)
        } else {
            Ok(())
        }
    });
    let now = snaps(groups);
    if opt.phase() != phase_before {
        return Err(Violation::new(
            None,
            format!(
                "closure step changed the phase from {phase_before:?} to {:?}",
                opt.phase()
            ),
        ));
    }
    if seen.len() == 2 && j.pred() != Pred::Ok {
        return Err(Violation::new(
            None,
            format!(
                "closure step called the closure twice, predicted {:?}",
                j.pred()
            ),
        ));
    }
    let g1 = seen.first().cloned().unwrap_or_default();
    let g2 = seen.get(1).cloned().unwrap_or_default();
    // After a first half that passed its checks (the second closure call), a fold owed happened.
    let base = if seen.len() == 2 {
        apply_fold(&before, j.fold.as_ref(), j.is_f64)
    } else {
        before.clone()
    };
    match r {
        Err(Fail::Closure) => {
            check_unchanged(&base, &now, "closure step (closure failed)")?;
            Ok("closure: closure error".into())
        }
        Err(Fail::Core(e)) => {
            let (got, name) = (kind(&e), err_name(&e));
            if seen.len() == 1 {
                judge_first_error(j, got, name, &before, &now, "closure step")?;
                return Ok(format!("closure: {name}"));
            }
            let expect = predict_second(j, Finish::Second, &g1, &g2)?;
            match expect.outcome {
                Err(p) if p == name => {
                    check_unchanged(&base, &now, "closure step")?;
                    Ok(format!("closure: {name}"))
                }
                p => Err(Violation::new(
                    expect.finding,
                    format!("closure step returned {name} after two gradients, predicted {p:?}"),
                )),
            }
        }
        Ok(report) => match report.status {
            StepStatus::Skipped(SkipReason::NonFiniteClean) => {
                if seen.len() != 1 || j.pred() != Pred::NonFinite {
                    return Err(Violation::new(
                        None,
                        format!(
                            "closure step skipped for a non-finite clean gradient, predicted {:?}",
                            j.pred()
                        ),
                    ));
                }
                judge_first_error(
                    j,
                    Pred::NonFinite,
                    "NonFiniteGradient",
                    &before,
                    &now,
                    "closure step",
                )?;
                Ok("closure: skipped clean".into())
            }
            status => {
                if j.pred() != Pred::Ok || seen.len() != 2 {
                    return Err(Violation::new(
                        None,
                        format!(
                            "closure step returned {status:?}, predicted {:?} ({} closure calls)",
                            j.pred(),
                            seen.len()
                        ),
                    ));
                }
                let expect = predict_second(j, Finish::Second, &g1, &g2)?;
                match (status, expect.outcome) {
                    (StepStatus::Applied, Ok(None)) => {
                        let class =
                            judge_applied(j, &before, &now, &g1, &g2, false, "closure step")?;
                        m.in_class &= class;
                        Ok("closure: applied".into())
                    }
                    (StepStatus::Skipped(r), Ok(Some(p))) if r == p => {
                        check_unchanged(&base, &now, "closure step (skipped)")?;
                        Ok(format!("closure: skipped {r:?}"))
                    }
                    (s, p) => Err(Violation::new(
                        expect.finding,
                        format!("closure step returned {s:?}, predicted {p:?}"),
                    )),
                }
            }
        },
    }
}

/// One step of the plain base optimizer with the gradient in the buffers.
fn base_step<B: Inspect>(
    b: &mut sam_core::BaseOptimizer,
    groups: &mut [Group<B>],
    j: &Judge,
    m: &mut Model,
) -> Result<Outcome, Violation> {
    let before = strip(snaps(groups), j.first.reinterpret);
    let g1: Vec<Vec<f64>> = before.iter().map(|s| s.g.clone()).collect();
    let r = b.apply(groups);
    let now = snaps(groups);
    match r {
        Err(e) => {
            let (got, name) = (kind(&e), err_name(&e));
            judge_first_error(j, got, name, &before, &now, "base step")?;
            Ok(format!("base: {name}"))
        }
        Ok(StepStatus::Skipped(SkipReason::NonFiniteClean)) => {
            judge_first_error(
                j,
                Pred::NonFinite,
                "NonFiniteGradient",
                &before,
                &now,
                "base step",
            )?;
            Ok("base: skipped".into())
        }
        Ok(StepStatus::Applied) if j.pred() == Pred::Ok => {
            let class = judge_applied(j, &before, &now, &g1, &[], false, "base step")?;
            m.in_class &= class;
            Ok("base: applied".into())
        }
        Ok(s) => Err(Violation::new(
            None,
            format!("base step returned {s:?}, predicted {:?}", j.pred()),
        )),
    }
}

/// The outcome of a call skipped in lockstep: it would prepare a buffer for another slot layout
/// (after a checkpoint load reset the record), which the reference backend does by
/// reinterpreting its slot memory while `sam-ndarray` keeps slots by role (both as documented),
/// so the backends would legitimately diverge.
const SKIPPED_RESPEC: &str = "skipped in lockstep (would prepare another slot layout)";

/// Applies one operation to a world, checking every promise; updates the model.
pub fn apply<B: Inspect>(
    w: &mut World<B>,
    m: &mut Model,
    op: &Op,
    lockstep: bool,
) -> Result<Outcome, Violation> {
    let n = w.active;
    let leaked = m.leaked.is_some();
    match op {
        Op::Step { g1, g2, finish } => {
            w.write(g1);
            let g1v = grads_of(w.act());
            let j = judge(w, m, &g1v);
            if lockstep && j.first.reinterpret {
                return Ok(format!("step: {SKIPPED_RESPEC}"));
            }
            let inactive = snaps(&w.groups[n..]);
            let params = w.params();
            let groups = &mut w.groups[..n];
            let out = match &mut w.opt {
                Opt::Base(b) => base_step(b, groups, &j, m),
                Opt::Sam(o) => guarded(o, groups, &j, &params, g2, *finish, m),
                Opt::Gsam(o) => guarded(o, groups, &j, &params, g2, *finish, m),
                Opt::Wsam(o) => guarded(o, groups, &j, &params, g2, *finish, m),
                Opt::Wasam(o) => guarded(o, groups, &j, &params, g2, *finish, m),
            }?;
            w.note(m, &j.first);
            check_inactive(&inactive, &snaps(&w.groups[n..]))?;
            Ok(out)
        }
        Op::Closure { g1, g2, fail } => {
            let is_f64 = w.f64;
            let g1v: Vec<Vec<f64>> = w
                .act()
                .iter()
                .enumerate()
                .map(|(gi, g)| match g1.values(gi, &g.buffer.weights_f64()) {
                    Some(v) => v.into_iter().map(|x| round_to(x, is_f64)).collect(),
                    None => g.buffer.grads_f64(),
                })
                .collect();
            let mut j = judge(w, m, &g1v);
            // A closure that fails on its first call stops the step before the optimizer runs.
            let begins = *fail != 1 || matches!(w.opt, Opt::Base(_));
            if !begins {
                j.first.prepares = 0;
                j.first.reinterpret = false;
            }
            if lockstep && j.first.reinterpret {
                return Ok(format!("closure: {SKIPPED_RESPEC}"));
            }
            let inactive = snaps(&w.groups[n..]);
            let groups = &mut w.groups[..n];
            let out = match &mut w.opt {
                Opt::Base(b) => {
                    write_recipe(groups, g1);
                    base_step(b, groups, &j, m)
                }
                Opt::Sam(o) => closure(o, groups, &j, g1, g2, *fail, m),
                Opt::Gsam(o) => closure(o, groups, &j, g1, g2, *fail, m),
                Opt::Wsam(o) => closure(o, groups, &j, g1, g2, *fail, m),
                Opt::Wasam(o) => closure(o, groups, &j, g1, g2, *fail, m),
            }?;
            if begins {
                w.note(m, &j.first);
            }
            check_inactive(&inactive, &snaps(&w.groups[n..]))?;
            Ok(out)
        }
        Op::Recover => {
            let before = snaps(&w.groups[..n]);
            let Some(r) = recover_opt(&mut w.opt, &mut w.groups[..n]) else {
                return Ok("recover: n/a".into());
            };
            let now = snaps(&w.groups[..n]);
            let phase = w.opt.phase();
            match m.leaked.take() {
                Some((leaked_phase, snap)) => {
                    if r.is_err() || phase != Phase::Idle {
                        return Err(Violation::new(
                            None,
                            format!(
                                "recover after a leaked {leaked_phase:?} guard: {:?}, phase {phase:?}",
                                r.err().map(|e| err_name(&e))
                            ),
                        ));
                    }
                    check_unchanged(
                        &snap,
                        &now,
                        &format!("recover after a leaked {leaked_phase:?} guard"),
                    )?;
                    Ok(format!("recover: {leaked_phase:?} undone"))
                }
                None => {
                    if let Err(e) = r {
                        return Err(Violation::new(
                            None,
                            format!("recover when idle failed: {}", err_name(&e)),
                        ));
                    }
                    check_unchanged(&before, &now, "recover when idle")?;
                    Ok("recover: no-op".into())
                }
            }
        }
        Op::SetGrads(r) => {
            w.write(r);
            Ok("set grads".into())
        }
        Op::Swap { k, touch, end } => swap(w, m, *k, touch.as_ref(), *end, lockstep),
        Op::UpdateAverages => {
            let Opt::Wasam(v) = &w.opt else {
                return Ok("update_averages: n/a".into());
            };
            let fold = owed_fold(v);
            let first = w.predict_begin(m);
            if lockstep && first.reinterpret {
                return Ok(format!("update_averages: {SKIPPED_RESPEC}"));
            }
            let before = strip(snaps(&w.groups[..n]), first.reinterpret);
            let Opt::Wasam(v) = &mut w.opt else {
                unreachable!("checked above")
            };
            let groups = &mut w.groups[..n];
            let r = v.update_averages(groups);
            let now = snaps(groups);
            let (got, name) = match &r {
                Ok(()) => (Pred::Ok, "ok"),
                Err(e) => (kind(e), err_name(e)),
            };
            if got != first.pred {
                return Err(Violation::new(
                    None,
                    format!(
                        "update_averages returned {name}, predicted {:?}",
                        first.pred
                    ),
                ));
            }
            let expect = if got == Pred::Ok {
                apply_fold(&before, fold.as_ref(), w.f64)
            } else {
                before
            };
            check_unchanged(&expect, &now, &format!("update_averages ({name})"))?;
            w.note(m, &first);
            Ok(format!("update_averages: {name}"))
        }
        Op::External { lr } => {
            if leaked {
                return Ok("external: skipped".into());
            }
            for g in &mut w.groups[..n] {
                let (wv, gv) = (g.buffer.weights_f64(), g.buffer.grads_f64());
                let new: Vec<f64> = wv.iter().zip(&gv).map(|(w, g)| w - lr * g).collect();
                g.buffer.set_weights(&new);
            }
            Ok("external".into())
        }
        Op::Checkpoint {
            steps,
            counts,
            flip_pending,
        } => {
            let before = snaps(&w.groups);
            let (out, loaded) = checkpoint(&mut w.opt, *steps, *counts, *flip_pending)?;
            if loaded {
                m.shape = None;
            }
            check_unchanged(&before, &snaps(&w.groups), "checkpoint")?;
            Ok(out)
        }
        Op::Active(k) => {
            if !leaked {
                w.active = (*k).min(w.groups.len());
            }
            Ok("active".into())
        }
        Op::Permute(i, j) => {
            if !leaked && *i < w.groups.len() && *j < w.groups.len() {
                w.groups.swap(*i, *j);
                w.caps.swap(*i, *j);
                w.prepared.swap(*i, *j);
            }
            Ok("permute".into())
        }
        Op::Options { group, raw } => {
            let Some(g) = w.groups.get_mut(*group) else {
                return Ok("options: n/a".into());
            };
            let Ok(o) = raw.build() else {
                return Ok("options: invalid".into());
            };
            if leaked {
                return Ok("options: skipped".into());
            }
            g.options = o;
            Ok("options".into())
        }
    }
}

/// WASAM `swap(k)`, optionally writing the live (averaged) weights, then ending as `end` says.
///
/// Predicted: `InvalidGroups` unless average `k` exists and holds a snapshot or gets its first
/// from the fold owed (checked first, in any phase), then [`World::predict_begin`]; on success
/// the fold owed is applied, the live weights are average `k` and average `k` the live weights
/// (bit for bit), and after the swap back (or `recover` of a leaked guard) everything is as
/// after the fold, except that average `k` holds what the live weights held while swapped.
fn swap<B: Inspect>(
    w: &mut World<B>,
    m: &mut Model,
    k: u8,
    touch: Option<&Recipe>,
    end: SwapEnd,
    lockstep: bool,
) -> Result<Outcome, Violation> {
    let Opt::Wasam(v) = &w.opt else {
        return Ok("swap: n/a".into());
    };
    let n = w.active;
    let phase = v.phase();
    let fold = owed_fold(v);
    let ki = usize::from(k);
    let owed = fold.is_some_and(|f| f.get(ki).is_some_and(Option::is_some));
    let valid = ki < v.swa_starts().len() && (v.counts()[ki] > 0 || owed);
    let first = if valid {
        w.predict_begin(m)
    } else {
        First::refused(Pred::InvalidGroups)
    };
    if lockstep && first.reinterpret {
        return Ok(format!("swap: {SKIPPED_RESPEC}"));
    }
    let before = strip(snaps(&w.groups[..n]), first.reinterpret);
    let Opt::Wasam(v) = &mut w.opt else {
        unreachable!("checked above")
    };
    let groups = &mut w.groups[..n];
    let out = run_swap(v, groups, k, touch, end);
    let after = snaps(groups);
    let phase_after = v.phase();
    let out = match out {
        Err((got, name)) => {
            if got != first.pred {
                return Err(Violation::new(
                    None,
                    format!(
                        "swap({k}) returned {name} in phase {phase:?}, predicted {:?} (average valid: {valid})",
                        first.pred
                    ),
                ));
            }
            check_unchanged(&before, &after, &format!("swap ({name})"))?;
            w.note(m, &first);
            return Ok(format!("swap: {name}"));
        }
        Ok(out) => out,
    };
    if first.pred != Pred::Ok {
        return Err(Violation::new(
            None,
            format!(
                "swap({k}) succeeded in phase {phase:?}, predicted {:?}",
                first.pred
            ),
        ));
    }
    w.note(m, &first);
    let avg = Slot::Average(k);
    let folded = apply_fold(&before, fold.as_ref(), w.f64);
    for (i, (f, s)) in folded.iter().zip(&out.swapped).enumerate() {
        let Some(fa) = f.slot(avg) else { continue };
        if !same(&s.w, fa) {
            return Err(Violation::new(
                None,
                format!(
                    "swap: live weights of group {i} are not average {k} ({})",
                    first_diff(&s.w, fa)
                ),
            ));
        }
        if s.slot(avg).is_some_and(|sa| !same(sa, &f.w)) {
            return Err(Violation::new(
                None,
                format!("swap: average {k} of group {i} does not hold the live weights"),
            ));
        }
    }
    check_same(&folded, &out.swapped, "swap", false, Some(avg))?;
    // Swapped back: as after the fold, average k holding what the live weights held.
    let at = role_index(avg).expect("a role");
    let back: Vec<GroupSnap> = folded
        .into_iter()
        .zip(&out.touched)
        .map(|(mut f, t)| {
            if f.slots[at].is_some() {
                f.slots[at] = Some(t.clone());
            }
            f
        })
        .collect();
    match out.back {
        None => {
            if phase_after != Phase::Swapped {
                return Err(Violation::new(
                    None,
                    "a leaked swap guard left the optimizer unswapped".into(),
                ));
            }
            m.leaked = Some((Phase::Swapped, back));
            return Ok("swap: leaked".into());
        }
        Some(Err(e)) => return Err(Violation::new(None, format!("swap_back failed: {e}"))),
        Some(Ok(())) => {}
    }
    if phase_after != Phase::Idle {
        return Err(Violation::new(
            None,
            "swap back left the optimizer swapped".into(),
        ));
    }
    check_unchanged(&back, &after, "swap twice")?;
    Ok("swap: back".into())
}

/// Saves the host state, edits it, loads it back. Returns the outcome and whether a state was
/// loaded (which resets the optimizer's record of the groups).
fn checkpoint(
    opt: &mut Opt,
    steps: Option<u64>,
    counts: Option<u64>,
    flip: bool,
) -> Result<(Outcome, bool), Violation> {
    let phase = opt.phase();
    let refused_state = |e: Error| -> Result<(Outcome, bool), Violation> {
        match e {
            Error::WrongPhase { .. } if phase != Phase::Idle => {
                Ok(("checkpoint: WrongPhase".into(), false))
            }
            e => Err(Violation::new(
                None,
                format!("state() in phase {phase:?}: {e}"),
            )),
        }
    };
    let idle_only = || -> Result<(), Violation> {
        if phase != Phase::Idle {
            return Err(Violation::new(
                None,
                format!("state() succeeded in phase {phase:?}"),
            ));
        }
        Ok(())
    };
    macro_rules! plain {
        ($o:expr) => {{
            match $o.state() {
                Ok(mut st) => {
                    idle_only()?;
                    if let Some(s) = steps {
                        st.steps = s;
                    }
                    if let Err(e) = $o.load_state(&st) {
                        return Err(Violation::new(
                            None,
                            format!("load_state failed when idle: {e}"),
                        ));
                    }
                    if $o.state().ok() != Some(st) {
                        return Err(Violation::new(
                            None,
                            "load_state did not restore the state".into(),
                        ));
                    }
                    Ok(("checkpoint: loaded".into(), true))
                }
                Err(e) => refused_state(e),
            }
        }};
    }
    match opt {
        Opt::Base(o) => plain!(o),
        Opt::Sam(o) => plain!(o),
        Opt::Gsam(o) => plain!(o),
        Opt::Wsam(o) => plain!(o),
        Opt::Wasam(o) => match o.state() {
            Ok(old) => {
                idle_only()?;
                let mut st = old;
                if let Some(s) = steps {
                    st.steps = s;
                }
                if let Some(c) = counts {
                    st.counts = [c; MAX_AVERAGES];
                }
                st.pending_fold ^= flip;
                // No run leaves a fold pending before its first step: such a state is refused,
                // and nothing changes.
                let refuse = st.pending_fold && st.steps == 0;
                match (o.load_state(&st), refuse) {
                    (Ok(()), false) => {
                        if o.state().ok() != Some(st) {
                            return Err(Violation::new(
                                None,
                                "WASAM load_state did not restore the state".into(),
                            ));
                        }
                        Ok(("checkpoint: loaded".into(), true))
                    }
                    (Err(Error::InvalidState { .. }), true) => {
                        if o.state().ok() != Some(old) {
                            return Err(Violation::new(
                                None,
                                "WASAM load_state refused a state but changed the optimizer".into(),
                            ));
                        }
                        Ok(("checkpoint: InvalidState".into(), false))
                    }
                    (r, _) => Err(Violation::new(
                        None,
                        format!(
                            "WASAM load_state({st:?}) returned {r:?}, predicted {}",
                            if refuse { "InvalidState" } else { "Ok" }
                        ),
                    )),
                }
            }
            Err(e) => refused_state(e),
        },
    }
}

/// With `SAM_FUZZ_TRACE=1`, prints each operation and its outcome to stderr.
fn trace(op: &Op, out: &Result<Outcome, Violation>) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var("SAM_FUZZ_TRACE").is_ok_and(|v| v == "1")) {
        eprintln!("op {op:?}\n  -> {out:?}");
    }
}

fn new_model(setup: &Setup) -> Model {
    Model {
        shape: None,
        leaked: None,
        in_class: true,
        coherent: true,
        normal: setup.variant.normal(),
    }
}

/// Owned memory of one reference-backend group.
struct Store<T> {
    w: Vec<T>,
    g: Vec<T>,
    slots: Vec<T>,
}

fn stores<T: Real>(setup: &Setup) -> Vec<Store<T>> {
    setup
        .groups
        .iter()
        .map(|gs| Store {
            w: gs.w.iter().map(|x| T::from_f64(*x)).collect(),
            g: gs.g.iter().map(|x| T::from_f64(*x)).collect(),
            slots: vec![T::default(); gs.slot_values],
        })
        .collect()
}

/// Builds the reference world; `None` if the variant is refused (the config check's business).
fn reference_world<'a, T: Real>(
    setup: &Setup,
    stores: &'a mut [Store<T>],
) -> Result<Option<World<SliceBuffer<'a, T>>>, Violation> {
    let Ok(opt) = setup.variant.build() else {
        return Ok(None);
    };
    let mut groups = Vec::new();
    let mut caps = Vec::new();
    for (gs, st) in setup.groups.iter().zip(stores.iter_mut()) {
        let Ok(options) = gs.raw.build() else {
            continue;
        };
        if gs.short_grad {
            let n = st.g.len();
            match SliceBuffer::new(&mut st.w, &mut st.g[..n - 1], &mut st.slots) {
                Err(SliceError::LengthMismatch { .. }) => {}
                other => {
                    return Err(Violation::new(
                        None,
                        format!("SliceBuffer accepted a short gradient: {other:?}"),
                    ));
                }
            }
        }
        match SliceBuffer::new(&mut st.w, &mut st.g, &mut st.slots) {
            Ok(b) => groups.push(Group::with_options(b, options)),
            Err(e) => {
                return Err(Violation::new(
                    None,
                    format!("SliceBuffer refused equal lengths: {e}"),
                ));
            }
        }
        caps.push(gs.slot_values);
    }
    let active = groups.len();
    Ok(Some(World {
        prepared: vec![None; active],
        groups,
        caps,
        active,
        opt,
        f64: setup.f64,
    }))
}

fn run_reference<T: Real>(setup: &Setup) -> Result<(), Violation> {
    let mut st = stores::<T>(setup);
    let Some(mut world) = reference_world(setup, &mut st)? else {
        return Ok(());
    };
    let mut m = new_model(setup);
    for op in &setup.ops {
        let out = apply(&mut world, &mut m, op, false);
        trace(op, &out);
        out?;
    }
    Ok(())
}

/// The outcomes of the calls an input makes on the reference backend, prefixed by the variant
/// and element type (for selecting seed inputs by what they exercise); stops at a violation.
pub fn outcomes(data: &[u8]) -> Vec<String> {
    let setup = Setup::decode(data, false);
    let tag = format!(
        "{}/{}",
        match setup.variant {
            VariantRaw::Sam(_) => "sam",
            VariantRaw::Gsam(_) => "gsam",
            VariantRaw::Wsam(_) => "wsam",
            VariantRaw::Wasam(..) => "wasam",
            VariantRaw::Base => "base",
        },
        if setup.f64 { "f64" } else { "f32" }
    );
    fn go<T: Real>(setup: &Setup, tag: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut st = stores::<T>(setup);
        let Ok(Some(mut world)) = reference_world(setup, &mut st) else {
            return out;
        };
        let mut m = new_model(setup);
        for op in &setup.ops {
            match apply(&mut world, &mut m, op, false) {
                Ok(o) => out.push(format!("{tag} {o}")),
                Err(_) => break,
            }
        }
        out
    }
    if setup.f64 {
        go::<f64>(&setup, &tag)
    } else {
        go::<f32>(&setup, &tag)
    }
}

/// The `step` check: see the module docs.
pub fn check(data: &[u8], policy: &Policy) {
    let setup = Setup::decode(data, false);
    let r = if setup.f64 {
        run_reference::<f64>(&setup)
    } else {
        run_reference::<f32>(&setup)
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

fn nd_arrays<T: Real>(values: &[f64], shapes: &[Vec<usize>]) -> Vec<ArrayD<T>> {
    let mut at = 0;
    shapes
        .iter()
        .map(|sh| {
            let n: usize = sh.iter().product();
            let v: Vec<T> = values[at..at + n].iter().map(|x| T::from_f64(*x)).collect();
            at += n;
            ArrayD::from_shape_vec(IxDyn(sh), v)
                .unwrap_or_else(|_| ArrayD::from_elem(IxDyn(&[0]), T::default()))
        })
        .collect()
}

/// Constructor misuse of `NdGroup` must be refused, never panic.
fn nd_constructors<T: Real>() -> Result<(), Violation> {
    let a = || ArrayD::<T>::from_elem(IxDyn(&[2, 3]), T::default());
    let refused = [
        NdGroup::with_grads(vec![a()], vec![]).is_err(),
        NdGroup::with_grads(
            vec![a()],
            vec![ArrayD::from_elem(IxDyn(&[3, 2]), T::default())],
        )
        .is_err(),
        NdGroup::new(vec![a().reversed_axes()]).is_err(),
        NdGroup::with_grads(vec![a()], vec![a().reversed_axes()]).is_err(),
    ];
    if refused.iter().any(|r| !r) {
        return Err(Violation::new(
            None,
            format!("NdGroup accepted a mismatched or non-contiguous array: {refused:?}"),
        ));
    }
    Ok(())
}

fn run_lockstep<T: Real>(setup: &Setup) -> Result<(), Violation> {
    nd_constructors::<T>()?;
    let mut st = stores::<T>(setup);
    let Some(mut a) = reference_world(setup, &mut st)? else {
        return Ok(());
    };
    let mut groups = Vec::new();
    for gs in &setup.groups {
        let Ok(options) = gs.raw.build() else {
            continue;
        };
        let buf = NdGroup::with_grads(
            nd_arrays::<T>(&gs.w, &gs.shapes),
            nd_arrays::<T>(&gs.g, &gs.shapes),
        )
        .map_err(|e| Violation::new(None, format!("NdGroup refused consistent arrays: {e}")))?;
        if buf.len() != gs.w.len() {
            return Err(Violation::new(
                None,
                "NdGroup length differs from its arrays".into(),
            ));
        }
        groups.push(Group::with_options(buf, options));
    }
    let caps = vec![usize::MAX; groups.len()];
    let active = groups.len();
    let Ok(opt) = setup.variant.build() else {
        return Ok(());
    };
    let mut b = World {
        prepared: vec![None; active],
        groups,
        caps,
        active,
        opt,
        f64: setup.f64,
    };
    let (mut ma, mut mb) = (new_model(setup), new_model(setup));
    for (i, op) in setup.ops.iter().enumerate() {
        let oa = apply(&mut a, &mut ma, op, true);
        trace(op, &oa);
        let oa = oa.map_err(|v| Violation {
            message: format!("reference backend: {}", v.message),
            ..v
        })?;
        let ob = apply(&mut b, &mut mb, op, true);
        trace(op, &ob);
        let ob = ob.map_err(|v| Violation {
            message: format!("ndarray backend: {}", v.message),
            ..v
        })?;
        if oa != ob {
            return Err(Violation::new(
                None,
                format!("op {i} ({op:?}): reference `{oa}`, ndarray `{ob}`"),
            ));
        }
        let (sa, sb) = (snaps(&a.groups), snaps(&b.groups));
        for (gi, (x, y)) in sa.iter().zip(&sb).enumerate() {
            let mut diffs = Vec::new();
            if !same_modulo_nan(&x.w, &y.w) {
                diffs.push(format!("weights ({})", first_diff(&x.w, &y.w)));
            }
            if !same_modulo_nan(&x.g, &y.g) {
                diffs.push(format!("gradient ({})", first_diff(&x.g, &y.g)));
            }
            for (k, role) in ROLES.iter().enumerate() {
                match (&x.slots[k], &y.slots[k]) {
                    (Some(p), Some(q)) if !same_modulo_nan(p, q) => {
                        diffs.push(format!("slot {role:?} ({})", first_diff(p, q)))
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        diffs.push(format!("slot {role:?} held by one backend only"))
                    }
                    _ => {}
                }
            }
            if !diffs.is_empty() {
                return Err(Violation::new(
                    None,
                    format!(
                        "op {i} ({op:?}) `{oa}`: group {gi} differs between the backends: {}",
                        diffs.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The `ndarray_step` check: see the module docs.
pub fn check_ndarray(data: &[u8], policy: &Policy) {
    let setup = Setup::decode(data, true);
    let r = if setup.f64 {
        run_lockstep::<f64>(&setup)
    } else {
        run_lockstep::<f32>(&setup)
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(
        g1: &[f64],
        g2: &[f64],
        alpha: f64,
        eps: f64,
    ) -> Result<Option<SkipReason>, &'static str> {
        let p = gsam_second(alpha, eps, &[g1.to_vec()], &[g2.to_vec()]).expect("consistent");
        assert_eq!(p.finding, None, "{g1:?} {g2:?} {eps}");
        p.outcome
    }

    #[test]
    fn gsam_second_prediction() {
        let applied = Ok(None);
        let overflow = Err("NormOverflow");
        let skip = Ok(Some(SkipReason::NonFiniteSecond));
        assert_eq!(outcome(&[1.0, 2.0], &[0.5, -1.0], 0.4, 1e-12), applied);
        assert_eq!(
            outcome(&[1.0, f64::NAN], &[0.5, -1.0], 0.4, 1e-12),
            skip,
            "the stash is read too (the first half keeps a non-finite one out)"
        );
        assert_eq!(
            outcome(&[1.0, 2.0], &[0.5, f64::INFINITY], 0.4, 1e-12),
            skip
        );
        // Zero gradients with ε = 0: cos = 0.
        assert_eq!(outcome(&[0.0; 2], &[0.0; 2], 0.4, 0.0), applied);
        // ‖g₂‖ overflows.
        assert_eq!(
            outcome(&[1.0, 1.0], &[f64::MAX, f64::MAX], 0.4, 0.0),
            overflow
        );
        // ‖g₁‖·‖g₂‖ overflows, but the cosine is taken at the reduction's scales.
        assert_eq!(outcome(&[1e200], &[1e200], 0.4, 0.0), applied);
        // a = 1 + α·cos·‖g₁‖/‖g₂‖ overflows.
        assert_eq!(outcome(&[1e10, 0.0], &[1e-300, 0.0], 0.4, 0.0), overflow);
        // Σg₂² overflows: rescaled.
        assert_eq!(outcome(&[0.01; 3], &[1e308; 3], 0.4, 1e-12), applied);
        // Scales 2^-1024 and 2 (their product is subnormal; finding GsamDotSubnormalScale).
        let big = 2f64.powi(1023);
        assert_eq!(outcome(&[0.49; 2], &[big, big * 1.7], 0.4, 1e-12), applied);
        // ε·s₂·s₁ overflows: cos = 0.
        assert_eq!(outcome(&[1e-300; 2], &[1e-300; 2], 0.4, 1e300), applied);
        // ε·s₂ overflows but ε·s₂·s₁ = 7.45 is finite (past finding GsamScaledEps): cos is
        // 0.0876, a = 1 + α·cos·‖g₁‖/(‖g₂‖+ε) = 3.5e297, applied; with α = 1e13 it overflows.
        let p = gsam_second(0.4, 1e9, &[vec![1e308, 0.0]], &[vec![1e-300; 2]]).expect("ok");
        assert_eq!(p, SecondPred::of(Ok(None)));
        let p = gsam_second(1e13, 1e9, &[vec![1e308, 0.0]], &[vec![1e-300; 2]]).expect("ok");
        assert_eq!(p.outcome, Err("NormOverflow"));
    }

    #[test]
    fn folds_round_to_the_element_type() {
        let snap = GroupSnap {
            w: vec![1.0, 3.0],
            g: vec![0.0; 2],
            slots: std::array::from_fn(|i| (i == 6).then(|| vec![0.1, 0.0])),
        };
        let mut fold = [None; MAX_AVERAGES];
        fold[1] = Some(1.0 / 3.0);
        let f = apply_fold(std::slice::from_ref(&snap), Some(&fold), false);
        let want: Vec<f64> = [0.1 + (1.0 - 0.1) / 3.0, 1.0]
            .iter()
            .map(|x| f64::from(*x as f32))
            .collect();
        assert_eq!(f[0].slot(Slot::Average(1)), Some(&want[..]));
        assert_eq!(
            apply_fold(std::slice::from_ref(&snap), None, false),
            vec![snap]
        );
    }
}
