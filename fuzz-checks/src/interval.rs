//! The `interval` check: SAM every k steps (`sam_core::Interval`) against an independent
//! composition, with hostile gradients and checkpoints in the middle of a run.
//!
//! The input picks a variant (SAM, ASAM, GSAM, WSAM, WASAM), `k ∈ 1..=4`, a storage type, two
//! groups (SGD with momentum; Adam) of a few elements with values from [`palette`], and up to
//! 12 closure steps, each with gradients from the palette (NaN and ±∞ included) or the
//! gradient of a quadratic. Some steps are preceded by a checkpoint save and a load into a
//! fresh `Interval` (the groups kept). The same gradients drive the composition: the plain
//! `BaseOptimizer` on steps `t` with `(t + 1) % k ≠ 0`, the variant on the others, each resumed
//! at step `t`. The check asserts:
//!
//! - nothing panics;
//! - every step's outcome (applied, skipped, or the error) is the composition's;
//! - the weights and the base-state slots are bit for bit the composition's after every step
//!   (NaN payloads aside), and the number of gradient evaluations is the same;
//! - a checkpoint taken between steps loads into a fresh `Interval` and changes no weight (and
//!   the run goes on equal to the composition).

use sam_core::checkpoint::Checkpoint;
use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{
    BaseOptimizer, Error, Group, Gsam, GsamConfig, Interval, Optimizer, OptimizerState,
    Perturbation, RhoSchedule, Sam, SamConfig, SamOptimizer, Schedule, StepStatus, Wasam,
    WasamState, Wsam, WsamConfig,
    backend::{Real, Slot},
};

use crate::checkpoint::sgd_adam_groups;
use crate::inspect::canonical_bits;
use crate::palette;
use crate::src::Src;
use crate::{Policy, Violation};

/// Runs the check on one input.
pub fn check(data: &[u8], policy: &Policy) {
    let mut s = Src::new(data);
    let r = match s.int(0, 4) {
        0 => either(&mut s, || Sam::new(SamConfig::default())),
        1 => either(&mut s, || Sam::new(Perturbation::asam(0.5, 0.01).into())),
        2 => either(&mut s, gsam),
        3 => either(&mut s, || Wsam::new(WsamConfig::default())),
        _ => either(&mut s, || Wasam::new(SamConfig::default(), &[0, 2])),
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

/// [`run`] with `f32` or `f64` storage, as the input says.
fn either<O>(
    s: &mut Src<'_>,
    make: impl Fn() -> Result<O, sam_core::Error>,
) -> Result<(), Violation>
where
    O: SamOptimizer + Clone,
    O::State: Resume + Clone,
{
    if s.bool() {
        run::<O, f32>(s, make)
    } else {
        run::<O, f64>(s, make)
    }
}

/// The GSAM every check of this kind runs: ρ = 0.05 constant, α = 0.3.
pub(crate) fn gsam() -> Result<Gsam, sam_core::Error> {
    let rho = RhoSchedule::Schedule(Schedule::constant(0.05)?);
    Gsam::new(GsamConfig {
        alpha: 0.3,
        ..GsamConfig::new(rho)
    })
}

/// The variant's checkpoint with the step count replaced (the composition resumes each
/// optimizer at the step it takes).
trait Resume: Sized {
    fn at(self, steps: u64) -> Self;
}

impl Resume for OptimizerState {
    fn at(self, steps: u64) -> Self {
        OptimizerState { steps }
    }
}

impl Resume for WasamState {
    fn at(self, steps: u64) -> Self {
        WasamState { steps, ..self }
    }
}

pub(crate) type Groups<T> = Vec<Group<VecBuffer<T>>>;

pub(crate) fn groups<T: Real>(s: &mut Src<'_>) -> Result<Groups<T>, Violation> {
    let lens = [s.usize(0, 6), s.usize(0, 6)];
    sgd_adam_groups(lens, |_| palette::element(s))
}

/// One call's gradients: palette values, or `w − 0.5` (finite for finite weights).
#[derive(Clone)]
pub(crate) enum Grad {
    Values(Vec<Vec<f64>>),
    Quadratic,
}

pub(crate) fn draw_grad(s: &mut Src<'_>, lens: &[usize]) -> Grad {
    if s.chance(1, 2) {
        return Grad::Quadratic;
    }
    Grad::Values(
        lens.iter()
            .map(|&n| (0..n).map(|_| palette::element(s)).collect())
            .collect(),
    )
}

pub(crate) fn write<T: Real>(gs: &mut [Group<VecBuffer<T>>], grad: &Grad) {
    for (k, g) in gs.iter_mut().enumerate() {
        let (w, out) = g.buffer.weights_and_grad();
        for (i, (o, w)) in out.iter_mut().zip(w).enumerate() {
            *o = T::from_f64(match grad {
                Grad::Values(v) => v[k][i],
                Grad::Quadratic => w.to_f64() - 0.5,
            });
        }
    }
}

/// One closure step with the drawn gradients (two calls on climbing steps): the outcome as
/// text, and the number of closure calls made.
pub(crate) fn step<O: Optimizer, T: Real>(
    opt: &mut O,
    gs: &mut Groups<T>,
    grads: &[Grad],
) -> (String, usize) {
    let (out, seen) = step_seen(opt, gs, grads);
    (out, seen.len())
}

/// [`step`], also returning the gradient each closure call wrote (flat over the groups, as
/// stored).
pub(crate) fn step_seen<O: Optimizer, T: Real>(
    opt: &mut O,
    gs: &mut Groups<T>,
    grads: &[Grad],
) -> (String, Vec<Vec<f64>>) {
    let mut seen: Vec<Vec<f64>> = Vec::new();
    let r = opt.step(gs, |gs: &mut [Group<VecBuffer<T>>]| {
        write(gs, &grads[seen.len().min(grads.len() - 1)]);
        let flat = gs
            .iter()
            .flat_map(|g| g.buffer.grad().iter().map(|x| x.to_f64()));
        seen.push(flat.collect());
        Ok::<_, Error<SliceError>>(())
    });
    let out = match r {
        Ok(report) => match report.status {
            StepStatus::Applied => "applied".to_string(),
            other => format!("{other:?}"),
        },
        Err(e) => format!("error: {e}"),
    };
    (out, seen)
}

/// Weights and base-state slots as bits (NaNs all alike).
pub(crate) fn state_bits<T: Real>(gs: &Groups<T>) -> Vec<Vec<u64>> {
    slot_bits(gs, false)
}

/// Weights, the stash when `stash` (and prepared), and the base-state slots, as bits (NaNs all
/// alike).
pub(crate) fn slot_bits<T: Real>(gs: &Groups<T>, stash: bool) -> Vec<Vec<u64>> {
    let canon = |x: &T| canonical_bits(*x);
    gs.iter()
        .map(|g| {
            let b = &g.buffer;
            let mut v: Vec<u64> = b.weights().iter().map(canon).collect();
            if let Some(spec) = b.spec() {
                let stash = (stash && spec.stash).then_some(Slot::Stash);
                for r in stash.into_iter().chain((0..spec.state).map(Slot::State)) {
                    v.extend(b.slot(r).unwrap_or(&[]).iter().map(canon));
                }
            }
            v
        })
        .collect()
}

fn run<O, T>(
    s: &mut Src<'_>,
    make: impl Fn() -> Result<O, sam_core::Error>,
) -> Result<(), Violation>
where
    O: SamOptimizer + Clone,
    O::State: Resume + Clone,
    T: Real,
{
    let k = s.int(1, 4);
    let fixed =
        |r: Result<O, sam_core::Error>| r.map_err(|e| Violation::plain(format!("config: {e}")));
    let mut every =
        Interval::new(fixed(make())?, k).map_err(|e| Violation::plain(format!("{e}")))?;
    let mut climber = fixed(make())?;
    let mut base = BaseOptimizer::new();
    let mut a = groups::<T>(s)?;
    let mut b = a.clone();
    let lens: Vec<usize> = a.iter().map(|g| g.buffer.weights().len()).collect();
    for t in 0..s.usize(1, 12) {
        if s.chance(1, 4) {
            // A checkpoint between steps, loaded into a fresh Interval; the groups are kept.
            let weights = |gs: &Groups<T>| -> Vec<Vec<u64>> {
                gs.iter()
                    .map(|g| {
                        g.buffer
                            .weights()
                            .iter()
                            .map(|x| x.to_f64().to_bits())
                            .collect()
                    })
                    .collect()
            };
            let before = weights(&a);
            let ckpt = Checkpoint::save(&every, &a)
                .map_err(|e| Violation::plain(format!("step {t}: save between steps: {e}")))?;
            let mut fresh =
                Interval::new(fixed(make())?, k).map_err(|e| Violation::plain(format!("{e}")))?;
            ckpt.load(&mut fresh, &mut a).map_err(|e| {
                Violation::plain(format!("step {t}: load of its own checkpoint: {e}"))
            })?;
            every = fresh;
            if weights(&a) != before {
                return Err(Violation::plain(format!(
                    "step {t}: a checkpoint load changed the weights"
                )));
            }
        }
        let grads = [draw_grad(s, &lens), draw_grad(s, &lens)];
        let steps = every.steps();
        let climbs = every.will_climb();
        if climbs != ((steps + 1) % k == 0) {
            return Err(Violation::plain(format!(
                "step {t}: will_climb at {steps} with k = {k}"
            )));
        }
        let (got, calls_a) = step(&mut every, &mut a, &grads);
        let (want, calls_b) = if climbs {
            let st = climber
                .state()
                .map_err(|e| Violation::plain(format!("{e}")))?
                .at(steps);
            climber
                .load_state(&st)
                .map_err(|e| Violation::plain(format!("{e}")))?;
            step(&mut climber, &mut b, &grads)
        } else {
            base.load_state(&OptimizerState { steps })
                .map_err(|e| Violation::plain(format!("{e}")))?;
            step(&mut base, &mut b, &grads)
        };
        if got != want || calls_a != calls_b {
            return Err(Violation::plain(format!(
                "step {t} (k = {k}, climbs {climbs}): {got} with {calls_a} calls, the composition {want} with {calls_b}"
            )));
        }
        if state_bits(&a) != state_bits(&b) {
            return Err(Violation::plain(format!(
                "step {t} (k = {k}, climbs {climbs}, {got}): weights or base state differ from the composition"
            )));
        }
    }
    Ok(())
}
