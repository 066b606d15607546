//! The world a sequence of calls runs in (optimizer, groups, the model's record) and the
//! executors of the first step, recovery and swaps.

use super::*;

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
pub struct World<B, O> {
    /// All groups (the first `active` are passed to the optimizer).
    pub groups: Vec<Group<B>>,
    /// Slot memory of each group, in values (`usize::MAX` for allocating backends).
    pub caps: Vec<usize>,
    /// The slot layout each group's buffer was last prepared for (`None`: never prepared).
    pub prepared: Vec<Option<SlotSpec>>,
    /// Number of groups passed.
    pub active: usize,
    /// The optimizer.
    pub opt: O,
    /// The optimizer as first built (what a resumed run builds before loading a checkpoint).
    pub initial: O,
    /// Values are `f64` (else `f32`).
    pub f64: bool,
}

pub(crate) fn snaps<B: Inspect>(groups: &[Group<B>]) -> Vec<GroupSnap> {
    groups.iter().map(|g| GroupSnap::of(&g.buffer)).collect()
}

/// A snapshot without its slots (when a call prepares a buffer for another slot layout, the
/// roles before and after cannot be compared).
pub(crate) fn strip(mut v: Vec<GroupSnap>, yes: bool) -> Vec<GroupSnap> {
    if yes {
        for s in &mut v {
            s.slots = Default::default();
        }
    }
    v
}

/// The position of a role in [`Slot::ALL`] (and in [`GroupSnap::slots`]).
pub(crate) fn role_index(role: Slot) -> Option<usize> {
    Slot::ALL.iter().position(|r| *r == role)
}

impl<B: Inspect, O: Drawn> World<B, O> {
    pub(crate) fn act(&self) -> &[Group<B>] {
        &self.groups[..self.active]
    }

    /// The slot layout group `i` needs now.
    pub(crate) fn spec(&self, i: usize) -> SlotSpec {
        self.opt.slot_spec(&self.groups[i].options)
    }

    /// Whether an active group's buffer was last prepared for another slot layout than the one
    /// its options need now.
    pub(crate) fn respec(&self) -> bool {
        (0..self.active).any(|i| self.prepared[i].is_some_and(|p| p != self.spec(i)))
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

    pub(crate) fn write(&mut self, r: &Recipe) {
        let n = self.active;
        write_recipe(&mut self.groups[..n], r);
    }

    pub(crate) fn params(&self) -> Vec<Option<PerturbParams>> {
        self.act()
            .iter()
            .map(|g| self.opt.perturb_params(&g.options))
            .collect()
    }

    /// Whether the next call starts inside the finiteness class (gradients are judged after).
    pub(crate) fn class_pre(&self, m: &Model) -> bool {
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
                && Slot::ALL.iter().filter(|r| kept(**r)).all(|r| {
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
    pub(crate) fn note(&mut self, m: &mut Model, f: &First) {
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
    ///
    /// A step that does not climb (LookSAM between refreshes, a plain step of `Interval`)
    /// checks that the lr each group uses is `≥ 0` and finite (`InvalidHyperparameter`), then
    /// [`predict_begin`](Self::predict_begin), then that the gradient is finite.
    pub fn predict_first(&self, m: &Model, g1: &[Vec<f64>]) -> First {
        if !self.opt.climbs() {
            if self.act().iter().any(|g| {
                let lr = self.opt.lr_used(&g.options);
                !(lr >= 0.0 && lr.is_finite())
            }) {
                return First::refused(Pred::InvalidHyper);
            }
            let mut f = self.predict_begin(m);
            if f.pred == Pred::Ok && any_nonfinite(g1) {
                f.pred = Pred::NonFinite;
            }
            return f;
        }
        if let Some(v) = self.opt.gsam() {
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

/// Writes the gradient recipe `r` into the groups' gradient storage (a [`Recipe::Sum`] the way a
/// framework accumulates micro-batches: zeroes the storage, then adds each part in place).
pub(crate) fn write_recipe<B: Inspect>(groups: &mut [Group<B>], r: &Recipe) {
    let is_f64 = <B::Scalar as Real>::NAME == "f64";
    for (gi, g) in groups.iter_mut().enumerate() {
        let w = g.buffer.weights_f64();
        let Recipe::Sum(parts) = r else {
            if let Some(v) = r.values(gi, &w, is_f64) {
                g.buffer.set_grads(&v);
            }
            continue;
        };
        g.buffer.set_grads(&vec![0.0; w.len()]);
        for p in parts {
            if let Some(v) = p.values(gi, &w, is_f64) {
                let sum: Vec<f64> = g
                    .buffer
                    .grads_f64()
                    .iter()
                    .zip(&v)
                    .map(|(a, x)| a + x)
                    .collect();
                g.buffer.set_grads(&sum);
            }
        }
    }
}

pub(crate) fn grads_of<B: Inspect>(groups: &[Group<B>]) -> Vec<Vec<f64>> {
    groups.iter().map(|g| g.buffer.grads_f64()).collect()
}

pub(crate) fn all_within(v: &[Vec<f64>], bound: f64) -> bool {
    v.iter().flatten().all(|x| x.abs() <= bound)
}

pub(crate) fn any_nonfinite(v: &[Vec<f64>]) -> bool {
    v.iter().flatten().any(|x| !x.is_finite())
}

#[derive(Debug)]
pub(crate) enum Fail<E> {
    Core(Error<E>),
    Closure,
}

impl<E> From<Error<E>> for Fail<E> {
    fn from(e: Error<E>) -> Self {
        Fail::Core(e)
    }
}

/// What happened between a successful first step and the end of its phase.
pub(crate) struct FirstOut {
    pub(crate) perturbed: Vec<GroupSnap>,
    pub(crate) g2: Vec<Vec<f64>>,
    pub(crate) result: Option<Result<StepStatus, &'static str>>,
}

/// `first_step`, write `g2`, finish; the guard's borrows end when this returns.
pub(crate) fn run_first<V: SamOptimizer, B: Inspect>(
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

pub(crate) fn recover_opt<B: ParamBuffer, O: Drawn>(
    opt: &mut O,
    groups: &mut [Group<B>],
) -> Option<Result<(), Error<B::Error>>> {
    match opt.form() {
        Form::Sam(o) => Some(o.recover(groups)),
        Form::Base(_) => None,
    }
}

/// What a successful swap did.
pub(crate) struct SwapOut {
    pub(crate) swapped: Vec<GroupSnap>,
    pub(crate) touched: Vec<Vec<f64>>,
    pub(crate) back: Option<Result<(), &'static str>>,
}

pub(crate) fn run_swap<B: Inspect>(
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
            if let Some(vals) = t.values(gi, &cur, <B::Scalar as Real>::NAME == "f64") {
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
