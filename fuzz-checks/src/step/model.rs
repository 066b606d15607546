//! The independent model of what a call must produce: the perturbation norm, GSAM's second
//! half on the canonical reduction, WASAM's fold owed, and the scale-safe arithmetic they use.

use super::*;

pub(crate) fn round_to(x: f64, is_f64: bool) -> f64 {
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
pub(crate) fn apply_fold(
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

pub(crate) fn ulp(x: f64, is_f64: bool) -> f64 {
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
pub(crate) fn split(x: f64) -> (f64, i32) {
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
pub(crate) fn ldexp(m: f64, e: i32) -> f64 {
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
pub(crate) fn in_units(a: f64, t: f64, rho: f64, unit: i32) -> f64 {
    if a == 0.0 || !a.is_finite() {
        return if a == 0.0 { 0.0 } else { a };
    }
    let (fa, ea) = split(a);
    let (ft, et) = split(t);
    let (fr, er) = split(rho);
    ldexp(fa / (ft * fr), ea - et - er - unit)
}

pub(crate) fn t_of(p: &Option<PerturbParams>, w: f64) -> f64 {
    match p.and_then(|p| p.eta) {
        Some(eta) => w.abs() + eta,
        None => 1.0,
    }
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

/// A second half's outcome: `Ok(None)` applied, `Ok(Some(skip))`, or an error's name.
pub type SecondOutcome = Result<Option<SkipReason>, &'static str>;

/// The predicted second half, with the open finding a different outcome would be an instance
/// of, if any. `also` is a second outcome that is accepted too: the model's values lie within
/// its error bound of a threshold (an overflow), where rounding decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecondPred {
    /// The outcome.
    pub outcome: SecondOutcome,
    /// Another outcome accepted (a threshold within the model's error bound).
    pub also: Option<SecondOutcome>,
    /// The known finding a different outcome is an instance of.
    pub finding: Option<Finding>,
}

impl SecondPred {
    pub(crate) fn of(outcome: SecondOutcome) -> Self {
        SecondPred {
            outcome,
            also: None,
            finding: None,
        }
    }

    /// The outcome to judge `got` against: `got` itself when it is the accepted alternative,
    /// else the predicted one.
    pub(crate) fn against(&self, got: SecondOutcome) -> SecondOutcome {
        if self.also == Some(got) {
            got
        } else {
            self.outcome
        }
    }
}

/// A step's status or an error's name, as a [`SecondOutcome`].
pub(crate) fn outcome_of(r: &Result<StepStatus, &'static str>) -> SecondOutcome {
    match r {
        Ok(StepStatus::Applied) => Ok(None),
        Ok(StepStatus::Skipped(s)) => Ok(Some(*s)),
        Err(e) => Err(e),
    }
}

/// The second-half prediction (`g1` the clean gradient as stored, `g2` the second one).
pub(crate) fn predict_second(
    j: &Judge,
    finish: Finish,
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
) -> Result<SecondPred, Violation> {
    if !j.climbs {
        // One gradient: `plain_step` applies whatever the buffers hold.
        return Ok(SecondPred::of(Ok(None)));
    }
    if j.looksam_refresh {
        return Ok(looksam_refresh(g1, g2, j.is_f64));
    }
    if finish == Finish::External && j.wsam_decoupled {
        return Ok(SecondPred::of(Err("InvalidGroups")));
    }
    if let Some((alpha, eps)) = j.gsam {
        return Ok(gsam_second(alpha, eps, g1, g2));
    }
    if j.checks_second && any_nonfinite(g2) {
        return Ok(SecondPred::of(Ok(Some(SkipReason::NonFiniteSecond))));
    }
    Ok(SecondPred::of(Ok(None)))
}

/// The prediction of GSAM's second half for clean gradient `g1` (the stash) and second gradient
/// `g2`, per group, from the documented rules (`Gsam`'s docs and `sam_core::Error`) evaluated
/// by an independent model in logarithms (no reduction or rescaling of the core):
///
/// 1. a skip (`NonFiniteSecond`) if `g₂` or the stash holds a NaN/±∞;
/// 2. `NormOverflow` unless `‖g₂‖` and `‖g₁‖` are finite;
/// 3. `cos = ⟨g₁,g₂⟩/(‖g₂‖‖g₁‖ + ε)` (0 when that denominator is 0; when ε dwarfs the norms
///    so far that it is not representable even at the reduction's scales, the core takes 0,
///    which gives the same outcome as the true cosine);
/// 4. `a = 1` when `cos = 0`, else `1 + α·cos·‖g₁‖/(‖g₂‖ + ε)` evaluated left to right in
///    `f64`: `NormOverflow` when `α·cos·‖g₁‖` or the quotient overflows, else applied.
///
/// Every threshold is compared with a margin: the model's logarithms are within `1e-9` of the
/// true values, the cosine within `1e-6` relative plus the products the core may lose below
/// the subnormal range. Where a threshold lies inside the margin, both outcomes are accepted
/// ([`SecondPred::also`]).
pub fn gsam_second(alpha: f64, eps: f64, g1: &[Vec<f64>], g2: &[Vec<f64>]) -> SecondPred {
    let (a, b) = (g1.concat(), g2.concat());
    if any_nonfinite(g1) || any_nonfinite(g2) {
        return SecondPred::of(Ok(Some(SkipReason::NonFiniteSecond)));
    }
    let (ln_n1, ln_n2) = (ln_norm(&a), ln_norm(&b));
    let overflow: SecondOutcome = Err("NormOverflow");
    // Rule 2, with its margin: a norm at the threshold gives overflow or the rest of the rules.
    match (above_max(ln_n1), above_max(ln_n2)) {
        (Some(true), _) | (_, Some(true)) => SecondPred::of(overflow),
        (None, _) | (_, None) => SecondPred {
            outcome: overflow,
            also: Some(coefficient(alpha, eps, &a, &b, ln_n1, ln_n2).outcome),
            finding: None,
        },
        _ => coefficient(alpha, eps, &a, &b, ln_n1, ln_n2),
    }
}

/// The prediction of a LookSAM refresh's second half for clean gradient `g1` (the stash) and
/// SAM gradient `g2`, from `LookSam`'s documented rules, by an independent model in logarithms:
/// a skip (`NonFiniteSecond`) if either holds a NaN/±∞; `NormOverflow` when the projection
/// coefficient at the reduction's scale, `s·⟨g₁, g₂⟩/‖g₁‖²` with `s` the power of two that
/// brings `max |g₂|` into `[½, 1)` (`f64` storage, at most `2^997`-ish; `1` for `f32`), is beyond
/// `f64::MAX`; else applied. Within a factor 8 of the threshold (the model brackets `s` and the
/// dot product, which may cancel) both outcomes are accepted.
pub fn looksam_refresh(g1: &[Vec<f64>], g2: &[Vec<f64>], is_f64: bool) -> SecondPred {
    if any_nonfinite(g1) || any_nonfinite(g2) {
        return SecondPred::of(Ok(Some(SkipReason::NonFiniteSecond)));
    }
    let (applied, overflow): (SecondOutcome, SecondOutcome) = (Ok(None), Err("NormOverflow"));
    let (a, b) = (g1.concat(), g2.concat());
    let ma = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mb = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if ma == 0.0 || mb == 0.0 {
        return SecondPred::of(applied);
    }
    // ⟨a,b⟩ and Σ|aᵢbᵢ| relative to max|a|·max|b|.
    let (d, sum) = a.iter().zip(&b).fold((0.0f64, 0.0f64), |(d, s), (x, y)| {
        let p = (x / ma) * (y / mb);
        (d + p, s + p.abs())
    });
    let ln_rest = ma.ln() + mb.ln() - 2.0 * ln_norm(&a);
    // ln s: scale_for(mb) lies in (½/mb, 1/mb], capped near 1e300 for tiny mb.
    let ln_s = if is_f64 {
        (-mb.ln()).min(1e300f64.ln() + std::f64::consts::LN_2)
    } else {
        0.0
    };
    let margin = 8f64.ln();
    let hi = sum.ln() + ln_rest + ln_s;
    let lo = (d.abs() - 1e-6 * sum).max(0.0).ln() + ln_rest + ln_s;
    let max = f64::MAX.ln();
    if hi < max - margin {
        SecondPred::of(applied)
    } else if lo > max + margin {
        SecondPred::of(overflow)
    } else {
        SecondPred {
            outcome: applied,
            also: Some(overflow),
            finding: None,
        }
    }
}

/// Steps 3 and 4 of [`gsam_second`] with finite norms `e^ln_n1`, `e^ln_n2`.
fn coefficient(alpha: f64, eps: f64, a: &[f64], b: &[f64], ln_n1: f64, ln_n2: f64) -> SecondPred {
    let (applied, overflow): (SecondOutcome, SecondOutcome) = (Ok(None), Err("NormOverflow"));
    let ma = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mb = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let ln_eps = eps.ln();
    // ln(‖g₁‖‖g₂‖ + ε), which may exceed ln f64::MAX: the core evaluates the cosine at scales
    // that bring the norms to order 1, so its denominator is infinite only when ε dwarfs the
    // norms by a factor of about f64::MAX, and then the coefficient is below overflow whether
    // cos is 0 or the true one (|α·cos·‖g₁‖/(‖g₂‖+ε)| ≤ α·‖g₁‖²‖g₂‖/ε² < f64::MAX). A zero
    // denominator or dot product gives cos = 0 (rule 3).
    let ln_den = ln_add(ln_n1 + ln_n2, ln_eps);
    if ln_den == f64::NEG_INFINITY || ma == 0.0 || mb == 0.0 || alpha == 0.0 {
        return SecondPred::of(applied);
    }
    // |⟨a,b⟩| relative to max|a|·max|b|, and Σ|aᵢbᵢ| for the rounding bound.
    let (d, s) = a.iter().zip(b).fold((0.0f64, 0.0f64), |(d, s), (x, y)| {
        let p = (x / ma) * (y / mb);
        (d + p, s + p.abs())
    });
    let ln_scale = ma.ln() + mb.ln();
    let ln_cos = d.abs().ln() + ln_scale - ln_den;
    // Error bound of the cosine: 1e-6 of Σ|aᵢbᵢ|/den, plus n+1 products lost below 2^-1074 at
    // the reduction's power-of-two scales (which bring the largest magnitudes to order 1, or
    // are 1): at most 2^-1068·max(1, max|a|·max|b|) each in true terms.
    let ln_lost = ((a.len() + 1) as f64).ln() - 1068.0 * std::f64::consts::LN_2 + ln_scale.max(0.0);
    let ln_delta = ln_add((1e-6 * s).ln() + ln_scale, ln_lost) - ln_den;
    let (lo, hi) = (ln_sub(ln_cos, ln_delta), ln_add(ln_cos, ln_delta));
    let ln_alpha = alpha.abs().ln();
    let ln_den2 = ln_add(ln_n2, ln_eps);
    let finite_at = |ln_c: f64| -> Option<bool> {
        if ln_c == f64::NEG_INFINITY {
            return Some(true);
        }
        let num = ln_alpha + ln_c.min(0.0) + ln_n1;
        match above_max(num) {
            Some(true) => return Some(false),
            None => return None,
            Some(false) => {}
        }
        if above_max(ln_den2) != Some(false) {
            // The quotient is at most α·cos·‖g₁‖/f64::MAX-ish: far below overflow.
            return Some(true);
        }
        above_max(num - ln_den2).map(|o| !o)
    };
    match (finite_at(lo), finite_at(hi)) {
        (Some(x), Some(y)) if x == y => {
            if x {
                SecondPred::of(applied)
            } else {
                SecondPred::of(overflow)
            }
        }
        _ => SecondPred {
            outcome: applied,
            also: Some(overflow),
            finding: None,
        },
    }
}

/// `ln ‖v‖`, scaled by the largest magnitude (no overflow or underflow); `-∞` for zero.
fn ln_norm(v: &[f64]) -> f64 {
    let m = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if m == 0.0 {
        return f64::NEG_INFINITY;
    }
    m.ln() + 0.5 * v.iter().map(|x| (x / m) * (x / m)).sum::<f64>().ln()
}

/// `ln(eˣ + eʸ)`.
fn ln_add(x: f64, y: f64) -> f64 {
    let (hi, lo) = if x >= y { (x, y) } else { (y, x) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln(max(eˣ − eʸ, 0))`.
fn ln_sub(x: f64, y: f64) -> f64 {
    if y >= x {
        return f64::NEG_INFINITY;
    }
    x + (-(y - x).exp()).ln_1p()
}

/// Whether `eˡ` is above `f64::MAX`, with a margin of `1e-9` in `l`: `None` inside it.
fn above_max(l: f64) -> Option<bool> {
    const MARGIN: f64 = 1e-9;
    let max = f64::MAX.ln();
    if l > max + MARGIN {
        Some(true)
    } else if l < max - MARGIN {
        Some(false)
    } else {
        None
    }
}
