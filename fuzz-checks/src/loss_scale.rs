//! The `loss_scale` check: a run under a declared loss scale (`Optimizer::set_grad_scale`)
//! against an unscaled twin, with the scale driven by `sam_core::LossScaler` as
//! `torch.amp.GradScaler` drives it.
//!
//! The input picks a variant (SAM, ASAM, GSAM, WSAM, WASAM, each sometimes inside an
//! `Interval` of `k ∈ 1..=4`; the plain `BaseOptimizer`; LookSAM), a storage type (`f32`,
//! `f64`, `bf16`, `f16`), two groups (SGD with momentum; Adam) of a few elements from [`palette`], a
//! `LossScaler` (`init_scale` 2^k, k ≤ 24 and sometimes ≤ 126; growth 2, backoff ½, growth
//! interval 1–4) and up to 12 closure steps, each with gradients `ĝ` from the palette (NaN and
//! ±∞ included) or the gradient `w − ½` of a quadratic at the twin's own weights, rounded to
//! the storage type. Twin A declares no scale (or `S = 1`) and stores `ĝ`; twin B declares
//! `S = scaler.scale()` before each step (sometimes a raw palette value instead), stores
//! `T(S·ĝ)`, and calls `scaler.update(skipped)` after it. The check asserts:
//!
//! - nothing panics;
//! - `set_grad_scale(S)` succeeds exactly when `S > 0`, `S` finite and `1/S` normal, and then
//!   holds `S`; otherwise it fails with `InvalidHyperparameter { name: "grad_scale" }` and the
//!   scale is unchanged;
//! - while the twins agree and `S` is a power of two: if every stored value of B's closure calls
//!   is exactly `S·ĝ` (or a NaN/∞ where `ĝ` has one too), B's step has A's outcome and number
//!   of gradient evaluations, and every weight and every slot is bit for bit A's (NaNs all
//!   alike);
//! - if instead a call of B stored a NaN/∞ (an overflow of `S·ĝ`) while that call's `ĝ` was
//!   finite, B's step is skipped (`StepStatus::Skipped`) with its weights and persistent slots
//!   (base state, averages; a slot prepared by the step aside) bit for bit as before the step
//!   (backup and stash are scratch: a skipped LookSAM refresh leaves the clean gradient there);
//! - after that, or after an inexact `S·ĝ` (an underflow below `S = 1`) or a raw scale that is
//!   not a power of two, the twins may legitimately diverge: B goes on alone, and while its run
//!   stays in the finiteness class of the crate (weights and consumed gradients `g/S` within
//!   [`BOUND_VALUE`], slots within [`BOUND_SLOT`], at most 16 gradient evaluations) its weights
//!   and persistent slots stay finite.

use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{
    BaseOptimizer, Error, Group, Interval, LookSam, LookSamConfig, LossScaler, LossScalerConfig,
    Optimizer, Perturbation, Sam, SamConfig, SamOptimizer, Wasam, Wsam, WsamConfig,
    backend::{Real, Slot},
};

use crate::inspect::{canonical_bits, kept};
use crate::interval::{Grad, Groups, draw_grad, groups, gsam};
use crate::palette;
use crate::src::Src;
use crate::step::{BOUND_SLOT, BOUND_VALUE};
use crate::{Policy, Violation};

/// Runs the check on one input.
pub fn check(data: &[u8], policy: &Policy) {
    let mut s = Src::new(data);
    let sam = || Sam::new(SamConfig::default());
    let r = match s.int(0, 6) {
        0 => wrapped(&mut s, sam()),
        1 => wrapped(&mut s, Sam::new(Perturbation::asam(0.5, 0.01).into())),
        2 => wrapped(&mut s, gsam()),
        3 => wrapped(&mut s, Wsam::new(WsamConfig::default())),
        4 => wrapped(&mut s, Wasam::new(SamConfig::default(), &[0, 2])),
        5 => storage(&mut s, BaseOptimizer::new()),
        _ => {
            let cfg = LookSamConfig {
                k: s.int(1, 3),
                alpha: s.pick(&[0.0, 0.7, 1.0]),
                ..LookSamConfig::default()
            };
            LookSam::new(cfg)
                .map_err(|e| Violation::plain(format!("config: {e}")))
                .and_then(|o| storage(&mut s, o))
        }
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

/// The variant, or (sometimes) SAM every `k` steps of it.
fn wrapped<O: SamOptimizer + Clone>(
    s: &mut Src<'_>,
    made: Result<O, Error>,
) -> Result<(), Violation> {
    let opt = made.map_err(|e| Violation::plain(format!("config: {e}")))?;
    if s.chance(1, 4) {
        let every =
            Interval::new(opt, s.int(1, 4)).map_err(|e| Violation::plain(format!("{e}")))?;
        storage(s, every)
    } else {
        storage(s, opt)
    }
}

/// [`run`] with the storage type the input picks.
fn storage<O: Optimizer + Clone>(s: &mut Src<'_>, opt: O) -> Result<(), Violation> {
    match s.int(0, 3) {
        0 => run::<O, f32>(s, opt),
        1 => run::<O, f64>(s, opt),
        2 => run::<O, half::bf16>(s, opt),
        _ => run::<O, half::f16>(s, opt),
    }
}

/// One closure call: the gradient `ĝ` (in `T`, widened) and the value stored for it, flat over
/// the groups.
struct Call {
    g: Vec<f64>,
    stored: Vec<f64>,
}

/// One closure step storing `T(scale·ĝ)`: the outcome as text, whether it was skipped, and the
/// closure calls.
fn step<O: Optimizer, T: Real>(
    opt: &mut O,
    gs: &mut Groups<T>,
    grads: &[Grad; 2],
    scale: f64,
) -> (String, bool, Vec<Call>) {
    let mut calls: Vec<Call> = Vec::new();
    let r = opt.step(gs, |gs: &mut [Group<VecBuffer<T>>]| {
        let grad = &grads[calls.len().min(1)];
        let mut call = Call {
            g: Vec::new(),
            stored: Vec::new(),
        };
        for (k, group) in gs.iter_mut().enumerate() {
            let (w, out) = group.buffer.weights_and_grad();
            for (i, (o, w)) in out.iter_mut().zip(w).enumerate() {
                let g = <T as Real>::from_f64(match grad {
                    Grad::Values(v) => v[k][i],
                    Grad::Quadratic => w.to_f64() - 0.5,
                })
                .to_f64();
                *o = <T as Real>::from_f64(scale * g);
                call.g.push(g);
                call.stored.push(o.to_f64());
            }
        }
        calls.push(call);
        Ok::<_, Error<SliceError>>(())
    });
    let (out, skipped) = match r {
        Ok(report) => (format!("{:?}", report.status), report.status.is_skipped()),
        Err(e) => (format!("error: {e}"), false),
    };
    (out, skipped, calls)
}

/// How B's stored gradients of one step relate to the unscaled `ĝ`, at its first call that
/// is not [`Exact`](Stored::Exact).
#[derive(Debug, PartialEq)]
enum Stored {
    /// Every value is `S·ĝ` exactly: `stored·(1/S) = ĝ` bit for bit.
    Exact,
    /// A NaN/∞ in a call whose `ĝ` holds one too: both twins see a non-finite gradient there.
    BothNonFinite,
    /// A NaN/∞ in a call whose `ĝ` is finite: `S·ĝ` overflowed the storage type.
    Overflow,
    /// A finite value that is not `S·ĝ` (underflow below `S = 1`).
    Inexact,
}

fn classify(calls: &[Call], unscale: f64) -> Stored {
    for c in calls {
        if c.stored.iter().any(|x| !x.is_finite()) {
            return if c.g.iter().any(|x| !x.is_finite()) {
                Stored::BothNonFinite
            } else {
                Stored::Overflow
            };
        }
        let exact = |(x, g): (&f64, &f64)| (x * unscale).to_bits() == g.to_bits();
        if !c.stored.iter().zip(&c.g).all(exact) {
            return Stored::Inexact;
        }
    }
    Stored::Exact
}

/// A positive normal power of two.
fn power_of_two(x: f64) -> bool {
    x.is_normal() && x > 0.0 && x.to_bits() & ((1u64 << 52) - 1) == 0
}

/// Weights and the slots `keep` selects (`None` while not prepared), per group, as bits (NaNs
/// all alike).
fn bits<T: Real>(gs: &Groups<T>, keep: impl Fn(Slot) -> bool) -> Vec<Option<Vec<u64>>> {
    let canon = |v: &[T]| v.iter().map(|x| canonical_bits(*x)).collect::<Vec<u64>>();
    let mut out = Vec::new();
    for g in gs {
        let b = &g.buffer;
        out.push(Some(canon(b.weights())));
        for role in Slot::ALL.into_iter().filter(|r| keep(*r)) {
            out.push(b.slot(role).map(canon));
        }
    }
    out
}

/// Whether `now` holds what `before` held (a slot prepared since is not compared).
fn unchanged(before: &[Option<Vec<u64>>], now: &[Option<Vec<u64>>]) -> bool {
    before.len() == now.len() && before.iter().zip(now).all(|(b, n)| b.is_none() || b == n)
}

/// Whether every value is finite (NaN as canonicalised by [`bits`] included).
fn finite(v: &[Option<Vec<u64>>]) -> bool {
    v.iter()
        .flatten()
        .flatten()
        .all(|x| f64::from_bits(*x).is_finite())
}

/// Whether every weight lies within `BOUND_VALUE` and every kept slot within `BOUND_SLOT`.
fn in_class<T: Real>(gs: &Groups<T>, keep: impl Fn(Slot) -> bool) -> bool {
    let within = |v: &[T], b: f64| v.iter().all(|x| x.to_f64().abs() <= b);
    gs.iter().all(|g| {
        let b = &g.buffer;
        within(b.weights(), BOUND_VALUE)
            && Slot::ALL
                .into_iter()
                .filter(|r| keep(*r))
                .all(|r| within(b.slot(r).unwrap_or(&[]), BOUND_SLOT))
    })
}

fn run<O: Optimizer + Clone, T: Real>(s: &mut Src<'_>, opt: O) -> Result<(), Violation> {
    let name: String = std::any::type_name::<O>()
        .split_inclusive('<')
        .map(|part| part.rsplit("::").next().unwrap_or(part))
        .collect();
    let fail = |m: String| Err(Violation::plain(format!("{name} in {}: {m}", T::NAME)));
    let (mut oa, mut ob) = (opt.clone(), opt);
    if s.bool() && oa.set_grad_scale(1.0).is_err() {
        return fail("set_grad_scale(1) refused".into());
    }
    let init = if s.chance(1, 4) {
        s.int(0, 126)
    } else {
        s.int(0, 24)
    };
    let config = LossScalerConfig {
        init_scale: 2f64.powi(init as i32),
        growth_factor: 2.0,
        backoff_factor: 0.5,
        growth_interval: s.int(1, 4) as u32,
    };
    let mut scaler = LossScaler::new(config).map_err(|e| Violation::plain(format!("{e}")))?;
    let mut a = groups::<T>(s)?;
    let mut b = a.clone();
    let lens: Vec<usize> = a.iter().map(|g| g.buffer.weights().len()).collect();
    let (mut comparing, mut class, mut evaluations) = (true, true, 0);
    for t in 0..s.usize(1, 12) {
        let grads = [draw_grad(s, &lens), draw_grad(s, &lens)];
        let want = if !s.chance(7, 8) {
            palette::hyper(s, 1e-3, 1e6)
        } else {
            scaler.scale()
        };
        let valid = want > 0.0 && want.is_finite() && (1.0 / want).is_normal();
        let prev = ob.grad_scale();
        match ob.set_grad_scale(want) {
            Ok(()) if valid && ob.grad_scale().to_bits() == want.to_bits() => {}
            Err(Error::InvalidHyperparameter {
                name: "grad_scale", ..
            }) if !valid && ob.grad_scale().to_bits() == prev.to_bits() => {}
            r => {
                let now = ob.grad_scale();
                return fail(format!(
                    "step {t}: set_grad_scale({want:e}) gave {r:?} (scale {prev:e} -> {now:e}; valid {valid})"
                ));
            }
        }
        let scale = ob.grad_scale();
        let kept_before = bits(&b, kept);
        let class_before = class && in_class(&b, kept);
        let (got, skipped, calls) = step(&mut ob, &mut b, &grads, scale);
        scaler.update(skipped);
        evaluations += calls.len();
        let consumed_ok = calls.iter().all(|c| {
            c.stored
                .iter()
                .all(|x| (x * (1.0 / scale)).abs() <= BOUND_VALUE)
        });
        class = class_before && consumed_ok && evaluations <= 16;
        let ctx = format!("step {t} at scale {scale:e}: {got}");
        if comparing {
            let how = if power_of_two(scale) {
                classify(&calls, 1.0 / scale)
            } else {
                Stored::Inexact
            };
            match how {
                Stored::Exact | Stored::BothNonFinite => {
                    let (want, _, calls_a) = step(&mut oa, &mut a, &grads, 1.0);
                    if got != want || calls.len() != calls_a.len() {
                        return fail(format!(
                            "{ctx} with {} calls, the unscaled twin {want} with {} ({how:?})",
                            calls.len(),
                            calls_a.len()
                        ));
                    }
                    if bits(&a, |_| true) != bits(&b, |_| true) {
                        return fail(format!(
                            "{ctx} ({how:?}): weights or slots differ from the unscaled twin"
                        ));
                    }
                }
                Stored::Overflow if !skipped => {
                    return fail(format!(
                        "{ctx}: S·ĝ overflowed but the step was not skipped"
                    ));
                }
                Stored::Overflow | Stored::Inexact => comparing = false,
            }
        }
        if skipped && !unchanged(&kept_before, &bits(&b, kept)) {
            return fail(format!(
                "{ctx}: a skip changed the weights or persistent slots"
            ));
        }
        // The finiteness class is that of `f32` and `f64` storage.
        if class && matches!(T::NAME, "f32" | "f64") && !finite(&bits(&b, kept)) {
            return fail(format!(
                "{ctx}: non-finite weights or slots from the finiteness class"
            ));
        }
    }
    Ok(())
}
