//! The `looksam` check: LookSAM (`sam_core::LookSam`) with hostile gradients and checkpoint
//! resumes in the middle of a run.
//!
//! The input picks the climb (SAM or ASAM), `k ∈ 1..=4`, α (0, 0.7, 1 or 3.5), a storage type,
//! two groups (SGD with momentum; Adam) of a few elements with values from [`palette`](crate::palette), and up
//! to 12 closure steps, each with gradients from the palette (NaN and ±∞ included) or the
//! gradient of a quadratic. The same gradients drive three runs:
//!
//! - `look`: LookSAM, sometimes replaced between steps by a fresh LookSAM and fresh groups (the
//!   weights copied, as a framework would restore its model) loaded from a checkpoint;
//! - `whole`: the same LookSAM, never interrupted;
//! - for α = 0 or `k = 1`, the composition: SAM on the refresh steps (`t % k == 0`), the plain
//!   `BaseOptimizer` on the others, each resumed at step `t`.
//!
//! The check asserts:
//!
//! - nothing panics;
//! - `look` has `whole`'s outcomes and, after every step, its bits (weights, stored direction,
//!   base state; NaN payloads aside): a resumed run continues bit for bit;
//! - with α = 0 or `k = 1`, the outcomes, the gradient evaluations and the weights and base
//!   state are the composition's, bit for bit (up to the first refresh refused with
//!   `NormOverflow`, which SAM has no reason to refuse: the composition stops there);
//! - a step that is not applied changes no weight and no base state, and a one-gradient step
//!   leaves the stored direction as it was;
//! - after an applied refresh with a finite stored direction, that direction is orthogonal to
//!   the clean gradient: `|⟨g_v, g⟩| ≤ (16 + 2n)·u·‖g_s‖·‖g‖ + Σ|g_i|·d` for `n` elements,
//!   unit roundoff `u` and smallest subnormal `d` of the storage type (each element of `g_v`
//!   is formed in `f64` and rounded once; the coefficient comes from `f64` sums of `n` terms),
//!   where the stash holds `s·g_v` with `s = 1` or, for extreme `f64` gradients, the power of
//!   two `kernel::scale_for(max |g_s|)`; asserted when the largest magnitudes of `g` and `g_s`
//!   lie in `[1e-290, 1e290]` (every `f32` value), where `LookSam` promises it.

use sam_core::backend::{Real, Slot, kernel};
use sam_core::checkpoint::Checkpoint;
use sam_core::{
    BaseOptimizer, LookSam, LookSamConfig, Optimizer, OptimizerState, Perturbation, Sam, SamConfig,
};

use crate::checkpoint::sgd_adam_groups;
use crate::interval::{Groups, draw_grad, groups, slot_bits, state_bits, step, step_seen};
use crate::src::Src;
use crate::{Policy, Violation};

/// Runs the check on one input.
pub fn check(data: &[u8], policy: &Policy) {
    let mut s = Src::new(data);
    let r = if s.bool() {
        run::<f32>(&mut s)
    } else {
        run::<f64>(&mut s)
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

fn fail(e: impl std::fmt::Display) -> Violation {
    Violation::plain(format!("{e}"))
}

/// Fresh groups holding the weights of `gs` (fresh gradient storage and slots).
fn fresh_copy<T: Real>(gs: &Groups<T>) -> Result<Groups<T>, Violation> {
    let lens = [gs[0].buffer.weights().len(), gs[1].buffer.weights().len()];
    let mut flat = gs
        .iter()
        .flat_map(|g| g.buffer.weights().iter().map(|x| x.to_f64()))
        .collect::<Vec<_>>()
        .into_iter();
    sgd_adam_groups(lens, |_| flat.next().unwrap_or(0.0))
}

/// The stored direction of every group, flat.
fn stash<T: Real>(gs: &Groups<T>) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    for g in gs {
        out.extend(g.buffer.slot(Slot::Stash)?.iter().map(|x| x.to_f64()));
    }
    Some(out)
}

/// The orthogonality bound of the module docs, or a violation.
fn check_orthogonal<T: Real>(
    g: &[f64],
    g_s: &[f64],
    g_v: &[f64],
    t: usize,
) -> Result<(), Violation> {
    let max = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let (mg, ms) = (max(g), max(g_s));
    // Outside [1e-290, 1e290] (f64 extremes) the projection coefficient of `LookSam` may be
    // subnormal (its documented limit): no bound is promised there.
    let in_range = |m: f64| (1e-290..=1e290).contains(&m);
    if !(in_range(mg) && in_range(ms) && g_v.iter().all(|x| x.is_finite())) {
        return Ok(());
    }
    let (u, d) = if T::NAME == "f32" {
        (f64::from(f32::EPSILON) / 2.0, f64::from(f32::from_bits(1)))
    } else {
        (f64::EPSILON / 2.0, f64::from_bits(1))
    };
    // Every vector divided by its largest magnitude (g_v by g_s's), so that nothing here
    // overflows or underflows; both sides of the bound scale alike.
    let g: Vec<f64> = g.iter().map(|x| x / mg).collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let g_s: Vec<f64> = g_s.iter().map(|x| x / ms).collect();
    let n = g.len() as f64;
    let rhs = (16.0 + 2.0 * n) * u * dot(&g_s, &g_s).sqrt() * dot(&g, &g).sqrt()
        + g.iter().map(|x| x.abs()).sum::<f64>() * (d / ms);
    // The stash holds s·g_v, with s = 1, or the power of two the norms of extreme f64
    // gradients are computed at (`kernel::scale_for(max |g_s|)`, see `LookSam`).
    let lhs = [1.0, kernel::scale_for(ms)]
        .map(|scale| dot(g_v, &g).abs() / scale / ms)
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    if lhs > rhs {
        return Err(Violation::plain(format!(
            "step {t}: the stored direction is not orthogonal to the clean gradient: \
             |<g_v, g>| = {lhs:e} > {rhs:e} (in units of max|g|·max|g_s|)"
        )));
    }
    Ok(())
}

fn run<T: Real>(s: &mut Src<'_>) -> Result<(), Violation> {
    let perturbation = if s.bool() {
        Perturbation::sam(0.05)
    } else {
        Perturbation::asam(0.5, 0.01)
    };
    let cfg = LookSamConfig {
        perturbation,
        k: s.int(1, 4),
        alpha: s.pick(&[0.0, 0.7, 1.0, 3.5]),
    };
    let make = || LookSam::new(cfg).map_err(fail);
    let mut look = make()?;
    let mut whole = make()?;
    let mut composed = (cfg.alpha == 0.0 || cfg.k == 1)
        .then(|| Sam::new(SamConfig::from(perturbation)).map(|sam| (sam, BaseOptimizer::new())))
        .transpose()
        .map_err(fail)?;
    let mut a = groups::<T>(s)?;
    let mut w = a.clone();
    let mut c = a.clone();
    let lens: Vec<usize> = a.iter().map(|g| g.buffer.weights().len()).collect();
    for t in 0..s.usize(1, 12) {
        if s.chance(1, 3) {
            let ckpt = Checkpoint::save(&look, &a)
                .map_err(|e| Violation::plain(format!("step {t}: save between steps: {e}")))?;
            let mut fresh = fresh_copy(&a)?;
            let mut resumed = make()?;
            ckpt.load(&mut resumed, &mut fresh).map_err(|e| {
                Violation::plain(format!("step {t}: load of its own checkpoint: {e}"))
            })?;
            (look, a) = (resumed, fresh);
        }
        let grads = [draw_grad(s, &lens), draw_grad(s, &lens)];
        let steps = whole.steps();
        let refresh = whole.refreshes();
        if refresh != (steps % cfg.k == 0) || look.refreshes() != refresh {
            return Err(Violation::plain(format!(
                "step {t}: refreshes() at step {steps} with k = {}",
                cfg.k
            )));
        }
        let (before, stash_before) = (state_bits(&w), stash(&w));
        let (got, calls) = step(&mut look, &mut a, &grads);
        let (want, seen) = step_seen(&mut whole, &mut w, &grads);
        if got != want || calls != seen.len() || slot_bits(&a, true) != slot_bits(&w, true) {
            return Err(Violation::plain(format!(
                "step {t}: the resumed run ({got}, {calls} calls) differs from the uninterrupted \
                 one ({want}, {} calls) in outcome or bits",
                seen.len()
            )));
        }
        let applied = want == "applied";
        // Weights first, then the base state, which does not exist before the first step
        // (a prefix then compares the weights).
        let after = state_bits(&w);
        let kept = before.iter().zip(&after).all(|(b, a)| a.starts_with(b));
        if !applied && !kept {
            return Err(Violation::plain(format!(
                "step {t}: {want} changed weights or base state"
            )));
        }
        if !refresh && stash(&w) != stash_before {
            return Err(Violation::plain(format!(
                "step {t}: a one-gradient step ({want}) changed the stored direction"
            )));
        }
        if refresh && applied {
            if let (Some(g_v), [g, g_s]) = (stash(&w), seen.as_slice()) {
                check_orthogonal::<T>(g, g_s, &g_v, t)?;
            }
        }
        if let Some((sam, base)) = composed.as_mut() {
            let resume = OptimizerState { steps };
            let (theirs, their_calls) = if refresh {
                sam.load_state(&resume).map_err(fail)?;
                step(sam, &mut c, &grads)
            } else {
                base.load_state(&resume).map_err(fail)?;
                step(base, &mut c, &grads)
            };
            if refresh && want.contains("overflow") && theirs == "applied" {
                // LookSAM's projection coefficient overflowed f64 where SAM needs none.
                composed = None;
                continue;
            }
            if want != theirs || seen.len() != their_calls || state_bits(&w) != state_bits(&c) {
                return Err(Violation::plain(format!(
                    "step {t} (k = {}, alpha = {}, refresh {refresh}): {want} with {} calls, \
                     the composition {theirs} with {their_calls}, or their bits differ",
                    cfg.k,
                    cfg.alpha,
                    seen.len()
                )));
            }
        }
    }
    Ok(())
}
